//! The standalone proxy: assembling it from the configuration file, and running the Pingora
//! server. It is built on the same public pieces an embedding proxy uses ([`Postbacks`], its
//! delivery and admin services), plus the parts only a standalone server has: listeners, TLS,
//! the upstream peers and their health checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::info;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};

use crate::config::{AdminConfig, Config, ListenConfig, Problem, ServerSettings};
use crate::http::builder::PostbacksBuilder;
use crate::http::fast::{FastApp, FastSettings};
use crate::http::postbacks::Postbacks;
use crate::http::proxy::PostbackProxy;
use crate::http::tls;
use crate::http::upstream::{self, HealthCheckService, Upstream, UpstreamConfig};
use pingora::services::listening::Service;

/// The server's own sections of the file, beside what [`Postbacks`] reads.
struct ServerParts {
    server: ServerSettings,
    listen: Vec<ListenConfig>,
    admin: Option<AdminConfig>,
    recent_records: usize,
    upstream: Option<UpstreamConfig>,
}

/// Splits the file into the server's sections and the postbacks' builder.
fn split(mut config: Config) -> (ServerParts, PostbacksBuilder) {
    let parts = ServerParts {
        server: std::mem::take(&mut config.server),
        listen: std::mem::take(&mut config.listen),
        recent_records: config.admin.as_ref().map_or(0, |a| a.recent_records),
        admin: config.admin.take(),
        upstream: config.upstream.take(),
    };
    let builder = Postbacks::builder(config).recent_records(parts.recent_records);
    (parts, builder)
}

/// Checks the server's sections: listeners, the admin address, thread and keep-alive settings,
/// and resolves the upstream peers. Each problem names its field.
fn check_server(parts: &ServerParts) -> Result<Vec<SocketAddr>, Vec<Problem>> {
    let mut problems = Vec::new();
    if parts.listen.is_empty() {
        problems.push(Problem::new("listen", "must not be empty"));
    }
    for (i, l) in parts.listen.iter().enumerate() {
        if l.address.parse::<SocketAddr>().is_err() {
            problems.push(Problem::new(
                format!("listen[{i}].address"),
                format!("`{}` is not an ip:port address", l.address),
            ));
        }
        if let Some(tls) = &l.tls {
            problems.extend(tls::check_files(tls, &format!("listen[{i}].tls")));
        }
    }
    if let Some(admin) = &parts.admin {
        if admin.address.parse::<SocketAddr>().is_err() {
            problems.push(Problem::new(
                "admin.address",
                format!("`{}` is not an ip:port address", admin.address),
            ));
        } else if parts.listen.iter().any(|l| l.address == admin.address) {
            problems.push(Problem::new(
                "admin.address",
                "must differ from every listen address",
            ));
        }
    }
    if parts.server.keepalive_timeout_seconds == 0 {
        problems.push(Problem::new(
            "server.keepalive_timeout_seconds",
            "must be at least 1",
        ));
    }
    if parts.server.header_timeout.0.is_zero() {
        problems.push(Problem::new("server.header_timeout", "must be more than 0"));
    }
    if parts.server.max_connections == 0 {
        problems.push(Problem::new("server.max_connections", "must be at least 1"));
    }
    if parts.server.threads == 0 {
        problems.push(Problem::new("server.threads", "must be at least 1"));
    }
    let Some(upstream) = &parts.upstream else {
        problems.push(Problem::new(
            "upstream.peers",
            "is required: the origin every other request goes to",
        ));
        return Err(problems);
    };
    let addrs = upstream::resolve(upstream).map_err(|p| problems.extend(p));
    match addrs {
        Ok(addrs) if problems.is_empty() => Ok(addrs),
        _ => Err(problems),
    }
}

/// The standalone proxy, assembled from the whole configuration file and ready to run: what
/// the `postback-proxy` binary runs.
pub struct App {
    parts: ServerParts,
    postbacks: Arc<Postbacks>,
    proxy: PostbackProxy,
    health_check: HealthCheckService,
}

