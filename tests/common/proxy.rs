//! The real `postback-proxy` binary, started with a configuration written into a temporary
//! directory, listening on free loopback ports.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::process::{append, eventually, owns_listener, Proc};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The main write key: databases `web`, `ads_*`.
pub const KEY: &str = "1/0123456789abcdef0123456789abcdef";
/// A key for the database `other` only.
pub const OTHER_KEY: &str = "2/fedcba9876543210";
/// A key configured only by its SHA-256 (`key_sha256`), databases `hashed`.
pub const HASHED_KEY: &str = "3/only-the-digest-is-in-the-file";

/// The path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_postback-proxy")
}

/// What goes into the configuration file. `Settings::new(origin.peer())` is the usual harness
/// configuration; change fields before [`Proxy::start_with`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// `upstream.peers`.
    pub upstream: Vec<String>,
    /// `client_ip.trusted_proxies`.
    pub trusted_proxies: Vec<String>,
    /// `client_ip.anonymize`.
    pub anonymize: bool,
    pub max_url_bytes: String,
    pub max_body_bytes: String,
    pub max_columns: usize,
    /// The file sink's path; `None`: `<tempdir>/events.jsonl`.
    pub sink_path: Option<PathBuf>,
    /// `delivery.queue_records`.
    pub queue_records: usize,
    /// `delivery.when_full`.
    pub when_full: String,
    /// `delivery.batch.max_wait`.
    pub batch_max_wait: String,
    /// `delivery.batch.max_records`.
    pub batch_max_records: usize,
    /// `delivery.buffer`: `memory` or `disk`.
    pub buffer: String,
    /// Extra lines for the `postback:` section (indented by two spaces each).
    pub postback_extra: Vec<String>,
    /// Extra lines for the `upstream:` section (indented by two spaces each).
    pub upstream_extra: Vec<String>,
    /// The `main` sink as a YAML flow mapping (`{ type: http, url: ... }`); `None`: the file sink.
    pub sink_yaml: Option<String>,
    /// Extra lines for the `delivery:` section (indented by two spaces each).
    pub delivery_extra: Vec<String>,
    /// `upstream.connect_timeout`.
    pub connect_timeout: String,
    /// `upstream.read_timeout`.
    pub read_timeout: String,
    /// A second listener, with TLS from these files, on [`Proxy::tls_port`].
    pub tls_listener: Option<TlsFiles>,
    /// Extra environment variables for the process (e.g. `SSL_CERT_FILE`).
    pub env: Vec<(String, String)>,
    /// Extra entries at the end of `routes:` (lines indented by two spaces each).
    pub routes_extra: Vec<String>,
    /// Lines of an `identity:` section (indented by two spaces each); empty: no section.
    pub identity: Vec<String>,
}

/// A PEM certificate chain and key for a TLS listener (or a TLS origin).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway certificate authority and a server certificate it signed for `localhost` and
/// `127.0.0.1`, made with the `openssl` command.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate (PEM), to trust in clients.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server: TlsFiles,
}

/// Runs `openssl ARGS` in `dir`; panics with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestPki {
    /// Creates the files in `dir`.
    pub fn create(dir: &Path) -> TestPki {
        let openssl = |args: &[&str]| openssl(dir, args);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=postback-proxy test CA",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "server.csr",
        ]);
        fs::write(
            dir.join("server.ext"),
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "cert.pem",
        ]);
        TestPki {
            ca: dir.join("ca.pem"),
            server: TlsFiles {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            },
        }
    }
}

impl Settings {
    /// The harness configuration with `upstream` as the only peer.
    pub fn new(upstream: impl Into<String>) -> Settings {
        Settings {
            upstream: vec![upstream.into()],
            trusted_proxies: vec!["127.0.0.1/32".into()],
            anonymize: false,
            max_url_bytes: "4KiB".into(),
            max_body_bytes: "64KiB".into(),
            max_columns: 20,
            sink_path: None,
            queue_records: 10_000,
            when_full: "reject".into(),
            batch_max_wait: "10ms".into(),
            batch_max_records: 100,
            buffer: "memory".into(),
            postback_extra: Vec::new(),
            upstream_extra: Vec::new(),
            sink_yaml: None,
            delivery_extra: Vec::new(),
            connect_timeout: "2s".into(),
            read_timeout: "20s".into(),
            tls_listener: None,
            env: Vec::new(),
            routes_extra: Vec::new(),
            identity: Vec::new(),
        }
    }

