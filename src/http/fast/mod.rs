//! The postback fast path (issue 12): our own [`ServerApp`] in front of Pingora's `HttpProxy`.
//!
//! Every connection first passes the connection limit (`server.max_connections`). TLS
//! connections (HTTP/1.1 and HTTP/2) then go to Pingora whole. A plain connection is read by
//! `conn`: one reused buffer per connection, each request head parsed by [`reader`] under a
//! total deadline (`server.header_timeout`). A request in the fast path's strict subset, to a
//! postback route, is answered here: the same rules, delivery and live view as Pingora's path
//! (`Postbacks::check_head`-then-`deliver`), and the answer Pingora would write ([`answer`]), in
//! one send. Every
//! other request is handed to Pingora's `HttpProxy` on the same connection together with the
//! bytes already read (`ServerSession::set_pipelined_prefix`), and when Pingora gives the
//! connection back, the next request is read here again.
//!
//! With `server.fast_path: false` every connection goes to Pingora whole (the limit on
//! connections still applies).

pub mod answer;
mod conn;
pub mod reader;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::{Histogram, IntCounter};

use crate::http::postbacks::Postbacks;
use crate::http::proxy::PostbackProxy;
use crate::metrics;
use crate::postback::route::{Route, Router};

/// Bodies the fast path reads itself; larger POSTs go to Pingora.
pub const MAX_FAST_BODY: usize = 64 * 1024;

/// The listener's application: the connection limit, then the fast path or Pingora.
pub struct FastApp {
    pingora: Arc<HttpProxy<PostbackProxy>>,
    fast: Option<FastPath>,
    open: AtomicUsize,
    max_connections: usize,
}

/// What the fast path shares with Pingora's side, and its settings.
pub struct FastPath {
    postbacks: Arc<Postbacks>,
    keepalive: Duration,
    header_timeout: Duration,
    max_body: usize,
    answers: answer::Answers,
    metrics: RouteMetrics,
}

/// Metric handles resolved once: `with_label_values` per request is a hash and a lock.
struct RouteMetrics {
    /// `postback_requests_total{route, outcome="accepted"}`, per route in the router's order.
    accepted: Vec<IntCounter>,
    /// `request_duration_seconds{kind="postback"}`.
    duration: Histogram,
}

impl RouteMetrics {
    fn new(router: &Router) -> RouteMetrics {
        RouteMetrics {
            accepted: router
                .routes()
                .iter()
                .map(|r| {
                    metrics::POSTBACK_REQUESTS.with_label_values(&[r.template.as_str(), "accepted"])
                })
                .collect(),
            duration: metrics::REQUEST_DURATION.with_label_values(&["postback"]),
        }
    }

    fn count(&self, router: &Router, route: &Route, outcome: &str, seconds: f64) {
        let index = router.routes().iter().position(|r| std::ptr::eq(r, route));
        match (outcome, index) {
            ("accepted", Some(i)) => self.accepted[i].inc(),
            _ => metrics::POSTBACK_REQUESTS
                .with_label_values(&[&route.template, outcome])
                .inc(),
        }
        self.duration.observe(seconds);
    }
}

/// What the fast path needs: the [`Postbacks`] it shares with Pingora's `PostbackProxy`, and its
/// settings from `server:`.
pub struct FastSettings {
    /// The routes, rules, delivery and live view, as Pingora's path uses them.
    pub postbacks: Arc<Postbacks>,
    /// `server.keepalive_timeout_seconds`.
    pub keepalive: Duration,
    /// `server.header_timeout`.
    pub header_timeout: Duration,
}

impl FastApp {
    /// `fast` is `Some` with `server.fast_path: true`.
    pub fn new(
        pingora: HttpProxy<PostbackProxy>,
        fast: Option<FastSettings>,
        max_connections: usize,
    ) -> pingora::Result<FastApp> {
        let fast = match fast {
            None => None,
            Some(s) => Some(FastPath {
                metrics: RouteMetrics::new(s.postbacks.router()),
                max_body: s
                    .postbacks
                    .rules()
                    .limits()
                    .max_body_bytes
                    .min(MAX_FAST_BODY),
                postbacks: s.postbacks,
                keepalive: s.keepalive,
                header_timeout: s.header_timeout,
                answers: answer::Answers::new()?,
            }),
        };
        Ok(FastApp {
            pingora: Arc::new(pingora),
            fast,
            open: AtomicUsize::new(0),
            max_connections,
        })
    }

    /// Counts the connection in, or `None` when `max_connections` are open.
    fn admit(&self) -> Option<Admitted<'_>> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::CONNECTIONS.inc();
        Some(Admitted(&self.open))
    }
}

/// One open connection, counted until dropped.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::CONNECTIONS.dec();
    }
}

#[async_trait]
impl ServerApp for FastApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_admitted) = self.admit() else {
            metrics::CONNECTIONS_REFUSED.inc();
            drop(stream);
            return None;
        };
        match &self.fast {
            Some(fast) if stream.get_ssl_digest().is_none() => {
                conn::serve(&self.pingora, fast, stream, shutdown).await;
            }
            _ => {
                // Pingora's own loop over the connection's requests.
                ServerApp::process_new(&self.pingora, stream, shutdown).await;
            }
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.pingora).await;
    }
}
