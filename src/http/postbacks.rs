//! [`Postbacks`]: the postback request filter a Pingora `request_filter` calls, and the services
//! (delivery, admin listener) that go with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{error, warn};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService, GenBackgroundService};
use pingora::services::listening::Service;

use http::{header, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;

use super::admin::AdminApp;
use super::body::{read_body, settle_body};
use super::builder::PostbacksBuilder;
use super::client_ip::ClientIpPolicy;
use super::forwarded::{is_tls, peer_ip};
use super::live::LiveView;
use crate::config::Config;
use crate::delivery::{Delivery, DeliveryError};
use crate::identity::extend::Page;
use crate::identity::server_cookie::{strip_port, IdRequest, ServerCookie};
use crate::identity::Identity;
use crate::metrics;
use crate::postback::fields::Fields;
use crate::postback::reply::{ErrorKind, Refusal, Reply};
use crate::postback::route::{Route, RouteMatch, Router};
use crate::postback::{Postback, PostbackRequest, Target};

/// Treasure Data compatible postbacks for a Pingora proxy: the routes, their rules, and the
/// delivery of records to the sinks.
///
/// Build it with [`Postbacks::builder`], call [`Postbacks::handle`] first in your
/// `ProxyHttp::request_filter`, and add [`Postbacks::delivery_service`] (and, if you like,
/// [`Postbacks::admin_service`]) to your `Server`. For `identity.extend_cookies`, also call
/// [`Postbacks::extend_cookies`] in your `ProxyHttp::response_filter`.
pub struct Postbacks {
    router: Router,
    postback: Postback,
    identity: Identity,
    delivery: Arc<Delivery>,
    live: Arc<LiveView>,
}

impl Postbacks {
    /// A builder from the configuration (it reads `routes`, `auth`, `client_ip`, `postback`,
    /// `sinks` and `delivery`; the standalone proxy's `server`, `listen`, `admin` and `upstream`
    /// are not its business). Add sinks of your own with [`PostbacksBuilder::sink`], then
    /// [`PostbacksBuilder::build`].
    ///
    /// ```
    /// use postback_proxy::{Config, Postbacks};
    ///
    /// let config =
    ///     Config::parse("auth: { write_keys: [{ key: 'KEY' }] }\nsinks: { main: { type: stdout } }")
    ///         .unwrap();
    /// assert!(Postbacks::builder(config).check().is_empty());
    /// ```
    pub fn builder(config: Config) -> PostbacksBuilder {
        PostbacksBuilder::new(config)
    }

    pub(crate) fn new(
        router: Router,
        postback: Postback,
        identity: Identity,
        delivery: Arc<Delivery>,
        live: Arc<LiveView>,
    ) -> Self {
        Postbacks {
            router,
            postback,
            identity,
            delivery,
            live,
        }
    }

    /// The client address policy of `client_ip:`, for the `X-Forwarded-For` sent upstream.
    pub(crate) fn client_ip_policy(&self) -> &ClientIpPolicy {
        self.postback.client_ip_policy()
    }

    /// The Pingora background service that runs delivery: add it to your `Server`. It starts
    /// the sinks' lanes when the server starts; at SIGTERM it makes `/readyz` answer 503 at once,
    /// lets requests in flight finish for `grace_period_seconds`, then delivers what the sinks take
    /// within `graceful_shutdown_timeout_seconds` (with the disk buffer, the rest waits on disk
    /// for the next start).
    pub fn delivery_service(&self, server: &ServerConf) -> GenBackgroundService<DeliveryService> {
        background_service(
            "delivery",
            DeliveryService {
                delivery: self.delivery.clone(),
                grace: Duration::from_secs(server.grace_period_seconds.unwrap_or(0)),
                drain: Some(Duration::from_secs(
                    server.graceful_shutdown_timeout_seconds.unwrap_or(5).max(1),
                )),
            },
        )
    }

    /// The delivery service of a server that calls [`Postbacks::finish`] itself once
    /// `Server::run` returns (our binary): it starts delivery and turns readiness off at SIGTERM,
    /// and leaves the drain to the caller, which can wait for it.
    pub(crate) fn delivery_service_without_drain(&self) -> GenBackgroundService<DeliveryService> {
        background_service(
            "delivery",
            DeliveryService {
                delivery: self.delivery.clone(),
                grace: Duration::ZERO,
                drain: None,
            },
        )
    }

    /// A listening service for the admin endpoints (`/metrics`, `/healthz`, `/readyz`, `/sinks`)
    /// on `address`, an `ip:port` that only operators reach.
    pub fn admin_service(&self, address: &str) -> Service<AdminApp> {
        let app = AdminApp::new(self.delivery.clone(), self.live.clone());
        let mut service = Service::new("admin".to_string(), app);
        service.add_tcp(address);
        service
    }

    /// Delivers what is buffered and closes the sinks, waiting at most `drain`; for a server
    /// that returns from `Server::run` (our binary does, after the delivery service's drain).
    pub fn finish(&self, drain: Duration) {
        self.delivery.finish(drain);
    }

    /// Runs in `request_filter` for every request. When the path is a postback route, answers
    /// the request (the GIF, `{}`, a redirect or a refusal) once delivery has accepted its
    /// records, and returns `true`; otherwise returns `false` and touches nothing.
    ///
    /// With `identity.server_cookie` enabled, it also answers td-js-sdk's server cookie
    /// endpoint (`GET /get_cookie_id`).
    pub async fn handle(&self, session: &mut Session) -> Result<bool> {
        if let Some(endpoint) = &self.identity.server_cookie {
            if session.req_header().uri.path() == endpoint.path() {
                self.server_cookie(session, endpoint).await?;
                return Ok(true);
            }
        }
        let Some(found) = self.router.find(session.req_header().uri.path()) else {
            return Ok(false);
        };
        let started = Instant::now();
        let route = match &found {
            RouteMatch::Postback { route, .. } | RouteMatch::BadName { route, .. } => *route,
        };
        let (reply, outcome) = match self.reply(session, route, &found).await {
            Ok(reply) if reply.status == 204 => (reply, "preflight"),
            Ok(reply) => (reply, "accepted"),
            Err(refusal) => {
                self.refused(route, session.req_header().uri.path(), &refusal);
                (Reply::refused(&refusal), refusal.kind.code())
            }
        };
        settle_body(session, self.postback.limits()).await;
        count(route, outcome, started);
        self.write_reply(session, reply).await?;
        Ok(true)
    }

    /// Answers td-js-sdk's `fetchServerCookie()` (see [`ServerCookie`]).
    async fn server_cookie(&self, session: &mut Session, endpoint: &ServerCookie) -> Result<()> {
        let started = Instant::now();
        let tls = is_tls(session);
        let req = session.req_header();
        let host = request_host(req).map(|h| strip_port(h).to_ascii_lowercase());
        let (reply, result) = endpoint.answer(&IdRequest {
            method: &req.method,
            query: req.uri.query(),
            host: host.as_deref(),
            headers: &req.headers,
            assessment: self.postback.assess(Fields::Map(&req.headers)),
            tls,
        });
        metrics::SERVER_IDS
            .with_label_values(&[result.label()])
            .inc();
        metrics::REQUEST_DURATION
            .with_label_values(&["identity"])
            .observe(started.elapsed().as_secs_f64());
        settle_body(session, self.postback.limits()).await;
        self.write_reply(session, reply).await
    }

    /// Runs in `response_filter` for every proxied response: with `identity.extend_cookies`,
    /// adds a `Set-Cookie` re-issuing each listed cookie the request carried, when the response
    /// is a 2xx HTML page that no shared cache may store, the origin does not set that cookie
    /// itself and the visitor did not opt out (`postback.privacy`). Touches nothing else: the
    /// origin's headers and body pass as they are.
    pub fn extend_cookies(&self, session: &Session, response: &mut ResponseHeader) {
        let extension = &self.identity.extension;
        if !extension.is_enabled() {
            return;
        }
        let req = session.req_header();
        let cookies = extension.set_cookies(&Page {
            request: &req.headers,
            status: response.status.as_u16(),
            response: &response.headers,
            assessment: self.postback.assess(Fields::Map(&req.headers)),
            tls: is_tls(session),
        });
        for (name, line) in cookies {
            match response.append_header(header::SET_COOKIE, line) {
                Ok(_) => metrics::COOKIES_EXTENDED.with_label_values(&[name]).inc(),
                Err(e) => warn!("cannot add the Set-Cookie of `{name}`: {e}"),
            }
        }
    }

    /// Works out the reply to a postback; reads the body of POSTs and delivers the records.
    async fn reply(
        &self,
        session: &mut Session,
        route: &Route,
        found: &RouteMatch<'_>,
    ) -> Result<Reply, Refusal> {
        // Copied: the path is the session's, which the body's read below borrows.
        let (database, table) = found.names(session.req_header().uri.path())?;
        let (database, table) = (database.to_owned(), table.to_owned());
        let now = crate::postback::now_secs();
        let (peer, tls) = (peer_ip(session), is_tls(session));
        if let Some(preflight) = self.postback.check_head(&postback_request(
            session.req_header(),
            &[],
            peer,
            tls,
            now,
        ))? {
            return Ok(preflight);
        }
        let body = if session.req_header().method == Method::POST {
            read_body(session, self.postback.limits()).await?
        } else {
            Vec::new()
        };
        let request = postback_request(session.req_header(), &body, peer, tls, now);
        self.deliver(route, &database, &table, &request).await
    }

    /// The rules that run after the body is read, the delivery of the records and the live
    /// view: what Pingora's path and the fast path (`http::fast`) share, so that both give the
    /// same answer and the same records. `req` carries the whole body.
    pub(crate) async fn deliver(
        &self,
        route: &Route,
        database: &str,
        table: &str,
        req: &PostbackRequest<'_>,
    ) -> Result<Reply, Refusal> {
        let target = Target {
            database,
            table,
            default_format: route.default_format,
            privacy: route.privacy.as_ref(),
            enrich: &route.enrich,
        };
        let outcome = self.postback.handle(target, req)?;
        let shown = self.live.render(&route.template, &outcome.records);
        self.delivery
            .accept(&route.sinks, &outcome.records)
            .await
            .map_err(|e| match e {
                DeliveryError::TooLarge => Refusal::new(ErrorKind::PayloadTooLarge, e.to_string()),
                _ => Refusal::new(ErrorKind::Unavailable, e.to_string()),
            })?;
        if let Some(events) = shown {
            self.live.publish(events);
        }
        Ok(outcome.reply)
    }

    /// The routes (the fast path decides with them which requests it may answer).
    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// The postback rules.
    pub(crate) fn rules(&self) -> &Postback {
        &self.postback
    }

    /// Shows a refused postback in the live view (`path` without its query).
    pub(crate) fn refused(&self, route: &Route, path: &str, refusal: &Refusal) {
        self.live.refused(&route.template, path, refusal);
    }

    /// Writes `reply`, with `Content-Length` and the CORS headers; no body for HEAD.
    async fn write_reply(&self, session: &mut Session, reply: Reply) -> Result<()> {
        let cors = self
            .postback
            .cors_headers(Fields::Map(&session.req_header().headers));
        let head = session.req_header().method == Method::HEAD;
        let mut resp =
            ResponseHeader::build(reply.status, Some(reply.headers.len() + cors.len() + 1))?;
        let reply_headers = reply.headers.iter().map(|(n, v)| (*n, &**v));
        for (name, value) in reply_headers.chain(cors.iter().map(|(n, v)| (*n, v.as_str()))) {
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

/// The host the request was sent to: the request target's authority (HTTP/2, absolute form) or
/// the `Host` header.
fn request_host(req: &pingora::http::RequestHeader) -> Option<&str> {
    req.uri
        .host()
        .or_else(|| req.headers.get(header::HOST).and_then(|v| v.to_str().ok()))
}

fn count(route: &Route, outcome: &str, started: Instant) {
    metrics::POSTBACK_REQUESTS
        .with_label_values(&[&route.template, outcome])
        .inc();
    metrics::REQUEST_DURATION
        .with_label_values(&["postback"])
        .observe(started.elapsed().as_secs_f64());
}

/// Runs delivery inside a Pingora server (see [`Postbacks::delivery_service`]).
pub struct DeliveryService {
    delivery: Arc<Delivery>,
    grace: Duration,
    /// `None`: the owner of the server drains after `Server::run` returns.
    drain: Option<Duration>,
}

#[async_trait]
impl BackgroundService for DeliveryService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Started here, inside Pingora's service start-up, so it runs after a `--daemon` fork.
        if let Err(e) = self.delivery.start() {
            error!("cannot start delivery: {e}");
        }
        let _ = shutdown.changed().await;
        // From the moment SIGTERM arrives, load balancers are told to stop sending.
        self.delivery.shutting_down();
        let Some(drain) = self.drain else {
            return;
        };
        tokio::time::sleep(self.grace).await;
        let delivery = self.delivery.clone();
        let _ = tokio::task::spawn_blocking(move || delivery.finish(drain)).await;
    }
}

/// The parts of `req` (and its `body`) the postback rules look at.
pub(crate) fn postback_request<'a>(
    req: &'a RequestHeader,
    body: &'a [u8],
    peer: Option<std::net::IpAddr>,
    tls: bool,
    now: i64,
) -> PostbackRequest<'a> {
    PostbackRequest {
        method: &req.method,
        query: req.uri.query(),
        url_len: req.uri.path_and_query().map_or(0, |pq| pq.as_str().len()),
        headers: Fields::Map(&req.headers),
        body,
        peer,
        tls,
        now,
    }
}
