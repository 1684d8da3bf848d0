//! The fast path's answers, byte for byte what Pingora writes for the same [`Reply`].
//!
//! Every answer is serialized by Pingora's own `ResponseHeader` exactly as
//! `PostbackProxy::write_reply` builds it, with the `Date` and `Connection` fields Pingora's
//! HTTP/1 session adds (`prepare_response_header`). The two answers nearly every postback gets,
//! the pixel and `{}`, are serialized once at start-up around a placeholder date; per request
//! only the `Date` goes between the halves: the same IMF-fixdate text as Pingora's, formatted
//! once a second per thread from the coarse clock (`clock.rs`).

use std::cell::RefCell;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;

use crate::clock::coarse_unix_millis;
use crate::postback::reply::Reply;

thread_local! {
    /// This thread's `Date` text and the UNIX second it is for.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Calls `f` with the `Date` field's value for now (`Tue, 01 Dec 2026 10:00:00 GMT`).
fn with_date<R>(f: impl FnOnce(&str) -> R) -> R {
    let secs = coarse_unix_millis() / 1000;
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
        }
        f(text)
    })
}

/// A date of the same length as every real one, to split pre-built answers around.
const PLACEHOLDER_DATE: &str = "Thu, 01 Jan 1970 00:00:00 GMT";

/// Serializes `reply` (with the CORS fields `cors`) into `out` as Pingora would: status line,
/// fields, `Content-Length` (but for 204), `Date`, `Connection`, and the body unless `head`.
pub fn serialize(
    reply: &Reply,
    cors: &[(&'static str, String)],
    keepalive: bool,
    head: bool,
    date: &str,
    out: &mut Vec<u8>,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(reply.status, Some(reply.headers.len() + cors.len() + 1))?;
    let reply_headers = reply.headers.iter().map(|(n, v)| (*n, &**v));
    for (name, value) in reply_headers.chain(cors.iter().map(|(n, v)| (*n, v.as_str()))) {
        resp.append_header(name, value)?;
    }
    if reply.status != 204 {
        resp.insert_header(header::CONTENT_LENGTH, reply.body.len().to_string())?;
    }
    resp.insert_header(header::DATE, date)?;
    resp.insert_header(
        header::CONNECTION,
        if keepalive { "keep-alive" } else { "close" },
    )?;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.status.as_str().as_bytes());
    out.push(b' ');
    if let Some(reason) = resp.get_reason_phrase() {
        out.extend_from_slice(reason.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    resp.header_to_h1_wire(out);
    out.extend_from_slice(b"\r\n");
    if !head && reply.status != 204 && reply.status != 304 {
        out.extend_from_slice(&reply.body);
    }
    Ok(())
}

/// One answer serialized ahead: the bytes before the date, and after it per keep-alive.
struct Prebuilt {
    reply: Reply,
    before_date: Vec<u8>,
    after_date_keepalive: Vec<u8>,
    after_date_close: Vec<u8>,
    body: Bytes,
}

impl Prebuilt {
    fn new(reply: Reply) -> pingora::Result<Prebuilt> {
        let split = |keepalive: bool| -> pingora::Result<(Vec<u8>, Vec<u8>)> {
            let mut out = Vec::new();
            serialize(&reply, &[], keepalive, true, PLACEHOLDER_DATE, &mut out)?;
            let at = out
                .windows(PLACEHOLDER_DATE.len())
                .position(|w| w == PLACEHOLDER_DATE.as_bytes())
                .ok_or_else(|| {
                    pingora::Error::explain(pingora::ErrorType::InternalError, "no Date field")
                })?;
            let after = out.split_off(at + PLACEHOLDER_DATE.len());
            out.truncate(at);
            Ok((out, after))
        };
        let (before_date, after_date_keepalive) = split(true)?;
        let (before_close, after_date_close) = split(false)?;
        debug_assert_eq!(before_date, before_close);
        Ok(Prebuilt {
            body: reply.body.clone(),
            reply,
            before_date,
            after_date_keepalive,
            after_date_close,
        })
    }

    fn write(&self, keepalive: bool, head: bool, date: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.before_date);
        out.extend_from_slice(date);
        out.extend_from_slice(if keepalive {
            &self.after_date_keepalive
        } else {
            &self.after_date_close
        });
        if !head {
            out.extend_from_slice(&self.body);
        }
    }
}

/// The answers the fast path writes.
pub struct Answers {
    prebuilt: [Prebuilt; 2],
}

impl Answers {
    /// Serializes the pixel and `{}` ahead.
    pub fn new() -> pingora::Result<Answers> {
        Ok(Answers {
            prebuilt: [
                Prebuilt::new(Reply::pixel())?,
                Prebuilt::new(Reply::json_ok())?,
            ],
        })
    }

    /// Appends the answer to `out`: pre-built when `reply` is one of those and has no CORS
    /// fields, else serialized now.
    pub fn write(
        &self,
        reply: &Reply,
        cors: &[(&'static str, String)],
        keepalive: bool,
        head: bool,
        out: &mut Vec<u8>,
    ) -> pingora::Result<()> {
        with_date(|date| {
            if cors.is_empty() {
                if let Some(p) = self.prebuilt.iter().find(|p| p.reply == *reply) {
                    p.write(keepalive, head, date.as_bytes(), out);
                    return Ok(());
                }
            }
            serialize(reply, cors, keepalive, head, date, out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prebuilt_and_serialized_answers_are_the_same_bytes() {
        let answers = Answers::new().unwrap();
        for reply in [Reply::pixel(), Reply::json_ok()] {
            for keepalive in [true, false] {
                for head in [true, false] {
                    // Both in the same second: a second that ended between the two answers
                    // is tried again.
                    let (fast, slow) = loop {
                        let (mut fast, mut slow) = (Vec::new(), Vec::new());
                        let second = coarse_unix_millis() / 1000;
                        answers
                            .write(&reply, &[], keepalive, head, &mut fast)
                            .unwrap();
                        with_date(|date| serialize(&reply, &[], keepalive, head, date, &mut slow))
                            .unwrap();
                        if coarse_unix_millis() / 1000 == second {
                            break (fast, slow);
                        }
                    };
                    assert_eq!(
                        String::from_utf8_lossy(&fast),
                        String::from_utf8_lossy(&slow)
                    );
                }
            }
        }
    }

    #[test]
    fn the_date_is_pingoras_text_for_this_second() {
        let ours = with_date(str::to_owned);
        let pingora = pingora::protocols::http::date::get_cached_date();
        let pingora = pingora.to_str().unwrap();
        // The coarse clock may be a tick behind: at most the previous second's text.
        let earlier =
            httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(1));
        assert!(ours == pingora || ours == earlier, "{ours} / {pingora}");
        assert_eq!(ours.len(), PLACEHOLDER_DATE.len());
    }

    #[test]
    fn the_pixel_answer() {
        let mut out = Vec::new();
        serialize(
            &Reply::pixel(),
            &[],
            true,
            false,
            PLACEHOLDER_DATE,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 43\r\n"), "{text}");
        assert!(
            text.contains("\r\nConnection: keep-alive\r\n\r\nGIF89a"),
            "{text}"
        );
    }
}
