//! The Pingora proxy service: postbacks answered by [`Postbacks`], everything else streamed to
//! the upstream with the `X-Forwarded-*` headers.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, StatusCode};
use log::warn;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::forwarded::add_forwarded_headers;
use super::postbacks::Postbacks;
use super::upstream::Upstream;
use crate::metrics;

/// The proxy service: one per process, shared by every connection.
pub struct PostbackProxy {
    postbacks: Arc<Postbacks>,
    upstream: Upstream,
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
    pub fn new(postbacks: Arc<Postbacks>, upstream: Upstream, keepalive_timeout: u64) -> Self {
        PostbackProxy {
            postbacks,
            upstream,
            keepalive_timeout,
        }
    }
}

#[async_trait]
impl ProxyHttp for PostbackProxy {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default adds response compression at level 0 (off),
    /// whose context is still built and called for every proxied request; answers pass as the
    /// upstream sent them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

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
        ctx.postback = self.postbacks.handle(session).await?;
        Ok(ctx.postback)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.upstream.peer()
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        let policy = self.postbacks.client_ip_policy();
        add_forwarded_headers(session, policy, upstream_request)
    }

    /// Proxied responses only (postbacks are answered in `request_filter`): identity's cookie
    /// extension may add a `Set-Cookie`; nothing else changes.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.postbacks.extend_cookies(session, upstream_response);
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
        let code = failure_status(e);
        if code > 0 {
            if code >= 500 {
                warn!("upstream request failed: {e}");
            }
            if let Err(write_err) = write_text(session, code, failure_text(code)).await {
                warn!("cannot send the {code} answer: {write_err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// The status for a failed proxy attempt; 0 when the client went away (nothing to answer).
fn failure_status(e: &Error) -> u16 {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => *code,
        (ConnectTimedout, _) => 504,
        (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => 504,
        (ConnectNoRoute | ConnectRefused | ConnectError | ConnectProxyFailure, _) => 502,
        (_, ErrorSource::Upstream) => 502,
        (ReadError | WriteError | ConnectionClosed, ErrorSource::Downstream) => 0,
        (_, ErrorSource::Downstream) => 400,
        _ => 500,
    }
}

/// The short text body of a failure answer: the status with its own reason phrase, and a few
/// words on what happened for the two a user meets most.
fn failure_text(code: u16) -> String {
    let reason = StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    match code {
        502 => format!("{code} {reason}: the upstream server is unavailable\n"),
        504 => format!("{code} {reason}: the upstream server did not answer in time\n"),
        _ => format!("{code} {reason}\n"),
    }
}

async fn write_text(session: &mut Session, code: u16, text: String) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, text.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(text)), true)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_status_has_its_own_reason_phrase() {
        assert_eq!(
            failure_text(502),
            "502 Bad Gateway: the upstream server is unavailable\n"
        );
        assert_eq!(
            failure_text(504),
            "504 Gateway Timeout: the upstream server did not answer in time\n"
        );
        assert_eq!(failure_text(400), "400 Bad Request\n");
        assert_eq!(failure_text(413), "413 Payload Too Large\n");
        assert_eq!(failure_text(500), "500 Internal Server Error\n");
        assert_eq!(failure_text(599), "599 Error\n");
    }
}
