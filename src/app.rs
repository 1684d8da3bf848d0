//! Assembling the parts from the configuration, and running the Pingora server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::config::{Config, Problem};
use crate::delivery::Delivery;
use crate::http::admin::AdminApp;
use crate::http::client_ip::ClientIpPolicy;
use crate::http::postbacks::Postbacks;
use crate::http::proxy::PostbackProxy;
use crate::http::upstream::{self, HealthCheckService, Upstream};
use crate::postback::auth::KeyStore;
use crate::postback::route::{Route, Router};
use crate::postback::Postback;
use crate::{sink, units::HumanDuration};

/// The largest body a postback may have (`postback.max_body_bytes`), so that the record made of
/// it always fits one frame of the disk buffer.
// TODO(lead): take this from the delivery side once the frame limit is exported there.
const MAX_RECORD_BYTES: u64 = 32 << 20;

/// What the configuration checks produce, before anything is opened.
struct Checked {
    router: Router,
    postback: Postback,
    upstream_addrs: Vec<SocketAddr>,
    sink_names: Vec<String>,
}

/// Runs every check on `config` that needs no side effects: routes, keys, limits, sinks,
/// addresses, upstream resolution. Each problem names its field.
fn check(config: &Config) -> Result<Checked, Vec<Problem>> {
    let mut problems = Vec::new();
    let sink_names: Vec<String> = config.sinks.keys().cloned().collect();
    if sink_names.is_empty() {
        problems.push(Problem::new("sinks", "must not be empty"));
    }
    for (name, cfg) in &config.sinks {
        problems.extend(sink::validate(name, cfg));
    }
    if config.routes.is_empty() {
        problems.push(Problem::new("routes", "must not be empty"));
    }
    let mut routes = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        let field = format!("routes[{i}]");
        let mut sinks = Vec::new();
        for name in r.sink.names() {
            match sink_names.iter().position(|n| n == name) {
                Some(id) if sinks.contains(&id) => problems.push(Problem::new(
                    format!("{field}.sink"),
                    format!("names `{name}` twice"),
                )),
                Some(id) => sinks.push(id),
                None => problems.push(Problem::new(
                    format!("{field}.sink"),
                    format!("no sink named `{name}` in `sinks`"),
                )),
            }
        }
        if r.sink.names().is_empty() {
            problems.push(Problem::new(
                format!("{field}.sink"),
                "must name at least one sink",
            ));
        }
        if sinks.len() != r.sink.names().len() {
            continue;
        }
        match Route::compile(r, sinks, &field) {
            Ok(route) => routes.push(route),
            Err(p) => problems.extend(p),
        }
    }
    for name in &sink_names {
        if !config.routes.iter().any(|r| r.sink.names().contains(name)) {
            warn!("sink `{name}` is configured but no route uses it");
        }
    }
    let client_ip = ClientIpPolicy::from_config(&config.client_ip).map_err(|p| problems.extend(p));
    let keys = KeyStore::from_config(&config.auth.write_keys).map_err(|p| problems.extend(p));
    let postback = match (keys, client_ip) {
        (Ok(keys), Ok(client_ip)) => {
            Postback::from_config(&config.postback, keys, client_ip, MAX_RECORD_BYTES)
                .map_err(|p| problems.extend(p))
        }
        _ => Err(()),
    };
    if config.auth.write_keys.is_empty() {
        warn!("auth.write_keys is empty: every postback will be refused with 403");
    }
    if config.listen.is_empty() {
        problems.push(Problem::new("listen", "must not be empty"));
    }
    for (i, l) in config.listen.iter().enumerate() {
        if l.address.parse::<SocketAddr>().is_err() {
            problems.push(Problem::new(
                format!("listen[{i}].address"),
                format!("`{}` is not an ip:port address", l.address),
            ));
        }
        if let Some(tls) = &l.tls {
            problems.extend(check_tls_files(tls, &format!("listen[{i}].tls")));
        }
    }
    if let Some(admin) = &config.admin {
        if admin.address.parse::<SocketAddr>().is_err() {
            problems.push(Problem::new(
                "admin.address",
                format!("`{}` is not an ip:port address", admin.address),
            ));
        } else if config.listen.iter().any(|l| l.address == admin.address) {
            problems.push(Problem::new(
                "admin.address",
                "must differ from every listen address",
            ));
        }
    }
    if config.server.keepalive_timeout_seconds == 0 {
        problems.push(Problem::new(
            "server.keepalive_timeout_seconds",
            "must be at least 1",
        ));
    }
    if config.server.threads == 0 {
        problems.push(Problem::new("server.threads", "must be at least 1"));
    }
    problems.extend(Delivery::validate(&config.delivery));
    let upstream_addrs = upstream::resolve(&config.upstream).map_err(|p| problems.extend(p));
    match (postback, upstream_addrs) {
        (Ok(postback), Ok(upstream_addrs)) if problems.is_empty() => Ok(Checked {
            router: Router::new(routes),
            postback,
            upstream_addrs,
            sink_names,
        }),
        _ => Err(problems),
    }
}

