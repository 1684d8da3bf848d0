//! The end-to-end harness: a recording origin server, the real proxy binary with its own
//! configuration and ports, and a raw HTTP/1.1 client. Each test builds its own, so tests run in
//! parallel. Every wait is bounded.
#![allow(dead_code)]

pub mod collector;
pub mod origin;
pub mod proxy;
pub mod raw;

use std::time::{SystemTime, UNIX_EPOCH};

// Not every test file uses every item.
#[allow(unused_imports)]
pub use origin::{big_body, Origin, Recorded};
#[allow(unused_imports)]
pub use proxy::{closed_port, Proxy, Settings, HASHED_KEY, KEY, OTHER_KEY};
#[allow(unused_imports)]
pub use raw::{request, RawConn, RawResponse};
use serde_json::Value;

/// The 43-byte transparent GIF every pixel answer carries.
pub const PIXEL_GIF: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// `Cache-Control` of every postback answer.
pub const NO_CACHE: &str = "no-cache, no-store, must-revalidate";

/// A client that follows no redirects and keeps no idle connections (a connection the proxy
/// closes is never reused by accident; keep-alive is tested with [`RawConn`]).
pub fn client() -> reqwest::Client {
    // reqwest is built with `rustls-no-provider` (for the http sink); tests only speak plain
    // HTTP but the builder wants a provider all the same.
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// UNIX seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A response read whole: status, headers, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub async fn from(resp: reqwest::Response) -> Resp {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("read the body").to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    /// The single value of header `name` (panics if repeated).
    pub fn header(&self, name: &str) -> Option<String> {
        let all = self.header_all(name);
        assert!(all.len() <= 1, "header {name} is repeated: {all:?}");
        all.into_iter().next()
    }

    /// Every value of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Sends `req` and reads the whole answer.
pub async fn send(req: reqwest::RequestBuilder) -> Resp {
    Resp::from(req.send().await.expect("request to the proxy failed")).await
}

/// GET `url` with the given headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = client().get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(req).await
}
