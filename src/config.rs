//! The YAML configuration file, as written by the user: one type for the whole file. [`Postbacks`]
//! reads `routes`, `auth`, `client_ip`, `postback`, `sinks` and `delivery`; the standalone proxy
//! reads `server`, `listen`, `admin` and `upstream` besides.
//!
//! [`Postbacks`]: crate::Postbacks
//!
//! These types mirror the file one to one; every key has a default except `upstream.peers`, and an
//! unknown key is an error. Checks that need more than the shape of the file (does the sink exist,
//! does the peer resolve, is the template well formed) run in [`crate::app::App::build`], which
//! reports each problem with the dotted path of the field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use smart_default::SmartDefault;

use crate::http::client_ip::ClientIpConfig;
use crate::http::upstream::UpstreamConfig;
use crate::postback::auth::AuthConfig;
use crate::postback::config::PostbackConfig;
use crate::postback::route::{default_routes, RouteConfig};
use crate::sink::SinkConfig;
use crate::units::HumanDuration;

/// One problem found in the configuration: the dotted path of the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field, e.g. `sinks.main.path` or `routes[1].path`.
    pub field: String,
    /// What is wrong, in a few words.
    pub message: String,
}

impl Problem {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses each entry of the list `field` with `parse`: the entries it accepts, and a problem
/// named `field[i]` with its message for each one it refuses. Runs at start-up.
pub fn parse_list<S, T>(
    field: &str,
    entries: &[S],
    parse: impl Fn(&S) -> Result<T, String>,
) -> (Vec<T>, Vec<Problem>) {
    let mut parsed = Vec::new();
    let mut problems = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match parse(entry) {
            Ok(value) => parsed.push(value),
            Err(message) => problems.push(Problem::new(format!("{field}[{i}]"), message)),
        }
    }
    (parsed, problems)
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid YAML or does not have the expected shape (this names line and field).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The file parsed, but some values are wrong.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl Config {
    /// Reads and parses `path`. Runs once at start-up (and for `--check`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the YAML text of a configuration file; the error names the line and the field.
    pub fn parse(text: &str) -> Result<Config, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }
}

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `server:`: Pingora's own settings (the standalone proxy).
    #[serde(default)]
    pub server: ServerSettings,
    /// `listen:`: the addresses served (the standalone proxy).
    #[serde(default = "default_listen")]
    pub listen: Vec<ListenConfig>,
    /// `admin:`: the admin listener, if any (the standalone proxy).
    pub admin: Option<AdminConfig>,
    /// `upstream:`: the origin (the standalone proxy requires it; an embedding proxy has its own).
    pub upstream: Option<UpstreamConfig>,
    /// `routes:`, tried in order. Default: the Treasure Data route alone, to the sink `main`.
    #[serde(default = "default_routes")]
    pub routes: Vec<RouteConfig>,
    /// `auth:`: the write keys.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `client_ip:`: whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    /// `postback:`: limits and the special parameters.
    #[serde(default)]
    pub postback: PostbackConfig,
    /// `sinks:`. Absent, and no sink registered in code: `main` is a file sink at
    /// `data/events.jsonl`.
    pub sinks: Option<BTreeMap<String, SinkConfig>>,
    /// `delivery:`: the buffer, batches and retries.
    #[serde(default)]
    pub delivery: crate::delivery::DeliveryConfig,
    /// `identity:`: cookie extension on proxied pages and td-js-sdk's server cookie endpoint.
    #[serde(default)]
    pub identity: crate::identity::config::IdentityConfig,
}

/// `server:`: the subset of Pingora's own server settings we pass through.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Worker threads of the proxy service.
    #[default(std::thread::available_parallelism().map_or(1, |n| n.get()))]
    pub threads: usize,
    /// How long Pingora lets in-flight requests finish after SIGTERM.
    #[default(3)]
    pub grace_period_seconds: u64,
    /// How long runtimes get to stop after the grace period.
    #[default(5)]
    pub graceful_shutdown_timeout_seconds: u64,
    /// The Unix socket through which `--upgrade` takes over the listening sockets.
    #[default("/tmp/postback-proxy.sock")]
    pub upgrade_sock: String,
    /// Where `--daemon` writes its pid.
    #[default("/tmp/postback-proxy.pid")]
    pub pid_file: String,
    /// Run as a daemon (same as `--daemon`).
    pub daemon: bool,
    /// Where a daemon writes its log.
    pub error_log: Option<String>,
    /// Drop privileges to this user after binding (daemon mode).
    pub user: Option<String>,
    /// Drop privileges to this group after binding (daemon mode).
    pub group: Option<String>,
    /// Let idle worker threads take tasks from busy ones (Pingora's `work_stealing`); `false`
    /// gives each thread its own single-threaded runtime, and new connections go to a thread at
    /// random. Unset: on with more than one thread; with one there is nothing to steal from, and
    /// the single-threaded runtime costs less per request.
    pub work_stealing: Option<bool>,
    /// How long an idle keep-alive connection waits for its next request.
    #[default(60)]
    pub keepalive_timeout_seconds: u64,
    // --- fast path (issue 12; src/http/fast) ---
    /// The whole request head must arrive within this (from the connection's start, or from the
    /// first byte of a later request on a keep-alive connection); then the connection is closed.
    /// Enforced by the fast path's reader (`fast_path: true`).
    #[default(HumanDuration::secs(30))]
    pub header_timeout: HumanDuration,
    /// Open connections per process (every listener together); beyond it a new connection is
    /// closed at once and counted in `server_connections_refused_total`.
    #[default(10_000)]
    pub max_connections: usize,
    /// Read every plain HTTP/1.1 connection in our own loop, answer postbacks there and hand
    /// every other request to Pingora on the same connection; `false`: Pingora reads everything.
    #[default(true)]
    pub fast_path: bool,
}

