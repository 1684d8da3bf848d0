//! The answers the proxy gives to postbacks, as plain data: status, headers and body bytes.

use std::borrow::Cow;

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

/// A header field of a [`Reply`]; fixed values are borrowed.
pub type ReplyHeader = (&'static str, Cow<'static, str>);

/// An answer to write: status, headers and body. `Content-Length` is added when written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The fixed fields of each kind of answer are a shared static list: a pixel's answer
    /// allocates nothing. Adding one (`to_mut().push`) copies the list first.
    pub headers: Cow<'static, [ReplyHeader]>,
    pub body: Bytes,
}

static NO_CACHE_ONLY: [ReplyHeader; 1] = [("Cache-Control", Cow::Borrowed(NO_CACHE))];
static GIF: [ReplyHeader; 2] = [
    ("Cache-Control", Cow::Borrowed(NO_CACHE)),
    ("Content-Type", Cow::Borrowed("image/gif")),
];
static JSON: [ReplyHeader; 2] = [
    ("Cache-Control", Cow::Borrowed(NO_CACHE)),
    ("Content-Type", Cow::Borrowed("application/json")),
];

impl Reply {
    fn new(status: u16, headers: &'static [ReplyHeader], body: Bytes) -> Reply {
        Reply {
            status,
            headers: Cow::Borrowed(headers),
            body,
        }
    }

    /// 200 with the GIF.
    pub fn pixel() -> Reply {
        Reply::new(200, &GIF, Bytes::from_static(PIXEL_GIF))
    }

    /// `status` with a JSON `body`.
    pub fn json(status: u16, body: Bytes) -> Reply {
        Reply::new(status, &JSON, body)
    }

    /// 200 with `{}`.
    pub fn json_ok() -> Reply {
        Reply::new(200, &JSON, Bytes::from_static(b"{}"))
    }

    /// 302 to `location`, with an empty body.
    pub fn redirect(location: String) -> Reply {
        let mut r = Reply::new(302, &NO_CACHE_ONLY, Bytes::new());
        r.headers.to_mut().push(("Location", Cow::Owned(location)));
        r
    }

    /// 204 for a CORS preflight; the CORS headers are added by the caller.
    pub fn no_content() -> Reply {
        Reply::new(204, &NO_CACHE_ONLY, Bytes::new())
    }

    /// The JSON error answer for `refusal`, with `Allow` on 405 and `Retry-After` on 503.
    pub fn refused(refusal: &Refusal) -> Reply {
        let body = serde_json::json!({"error": refusal.kind.code(), "message": refusal.message});
        let mut r = Reply::new(refusal.kind.status(), &JSON, Bytes::from(body.to_string()));
        match refusal.kind {
            ErrorKind::MethodNotAllowed => r
                .headers
                .to_mut()
                .push(("Allow", Cow::Borrowed("GET, HEAD, POST, OPTIONS"))),
            ErrorKind::Unavailable | ErrorKind::TooManyRequests => {
                r.headers.to_mut().push(("Retry-After", Cow::Borrowed("1")))
            }
            _ => {}
        }
        r
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.to_mut().push((name, Cow::Owned(value)));
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
