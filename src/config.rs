//! The YAML configuration file, as written by the user.
//!
//! These types mirror the file one to one; every key has a default except `upstream.peers`, and an
//! unknown key is an error. Checks that need more than the shape of the file (does the sink exist,
//! does the peer resolve, is the template well formed) run in [`crate::app::App::build`], which
//! reports each problem with the dotted path of the field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::privacy::PrivacyConfig;
use crate::sink::SinkConfig;
use crate::units::{ByteSize, HumanDuration};

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
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default = "default_listen")]
    pub listen: Vec<ListenConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    pub upstream: UpstreamConfig,
    #[serde(default = "default_routes")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub postback: PostbackConfig,
    #[serde(default = "crate::sink::default_sinks")]
    pub sinks: BTreeMap<String, SinkConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// `server:`: the subset of Pingora's own server settings we pass through.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// How long Pingora lets in-flight requests finish after SIGTERM.
    pub grace_period_seconds: u64,
    /// How long runtimes get to stop after the grace period.
    pub graceful_shutdown_timeout_seconds: u64,
    /// The Unix socket through which `--upgrade` takes over the listening sockets.
    pub upgrade_sock: String,
    /// Where `--daemon` writes its pid.
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
    /// gives each thread its own single-threaded runtime.
    pub work_stealing: bool,
    /// How long an idle keep-alive connection waits for its next request.
    pub keepalive_timeout_seconds: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            grace_period_seconds: 3,
            graceful_shutdown_timeout_seconds: 5,
            upgrade_sock: "/tmp/postback-proxy.sock".into(),
            pid_file: "/tmp/postback-proxy.pid".into(),
            daemon: false,
            error_log: None,
            user: None,
            group: None,
            work_stealing: true,
            keepalive_timeout_seconds: 60,
        }
    }
}

/// One entry of `listen:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// `ip:port` to bind.
    pub address: String,
    /// Serve TLS (HTTP/1.1 and HTTP/2 by ALPN) with these files.
    #[serde(default)]
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
    pub address: String,
}

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

fn default_connect_timeout() -> HumanDuration {
    HumanDuration::secs(2)
}

fn default_read_timeout() -> HumanDuration {
    HumanDuration::secs(60)
}

/// `upstream.health_check:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// How often each peer is probed.
    pub interval: HumanDuration,
    /// None: a TCP connect. A path such as `/healthz`: an HTTP GET that must answer 200.
    pub path: Option<String>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: HumanDuration::secs(5),
            path: None,
        }
    }
}

/// The answer a route gives when the request has no `td_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The 1x1 GIF.
    Pixel,
    /// `{}` as `application/json`.
    #[default]
    Json,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The path template, e.g. `/postback/v3/event/{database}/{table}`.
    pub path: String,
    /// A fixed database, for templates without `{database}`.
    #[serde(default)]
    pub database: Option<String>,
    /// A fixed table, for templates without `{table}`.
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub default_format: Format,
    /// The name of the sink (a key of `sinks:`).
    #[serde(default = "default_sink_name")]
    pub sink: String,
    /// Replaces `postback.privacy` for this route.
    #[serde(default)]
    pub privacy: Option<PrivacyConfig>,
}

fn default_sink_name() -> String {
    "main".into()
}

fn default_routes() -> Vec<RouteConfig> {
    vec![RouteConfig {
        path: "/postback/v3/event/{database}/{table}".into(),
        database: None,
        table: None,
        default_format: Format::Json,
        sink: default_sink_name(),
        privacy: None,
    }]
}

/// `auth:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The accepted write keys; none: every postback is refused with 403.
    pub write_keys: Vec<WriteKeyConfig>,
}

/// One write key: the key itself or its SHA-256, and the databases it may write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteKeyConfig {
    #[serde(default)]
    pub key: Option<String>,
    /// Hex SHA-256 of the key, so the file holds no secret.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Glob patterns (`*`, `?`) of the databases this key may write.
    #[serde(default = "default_databases")]
    pub databases: Vec<String>,
}

fn default_databases() -> Vec<String> {
    vec!["*".into()]
}

/// `postback:`: limits and the behaviour of the special parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostbackConfig {
    pub max_url_bytes: ByteSize,
    pub max_body_bytes: ByteSize,
    pub max_columns: usize,
    pub record_time_window: TimeWindowConfig,
    pub redirect: RedirectConfig,
    pub global_id: GlobalIdConfig,
    pub client_ip: ClientIpConfig,
    pub cors: CorsConfig,
    pub privacy: PrivacyConfig,
    pub rate_limit: RateLimitConfig,
}

/// `postback.rate_limit:`: postbacks per second allowed from one client address.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// None: no limit. Past it, `429` with `Retry-After: 1`.
    pub per_second: Option<u64>,
}

