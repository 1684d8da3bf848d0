//! The fast path's connection loop: read a head, answer a postback or hand the request to
//! Pingora, and again, on one buffer.
//!
//! Timeouts: the first request's head must be complete within `header_timeout` of the
//! connection's start; between requests the connection waits `keepalive` for the first byte of
//! the next one, whose head then has `header_timeout`. Past either, the connection is closed
//! without an answer (as Pingora closes an idle keep-alive connection). A POST's body, when it
//! did not come with its head, gets another `header_timeout`; if it is not all there by then (or
//! the client closes first), the request goes to Pingora, which reads the rest under its own
//! rules and answers as it always does.
//!
//! At shutdown (SIGTERM, or the broadcast a graceful upgrade sends once the new process has the
//! listeners) a connection is not cut between two requests, where a client may already be
//! sending the next one: that request is still read and answered, with `Connection: close`. An
//! idle connection ends when its keep-alive runs out or the runtime stops, after
//! `grace_period_seconds`. (Pingora's own path closes idle connections at the broadcast.)
//!
//! Keep-alive and pipelining follow Pingora's HTTP/1 session with pipelining off (its default),
//! so that both give the same answers: `Connection: close` closes after the answer; bytes a
//! client sent after a request's end close the connection after that request's answer (Pingora:
//! "bytes overread on request, disallowing reuse").

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::Method;
use once_cell::sync::Lazy;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Shutdown, Stream};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant as TokioInstant, Sleep};

use super::reader::{self, FastMethod, Head, Parsed, MAX_HEADERS};
use super::FastPath;
use crate::http::proxy::PostbackProxy;
use crate::metrics;
use crate::postback::fields::Fields;
use crate::postback::reply::{Refusal, Reply};
use crate::postback::route::{Route, RouteMatch};
use crate::postback::PostbackRequest;

/// The read buffer a connection starts with (and keeps while idle).
const INITIAL_BUFFER: usize = 4096;

/// Pingora's first wait for a request on a new connection (`process_new` sets keep-alive 60 s),
/// given to a session that takes a partial head.
const PINGORA_FIRST_KEEPALIVE: u64 = 60;

// `fast_path_requests_total` handles, resolved once.
static ANSWERED: Lazy<IntCounter> =
    Lazy::new(|| metrics::FAST_PATH_REQUESTS.with_label_values(&["answered"]));
static HANDED_OFF: Lazy<IntCounter> =
    Lazy::new(|| metrics::FAST_PATH_REQUESTS.with_label_values(&["handed_off"]));

/// What reading a head came to.
#[allow(clippy::large_enum_variant)] // on the stack on purpose: no allocation per request
enum Step<'r> {
    /// A head inside the subset, to a postback route (its body may still be arriving).
    Request(Head, RouteMatch<'r>),
    /// Outside the subset: Pingora takes the buffer as it is.
    HandOff,
    /// Closed, timed out, shutting down: drop the connection.
    Close,
}

/// Serves one plain connection until it closes.
pub(super) async fn serve(
    pingora: &Arc<HttpProxy<PostbackProxy>>,
    fast: &FastPath,
    mut stream: Stream,
    shutdown: &ShutdownWatch,
) {
    let peer = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        .map(|ip| ip.to_canonical());
    let mut conn = Conn {
        fast,
        peer,
        buf: BytesMut::with_capacity(INITIAL_BUFFER),
        out: Vec::with_capacity(512),
        shutdown: shutdown.clone(),
        timer: Box::pin(tokio::time::sleep(fast.keepalive)),
    };
    let mut first = true;
    loop {
        let step = conn.read_head(&mut stream, first).await;
        first = false;
        let head = match step {
            Step::Close => return,
            Step::HandOff => match hand_off(pingora, stream, &mut conn.buf, shutdown).await {
                Some(back) => {
                    stream = back;
                    continue;
                }
                None => return,
            },
            Step::Request(head, found) => (head, found),
        };
        let (head, found) = head;
        // The body, within another `header_timeout`; else Pingora reads it.
        if conn.buf.len() < head.head_len + head.content_length
            && !conn.read_body(&mut stream, &head).await
        {
            match hand_off(pingora, stream, &mut conn.buf, shutdown).await {
                Some(back) => {
                    stream = back;
                    continue;
                }
                None => return,
            }
        }
        match conn.answer(&mut stream, &head, found).await {
            Ok(true) => {}
            Ok(false) => {
                Shutdown::shutdown(&mut *stream).await;
                return;
            }
            Err(()) => return,
        }
        if !conn.buf.is_empty() {
            // Pipelined bytes: Pingora (pipelining off) answers this request and then closes.
            return;
        }
    }
}

