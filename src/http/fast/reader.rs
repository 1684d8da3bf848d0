//! The fast path's request-head reader: `httparse` over the connection's own buffer, with the
//! header array on the stack, and the strict subset of requests the fast path answers itself.
//!
//! [`parse`] never changes the buffer and never allocates (but for a head of more than
//! [`MAX_HEADERS`] fields, which it only measures). What it returns is a decision:
//! read more ([`Parsed::Partial`]), hand the connection's bytes to Pingora as they are
//! ([`Parsed::HandOff`]), or a request the fast path can answer ([`Parsed::Request`]), described
//! by offsets into the buffer. Everything outside the subset is handed off, so Pingora's own
//! parser and framing rules decide it: another HTTP version, another method, `Transfer-Encoding`,
//! `Upgrade`, `Expect`, repeated or unusual `Content-Length`, `Host` or `Connection`, a request
//! target outside a conservative set of bytes (so `http::Uri` and Pingora see exactly the same
//! path and query), a body larger than the caller's bound, and any head `httparse` refuses.

/// Header fields parsed on the stack; a head with more is measured once more with Pingora's
/// limit and then handed off.
pub const MAX_HEADERS: usize = 32;

/// Pingora's own limit on header fields (`MAX_HEADERS` in pingora-core's HTTP/1 code).
pub const PINGORA_MAX_HEADERS: usize = 256;

/// Pingora's own limit on a request head (`MAX_HEADER_SIZE`): a partial head longer than this is
/// handed off, and Pingora refuses it.
pub const MAX_HEAD_BYTES: usize = 1_048_575;

/// Request targets longer than this are handed off (`http::Uri` stops at 64 KiB).
pub const MAX_TARGET_BYTES: usize = 32 * 1024;

/// The methods the fast path answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastMethod {
    Get,
    Head,
    Post,
}

/// A range of the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl Span {
    fn of(buf: &[u8], part: &[u8]) -> Span {
        Span {
            start: (part.as_ptr() as usize - buf.as_ptr() as usize) as u32,
            len: part.len() as u32,
        }
    }

    /// The range, for slicing.
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

/// One header field: name and value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub name: Span,
    pub value: Span,
}

/// A request head inside the fast path's subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub method: FastMethod,
    /// The request target (origin form: path and query).
    pub target: Span,
    /// Bytes of the target before `?`.
    pub path_len: usize,
    /// The head's length, blank line included: the body starts here.
    pub head_len: usize,
    /// The body's length (0 for GET and HEAD).
    pub content_length: usize,
    /// `Connection: close`.
    pub close: bool,
    fields: [Field; MAX_HEADERS],
    field_count: usize,
}

impl Head {
    /// The header fields, in order.
    pub fn fields(&self) -> &[Field] {
        &self.fields[..self.field_count]
    }

    /// The request target's bytes in `buf`.
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.target.range()]
    }

    /// The path (target before `?`), as text.
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        // The target is checked to be ASCII.
        std::str::from_utf8(&self.target(buf)[..self.path_len]).unwrap_or("")
    }

    /// The query (target after the first `?`), as text.
    pub fn query<'b>(&self, buf: &'b [u8]) -> Option<&'b str> {
        let target = self.target(buf);
        (self.path_len < target.len())
            .then(|| std::str::from_utf8(&target[self.path_len + 1..]).unwrap_or(""))
    }
}

/// What [`parse`] decided.
#[derive(Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // on the stack on purpose: no allocation per request
pub enum Parsed {
    /// The head is not complete yet: read more.
    Partial,
    /// Outside the subset: Pingora takes the bytes as they are.
    HandOff,
    /// A whole head inside the subset (the body may still be arriving).
    Request(Head),
}

