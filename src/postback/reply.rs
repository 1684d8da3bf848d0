//! The answers the proxy gives to postbacks, as plain data: status, headers and body bytes.

use bytes::Bytes;

/// The 43-byte transparent 1x1 GIF.
pub const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// `Cache-Control` of every postback answer.
pub const NO_CACHE: &str = "no-cache, no-store, must-revalidate";

/// The kinds of refusal, each with its status and the `error` word of the JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    PayloadTooLarge,
    UriTooLong,
    UnsupportedMediaType,
    TooManyRequests,
    Unavailable,
}

impl ErrorKind {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UriTooLong => 414,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::TooManyRequests => 429,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The `error` field of the JSON body, and the `outcome` label of the request metric.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::TooManyRequests => "too_many_requests",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

/// A postback that was refused: the kind and a message for the client (never containing the key).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    /// A refusal of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

/// An answer to write: status, headers and body. `Content-Length` is added when written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Reply {
    fn new(status: u16, content_type: Option<&str>, body: Bytes) -> Reply {
        // Room for a `Set-Cookie` too.
        let mut headers = Vec::with_capacity(3);
        headers.push(("Cache-Control", NO_CACHE.to_owned()));
        if let Some(ct) = content_type {
            headers.push(("Content-Type", ct.to_owned()));
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    /// 200 with the GIF.
    pub fn pixel() -> Reply {
        Reply::new(200, Some("image/gif"), Bytes::from_static(PIXEL_GIF))
    }

    /// 200 with `{}`.
    pub fn json_ok() -> Reply {
        Reply::new(200, Some("application/json"), Bytes::from_static(b"{}"))
    }

    /// 302 to `location`, with an empty body.
    pub fn redirect(location: String) -> Reply {
        let mut r = Reply::new(302, None, Bytes::new());
        r.headers.push(("Location", location));
        r
    }

    /// 204 for a CORS preflight; the CORS headers are added by the caller.
    pub fn no_content() -> Reply {
        Reply::new(204, None, Bytes::new())
    }

    /// The JSON error answer for `refusal`, with `Allow` on 405 and `Retry-After` on 503.
    pub fn refused(refusal: &Refusal) -> Reply {
        let body = serde_json::json!({"error": refusal.kind.code(), "message": refusal.message});
        let mut r = Reply::new(
            refusal.kind.status(),
            Some("application/json"),
            Bytes::from(body.to_string()),
        );
        match refusal.kind {
            ErrorKind::MethodNotAllowed => {
                r.headers.push(("Allow", "GET, HEAD, POST, OPTIONS".into()))
            }
            ErrorKind::Unavailable | ErrorKind::TooManyRequests => {
                r.headers.push(("Retry-After", "1".into()))
            }
            _ => {}
        }
        r
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gif_is_43_bytes() {
        assert_eq!(PIXEL_GIF.len(), 43);
        assert_eq!(&PIXEL_GIF[..6], b"GIF89a");
    }

    #[test]
    fn error_body() {
        let r = Reply::refused(&Refusal::new(ErrorKind::Unavailable, "buffer \"full\""));
        assert_eq!(r.status, 503);
        assert_eq!(
            &r.body[..],
            br#"{"error":"unavailable","message":"buffer \"full\""}"#
        );
        assert!(r.headers.contains(&("Retry-After", "1".into())));
        assert!(r.headers.contains(&("Cache-Control", NO_CACHE.into())));
    }
}