/// Gives the request whose bytes start `buf` to Pingora's `HttpProxy` on this connection.
/// `Some` when Pingora keeps the connection open for another request.
async fn hand_off(
    pingora: &Arc<HttpProxy<PostbackProxy>>,
    stream: Stream,
    buf: &mut BytesMut,
    shutdown: &ShutdownWatch,
) -> Option<Stream> {
    HANDED_OFF.inc();
    let mut session = ServerSession::new_http1(stream);
    // As Pingora's own loop sets up a new connection's session (`ServerApp::process_new`).
    if *shutdown.borrow() {
        session.set_keepalive(None);
    } else {
        session.set_keepalive(Some(PINGORA_FIRST_KEEPALIVE));
    }
    session.set_keepalive_reuses_remaining(
        pingora
            .server_options
            .as_ref()
            .and_then(|o| o.keepalive_request_limit),
    );
    if !buf.is_empty() {
        session.set_pipelined_prefix(buf.split());
    }
    let reused = pingora.process_new_http(session, shutdown).await?;
    // With pipelining off (Pingora's default, which this proxy keeps) a reusable connection
    // carries no bytes of a next request: Pingora refuses reuse when it read past the request.
    let (stream, _settings) = reused.consume();
    Some(stream)
}

impl FastPath {
    /// The postback route for `path`, or `None` to hand the request to Pingora.
    fn route(&self, path: &str) -> Option<RouteMatch<'_>> {
        // Pingora's side counts a rate limit per client; with one configured, it decides alone.
        if self.postbacks.rules().limits().has_rate_limit() {
            return None;
        }
        self.postbacks.router().find(path)
    }
}

struct Conn<'a> {
    fast: &'a FastPath,
    peer: Option<IpAddr>,
    buf: BytesMut,
    /// The answer being written.
    out: Vec<u8>,
    shutdown: ShutdownWatch,
    /// The connection's one timer for its reads (see [`Conn::read_more`]).
    timer: Pin<Box<Sleep>>,
}

