//! The Pingora proxy: postbacks answered here, everything else streamed to the upstream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method};
use log::warn;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use pingora_limits::rate::Rate;

use crate::delivery::Delivery;
use crate::metrics;
use crate::postback::{Postback, PostbackRequest, Target};
use crate::postback::reply::{ErrorKind, Refusal, Reply};
use crate::postback::route::{Route, RouteMatch, Router};
use crate::http::upstream::Upstream;

/// The proxy service: one per process, shared by every connection.
pub struct PostbackProxy {
    router: Router,
    postback: Postback,
    delivery: Arc<Delivery>,
    upstream: Upstream,
    /// Postbacks per client address in the current second (with `postback.rate_limit`).
    rate: Rate,
    /// Seconds an idle keep-alive connection waits for its next request.
    keepalive_timeout: u64,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    /// Set when a postback route took the request.
    postback: bool,
}

impl PostbackProxy {
    /// Assembles the proxy from its parts (see [`crate::app::App::build`]).
    pub fn new(
        router: Router,
        postback: Postback,
        delivery: Arc<Delivery>,
        upstream: Upstream,
        keepalive_timeout: u64,
    ) -> Self {
        PostbackProxy {
            router,
            postback,
            delivery,
            upstream,
            rate: Rate::new(std::time::Duration::from_secs(1)),
            keepalive_timeout,
        }
    }