/// Whether `b` may be in a request target: RFC 3986 unreserved, sub-delims, `:`, `@`, `/`, `?`
/// and `%`, which is visible ASCII but for ``"#<>[\]^`{|}``. Every one of them `http::Uri` keeps
/// as it is, so the path and query the fast path sees are the ones Pingora's `RequestHeader`
/// would give. Comparisons rather than a table, so that the check of a whole target vectorizes.
const fn target_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~')
        && !matches!(b, b'"' | b'#' | b'<' | b'>' | b'['..=b'^' | b'`' | b'{'..=b'}')
}

// Field values need no check of their own: httparse lets through only HTAB, visible ASCII and
// obs-text (0x80-0xFF), exactly what `http::HeaderValue` takes (the fuzz target checks it).

/// `Content-Length` as plain digits only (no sign, no list, no spaces); else `None`.
fn content_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add((d - b'0') as usize)
    })
}

/// Classifies the bytes at the start of `buf`. `max_body` bounds the `Content-Length` of a POST
/// the fast path takes; `wanted` is asked once the head is complete, with its path, whether the
/// fast path would answer it at all (a postback route): `false` hands the request off before
/// its fields are looked at.
pub fn parse(buf: &[u8], max_body: usize, wanted: impl FnOnce(&str) -> bool) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return partial(buf),
        Err(httparse::Error::TooManyHeaders) => return measure_large(buf),
        Err(_) => return Parsed::HandOff,
    };
    if req.version != Some(1) {
        return Parsed::HandOff;
    }
    let method = match req.method {
        Some("GET") => FastMethod::Get,
        Some("HEAD") => FastMethod::Head,
        Some("POST") => FastMethod::Post,
        _ => return Parsed::HandOff,
    };
    let Some(target) = req.path else {
        return Parsed::HandOff;
    };
    let tb = target.as_bytes();
    if tb.first() != Some(&b'/')
        || tb.len() > MAX_TARGET_BYTES
        // No early exit: one vectorized pass.
        || !tb.iter().fold(true, |ok, &b| ok & target_byte(b))
    {
        return Parsed::HandOff;
    }
    let path_len = tb.iter().position(|&b| b == b'?').unwrap_or(tb.len());
    if !wanted(&target[..path_len]) {
        return Parsed::HandOff;
    }

    let mut head = Head {
        method,
        target: Span::of(buf, tb),
        path_len,
        head_len,
        content_length: 0,
        close: false,
        fields: [Field::default(); MAX_HEADERS],
        field_count: 0,
    };
    let (mut length, mut hosts, mut connection) = (None, 0, false);
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let value = h.value;
        // The fields that matter, told apart by length first.
        let is = |known: &[u8]| name.len() == known.len() && name.eq_ignore_ascii_case(known);
        match name.len() {
            14 if is(b"content-length") => {
                if length.is_some() {
                    return Parsed::HandOff;
                }
                let Some(n) = content_length(value) else {
                    return Parsed::HandOff;
                };
                length = Some(n);
            }
            4 if is(b"host") => {
                hosts += 1;
                if hosts > 1 || value.contains(&b'@') {
                    return Parsed::HandOff;
                }
            }
            10 if is(b"connection") => {
                if connection {
                    return Parsed::HandOff;
                }
                connection = true;
                if value.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if !value.eq_ignore_ascii_case(b"keep-alive") {
                    return Parsed::HandOff;
                }
            }
            17 if is(b"transfer-encoding") => return Parsed::HandOff,
            7 if is(b"upgrade") => return Parsed::HandOff,
            6 if is(b"expect") => return Parsed::HandOff,
            14 if is(b"http2-settings") => return Parsed::HandOff,
            _ => {}
        }
        head.fields[i] = Field {
            name: Span::of(buf, name),
            value: Span::of(buf, value),
        };
        head.field_count = i + 1;
    }
    match (method, length) {
        (FastMethod::Get | FastMethod::Head, None | Some(0)) => {}
        (FastMethod::Post, Some(n)) if n <= max_body => head.content_length = n,
        _ => return Parsed::HandOff,
    }
    Parsed::Request(head)
}

fn partial(buf: &[u8]) -> Parsed {
    if buf.len() > MAX_HEAD_BYTES {
        Parsed::HandOff
    } else {
        Parsed::Partial
    }
}