    /// The harness configuration in front of every one of `origins`, in order.
    pub fn for_origins(origins: &[&super::Origin]) -> Settings {
        let mut settings = Settings::new(origins[0].peer());
        settings
            .upstream
            .extend(origins[1..].iter().map(|o| o.peer()));
        settings
    }

    /// The YAML text of the configuration (without the TLS listener).
    pub fn yaml(&self, dir: &Path, port: u16, admin_port: u16) -> String {
        self.yaml_with_tls(dir, port, admin_port, None)
    }

    /// The YAML text of the configuration; with `tls_listener` set, its listener is on
    /// `tls_port`.
    pub fn yaml_with_tls(
        &self,
        dir: &Path,
        port: u16,
        admin_port: u16,
        tls_port: Option<u16>,
    ) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sink = self
            .sink_path
            .clone()
            .unwrap_or_else(|| dir.join("events.jsonl"));
        let hashed = hex::encode(Sha256::digest(HASHED_KEY.as_bytes()));
        let indent =
            |lines: &[String]| -> String { lines.iter().map(|l| format!("  {l}\n")).collect() };
        let extra = indent(&self.postback_extra);
        let upstream_extra = indent(&self.upstream_extra);
        let delivery_extra = indent(&self.delivery_extra);
        let routes_extra = indent(&self.routes_extra);
        let identity = match self.identity.is_empty() {
            true => String::new(),
            false => format!("identity:\n{}", indent(&self.identity)),
        };
        let main_sink = match &self.sink_yaml {
            Some(yaml) => yaml.clone(),
            None => format!("{{ type: file, path: {:?} }}", sink.display().to_string()),
        };
        let tls_listen = match (&self.tls_listener, tls_port) {
            (None, _) => String::new(),
            (Some(files), Some(tls_port)) => format!(
                "  - address: 127.0.0.1:{tls_port}\n    tls: {{ cert: {:?}, key: {:?} }}\n",
                files.cert.display().to_string(),
                files.key.display().to_string()
            ),
            (Some(_), None) => panic!("a TLS listener needs a port: use yaml_with_tls"),
        };
        format!(
            r#"{server}
listen:
  - address: 127.0.0.1:{port}
{tls_listen}
admin:
  address: 127.0.0.1:{admin_port}

upstream:
  peers: [{upstream}]
  connect_timeout: {connect_timeout}
  read_timeout: {read_timeout}
{upstream_extra}
routes:
  - path: /postback/v3/event/{{database}}/{{table}}
    sink: main
  - path: /px/{{table}}.gif
    database: web
    default_format: pixel
    sink: main
  - path: /td/{{database}}/{{table}}
    sink: main
{routes_extra}
auth:
  write_keys:
    - key: "{KEY}"
      databases: ["web", "ads_*"]
    - key: "{OTHER_KEY}"
      databases: ["other"]
    - key_sha256: "{hashed}"
      databases: ["hashed"]

postback:
  max_url_bytes: {max_url}
  max_body_bytes: {max_body}
  max_columns: {max_columns}
  redirect:
    allowed_hosts: ["example.com", "*.example.com"]
  cors:
    allowed_origins: ["https://www.example.com"]
{extra}
client_ip:
  trusted_proxies: [{trusted}]
  anonymize: {anonymize}

sinks:
  main: {main_sink}

delivery:
  buffer: {buffer}
  dir: {dir}/buffer
  queue_records: {queue}
  when_full: {when_full}
  batch: {{ max_records: {batch_records}, max_wait: {max_wait} }}
  retry: {{ initial: 50ms, max: 500ms }}
{delivery_extra}
{identity}"#,
            server = server_yaml(dir),
            dir = dir.display(),
            upstream = list(&self.upstream),
            trusted = list(&self.trusted_proxies),
            anonymize = self.anonymize,
            max_url = self.max_url_bytes,
            max_body = self.max_body_bytes,
            max_columns = self.max_columns,
            queue = self.queue_records,
            when_full = self.when_full,
            batch_records = self.batch_max_records,
            max_wait = self.batch_max_wait,
            buffer = self.buffer,
            connect_timeout = self.connect_timeout,
            read_timeout = self.read_timeout,
        )
    }
}

pub use super::process::free_port;

/// A loopback port with nothing listening on it (bound, then released).
pub fn closed_port() -> u16 {
    free_port()
}