    /// `Err` when the client has sent more than `postback.rate_limit.per_second` postbacks this second.
    fn check_rate(&self, session: &Session) -> Result<(), Refusal> {
        let (Some(limit), Some(peer)) = (self.postback.rate_limit, peer_ip(session)) else {
            return Ok(());
        };
        let xff = session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes());
        let client = self.postback.client_ip_policy().client_ip(peer, xff);
        if self.rate.observe(&client, 1) > limit as isize {
            return Err(Refusal::new(
                ErrorKind::TooManyRequests,
                format!("more than {limit} postbacks per second from this address"),
            ));
        }
        Ok(())
    }

    /// Works out the reply to a postback; reads the body of POSTs.
    async fn postback_reply(
        &self,
        session: &mut Session,
        found: &RouteMatch<'_>,
    ) -> Result<Reply, Refusal> {
        let (route, database, table) = match found {
            RouteMatch::Postback {
                route,
                database,
                table,
            } => (*route, database.as_str(), table.as_str()),
            RouteMatch::BadName { message, .. } => {
                return Err(Refusal::new(ErrorKind::BadRequest, message.clone()))
            }
        };
        self.check_rate(session)?;
        let req = session.req_header();
        let url_len = req.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if url_len > self.postback.max_url_bytes {
            return Err(Refusal::new(
                ErrorKind::UriTooLong,
                format!(
                    "the URL is longer than {} bytes",
                    self.postback.max_url_bytes
                ),
            ));
        }
        Postback::check_method(&req.method)?;
        if req.method == Method::OPTIONS {
            return self.postback.preflight(&req.headers);
        }
        let body = if req.method == Method::POST {
            read_body(session, self.postback.max_body_bytes).await?
        } else {
            Vec::new()
        };
        let req = session.req_header();
        let request = PostbackRequest {
            method: &req.method,
            query: req.uri.query(),
            headers: &req.headers,
            body: &body,
            peer: peer_ip(session),
            tls: is_tls(session),
            now: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        };
        let target = Target {
            database,
            table,
            default_format: route.default_format,
            privacy: route.privacy.as_ref(),
        };
        let outcome = self.postback.handle(target, &request)?;
        self.delivery
            .accept(route.sink, outcome.records)
            .await
            .map_err(|e| Refusal::new(ErrorKind::Unavailable, e.to_string()))?;
        Ok(outcome.reply)
    }

    /// Writes `reply`, with `Content-Length` and the CORS headers; no body for HEAD.
    async fn write_reply(&self, session: &mut Session, reply: Reply) -> Result<()> {
        let cors = self.postback.cors_headers(&session.req_header().headers);
        let head = session.req_header().method == Method::HEAD;
        let mut resp =
            ResponseHeader::build(reply.status, Some(reply.headers.len() + cors.len() + 1))?;
        for (name, value) in reply.headers.into_iter().chain(cors) {
            resp.append_header(name, value)?;
        }
        // A 204 has no body and, by RFC 9110, no Content-Length.
        if reply.status != 204 {
            resp.insert_header(header::CONTENT_LENGTH, reply.body.len().to_string())?;
        }
        let no_body = head || reply.body.is_empty();
        session
            .write_response_header(Box::new(resp), no_body)
            .await?;
        if !no_body {
            session.write_response_body(Some(reply.body), true).await?;
        }
        Ok(())
    }

    fn count(&self, route: &Route, outcome: &str, started: Instant) {
        metrics::POSTBACK_REQUESTS
            .with_label_values(&[&route.template, outcome])
            .inc();
        metrics::REQUEST_DURATION
            .with_label_values(&["postback"])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Reads the whole body, refusing it with 413 past `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            ErrorKind::PayloadTooLarge,
            format!("the body is larger than {limit} bytes"),
        )
    };
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                // The framing is broken: what follows on this connection cannot be trusted to be
                // a request boundary, so the connection closes after the answer.
                session.set_keepalive(None);
                return Err(Refusal::new(
                    ErrorKind::BadRequest,
                    format!("cannot read the request body: {:?}", e.etype()),
                ));
            }
        }
    }
}

/// After an early answer: drain a body of known, acceptable size so the connection can be
/// reused; otherwise close the connection after the answer.
async fn settle_body(session: &mut Session, limit: usize) {
    if session.is_body_done() {
        return;
    }
    let small = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n <= limit as u64);
    if !small || session.drain_request_body().await.is_err() {
        session.set_keepalive(None);
    }
}

fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

#[async_trait]
impl ProxyHttp for PostbackProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            postback: false,
        }
    }

    /// Runs for every request: answers postbacks here (returns `true`), lets the rest through.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora keeps an HTTP/1.1 connection open for ever between requests; bound the wait for
        // the next one, unless it already decided to close the connection.
        if session.get_keepalive() == Some(0) {
            session.set_keepalive(Some(self.keepalive_timeout));
        }
        let Some(found) = self.router.find(session.req_header().uri.path()) else {
            return Ok(false);
        };
        ctx.postback = true;
        let route = match &found {
            RouteMatch::Postback { route, .. } | RouteMatch::BadName { route, .. } => *route,
        };
        let (reply, outcome) = match self.postback_reply(session, &found).await {
            Ok(reply) => {
                let outcome = if reply.status == 204 {
                    "preflight"
                } else {
                    "accepted"
                };
                (reply, outcome)
            }
            Err(refusal) => (Reply::refused(&refusal), refusal.kind.code()),
        };
        settle_body(session, self.postback.max_body_bytes).await;
        self.count(route, outcome, ctx.started);
        self.write_reply(session, reply).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.upstream.peer()
    }

    /// Adds `X-Forwarded-For`, `-Proto` and `-Host`. From a trusted proxy, the chain it sent is
    /// kept and extended; from anyone else, what the client claimed is replaced.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer = peer_ip(session);
        let trusted = peer.is_some_and(|ip| self.postback.client_ip_policy().is_trusted(ip));
        if let Some(ip) = peer {
            let chain: Vec<&str> = if trusted {
                session
                    .req_header()
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect()
            } else {
                Vec::new()
            };
            let mut value = chain.join(", ");
            if !value.is_empty() {
                value.push_str(", ");
            }
            value.push_str(&ip.to_string());
            upstream_request.insert_header("X-Forwarded-For", value)?;
        }
        let keep_proto = trusted && upstream_request.headers.contains_key("x-forwarded-proto");
        let keep_host = trusted && upstream_request.headers.contains_key("x-forwarded-host");
        if !keep_proto {
            let proto = if is_tls(session) { "https" } else { "http" };
            upstream_request.insert_header("X-Forwarded-Proto", proto)?;
        }
        if !keep_host {
            let req = session.req_header();
            let host = req
                .headers
                .get(header::HOST)
                .cloned()
                .or_else(|| req.uri.authority().and_then(|a| a.as_str().parse().ok()));
            match host {
                Some(host) => upstream_request.insert_header("X-Forwarded-Host", host)?,
                None => {
                    upstream_request.remove_header("X-Forwarded-Host");
                }
            }
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.postback {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        metrics::UPSTREAM_RESPONSES
            .with_label_values(&[&status.to_string()])
            .inc();
        metrics::REQUEST_DURATION
            .with_label_values(&["upstream"])
            .observe(ctx.started.elapsed().as_secs_f64());
    }

    /// Answers a failed proxy attempt with a short text body: 502 when the upstream cannot be
    /// reached or breaks off, 504 when it does not answer in time.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        use ErrorType::*;
        let code = match (e.etype(), e.esource()) {
            (HTTPStatus(code), _) => *code,
            (ConnectTimedout, _) => 504,
            (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => 504,
            (ConnectNoRoute | ConnectRefused | ConnectError | ConnectProxyFailure, _) => 502,
            (_, ErrorSource::Upstream) => 502,
            (ReadError | WriteError | ConnectionClosed, ErrorSource::Downstream) => 0,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0 {
            if code >= 500 {
                warn!("upstream request failed: {e}");
            }
            let text = match code {
                502 => "502 Bad Gateway: the upstream server is unavailable\n",
                504 => "504 Gateway Timeout: the upstream server did not answer in time\n",
                400 => "400 Bad Request\n",
                _ => "500 Internal Server Error\n",
            };
            if let Err(write_err) = write_text(session, code, text).await {
                warn!("cannot send the {code} answer: {write_err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

async fn write_text(session: &mut Session, code: u16, text: &'static str) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, text.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(text.as_bytes())), true)
        .await
}