/// A head with more fields than the stack holds: still partial (keep reading, under the head
/// deadline) or complete or broken (Pingora decides).
fn measure_large(buf: &[u8]) -> Parsed {
    let mut headers = vec![httparse::EMPTY_HEADER; PINGORA_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => partial(buf),
        _ => Parsed::HandOff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_bytes_are_rfc_3986_unreserved_sub_delims_and_the_path_and_query_marks() {
        let allowed: Vec<u8> = (0..=255u8).filter(|&b| target_byte(b)).collect();
        let mut want: Vec<u8> = (0..=255u8).filter(u8::is_ascii_alphanumeric).collect();
        want.extend_from_slice(b"-._~!$&'()*+,;=:@/?%");
        want.sort_unstable();
        assert_eq!(String::from_utf8(allowed), String::from_utf8(want));
    }

    fn head(buf: &[u8]) -> Head {
        match parse(buf, 1024, |_| true) {
            Parsed::Request(h) => h,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn a_pixel_is_taken() {
        let buf = b"GET /postback/v3/event/web/pv?a=1&b=%20 HTTP/1.1\r\nHost: x\r\nUser-Agent: u\r\n\r\nrest";
        let h = head(buf);
        assert_eq!(h.method, FastMethod::Get);
        assert_eq!(h.path(buf), "/postback/v3/event/web/pv");
        assert_eq!(h.query(buf), Some("a=1&b=%20"));
        assert_eq!(h.head_len, buf.len() - 4);
        assert_eq!(h.fields().len(), 2);
        assert_eq!(&buf[h.fields()[1].value.range()], b"u");
        assert!(!h.close);
    }

    #[test]
    fn partial_heads_wait() {
        assert_eq!(
            parse(b"GET /a HTTP/1.1\r\nHost: x\r\n", 0, |_| true),
            Parsed::Partial
        );
        assert_eq!(parse(b"", 0, |_| true), Parsed::Partial);
        assert_eq!(parse(b"GE", 0, |_| true), Parsed::Partial);
    }

    #[test]
    fn many_fields_are_measured_then_handed_off() {
        let mut buf = b"GET /a HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        assert_eq!(parse(&buf, 0, |_| true), Parsed::Partial);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(parse(&buf, 0, |_| true), Parsed::HandOff);
    }

    #[test]
    fn outside_the_subset_is_handed_off() {
        for buf in [
            &b"GET /a HTTP/1.0\r\n\r\n"[..],
            b"PUT /a HTTP/1.1\r\n\r\n",
            b"OPTIONS /a HTTP/1.1\r\n\r\n",
            b"GET http://x/a HTTP/1.1\r\n\r\n",
            b"GET /a\"b HTTP/1.1\r\n\r\n",
            b"GET /a#f HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"POST /a HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
            b"POST /a HTTP/1.1\r\nContent-Length: 0, 1\r\n\r\nx",
            b"POST /a HTTP/1.1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 2000\r\n\r\n",
            b"GET /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: u@a\r\n\r\n",
            b"GET /a HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET /a HTTP/1.1\r\nConnection: keep-alive, TE\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX : a\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(
                parse(buf, 1024, |_| true),
                Parsed::HandOff,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn unwanted_paths_are_handed_off_before_their_fields() {
        let buf = b"GET /app/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut asked = None;
        let got = parse(buf, 0, |p| {
            asked = Some(p.to_string());
            false
        });
        assert_eq!(got, Parsed::HandOff);
        assert_eq!(asked.as_deref(), Some("/app/x"));
    }

    #[test]
    fn posts_with_a_length_and_connection_close() {
        let buf = b"POST /td/web/t HTTP/1.1\r\nContent-Length: 2\r\nConnection: Close\r\n\r\n{}";
        let h = head(buf);
        assert_eq!(h.method, FastMethod::Post);
        assert_eq!(h.content_length, 2);
        assert!(h.close);
        assert_eq!(h.query(buf), None);
    }
}
