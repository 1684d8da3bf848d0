//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/sinks`, and the live view (`/`,
//! `/events/recent`, `/events/stream`). Bind it to a private address only.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, StatusCode};
use log::debug;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::live::LiveView;
use crate::delivery::Delivery;
use crate::metrics;

/// The live view's page: HTML, CSS and script in one file, built into the binary.
const PAGE: &str = include_str!("live/page.html");

/// How often an idle event stream sends a comment, so proxies and browsers keep it open.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// The most an event stream gathers into one write.
const STREAM_CHUNK: usize = 64 * 1024;

/// The event that tells a viewer it fell behind by `n` events.
fn missed(n: u64) -> String {
    format!("data: {{\"kind\":\"missed\",\"count\":{n}}}\n\n")
}

/// Answers the admin endpoints.
pub struct AdminApp {
    delivery: Arc<Delivery>,
    live: Arc<LiveView>,
}

/// A whole answer: status, content type, body.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
}

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        status,
        content_type,
        body: body.into(),
    }
}

impl AdminApp {
    /// The admin endpoints, reporting on `delivery` and showing `live`.
    pub(crate) fn new(delivery: Arc<Delivery>, live: Arc<LiveView>) -> Self {
        AdminApp { delivery, live }
    }

    /// The answer to every admin request but the event stream.
    fn respond(&self, path: &str) -> Answer {
        match path {
            "/" => answer(StatusCode::OK, "text/html; charset=utf-8", PAGE),
            "/metrics" => {
                self.delivery.update_gauges();
                answer(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics::render(),
                )
            }
            "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                if self.delivery.ready() {
                    answer(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: a buffer is full or the proxy is shutting down\n",
                    )
                }
            }
            "/sinks" => match serde_json::to_vec(&self.delivery.sinks_status()) {
                Ok(json) => answer(StatusCode::OK, "application/json", json),
                Err(_) => answer(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "\n"),
            },
            "/events/recent" => answer(StatusCode::OK, "application/json", self.live.recent_json()),
            _ => answer(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    /// Streams events as Server-Sent Events until the viewer goes away or the server stops.
    /// A viewer that falls behind gets a `missed` event with the count, never a slower proxy.
    async fn stream(&self, http: &mut ServerSession, shutdown: &ShutdownWatch) {
        let mut events = self.live.subscribe();
        let mut head = match ResponseHeader::build(200, Some(4)) {
            Ok(h) => h,
            Err(_) => return,
        };
        let _ = head.insert_header(header::CONTENT_TYPE, "text/event-stream");
        let _ = head.insert_header(header::CACHE_CONTROL, "no-store");
        http.set_keepalive(None);
        if http.write_response_header(Box::new(head)).await.is_err() {
            return;
        }
        let hello = "retry: 1000\nevent: hello\ndata: {}\n\n";
        if http
            .write_response_body(Bytes::from(hello), false)
            .await
            .is_err()
        {
            return;
        }
        let mut shutdown = shutdown.clone();
        loop {
            let mut chunk = tokio::select! {
                event = events.recv() => match event {
                    Ok(json) => format!("data: {json}\n\n"),
                    Err(RecvError::Lagged(n)) => missed(n),
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(HEARTBEAT) => ": keep-alive\n\n".to_string(),
                _ = shutdown.changed() => return,
            };
            // Whatever else is ready goes in the same write: one syscall for a burst, not one
            // per event.
            while chunk.len() < STREAM_CHUNK {
                match events.try_recv() {
                    Ok(json) => {
                        chunk.push_str("data: ");
                        chunk.push_str(&json);
                        chunk.push_str("\n\n");
                    }
                    Err(TryRecvError::Lagged(n)) => chunk.push_str(&missed(n)),
                    Err(_) => break,
                }
            }
            if http
                .write_response_body(Bytes::from(chunk), false)
                .await
                .is_err()
            {
                debug!("event stream viewer went away");
                return;
            }
        }
    }
}

#[async_trait]
impl HttpServerApp for AdminApp {
    /// Runs for every admin connection's request.
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(http.read_request().await, Ok(true)) {
            return None;
        }
        let _ = http.drain_request_body().await;
        let path = http.req_header().uri.path().to_owned();
        if path == "/events/stream" {
            self.stream(&mut http, shutdown).await;
            return None;
        }
        let a = self.respond(&path);
        http.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let mut head = ResponseHeader::build(a.status, Some(3)).ok()?;
        head.insert_header(header::CONTENT_TYPE, a.content_type)
            .ok()?;
        head.insert_header(header::CONTENT_LENGTH, a.body.len())
            .ok()?;
        head.insert_header(header::CACHE_CONTROL, "no-store").ok()?;
        http.write_response_header(Box::new(head)).await.ok()?;
        http.write_response_body(Bytes::from(a.body), true)
            .await
            .ok()?;
        let settings = HttpPersistentSettings::for_session(&http);
        match http.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(_) => None,
        }
    }
}
