//! The postback request filter: what a Pingora `request_filter` calls to answer postbacks.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{header, Method};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::body::{read_body, settle_body};
use super::forwarded::{is_tls, peer_ip};
use crate::delivery::Delivery;
use crate::metrics;
use crate::postback::reply::{ErrorKind, Refusal, Reply};
use crate::postback::route::{Route, RouteMatch, Router};
use crate::postback::{Postback, PostbackRequest, Target};

/// The postback routes, their rules and the delivery they hand records to.
pub struct Postbacks {
    router: Router,
    postback: Postback,
    delivery: Arc<Delivery>,
}

impl Postbacks {
    /// Assembles the filter from its parts.
    pub fn new(router: Router, postback: Postback, delivery: Arc<Delivery>) -> Self {
        Postbacks {
            router,
            postback,
            delivery,
        }
    }

    /// The postback rules (the client address policy is shared with the proxied requests).
    pub fn rules(&self) -> &Postback {
        &self.postback
    }

    /// Runs in `request_filter` for every request. When the path is a postback route, answers
    /// the request (the GIF, `{}`, a redirect or a refusal) once delivery has accepted its
    /// records, and returns `true`; otherwise returns `false` and touches nothing.
    pub async fn handle(&self, session: &mut Session) -> Result<bool> {
        let Some(found) = self.router.find(session.req_header().uri.path()) else {
            return Ok(false);
        };
        let started = Instant::now();
        let route = match &found {
            RouteMatch::Postback { route, .. } | RouteMatch::BadName { route, .. } => *route,
        };
        let (reply, outcome) = match self.reply(session, &found).await {
            Ok(reply) if reply.status == 204 => (reply, "preflight"),
            Ok(reply) => (reply, "accepted"),
            Err(refusal) => (Reply::refused(&refusal), refusal.kind.code()),
        };
        settle_body(session, self.postback.limits()).await;
        count(route, outcome, started);
        self.write_reply(session, reply).await?;
        Ok(true)
    }

    /// Works out the reply to a postback; reads the body of POSTs and delivers the records.
    async fn reply(&self, session: &mut Session, found: &RouteMatch<'_>) -> Result<Reply, Refusal> {
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (peer, tls) = (peer_ip(session), is_tls(session));
        let req = session.req_header();
        let head = PostbackRequest {
            method: &req.method,
            query: req.uri.query(),
            url_len: head_len(req),
            headers: &req.headers,
            body: &[],
            peer,
            tls,
            now,
        };
        if let Some(preflight) = self.postback.check_head(&head)? {
            return Ok(preflight);
        }
        let body = if req.method == Method::POST {
            read_body(session, self.postback.limits()).await?
        } else {
            Vec::new()
        };
        let req = session.req_header();
        let request = PostbackRequest {
            method: &req.method,
            query: req.uri.query(),
            url_len: head_len(req),
            headers: &req.headers,
            body: &body,
            peer,
            tls,
            now,
        };
        let target = Target {
            database,
            table,
            default_format: route.default_format,
            privacy: route.privacy.as_ref(),
        };
        let outcome = self.postback.handle(target, &request)?;
        // TODO(lead): one call with every sink once delivery takes a list.
        let (last, others) = route.sinks.split_last().expect("a route has a sink");
        for &sink in others {
            self.delivery
                .accept(sink, outcome.records.clone())
                .await
                .map_err(|e| Refusal::new(ErrorKind::Unavailable, e.to_string()))?;
        }
        self.delivery
            .accept(*last, outcome.records)
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
}

fn head_len(req: &pingora::http::RequestHeader) -> usize {
    req.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
}

fn count(route: &Route, outcome: &str, started: Instant) {
    metrics::POSTBACK_REQUESTS
        .with_label_values(&[&route.template, outcome])
        .inc();
    metrics::REQUEST_DURATION
        .with_label_values(&["postback"])
        .observe(started.elapsed().as_secs_f64());
}
