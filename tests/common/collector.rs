//! A real HTTP collector for the `http` sink: it takes NDJSON batches (gzipped or not) on any
//! path and keeps every record it was sent.
//!
//! Its records live in a [`Received`] that outlives the server, so a test can stop the collector
//! (its port then refuses connections, as a collector that is down does) and start it again on the
//! same port. With `fail_every = N`, every N-th POST is answered `503` without keeping its records.

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::Value;

use super::server::Server;

/// What the collector kept, shared across restarts.
#[derive(Default)]
pub struct Received {
    records: Mutex<Vec<Value>>,
    posts: AtomicU64,
    failed: AtomicU64,
    content_types: Mutex<Vec<String>>,
}

impl Received {
    /// A new, empty store.
    pub fn new() -> Arc<Received> {
        Arc::new(Received::default())
    }

    /// Every record kept so far, in arrival order.
    pub fn records(&self) -> Vec<Value> {
        self.records.lock().unwrap().clone()
    }

    /// How many POSTs were answered 503 on purpose.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// The `Content-Type` of each POST received.
    pub fn content_types(&self) -> Vec<String> {
        self.content_types.lock().unwrap().clone()
    }

    /// Waits (up to `limit`) until `pred` holds for the records, then returns them.
    pub fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let records = self.records();
            if pred(&records) {
                return records;
            }
            if start.elapsed() > limit {
                panic!(
                    "collector: gave up waiting for {what} after {limit:?}; {} records so far",
                    records.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The collector server; stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    _server: Server,
}

impl Collector {
    /// Starts a collector on `127.0.0.1:port` (0: a free port) keeping records in `received`.
    pub fn start(port: u16, received: Arc<Received>, fail_every: Option<u64>) -> Collector {
        let server = Server::bind("collector", port, move |req| {
            handle(received.clone(), fail_every, req)
        });
        Collector {
            addr: server.addr,
            _server: server,
        }
    }

    /// The collector's URL.
    pub fn url(&self) -> String {
        format!("http://{}/bulk", self.addr)
    }
}

async fn handle(
    received: Arc<Received>,
    fail_every: Option<u64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let gzip = req
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    let n = received.posts.fetch_add(1, Ordering::SeqCst) + 1;
    if fail_every.is_some_and(|every| n.is_multiple_of(every)) {
        received.failed.fetch_add(1, Ordering::SeqCst);
        return Ok(status(StatusCode::SERVICE_UNAVAILABLE));
    }
    let text = if gzip {
        let mut out = String::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut out)
            .is_err()
        {
            return Ok(status(StatusCode::BAD_REQUEST));
        }
        out
    } else {
        match String::from_utf8(body.to_vec()) {
            Ok(t) => t,
            Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
        }
    };
    let mut parsed = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(v) => parsed.push(v),
            Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
        }
    }
    received.content_types.lock().unwrap().push(content_type);
    received.records.lock().unwrap().extend(parsed);
    Ok(status(StatusCode::OK))
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
    *resp.status_mut() = code;
    resp
}