impl Default for PostbackConfig {
    fn default() -> Self {
        PostbackConfig {
            max_url_bytes: ByteSize::kib(16),
            max_body_bytes: ByteSize(1_048_064),
            max_columns: 512,
            record_time_window: TimeWindowConfig::default(),
            redirect: RedirectConfig::default(),
            global_id: GlobalIdConfig::default(),
            client_ip: ClientIpConfig::default(),
            cors: CorsConfig::default(),
            privacy: PrivacyConfig::default(),
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// `postback.record_time_window:`: how far `td_record_time` may lie from the receive time.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeWindowConfig {
    pub past: HumanDuration,
    pub future: HumanDuration,
}

impl Default for TimeWindowConfig {
    fn default() -> Self {
        TimeWindowConfig {
            past: HumanDuration::secs(7 * 86400),
            future: HumanDuration::secs(3 * 86400),
        }
    }
}

/// `postback.redirect:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedirectConfig {
    /// Hosts `td_redirect` may point to: `example.com`, or `*.example.com` for its subdomains.
    pub allowed_hosts: Vec<String>,
}

/// `SameSite` of the global-id cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

/// When the global-id cookie carries `Secure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecureSetting {
    /// When the request came over TLS.
    Auto,
    Always,
    Never,
}

impl<'de> Deserialize<'de> for SecureSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SecureSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto`, `true` or `false`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SecureSetting, E> {
                Ok(if v {
                    SecureSetting::Always
                } else {
                    SecureSetting::Never
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecureSetting, E> {
                match v {
                    "auto" => Ok(SecureSetting::Auto),
                    "true" => Ok(SecureSetting::Always),
                    "false" => Ok(SecureSetting::Never),
                    _ => Err(E::custom(format!(
                        "`{v}` is not one of `auto`, `true`, `false`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `postback.global_id:`: the cookie that carries the visitor's global id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalIdConfig {
    pub cookie: String,
    pub max_age: HumanDuration,
    /// The cookie's `Domain`; none: the request host.
    pub domain: Option<String>,
    pub same_site: SameSite,
    pub secure: SecureSetting,
}

impl Default for GlobalIdConfig {
    fn default() -> Self {
        GlobalIdConfig {
            cookie: "_td_global".into(),
            max_age: HumanDuration::secs(730 * 86400),
            domain: None,
            same_site: SameSite::Lax,
            secure: SecureSetting::Auto,
        }
    }
}

/// `postback.client_ip:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientIpConfig {
    /// Addresses or CIDR blocks whose `X-Forwarded-For` is believed; none by default.
    pub trusted_proxies: Vec<String>,
    /// Zero the last IPv4 octet / the last 80 bits of IPv6 before the address is recorded.
    pub anonymize: bool,
}

/// `postback.cors:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins (`https://www.example.com`) allowed to POST from browsers; `*` for any.
    pub allowed_origins: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// Where accepted records wait for their sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    /// A bounded queue in memory: fast; a crash loses what is queued.
    Memory,
    /// An append-only log on disk: a crash loses nothing.
    Disk,
}

/// What happens to a postback when the buffer is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Answer 503 with `Retry-After`; nothing accepted is lost.
    Reject,
    /// Answer as usual and count the dropped record.
    Drop,
}

/// How often the disk buffer is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every answer.
    Always,
    /// On this interval: the window a power loss can cost.
    Every(HumanDuration),
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "always" {
            return Ok(FsyncPolicy::Always);
        }
        humantime::parse_duration(&text)
            .map(|d| FsyncPolicy::Every(HumanDuration(d)))
            .map_err(|_| de::Error::custom(format!("`{text}` is neither `always` nor a duration")))
    }
}

/// `delivery:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub buffer: BufferKind,
    pub dir: PathBuf,
    pub max_bytes: ByteSize,
    pub queue_records: usize,
    pub fsync: FsyncPolicy,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub when_full: WhenFull,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            buffer: BufferKind::Disk,
            dir: "data/buffer".into(),
            max_bytes: ByteSize::gib(1),
            queue_records: 65536,
            fsync: FsyncPolicy::Every(HumanDuration::secs(1)),
            batch: BatchConfig::default(),
            retry: RetryConfig::default(),
            when_full: WhenFull::Reject,
        }
    }
}

/// `delivery.batch:`: how records are grouped for the sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_records: usize,
    pub max_bytes: ByteSize,
    pub max_wait: HumanDuration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 1000,
            max_bytes: ByteSize::mib(1),
            max_wait: HumanDuration::millis(100),
        }
    }
}

/// `delivery.retry:`: backoff for a failing sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: HumanDuration::millis(100),
            max: HumanDuration::secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_every_default() {
        let c = Config::parse("upstream: { peers: ['127.0.0.1:3000'] }").unwrap();
        assert_eq!(c.listen[0].address, "0.0.0.0:8080");
        assert_eq!(c.routes[0].path, "/postback/v3/event/{database}/{table}");
        assert_eq!(c.routes[0].sink, "main");
        assert!(
            matches!(c.sinks["main"], SinkConfig::File(ref f) if f.path == Path::new("data/events.jsonl"))
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
        let err = Config::parse("listen: [{address: '127.0.0.1:1'}]").unwrap_err();
        assert!(err.contains("upstream"), "{err}");
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