impl App {
    /// Checks `config` as `--check` does, opening nothing; an empty list means it would start.
    pub fn validate(config: Config) -> Vec<Problem> {
        let (parts, postbacks) = split(config);
        let mut problems = postbacks.check();
        problems.extend(check_server(&parts).err().unwrap_or_default());
        problems
    }

    /// Checks `config`, opens its sinks and buffers. Runs once at start-up.
    pub fn build(config: Config) -> Result<App, Vec<Problem>> {
        let (parts, builder) = split(config);
        let mut problems = builder.check();
        let addrs = check_server(&parts).map_err(|p| problems.extend(p));
        let addrs = match addrs {
            Ok(addrs) if problems.is_empty() => addrs,
            _ => return Err(problems),
        };
        let postbacks = Arc::new(builder.build().map_err(|e| e.0)?);
        let Some(upstream_cfg) = &parts.upstream else {
            return Err(vec![Problem::new("upstream.peers", "is required")]);
        };
        let (upstream, health_check) = Upstream::new(upstream_cfg, &addrs)
            .map_err(|e| vec![Problem::new("upstream.peers", e.to_string())])?;
        let proxy = PostbackProxy::new(
            postbacks.clone(),
            upstream,
            parts.server.keepalive_timeout_seconds,
        );
        Ok(App {
            parts,
            postbacks,
            proxy,
            health_check,
        })
    }

    /// Runs the server until SIGTERM, SIGINT or SIGQUIT, then delivers what is queued and returns.
    /// `daemon` and `upgrade` are the command-line switches.
    pub fn run(self, daemon: bool, upgrade: bool) -> Result<(), pingora::BError> {
        let s = &self.parts.server;
        let mut conf = ServerConf {
            threads: s.threads,
            daemon: daemon || s.daemon,
            grace_period_seconds: Some(s.grace_period_seconds),
            graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
            upgrade_sock: s.upgrade_sock.clone(),
            pid_file: s.pid_file.clone(),
            error_log: s.error_log.clone(),
            user: s.user.clone(),
            group: s.group.clone(),
            ..ServerConf::default()
        };
        conf.work_stealing = s.steals_work();
        let opt = Opt {
            upgrade,
            daemon: conf.daemon,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();

        // The listener service is `FastApp` (the connection limit, then the postback fast path
        // or Pingora's own loop) in front of Pingora's `HttpProxy`.
        let fast = s.fast_path;
        let shared = fast.then(|| FastSettings {
            postbacks: self.postbacks.clone(),
            keepalive: Duration::from_secs(s.keepalive_timeout_seconds),
            header_timeout: s.header_timeout.0,
        });
        let pingora_proxy = pingora::proxy::http_proxy(&server.configuration, self.proxy);
        let app = FastApp::new(pingora_proxy, shared, s.max_connections)?;
        let mut proxy = Service::new("Pingora HTTP Proxy Service".to_string(), app);
        for l in &self.parts.listen {
            match &l.tls {
                // The fast path reads into its own buffer: no 64 KiB L4 read buffer per
                // connection in front of it.
                None if fast => proxy.add_listener(
                    ListenerConfig::tcp(&l.address).l4_buffer(L4BufferSettings::default().read(0)),
                ),
                None => proxy.add_tcp(&l.address),
                Some(tls) => {
                    let mut settings = TlsSettings::intermediate(
                        &tls.cert.to_string_lossy(),
                        &tls.key.to_string_lossy(),
                    )?;
                    settings.enable_h2();
                    proxy.add_tls_with_settings(&l.address, None, settings);
                }
            }
            info!(
                "listening on {}{}",
                l.address,
                if l.tls.is_some() { " (TLS)" } else { "" }
            );
        }
        server.add_service(proxy);
        server.add_service(self.health_check);
        server.add_service(self.postbacks.delivery_service_without_drain());
        if let Some(admin) = &self.parts.admin {
            server.add_service(self.postbacks.admin_service(&admin.address));
            info!("admin listener on {}", admin.address);
        }

        server.run(RunArgs::default());
        let drain = Duration::from_secs(self.parts.server.graceful_shutdown_timeout_seconds);
        self.postbacks.finish(drain.max(Duration::from_secs(1)));
        Ok(())
    }
}
