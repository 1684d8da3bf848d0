//! A real HTTP/1.1 origin server on an ephemeral loopback port, recording every request it gets.
//!
//! It runs on its own thread with its own tokio runtime, so tests of any flavour can use it. Every
//! answer carries `x-origin: yes`. Paths:
//!
//! * anything else: 200, `application/json`, echoing method, path+query, headers and body.
//! * `/status/{code}`: that status, `text/plain`, two `Set-Cookie`s and `x-custom-resp`.
//! * `/big?n=BYTES[&len=1]`: a large body ([`big_body`]) streamed in 64 KiB chunks; chunked
//!   unless `len=1`, which adds `Content-Length`.
//! * `/hold`: sends `first\n`, waits until [`Origin::release`] (or 30 s), then sends `second\n`.
//! * `/slow?ms=N`: waits N ms, then echoes.
//! * `/ws` with `Upgrade`: answers 101 and then echoes every byte read, prefixed with `echo:`.
//!
//! The request body is recorded frame by frame as it arrives, so a test can see a body that is
//! still being sent (`complete == false`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the origin received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, exactly as sent on the request line.
    pub uri: String,
    /// Every header in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body bytes received so far.
    pub body: Vec<u8>,
    /// The whole body has arrived.
    pub complete: bool,
}

impl Recorded {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct State {
    requests: Mutex<Vec<Recorded>>,
    release: tokio::sync::Notify,
}

/// The origin server; stops when dropped.
pub struct Origin {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

type Body = BoxBody<Bytes, Infallible>;

/// The deterministic content of `/big`: byte `i` is `i % 251`.
pub fn big_body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

impl Origin {
    /// Starts the origin on `127.0.0.1:0`.
    pub fn start() -> Origin {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind origin");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            release: tokio::sync::Notify::new(),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("origin-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let st = st.clone();
                                tokio::spawn(async move {
                                    let service = service_fn(move |req| handle(st.clone(), req));
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), service)
                                        .with_upgrades()
                                        .await;
                                });
                            }
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .unwrap();
        Origin {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`, for `upstream.peers`.
    pub fn peer(&self) -> String {
        self.addr.to_string()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until some request satisfies `pred`, and returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.requests().into_iter().find(&pred) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "the origin never received {what}; it received {:#?}",
                    self.requests()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The only complete request with path+query `uri`, waiting for it (up to 10 s).
    pub fn request_to(&self, uri: &str) -> Recorded {
        let r = self.wait_for(uri, |r| r.uri == uri && r.complete);
        let n = self.requests().iter().filter(|r| r.uri == uri).count();
        assert_eq!(n, 1, "the origin received {uri} {n} times");
        r
    }

    /// Lets a held `/hold` answer continue.
    pub fn release(&self) {
        self.state.release.notify_waiters();
        self.state.release.notify_one();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A body fed through a channel: a streamed answer.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn query_param(uri: &hyper::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|p| {
        let (n, v) = p.split_once('=').unwrap_or((p, ""));
        (n == name).then(|| v.to_string())
    })
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let uri = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_string());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let index = {
        let mut all = state.requests.lock().unwrap();
        all.push(Recorded {
            method: req.method().to_string(),
            uri: uri.clone(),
            headers: headers.clone(),
            body: Vec::new(),
            complete: false,
        });
        all.len() - 1
    };
    let path = req.uri().path().to_string();

    if path == "/ws" && req.headers().contains_key(hyper::header::UPGRADE) {
        state.requests.lock().unwrap()[index].complete = true;
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 4096];
            loop {
                let n = match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&buf[..n]);
                if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
                    break;
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .header("x-origin", "yes")
            .body(full(Bytes::new()))
            .unwrap();
        return Ok(resp);
    }

    // Read the body frame by frame, recording it as it arrives.
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            state.requests.lock().unwrap()[index]
                .body
                .extend_from_slice(data);
        }
    }
    let recorded = {
        let mut all = state.requests.lock().unwrap();
        all[index].complete = true;
        all[index].clone()
    };

    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        let resp = Response::builder()
            .status(code)
            .header("content-type", "text/plain")
            .header("x-origin", "yes")
            .header("x-custom-resp", "Value  With Spaces")
            .header("set-cookie", "a=1; Path=/")
            .header("set-cookie", "b=2; Path=/")
            .body(full(format!("status {code} from origin\n")))
            .unwrap();
        return Ok(resp);
    }
    if path == "/big" {
        let n: usize = query_param(&recorded_uri(&recorded), "n")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4_000_000);
        let with_len = query_param(&recorded_uri(&recorded), "len").as_deref() == Some("1");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let data = big_body(n);
            for chunk in data.chunks(64 * 1024) {
                if tx.send(Bytes::copy_from_slice(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let mut builder = Response::builder()
            .status(200)
            .header("content-type", "application/octet-stream")
            .header("x-origin", "yes");
        if with_len {
            builder = builder.header("content-length", n.to_string());
        }
        return Ok(builder.body(ChannelBody(rx).boxed()).unwrap());
    }
    if path == "/hold" {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let st = state.clone();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"first\n")).await;
            let _ = tokio::time::timeout(Duration::from_secs(30), st.release.notified()).await;
            let _ = tx.send(Bytes::from_static(b"second\n")).await;
        });
        let resp = Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("x-origin", "yes")
            .body(ChannelBody(rx).boxed())
            .unwrap();
        return Ok(resp);
    }
    if path == "/slow" {
        let ms: u64 = query_param(&recorded_uri(&recorded), "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let echo = serde_json::json!({
        "method": recorded.method,
        "uri": recorded.uri,
        "headers": recorded.headers.iter().map(|(n, v)| vec![n.clone(), v.clone()]).collect::<Vec<_>>(),
        "body_len": recorded.body.len(),
        "body": String::from_utf8_lossy(&recorded.body),
    });
    let resp = Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("x-origin", "yes")
        .body(full(echo.to_string()))
        .unwrap();
    Ok(resp)
}

fn recorded_uri(r: &Recorded) -> hyper::Uri {
    r.uri.parse().unwrap_or_default()
}