impl ServerSettings {
    /// Whether Pingora's runtime steals work between threads: `work_stealing` as set, else only
    /// with more than one thread.
    pub fn steals_work(&self) -> bool {
        self.work_stealing.unwrap_or(self.threads > 1)
    }
}

/// One entry of `listen:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// `ip:port` to bind.
    pub address: String,
    /// Serve TLS (HTTP/1.1 and HTTP/2 by ALPN) with these files.
    pub tls: Option<TlsConfig>,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_listen() -> Vec<ListenConfig> {
    vec![ListenConfig {
        address: "0.0.0.0:8080".into(),
        tls: None,
    }]
}

/// `admin:`: the listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` of the admin listener.
    pub address: String,
    /// How many recent records and refusals the live view (`/`) keeps; 0 turns it off.
    #[serde(default = "default_recent_records")]
    pub recent_records: usize,
}

fn default_recent_records() -> usize {
    crate::http::builder::DEFAULT_RECENT_RECORDS
}

#[cfg(test)]
use crate::delivery::{FsyncPolicy, WhenFull};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postback::cookie::SecureSetting;
    use crate::units::ByteSize;

    #[test]
    fn work_stealing_is_on_with_more_than_one_thread_unless_set() {
        let server = |yaml: &str| {
            Config::parse(&format!(
                "server: {yaml}\nupstream: {{ peers: ['127.0.0.1:3000'] }}"
            ))
            .unwrap()
            .server
        };
        assert!(!server("{threads: 1}").steals_work());
        assert!(server("{threads: 2}").steals_work());
        assert!(server("{threads: 1, work_stealing: true}").steals_work());
        assert!(!server("{threads: 4, work_stealing: false}").steals_work());
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let c = Config::parse("upstream: { peers: ['127.0.0.1:3000'] }").unwrap();
        assert_eq!(c.listen[0].address, "0.0.0.0:8080");
        assert_eq!(c.routes[0].path, "/postback/v3/event/{database}/{table}");
        assert_eq!(c.routes[0].sink.names(), ["main"]);
        assert!(
            c.sinks.is_none()
                && matches!(crate::sink::default_sinks()["main"], SinkConfig::File(ref f) if f.path == Path::new("data/events.jsonl"))
        );
        assert!(c.auth.write_keys.is_empty());
        assert_eq!(c.postback.max_url_bytes, ByteSize(16384));
        assert_eq!(c.postback.max_body_bytes, ByteSize(1_048_064));
        assert!(c.admin.is_none());
        assert_eq!(c.delivery.when_full, WhenFull::Reject);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key_and_line() {
        let err =
            Config::parse("upstream:\n  peers: ['127.0.0.1:3000']\n  timeout: 5s\n").unwrap_err();
        assert!(err.contains("timeout"), "{err}");
        assert!(err.contains('3'), "{err}");
        let err =
            Config::parse("upstream: { peers: [a] }\nsinks:\n  main: { type: file, pth: x }\n")
                .unwrap_err();
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn upstream_peers_are_required() {
        let config = Config::parse("listen: [{address: '127.0.0.1:1'}]").unwrap();
        let problems = crate::App::validate(config);
        assert!(
            problems.iter().any(|p| p.field == "upstream.peers"),
            "{problems:?}"
        );
    }

    #[test]
    fn secure_and_fsync_words() {
        let c = Config::parse(
            "upstream: {peers: [a]}\npostback: {global_id: {secure: true}}\ndelivery: {fsync: always}",
        )
        .unwrap();
        assert_eq!(c.postback.global_id.secure, SecureSetting::Always);
        assert_eq!(c.delivery.fsync, FsyncPolicy::Always);
        let c = Config::parse("upstream: {peers: [a]}\ndelivery: {fsync: 250ms}").unwrap();
        assert_eq!(
            c.delivery.fsync,
            FsyncPolicy::Every(HumanDuration::millis(250))
        );
    }
}
