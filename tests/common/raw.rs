//! A minimal HTTP/1.1 client on one `std::net::TcpStream`, to see exactly what goes over a
//! connection: several requests on one connection (keep-alive), bodies sent in pieces, upgrades.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One response read from the connection.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        super::server::header_in(&self.headers, name)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One client connection.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects, with a 10 s read timeout so no read waits for ever.
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connect to the proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the proxy");
        self.stream.flush().unwrap();
    }

    /// Writes `bytes`; `false` if the peer has closed the connection.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Reads more bytes into the buffer; `false` on end of stream.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("reading from the proxy failed: {e}"),
            }
        }
    }

    /// Reads until the buffer holds `needle`, returning everything up to and including it.
    pub fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        loop {
            if let Some(i) = find(&self.buf, needle) {
                let rest = self.buf.split_off(i + needle.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            assert!(
                self.fill(),
                "connection closed before {:?} arrived; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    fn read_exact_n(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill(),
                "connection closed after {} of {n} body bytes",
                self.buf.len()
            );
        }
        let rest = self.buf.split_off(n);
        std::mem::replace(&mut self.buf, rest)
    }

    /// Reads the head of a response: status and headers.
    pub fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        let head = self.read_until(b"\r\n\r\n");
        let text = String::from_utf8(head).expect("response head is not UTF-8");
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap();
        assert!(
            version.starts_with("HTTP/1."),
            "bad status line {status_line:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line without a colon");
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        (status, headers)
    }

    /// Reads one whole response. `head_request`: the request was HEAD (no body follows).
    pub fn read_response(&mut self, head_request: bool) -> RawResponse {
        let (status, headers) = self.read_head();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v): &(String, String)| v.clone())
        };
        let body = if head_request || status == 204 || status == 304 || status < 200 {
            Vec::new()
        } else if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked()
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().expect("bad Content-Length");
            self.read_exact_n(len)
        } else {
            while self.fill() {}
            std::mem::take(&mut self.buf)
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.read_until(b"\r\n");
            let size_text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let l = self.read_until(b"\r\n");
                    if l == b"\r\n" {
                        return body;
                    }
                }
            }
            body.extend(self.read_exact_n(size));
            self.read_exact_n(2);
        }
    }

    /// `true` when the server has closed the connection (reads end of stream within 10 s).
    pub fn closed_by_peer(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
            Err(_) => false,
        }
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A request with `Host`, the given extra header lines and body (adds `Content-Length` when the
/// body is not empty and no such header is given).
pub fn request(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    let has_len = headers.iter().any(|h| {
        let h = h.to_ascii_lowercase();
        h.starts_with("content-length:") || h.starts_with("transfer-encoding:")
    });
    if !body.is_empty() && !has_len {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A WebSocket upgrade request (`GET target` with `Connection: Upgrade`, `Upgrade: websocket`
/// and the RFC 6455 sample key).
pub fn websocket_upgrade(target: &str) -> Vec<u8> {
    request(
        "GET",
        target,
        &[
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ],
        b"",
    )
}

/// Ambiguous framings, each hiding a second request behind the first (name, framing headers,
/// body): CL.TE and TE.CL with every spelling of `Transfer-Encoding` proxies disagree on, and the
/// rest of the request-smuggling catalogue. `s` is the smuggled request.
pub fn smuggling_cases(s: &str) -> Vec<(&'static str, Vec<String>, Vec<u8>)> {
    let cl_te_body = format!("0\r\n\r\n{s}");
    let te_cl_body = format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
    let cl = |body: &str| format!("Content-Length: {}", body.len());
    let te_variants = [
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: CHUNKED",
        "Transfer-Encoding:\tchunked",
        "Transfer-Encoding: chunked ",
        "Transfer-Encoding: identity, chunked",
        "transfer-encoding: chunked",
    ];
    let mut cases: Vec<(&'static str, Vec<String>, Vec<u8>)> = Vec::new();
    for te in te_variants {
        cases.push((
            "CL.TE",
            vec![cl(&cl_te_body), te.to_string()],
            cl_te_body.clone().into_bytes(),
        ));
        cases.push((
            "TE.CL",
            vec![te.to_string(), "Content-Length: 4".to_string()],
            te_cl_body.clone().into_bytes(),
        ));
    }
    cases.extend([
        (
            "two Content-Lengths",
            vec!["Content-Length: 0".to_string(), cl(s)],
            s.as_bytes().to_vec(),
        ),
        (
            "two Content-Lengths, reversed",
            vec![cl(s), "Content-Length: 0".to_string()],
            s.as_bytes().to_vec(),
        ),
        (
            "Content-Length list",
            vec![format!("Content-Length: 0, {}", s.len())],
            s.as_bytes().to_vec(),
        ),
        (
            "Content-Length with a sign",
            vec![format!("Content-Length: +{}", s.len())],
            s.as_bytes().to_vec(),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            vec![
                "Transfer-Encoding: chunked, identity".to_string(),
                cl(&cl_te_body),
            ],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "Transfer-Encoding: chunked, identity alone",
            vec!["Transfer-Encoding: chunked, identity".to_string()],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "Transfer-Encoding: xchunked",
            vec!["Transfer-Encoding: xchunked".to_string(), cl(&cl_te_body)],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "Transfer-Encoding: \"chunked\"",
            vec!["Transfer-Encoding: \"chunked\"".to_string()],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "two Transfer-Encodings, the last not chunked",
            vec![
                "Transfer-Encoding: chunked".to_string(),
                "Transfer-Encoding: x".to_string(),
            ],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "space before the colon",
            vec!["Transfer-Encoding : chunked".to_string(), cl(&cl_te_body)],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "folded Transfer-Encoding",
            vec![
                "X-Pad: 1".to_string(),
                " Transfer-Encoding: chunked".to_string(),
                cl(&cl_te_body),
            ],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            vec!["Transfer-Encoding: chunked".to_string()],
            cl_te_body.clone().into_bytes(),
        ),
        (
            "bad chunk size",
            vec!["Transfer-Encoding: chunked".to_string()],
            format!("1x\r\nA\r\n0\r\n\r\n{s}").into_bytes(),
        ),
        (
            "chunk size overflow",
            vec!["Transfer-Encoding: chunked".to_string()],
            format!("10000000000000001\r\nA\r\n0\r\n\r\n{s}").into_bytes(),
        ),
    ]);
    cases
}

/// Reads from `stream` into `out` until it is quiet for `idle` (or 15 s pass); `true` when the
/// peer closed or reset the connection meanwhile.
pub fn read_until_quiet(
    stream: &mut std::net::TcpStream,
    idle: std::time::Duration,
    out: &mut Vec<u8>,
) -> bool {
    use std::io::{ErrorKind, Read};
    stream.set_read_timeout(Some(idle)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut chunk = vec![0u8; 64 * 1024];
    while std::time::Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            // Reset: closed, with whatever had arrived.
            Err(_) => return true,
        }
    }
    false
}

/// A request head plus body, exactly as given (no header is added but `Host`).
pub fn raw_request(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}
