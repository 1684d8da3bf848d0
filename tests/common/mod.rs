//! The end-to-end harness every test file uses: the real proxy binary with its own configuration
//! and ports, retried on other ports when another process took one, and trusted only once it
//! holds its listeners itself ([`proxy`]); the peers the tests stand up, a recording origin
//! ([`origin`]) and an `http` sink collector ([`collector`]), on one HTTP server ([`server`]);
//! free ports, child processes killed when dropped and bounded waits ([`process`]); a raw
//! HTTP/1.1 client ([`raw`]); and the reqwest client and answers below. Each test builds its own,
//! so tests run in parallel. Every wait is bounded.
//!
//! Test files are named after the contract's sections (`../shared/SPEC.md`): `command_line.rs`
//! (1, 2), `postback_requests.rs` (3, 4), `delivery.rs`, `sink_kafka.rs`, `sink_fluent.rs` (4),
//! `passthrough.rs` (5), `deploy.rs` (6), `identity.rs` (7), `browser.rs` (3, 7); across sections: `frontdoor.rs`
//! (TLS, health checks, upgrades) and `adversarial.rs` (hostile input).
#![allow(dead_code)]

pub mod browser;
pub mod collector;
pub mod origin;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod server;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

// Not every test file uses every item.
#[allow(unused_imports)]
pub use origin::{big_body, Origin, Recorded};
#[allow(unused_imports)]
pub use process::{eventually, free_port, Proc};
#[allow(unused_imports)]
pub use proxy::{closed_port, Proxy, Settings, HASHED_KEY, KEY, OTHER_KEY};
#[allow(unused_imports)]
pub use raw::{
    raw_request, read_until_quiet, request, smuggling_cases, websocket_upgrade, RawConn,
    RawResponse,
};
use serde_json::Value;

/// The 43-byte transparent GIF every pixel answer carries: the crate's own constant.
// The one place the tests name a path inside the crate for it: when the module moves, change
// this line only.
#[allow(unused_imports)]
pub use postback_proxy::postback::reply::PIXEL_GIF;

/// How long a test waits for what the proxy does in the background (deliveries, retries,
/// imports) before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// `Cache-Control` of every postback answer.
pub const NO_CACHE: &str = "no-cache, no-store, must-revalidate";

/// A client that follows no redirects and keeps no idle connections (a connection the proxy
/// closes is never reused by accident; keep-alive is tested with [`RawConn`]).
pub fn client() -> reqwest::Client {
    client_builder().build().unwrap()
}

/// The builder of [`client`], to add to (a timeout, TLS roots).
pub fn client_builder() -> reqwest::ClientBuilder {
    // reqwest is built with `rustls-no-provider` (for the http sink); the builder wants a
    // provider installed, the one the proxy installs for itself. The one place the tests name
    // this path inside the crate: when the module moves, change this line only.
    postback_proxy::http::tls::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
}

/// An origin and the harness proxy in front of it, with the harness configuration.
pub fn harness() -> (Origin, Proxy) {
    origin_and_proxy(|_| {})
}

/// An origin and the harness proxy in front of it, its [`Settings`] changed by `configure`
/// first.
pub fn origin_and_proxy(configure: impl FnOnce(&mut Settings)) -> (Origin, Proxy) {
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    configure(&mut settings);
    let proxy = Proxy::start_with(settings);
    (origin, proxy)
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

    /// Asserts the answer is `status` with a short `text/plain` body (the proxy's own error
    /// answers: 502, 504).
    pub fn assert_short_text(&self, status: u16) {
        assert_eq!(self.status, status, "{:?}", self.text());
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("text/plain"),
            "Content-Type of the {status}: {ct:?}"
        );
        assert!(
            !self.body.is_empty() && self.body.len() < 200,
            "the {status} body should be a short text: {:?}",
            self.text()
        );
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

/// Asserts that `text` contains every one of `needles`; `what` names the text.
pub fn assert_contains_all(text: &str, needles: &[&str], what: &str) {
    for needle in needles {
        assert!(text.contains(needle), "{what} lacks {needle:?}:\n{text}");
    }
}

/// GET `url` with the given headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = client().get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(req).await
}

/// The answer lets the configured origin `https://www.example.com` read it, with credentials.
pub fn assert_cors_allowed(r: &Resp) {
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://www.example.com")
    );
    assert_eq!(
        r.header("access-control-allow-credentials").as_deref(),
        Some("true")
    );
}