/// The `server:` section every test configuration starts with: two threads, short grace
/// periods, the upgrade socket and pid file in `dir`.
pub fn server_yaml(dir: &Path) -> String {
    format!(
        "server:
  threads: 2
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 2
  upgrade_sock: {dir}/upgrade.sock
  pid_file: {dir}/proxy.pid
",
        dir = dir.display()
    )
}

/// The `auth:` section with one write key, `key`, for the database `web`.
pub fn web_key_yaml(key: &str) -> String {
    format!("auth:\n  write_keys:\n    - key: \"{key}\"\n      databases: [\"web\"]\n")
}

/// A small configuration for a sink's end-to-end test: the server section, one listener on
/// `port`, `127.0.0.1:{upstream}` as the only peer, `key` for the database `web`, `sink` as the
/// YAML of `sinks.main` (its lines indented by 4) and a disk buffer in `{dir}/buffer`, retried
/// from 50 ms up to `retry_max`.
pub fn sink_test_yaml(
    dir: &Path,
    port: u16,
    upstream: u16,
    key: &str,
    sink: &str,
    retry_max: &str,
) -> String {
    format!(
        r#"{server}
listen:
  - address: 127.0.0.1:{port}

upstream:
  peers: ["127.0.0.1:{upstream}"]

{auth}
sinks:
  main:
{sink}
delivery:
  buffer: disk
  dir: {dir}/buffer
  batch: {{ max_wait: 10ms }}
  retry: {{ initial: 50ms, max: {retry_max} }}
"#,
        server = server_yaml(dir),
        auth = web_key_yaml(key),
        dir = dir.display(),
    )
}

/// Appends a torn frame (a length of 500, then 40 bytes) to the newest segment holding records
/// in `spool`, a sink's folder of the disk buffer: what a crash in mid-write leaves.
pub fn tear_newest_segment(spool: &Path) {
    let newest = fs::read_dir(spool)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| fs::metadata(p).unwrap().len() > 0)
        .max()
        .expect("a segment with records");
    let mut torn = 500u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xAB; 40]);
    let mut file = fs::OpenOptions::new().append(true).open(&newest).unwrap();
    std::io::Write::write_all(&mut file, &torn).unwrap();
}

/// Runs `postback-proxy <flag> FILE --check` in `cwd`: the output, its stdout and its stderr.
pub fn check(flag: &str, file: &Path, cwd: &Path) -> (Output, String, String) {
    let out = Command::new(binary())
        .arg(flag)
        .arg(file)
        .arg("--check")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run postback-proxy --check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Starts the binary with `-c config` and `args`, in `work`, its stderr and stdout appended to
/// the files `stderr` and `stdout` there.
fn spawn_binary(
    work: &Path,
    config: &Path,
    args: &[&str],
    stderr: &str,
    stdout: &str,
    env: &[(String, String)],
) -> Proc {
    let child = Command::new(binary())
        .arg("-c")
        .arg(config)
        .args(args)
        .current_dir(work)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(append(&work.join(stdout)))
        .stderr(append(&work.join(stderr)))
        .spawn()
        .expect("spawn postback-proxy");
    Proc::adopt("postback-proxy", child, work.join(stderr))
}

/// A running proxy; killed when dropped.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// 0 when the configuration has no admin listener.
    pub admin_port: u16,
    /// The TLS listener's port; 0 when the configuration has none.
    pub tls_port: u16,
    /// The file sink's path.
    pub events: PathBuf,
    pub config_path: PathBuf,
    /// The working directory of the process (`dir`, or the first instance's for
    /// [`Proxy::start_upgrade`]).
    work: PathBuf,
    /// Extra environment of the process.
    env: Vec<(String, String)>,
    /// The process; its log is its stderr.
    proc: Proc,
}

/// The ports a configuration is written for.
struct Ports {
    port: u16,
    admin: Option<u16>,
    tls: Option<u16>,
}

impl Proxy {
    /// The harness configuration in front of `upstream` (`host:port`).
    pub fn start(upstream: impl Into<String>) -> Proxy {
        Proxy::start_with(Settings::new(upstream))
    }

    /// Writes the configuration, starts the binary and waits until it listens.
    pub fn start_with(settings: Settings) -> Proxy {
        Proxy::start_in(None, settings)
    }