/// Loads a listener's certificate chain and key as Pingora will, so a bad pair is a problem
/// named by its field rather than a failure of the running server.
fn check_tls_files(tls: &crate::config::TlsConfig, field: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (what, path) in [("cert", &tls.cert), ("key", &tls.key)] {
        if !path.is_file() {
            problems.push(Problem::new(
                format!("{field}.{what}"),
                format!("`{}` is not a readable file", path.display()),
            ));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let (cert, key) = (tls.cert.to_string_lossy(), tls.key.to_string_lossy());
    let loaded = match pingora::tls::load_certs_and_key_files(&cert, &key) {
        Ok(Some(pair)) => pair,
        _ => {
            return vec![Problem::new(
                format!("{field}.cert"),
                format!(
                "cannot load a PEM certificate chain from `{cert}` and a private key from `{key}`"
            ),
            )]
        }
    };
    crate::http::tls::install_crypto_provider();
    let (certs, key_der) = loaded;
    if let Err(e) = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
    {
        problems.push(Problem::new(
            format!("{field}.key"),
            format!("does not fit the certificate in `{cert}`: {e}"),
        ));
    }
    problems
}

/// Checks `config` as `--check` does; an empty list means it would start.
pub fn validate(config: &Config) -> Vec<Problem> {
    check(config).err().unwrap_or_default()
}

/// The assembled proxy, ready to run.
pub struct App {
    config: Config,
    proxy: PostbackProxy,
    delivery: Arc<Delivery>,
    health_check: HealthCheckService,
}

impl App {
    /// Checks `config` and opens its sinks. Runs once at start-up.
    pub fn build(config: Config) -> Result<App, Vec<Problem>> {
        let checked = check(&config)?;
        let mut sinks = Vec::new();
        let mut problems = Vec::new();
        for name in &checked.sink_names {
            match sink::open(name, &config.sinks[name]) {
                Ok(s) => sinks.push((name.clone(), s)),
                Err(p) => problems.push(p),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let (upstream, health_check) = Upstream::new(&config.upstream, &checked.upstream_addrs)
            .map_err(|e| vec![Problem::new("upstream.peers", e.to_string())])?;
        let delivery = Delivery::open(&config.delivery, sinks).map_err(|e| {
            vec![Problem::new(
                "delivery.dir",
                format!(
                    "cannot open the buffer in `{}`: {e}",
                    config.delivery.dir.display()
                ),
            )]
        })?;
        let delivery = Arc::new(delivery);
        let postbacks = Arc::new(Postbacks::new(
            checked.router,
            checked.postback,
            delivery.clone(),
        ));
        let proxy =
            PostbackProxy::new(postbacks, upstream, config.server.keepalive_timeout_seconds);
        Ok(App {
            config,
            proxy,
            delivery,
            health_check,
        })
    }

    /// Runs the server until SIGTERM, SIGINT or SIGQUIT, then delivers what is queued and returns.
    /// `daemon` and `upgrade` are the command-line switches.
    pub fn run(self, daemon: bool, upgrade: bool) -> Result<(), pingora::BError> {
        let s = &self.config.server;
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
        conf.work_stealing = s.work_stealing;
        let opt = Opt {
            upgrade,
            daemon: conf.daemon,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();

        let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, self.proxy);
        for l in &self.config.listen {
            match &l.tls {
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
        server.add_service(background_service(
            "delivery",
            DeliveryStarter(self.delivery.clone()),
        ));
        if let Some(admin) = &self.config.admin {
            let mut service =
                Service::new("admin".to_string(), AdminApp::new(self.delivery.clone()));
            service.add_tcp(&admin.address);
            server.add_service(service);
            info!("admin listener on {}", admin.address);
        }

        server.run(RunArgs::default());
        let drain = HumanDuration::secs(self.config.server.graceful_shutdown_timeout_seconds);
        self.delivery.finish(drain.0.max(Duration::from_secs(1)));
        Ok(())
    }
}

/// Starts the delivery thread inside Pingora's service start-up, i.e. after any daemon fork.
struct DeliveryStarter(Arc<Delivery>);

#[async_trait]
impl BackgroundService for DeliveryStarter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if let Err(e) = self.0.start() {
            error!("cannot start the delivery thread: {e}");
        }
        // Delivery runs on its own thread; this service only lives as long as the server.
        let _ = shutdown.changed().await;
    }
}
