//! The upstream origin: peers resolved once at start-up, picked round robin, health checked.

use serde::Deserialize;
use smart_default::SmartDefault;

use crate::units::HumanDuration;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::prelude::HttpPeer;
use pingora::services::background::{background_service, GenBackgroundService};
use pingora::{Error, ErrorType, Result};

use crate::config::Problem;

/// `upstream:`: the origin every non-postback request goes to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of each origin server; resolved once at start-up.
    pub peers: Vec<String>,
    #[serde(default)]
    pub tls: bool,
    /// The SNI and `Host` to verify for TLS; empty: the peer's host name.
    #[serde(default)]
    pub sni: String,
    /// Verify the origin's TLS certificate (turn off only for a self-signed test origin).
    #[serde(default = "default_true")]
    pub verify_cert: bool,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: HumanDuration,
}

fn default_true() -> bool {
    true
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration::secs(2)
}

fn default_read_timeout() -> HumanDuration {
    HumanDuration::secs(60)
}

/// `upstream.health_check:`.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// How often each peer is probed.
    #[default(HumanDuration::secs(5))]
    pub interval: HumanDuration,
    /// None: a TCP connect. A path such as `/healthz`: an HTTP GET that must answer 200.
    pub path: Option<String>,
}

/// Picks the peer for each proxied request.
pub struct Upstream {
    balancer: Arc<LoadBalancer<RoundRobin>>,
    tls: bool,
    sni: String,
    verify_cert: bool,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
}

/// The background service that runs the health checks; add it to the server.
pub type HealthCheckService = GenBackgroundService<LoadBalancer<RoundRobin>>;

/// Resolves every `upstream.peers` entry to socket addresses. Runs at start-up and for `--check`;
/// a name that does not resolve is a problem naming its index, never a panic later.
pub fn resolve(cfg: &UpstreamConfig) -> Result<Vec<SocketAddr>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut addrs = Vec::new();
    if cfg.peers.is_empty() {
        problems.push(Problem::new("upstream.peers", "must not be empty"));
    }
    for (i, peer) in cfg.peers.iter().enumerate() {
        match peer.to_socket_addrs() {
            Ok(resolved) => {
                let before = addrs.len();
                addrs.extend(resolved.filter(|a| !addrs.contains(a)).collect::<Vec<_>>());
                if addrs.len() == before && !cfg.peers[..i].contains(peer) {
                    problems.push(Problem::new(
                        format!("upstream.peers[{i}]"),
                        format!("`{peer}` resolves to no address"),
                    ));
                }
            }
            Err(e) => problems.push(Problem::new(
                format!("upstream.peers[{i}]"),
                format!("cannot resolve `{peer}` (write host:port): {e}"),
            )),
        }
    }
    if cfg.connect_timeout.0.is_zero() {
        problems.push(Problem::new(
            "upstream.connect_timeout",
            "must be more than 0",
        ));
    }
    if cfg.read_timeout.0.is_zero() {
        problems.push(Problem::new("upstream.read_timeout", "must be more than 0"));
    }
    if cfg
        .health_check
        .path
        .as_deref()
        .is_some_and(|p| !p.starts_with('/') || p.contains(char::is_whitespace))
    {
        problems.push(Problem::new(
            "upstream.health_check.path",
            "must be a path such as /healthz",
        ));
    }
    if cfg.health_check.interval.0.is_zero() {
        problems.push(Problem::new(
            "upstream.health_check.interval",
            "must be more than 0",
        ));
    }
    if problems.is_empty() {
        Ok(addrs)
    } else {
        Err(problems)
    }
}

impl Upstream {
    /// Builds the balancer over the resolved `addrs` and the health check service that keeps it
    /// current.
    pub fn new(
        cfg: &UpstreamConfig,
        addrs: &[SocketAddr],
    ) -> Result<(Upstream, HealthCheckService)> {
        let mut balancer = LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().copied())
            .map_err(|e| {
                Error::because(
                    ErrorType::InternalError,
                    "building the upstream balancer",
                    e,
                )
            })?;
        let check: Box<dyn HealthCheck + Send + Sync> = match &cfg.health_check.path {
            Some(path) => {
                let mut check = HttpHealthCheck::new(&sni_of(cfg), cfg.tls);
                check.req = RequestHeader::build("GET", path.as_bytes(), None)?;
                check.req.insert_header("Host", sni_of(cfg))?;
                check.peer_template.options.verify_cert = cfg.verify_cert;
                check.peer_template.options.verify_hostname = cfg.verify_cert;
                Box::new(check)
            }
            None if cfg.tls => {
                let mut check = TcpHealthCheck::new_tls(&sni_of(cfg));
                check.peer_template.options.verify_cert = cfg.verify_cert;
                check.peer_template.options.verify_hostname = cfg.verify_cert;
                check
            }
            None => TcpHealthCheck::new(),
        };
        balancer.set_health_check(check);
        balancer.health_check_frequency = Some(cfg.health_check.interval.0);
        let service = background_service("upstream health check", balancer);
        let upstream = Upstream {
            balancer: service.task(),
            tls: cfg.tls,
            sni: sni_of(cfg),
            verify_cert: cfg.verify_cert,
            connect_timeout: cfg.connect_timeout.0,
            read_timeout: cfg.read_timeout.0,
        };
        Ok((upstream, service))
    }

    /// Runs for every proxied request: the next healthy peer, round robin.
    pub fn peer(&self) -> Result<Box<HttpPeer>> {
        let backend = self
            .balancer
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no healthy upstream peer"))?;
        let addr = *backend.addr.as_inet().ok_or_else(|| {
            Error::explain(
                ErrorType::ConnectNoRoute,
                "upstream peer is not an inet address",
            )
        })?;
        let mut peer = HttpPeer::new(addr, self.tls, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.verify_cert = self.verify_cert;
        peer.options.verify_hostname = self.verify_cert;
        Ok(Box::new(peer))
    }
}

/// The configured SNI, or the host part of the first peer.
fn sni_of(cfg: &UpstreamConfig) -> String {
    if !cfg.sni.is_empty() {
        return cfg.sni.clone();
    }
    let first = cfg.peers.first().map(String::as_str).unwrap_or_default();
    first
        .rsplit_once(':')
        .map_or(first, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}