    /// Like [`Proxy::start_with`], in `dir` (from [`Proxy::take_dir`]) when given: the same
    /// sink file and buffer directory as an earlier run.
    pub fn start_in(dir: Option<tempfile::TempDir>, settings: Settings) -> Proxy {
        let sink = settings.sink_path.clone();
        Proxy::start_full(
            dir,
            |dir, ports| settings.yaml_with_tls(dir, ports.port, ports.admin.unwrap(), ports.tls),
            true,
            settings.tls_listener.is_some(),
            |dir| sink.clone().unwrap_or_else(|| dir.join("events.jsonl")),
            &settings.env,
        )
    }

    /// Starts the binary with the configuration `yaml(dir, port, admin_port)` (the admin port is
    /// `Some` when `admin` is set), in `dir` as its working directory. `events(dir)` is where
    /// the file sink writes. Retries with other ports if another process took one.
    pub fn start_yaml(
        yaml: impl Fn(&Path, u16, Option<u16>) -> String,
        admin: bool,
        events: impl Fn(&Path) -> PathBuf,
    ) -> Proxy {
        Proxy::start_yaml_in(None, yaml, admin, events)
    }

    fn start_yaml_in(
        existing: Option<tempfile::TempDir>,
        yaml: impl Fn(&Path, u16, Option<u16>) -> String,
        admin: bool,
        events: impl Fn(&Path) -> PathBuf,
    ) -> Proxy {
        Proxy::start_full(
            existing,
            |dir, ports| yaml(dir, ports.port, ports.admin),
            admin,
            false,
            events,
            &[],
        )
    }