impl<'a> Conn<'a> {
    /// Reads until the buffer starts with a whole head, or the head is outside the subset.
    async fn read_head(&mut self, stream: &mut Stream, first: bool) -> Step<'a> {
        let fast: &'a FastPath = self.fast;
        // The head's deadline: from the connection's start, or from a later request's first byte.
        let mut deadline = first.then(|| Instant::now() + fast.header_timeout);
        loop {
            if !self.buf.is_empty() {
                let mut found = None;
                let parsed = reader::parse(&self.buf, fast.max_body, |path| {
                    found = fast.route(path);
                    found.is_some()
                });
                match (parsed, found) {
                    (Parsed::Partial, _) => {}
                    (Parsed::Request(head), Some(found)) => return Step::Request(head, found),
                    _ => return Step::HandOff,
                }
                if deadline.is_none() {
                    deadline = Some(Instant::now() + fast.header_timeout);
                }
            }
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => fast.keepalive,
            };
            match self.read_more(stream, wait).await {
                Read::Data => {}
                Read::TimedOut => {
                    if deadline.is_some() {
                        metrics::HEADER_TIMEOUTS.inc();
                    }
                    return Step::Close;
                }
                Read::Closed => return Step::Close,
            }
        }
    }

    /// Reads the rest of the body into the buffer; `false` when it does not come in time.
    async fn read_body(&mut self, stream: &mut Stream, head: &Head) -> bool {
        let deadline = Instant::now() + self.fast.header_timeout;
        while self.buf.len() < head.head_len + head.content_length {
            let wait = deadline.saturating_duration_since(Instant::now());
            if !matches!(self.read_more(stream, wait).await, Read::Data) {
                return false;
            }
        }
        true
    }

    async fn read_more(&mut self, stream: &mut Stream, wait: Duration) -> Read {
        if wait.is_zero() {
            return Read::TimedOut;
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(self.buf.capacity().max(INITIAL_BUFFER));
        }
        // One timer per connection, moved only when it must be: earlier when this read's
        // deadline is sooner than the timer, and later when it fires before the deadline. A
        // keep-alive connection's next request does not register a timer of its own.
        let deadline = TokioInstant::now() + wait;
        if self.timer.is_elapsed() || self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        loop {
            tokio::select! {
                biased;
                read = stream.read_buf(&mut self.buf) => {
                    return match read {
                        Ok(0) | Err(_) => Read::Closed,
                        Ok(_) => Read::Data,
                    };
                }
                () = &mut self.timer => {
                    if TokioInstant::now() >= deadline {
                        return Read::TimedOut;
                    }
                    self.timer.as_mut().reset(deadline);
                }
            }
        }
    }

    /// Answers the postback at the start of the buffer and takes it off the buffer. `Ok(true)`:
    /// the connection stays open; `Ok(false)`: close it; `Err`: it broke.
    async fn answer(
        &mut self,
        stream: &mut Stream,
        head: &Head,
        found: RouteMatch<'_>,
    ) -> Result<bool, ()> {
        let started = Instant::now();
        ANSWERED.inc();
        let fast = self.fast;
        let request = self
            .buf
            .split_to(head.head_len + head.content_length)
            .freeze();
        let head_bytes = request.slice(..head.head_len);
        let body = &request[head.head_len..];
        // The fields as the rules read them: slices of the head, no map built (the reader let
        // through only names and values `http` takes).
        let mut pairs: [(&[u8], &[u8]); MAX_HEADERS] = [(&[], &[]); MAX_HEADERS];
        for (pair, f) in pairs.iter_mut().zip(head.fields()) {
            *pair = (&head_bytes[f.name.range()], &head_bytes[f.value.range()]);
        }
        let fields = Fields::Raw(&pairs[..head.fields().len()]);
        let route = match &found {
            RouteMatch::Postback { route, .. } | RouteMatch::BadName { route, .. } => *route,
        };
        let result = self
            .reply(&found, route, head, &head_bytes, fields, body)
            .await;
        let (reply, outcome) = match result {
            Ok(reply) => (reply, "accepted"),
            Err(refusal) => {
                let path = head.path(&head_bytes);
                fast.postbacks.refused(route, path, &refusal);
                (Reply::refused(&refusal), refusal.kind.code())
            }
        };
        fast.metrics.count(
            fast.postbacks.router(),
            route,
            outcome,
            started.elapsed().as_secs_f64(),
        );
        let keepalive = !head.close && !*self.shutdown.borrow();
        let cors = fast.postbacks.rules().cors_headers(fields);
        // Let go of the request's bytes, so the buffer can take its whole allocation back.
        drop((head_bytes, request));
        self.out.clear();
        if fast
            .answers
            .write(
                &reply,
                &cors,
                keepalive,
                head.method == FastMethod::Head,
                &mut self.out,
            )
            .is_err()
        {
            return Err(());
        }
        if stream.write_all(&self.out).await.is_err() || stream.flush().await.is_err() {
            return Err(());
        }
        Ok(keepalive)
    }

    /// Works out the reply as `PostbackProxy::postback_reply` does (keep the two in step; the
    /// differential test in tests/fast_path.rs compares them).
    async fn reply(
        &self,
        found: &RouteMatch<'_>,
        route: &Route,
        head: &Head,
        head_bytes: &[u8],
        headers: Fields<'_>,
        body: &[u8],
    ) -> Result<Reply, Refusal> {
        let fast = self.fast;
        let (path, query) = (head.path(head_bytes), head.query(head_bytes));
        let method = match head.method {
            FastMethod::Get => Method::GET,
            FastMethod::Head => Method::HEAD,
            FastMethod::Post => Method::POST,
        };
        let (database, table) = found.names(path)?;
        let now = crate::postback::now_secs();
        let request = PostbackRequest {
            method: &method,
            query,
            url_len: head.target.len as usize,
            headers,
            body,
            peer: self.peer,
            tls: false,
            now,
        };
        // The same rules in the same order as Pingora's path: the head's first (the body is
        // already here, within its limit), then the rest with delivery.
        if let Some(reply) = fast.postbacks.rules().check_head(&request)? {
            return Ok(reply);
        }
        fast.postbacks
            .deliver(route, database, table, &request)
            .await
    }
}

enum Read {
    Data,
    TimedOut,
    Closed,
}