    fn start_full(
        existing: Option<tempfile::TempDir>,
        yaml: impl Fn(&Path, &Ports) -> String,
        admin: bool,
        tls: bool,
        events: impl Fn(&Path) -> PathBuf,
        env: &[(String, String)],
    ) -> Proxy {
        let reuse = existing.is_some();
        let mut slot = existing;
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let dir = match slot.take() {
                Some(dir) => dir,
                None => tempfile::tempdir().expect("tempdir"),
            };
            let port = free_port();
            let mut admin_port = free_port();
            while admin_port == port {
                admin_port = free_port();
            }
            let mut tls_port = free_port();
            while tls_port == port || tls_port == admin_port {
                tls_port = free_port();
            }
            let ports = Ports {
                port,
                admin: admin.then_some(admin_port),
                tls: tls.then_some(tls_port),
            };
            let config_path = dir.path().join("postback-proxy.yaml");
            fs::write(&config_path, yaml(dir.path(), &ports)).unwrap();
            let events = events(dir.path());
            let work = dir.path().to_path_buf();
            let proc = spawn_binary(&work, &config_path, &[], "stderr.log", "stdout.log", env);
            let mut proxy = Proxy {
                dir,
                port,
                admin_port: if admin { admin_port } else { 0 },
                tls_port: if tls { tls_port } else { 0 },
                events,
                config_path,
                work,
                env: env.to_vec(),
                proc,
            };
            match proxy.wait_listening() {
                Ok(()) => return proxy,
                Err(e) => last_err = e,
            }
            // Kill it and try again with other ports.
            proxy.kill();
            if reuse {
                slot = Some(proxy.take_dir());
            }
        }
        panic!("the proxy did not start: {last_err}");
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let ports: Vec<u16> = [self.port, self.admin_port, self.tls_port]
            .into_iter()
            .filter(|&p| p != 0)
            .collect();
        self.proc
            .try_wait_listening(&ports, Duration::from_secs(20))
    }

    /// `127.0.0.1:PORT` of the proxy listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// GET `path` on the proxy listener, without extra headers.
    pub async fn get(&self, path: &str) -> super::Resp {
        super::get(&self.url(path), &[]).await
    }

    /// `https://127.0.0.1:TLS_PORT{path}`: the TLS listener.
    pub fn https_url(&self, path: &str) -> String {
        assert!(self.tls_port != 0, "this proxy has no TLS listener");
        format!("https://127.0.0.1:{}{path}", self.tls_port)
    }

    /// Starts a second process on the same configuration file, in the same working directory,
    /// with `--upgrade`: it takes over this one's listening sockets through `server.upgrade_sock`
    /// once this one gets SIGQUIT. Returns at once (the new process binds nothing by itself);
    /// see [`Proxy::wait_upgrade_sock`]. Its stderr goes to `stderr-upgrade.log`.
    pub fn start_upgrade(&self) -> Proxy {
        let proc = spawn_binary(
            &self.work,
            &self.config_path,
            &["--upgrade"],
            "stderr-upgrade.log",
            "stdout-upgrade.log",
            &self.env,
        );
        Proxy {
            dir: tempfile::tempdir().expect("tempdir"),
            port: self.port,
            admin_port: self.admin_port,
            tls_port: self.tls_port,
            events: self.events.clone(),
            config_path: self.config_path.clone(),
            work: self.work.clone(),
            env: self.env.clone(),
            proc,
        }
    }

    /// The harness configuration's `server.upgrade_sock`.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.work.join("upgrade.sock")
    }

    /// Waits (up to 20 s) until this process (started by [`Proxy::start_upgrade`]) listens on
    /// the upgrade socket `sock`, i.e. waits for the old process's listening sockets.
    pub fn wait_upgrade_sock(&mut self, sock: &Path) {
        use std::os::unix::fs::FileTypeExt;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.proc.exited() {
                panic!(
                    "the new process exited with {status} before taking over; stderr:\n{}",
                    self.stderr()
                );
            }
            if fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "no upgrade socket at {} after 20 s; stderr:\n{}",
                    sock.display(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `true` when this process holds the listening socket of `port` (Linux `/proc`).
    pub fn owns_listener(&self, port: u16) -> bool {
        owns_listener(self.proc.pid(), port)
    }

    /// `true` while the process runs.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// `http://127.0.0.1:ADMIN_PORT{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The proxy's stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.log()
    }

    /// Waits (up to `limit`) until the proxy's stderr contains `text`; panics if it does not.
    pub fn wait_log(&self, text: &str, limit: Duration) {
        assert!(
            eventually(limit, || self.stderr().contains(text)),
            "no `{text}` in the log after {limit:?}:\n{}",
            self.stderr()
        );
    }

    /// `{dir}/rejected.jsonl` of the harness's buffer directory, as it is now (empty if absent).
    pub fn rejected(&self) -> String {
        fs::read_to_string(self.dir.path().join("buffer/rejected.jsonl")).unwrap_or_default()
    }

    /// The records in the file sink right now (whole lines only).
    pub fn lines(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.events).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("the sink holds a line that is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits (up to 10 s) until the sink holds at least `n` records, and returns all of them.
    pub fn records(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {n} records in {}, found {}: {lines:#?}\nstderr:\n{}",
                    self.events.display(),
                    lines.len(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one good postback (database `web`, table `zz_marker`), waits until it is in the sink
    /// and returns every record before it, other than markers. As records are written in the
    /// order they were accepted, a refused request that nevertheless queued a record would show
    /// up here.
    pub async fn records_until_marker(&self) -> Vec<Value> {
        let marker = format!("m{}", fastrand::u64(..));
        let url = self.url(&format!(
            "/postback/v3/event/web/zz_marker?td_write_key={KEY}&marker={marker}"
        ));
        let resp = super::client()
            .get(url)
            .send()
            .await
            .expect("marker request");
        assert_eq!(resp.status(), 200, "the marker postback was refused");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines();
            if let Some(pos) = lines
                .iter()
                .position(|r| r["record"]["marker"] == marker.as_str())
            {
                return lines[..pos]
                    .iter()
                    .filter(|r| r["table"] != "zz_marker")
                    .cloned()
                    .collect();
            }
            if Instant::now() > deadline {
                panic!(
                    "the marker record never reached the sink; records: {lines:#?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends the marker postback ([`Proxy::records_until_marker`]) and asserts that no record
    /// came before it: `what` (the requests sent so far) left none.
    pub async fn assert_no_records_before_marker(&self, what: &str) {
        let records = self.records_until_marker().await;
        assert!(records.is_empty(), "{what} left records: {records:#?}");
    }

    /// The admin listener's `/metrics` text (asserting it answers 200).
    pub async fn metrics(&self) -> String {
        let r = super::get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        r.text()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The temporary directory (configuration, sink file, buffer), to start another proxy in it
    /// with [`Proxy::start_in`]. Call after the process exited.
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        assert!(self.proc.exited().is_some(), "take_dir on a running proxy");
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        self.proc.signal(signal);
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits up to `limit` for the process to exit; panics (with stderr) if it does not.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.proc.wait_exit(limit)
    }
}
