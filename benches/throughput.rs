//! Throughput of the proxy against nginx doing the same job, over HTTP, on the loopback.
//!
//! Run: `cargo bench --bench throughput` (options after `--`: `--duration 10 --rounds 3
//! --connections 64 --only pixel,json,batch,redirect,passthrough --layout pinned|shared|both`,
//! or `--quick` for a 2-second, 1-round smoke run; `--write-setup DIR` writes the proxy's
//! configuration and the wrk scripts for `benches/profile/` and runs nothing). It installs nginx
//! and wrk with apt-get when they are missing (Debian: run as root).
//!
//! For each variant, the release binary of the proxy and an nginx configured to do the nearest
//! equivalent (`benches/throughput/nginx.conf`) are started fresh for every run, in turn, round
//! after round (nginx, proxy, nginx, proxy, ...), and loaded by wrk for a fixed time. Reported:
//! the median over the rounds of requests/s, latency percentiles, CPU seconds used by the server
//! per 100k requests, and the proxy's peak RSS. After every run the harness checks that every
//! request wrk saw accepted is in the proxy's file sink (or nginx's access log), and stops with
//! an error when one is missing.
//!
//! `--proxy PATH` measures another proxy binary than the one built with the bench (a copy, say,
//! so that a build running meanwhile cannot replace it). `--baseline PATH` adds another build of the proxy (say, the commit before a change) to every
//! round, run the same way and interleaved with the others, so its figures come from the same
//! machine at the same time. `--half-sent N` (default 3000, 0 to skip) measures, once, the
//! resident memory of each server while N connections each hold half a request head.
//!
//! Two layouts: `pinned` (server: 1 thread / 1 worker on CPU 0; wrk: 1 thread on CPU 1) and
//! `shared` (server: 2 threads / 2 workers, wrk: 2 threads, no pinning).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const PROXY_BIN: &str = env!("CARGO_BIN_EXE_postback-proxy");
const PROXY_TEMPLATE: &str = include_str!("throughput/proxy.yaml");
const NGINX_TEMPLATE: &str = include_str!("throughput/nginx.conf");
const ORIGIN_TEMPLATE: &str = include_str!("throughput/origin.conf");
const REPORT_LUA: &str = include_str!("throughput/report.lua");

const WRITE_KEY: &str = "1/bench0123456789abcdef";
const USER_AGENT: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";
const COOKIE: &str =
    "_td_global=5f0b8a52-1c3e-4c0e-9d7e-2f1a6b3c4d5e; _ga=GA1.1.1234567890.1764245000";

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
    duration_secs: u64,
    rounds: usize,
    connections: usize,
    only: Vec<String>,
    layouts: Vec<Layout>,
    /// Another proxy binary to measure alongside (`--baseline`).
    baseline: Option<PathBuf>,
    /// The proxy binary (`--proxy`; default: the one this bench was built with).
    proxy: PathBuf,
    /// Connections with half a request head for the memory measurement (`--half-sent`).
    half_sent: usize,
    /// Write the profiling set-up there and run nothing (`--write-setup`).
    write_setup: Option<PathBuf>,
}

const USAGE: &str = "usage: cargo bench --bench throughput -- [--duration SECS] [--rounds N] \
[--connections N] [--only pixel,json,batch,redirect,passthrough] [--layout pinned|shared|both] \
[--proxy PATH] [--baseline PATH-TO-ANOTHER-PROXY-BINARY] [--half-sent N] [--quick] \
[--write-setup DIR]";

fn parse_options() -> Options {
    let mut duration = None;
    let mut rounds = None;
    let mut connections = 64;
    let mut only = Vec::new();
    let mut layouts = vec![Layout::Pinned, Layout::Shared];
    let mut quick = false;
    let mut baseline = None;
    let mut proxy = PathBuf::from(PROXY_BIN);
    let mut half_sent = 3000;
    let mut write_setup = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // `--name value` or `--name=value`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| fail(&format!("{name} needs a value\n{USAGE}")))
        };
        match name.as_str() {
            "--bench" => {} // what `cargo bench` passes to every bench binary
            "--quick" => quick = true,
            "--duration" => duration = Some(number(&name, &value())),
            "--rounds" => rounds = Some(number(&name, &value()) as usize),
            "--connections" => connections = number(&name, &value()) as usize,
            "--baseline" => baseline = Some(PathBuf::from(value())),
            "--proxy" => proxy = PathBuf::from(value()),
            "--half-sent" => half_sent = number(&name, &value()) as usize,
            "--write-setup" => write_setup = Some(PathBuf::from(value())),
            "--only" => only = value().split(',').map(|s| s.trim().to_string()).collect(),
            "--layout" => {
                layouts = match value().as_str() {
                    "pinned" => vec![Layout::Pinned],
                    "shared" => vec![Layout::Shared],
                    "both" => vec![Layout::Pinned, Layout::Shared],
                    other => fail(&format!("unknown layout `{other}`\n{USAGE}")),
                }
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => fail(&format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    let (default_duration, default_rounds) = if quick { (2, 1) } else { (10, 3) };
    let options = Options {
        duration_secs: duration.unwrap_or(default_duration),
        rounds: rounds.unwrap_or(default_rounds),
        connections,
        only,
        layouts,
        baseline,
        proxy,
        half_sent,
        write_setup,
    };
    if options.duration_secs == 0 || options.rounds == 0 || options.connections == 0 {
        fail("--duration, --rounds and --connections must be at least 1");
    }
    options
}

fn number(name: &str, text: &str) -> u64 {
    text.parse()
        .unwrap_or_else(|_| fail(&format!("{name}: `{text}` is not a whole number")))
}

fn fail(message: &str) -> ! {
    eprintln!("throughput: {message}");
    std::process::exit(2);
}

// ---------------------------------------------------------------------------------------------
// Layouts, servers, variants

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    /// Server: 1 thread (1 worker) on CPU 0; wrk: 1 thread on CPU 1.
    Pinned,
    /// Server: 2 threads (2 workers); wrk: 2 threads; no pinning.
    Shared,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Pinned => "pinned 1+1",
            Layout::Shared => "shared 2+2",
        }
    }
    fn server_threads(self) -> usize {
        match self {
            Layout::Pinned => 1,
            Layout::Shared => 2,
        }
    }
    /// The CPU list for `taskset -c` of the server (and of wrk), if pinned.
    fn server_cpus(self) -> Option<&'static str> {
        match self {
            Layout::Pinned => Some("0"),
            Layout::Shared => None,
        }
    }
    fn client_cpus(self) -> Option<&'static str> {
        match self {
            Layout::Pinned => Some("1"),
            Layout::Shared => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Buffer {
    Disk,
    Memory,
}

impl Buffer {
    fn name(self) -> &'static str {
        match self {
            Buffer::Disk => "disk",
            Buffer::Memory => "memory",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Nginx,
    Proxy(Buffer),
    /// The `--baseline` binary.
    Baseline(Buffer),
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Nginx => "nginx".to_string(),
            Target::Proxy(b) => format!("proxy ({})", b.name()),
            Target::Baseline(b) => format!("baseline ({})", b.name()),
        }
    }

    fn is_proxy(self) -> bool {
        !matches!(self, Target::Nginx)
    }
}

/// One kind of request, sent by wrk to both servers.
struct Variant {
    name: &'static str,
    label: &'static str,
    method: &'static str,
    /// Path and query.
    target: String,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
    /// What a probe request must answer.
    status: u16,
    /// Something the probe's answer must contain (lower case).
    contains: &'static str,
    /// Records per accepted request in the proxy's sink (0: not a postback).
    records_per_request: u64,
    /// The buffers the proxy is measured with.
    buffers: Vec<Buffer>,
}

fn variants() -> Vec<Variant> {
    let browser = || {
        vec![
            ("User-Agent", USER_AGENT.to_string()),
            ("Accept", "*/*".to_string()),
            ("Accept-Language", "en-US,en;q=0.9".to_string()),
            ("Cookie", COOKIE.to_string()),
        ]
    };
    let with = |extra: &[(&'static str, &str)]| {
        let mut headers = browser();
        headers.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        headers
    };
    let event = r#""td_version":"4.2.0","td_client_id":"5f0b8a52-1c3e-4c0e-9d7e-2f1a6b3c4d5e","td_charset":"utf-8","td_language":"en-us","td_screen":"1920x1080","td_title":"Winter sale","td_url":"https://www.example.com/products/42","td_referrer":"https://www.example.com/search?q=shoes""#;
    let events: Vec<String> = (1..=5)
        .map(|i| format!(r#"{{"action":"view_{i}",{event}}}"#))
        .collect();
    vec![
        Variant {
            name: "pixel",
            label: "pixel GET",
            method: "GET",
            target: format!(
                "/postback/v3/event/web/pageviews?td_format=pixel&td_write_key={WRITE_KEY}\
                 &page=%2Fproducts%2F42&referrer=https%3A%2F%2Fwww.example.com%2Fsearch%3Fq%3Dshoes\
                 &campaign=winter_sale&ab=b&screen=1920x1080\
                 &td_ip=td_ip&td_ua=td_ua&td_global_id=td_global_id"
            ),
            headers: browser(),
            body: None,
            status: 200,
            contains: "image/gif",
            records_per_request: 1,
            buffers: vec![Buffer::Disk, Buffer::Memory],
        },
        Variant {
            name: "json",
            label: "POST JSON",
            method: "POST",
            target: "/postback/v3/event/web/events".to_string(),
            headers: with(&[
                ("Content-Type", "application/json"),
                ("X-TD-Write-Key", WRITE_KEY),
            ]),
            body: Some(
                r#"{"page":"/products/42","referrer":"https://www.example.com/search?q=shoes","campaign":"winter_sale","ab":"b","screen":"1920x1080","lang":"en-US","user_id":"u_8f3a2c","value":"19.99"}"#
                    .to_string(),
            ),
            status: 200,
            contains: "{}",
            records_per_request: 1,
            buffers: vec![Buffer::Disk],
        },
        Variant {
            name: "batch",
            label: "td-js-sdk batch of 5",
            method: "POST",
            target: "/postback/v3/event/web/sdk_events".to_string(),
            headers: with(&[
                ("Content-Type", "application/vnd.treasuredata.v1+json"),
                ("Authorization", &format!("TD1 {WRITE_KEY}")),
            ]),
            body: Some(format!(r#"{{"events":[{}]}}"#, events.join(","))),
            status: 200,
            contains: "{}",
            records_per_request: 5,
            buffers: vec![Buffer::Disk],
        },
        Variant {
            name: "redirect",
            label: "redirect 302",
            method: "GET",
            target: format!(
                "/postback/v3/event/web/clicks?td_write_key={WRITE_KEY}&campaign=winter_sale\
                 &creative=banner_a&email_id=m_20261127&td_ip=td_ip\
                 &td_redirect=https%3A%2F%2Fexample.com%2Flanding"
            ),
            headers: browser(),
            body: None,
            status: 302,
            contains: "location: https://example.com/landing",
            records_per_request: 1,
            buffers: vec![Buffer::Disk],
        },
        Variant {
            name: "passthrough",
            label: "passthrough GET",
            method: "GET",
            target: "/products/42?ref=home".to_string(),
            headers: browser(),
            body: None,
            status: 200,
            contains: "</html>",
            records_per_request: 0,
            buffers: vec![Buffer::Disk],
        },
    ]
}

impl Variant {
    fn targets(&self, baseline: bool) -> Vec<Target> {
        let mut targets = vec![Target::Nginx];
        targets.extend(self.buffers.iter().map(|b| Target::Proxy(*b)));
        if baseline {
            targets.extend(self.buffers.iter().map(|b| Target::Baseline(*b)));
        }
        targets
    }

    /// The wrk script: this request, then `report.lua`.
    fn wrk_script(&self) -> String {
        let mut lua = format!(
            "-- generated by benches/throughput.rs: variant {}\nwrk.method = {}\nwrk.path = {}\n",
            self.name,
            lua_string(self.method),
            lua_string(&self.target)
        );
        for (name, value) in &self.headers {
            let _ = writeln!(
                lua,
                "wrk.headers[{}] = {}",
                lua_string(name),
                lua_string(value)
            );
        }
        if let Some(body) = &self.body {
            let _ = writeln!(lua, "wrk.body = {}", lua_string(body));
        }
        lua.push_str(REPORT_LUA);
        lua
    }

    /// The same request as raw HTTP/1.1, for the probe.
    fn raw_request(&self, port: u16) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n",
            self.method, self.target
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let body = self.body.clone().unwrap_or_default();
        if self.body.is_some() {
            let _ = write!(head, "Content-Length: {}\r\n", body.len());
        }
        head.push_str("\r\n");
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body.as_bytes());
        raw
    }
}

fn lua_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Tools

struct Tools {
    nginx: PathBuf,
    wrk: PathBuf,
    taskset: PathBuf,
    clock_ticks: f64,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Finds nginx, wrk and taskset, installing nginx and wrk with apt-get when missing.
fn ensure_tools() -> Tools {
    if find_program("nginx").is_none() || find_program("wrk").is_none() {
        println!("throughput: nginx or wrk is missing: apt-get update && apt-get install -y nginx-light wrk");
        let ok = Command::new("sh")
            .args(["-c", "apt-get update && apt-get install -y nginx-light wrk"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            fail("apt-get could not install nginx-light and wrk (run as root on Debian, or install them yourself)");
        }
    }
    let found = |name: &str| {
        find_program(name).unwrap_or_else(|| {
            fail(&format!(
                "`{name}` not found in PATH (Debian package: util-linux for taskset)"
            ))
        })
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Tools {
        nginx: found("nginx"),
        wrk: found("wrk"),
        taskset: found("taskset"),
        clock_ticks: if ticks > 0 { ticks as f64 } else { 100.0 },
    }
}

/// `program args...`, under `taskset -c cpus` when given.
fn command(tools: &Tools, cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new(&tools.taskset);
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A fresh directory under `target/tmp`: on the project's disk (`/tmp` may be a tmpfs, which
/// would flatter the disk buffer).
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir in target/tmp")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

fn fill(template: &str, fields: &[(&str, String)]) -> String {
    let mut text = template.to_string();
    for (name, value) in fields {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    let unfilled = text
        .match_indices("{{")
        .any(|(i, _)| text[i + 2..].starts_with(|c: char| c.is_ascii_uppercase()));
    assert!(!unfilled, "a template field was left unfilled:\n{text}");
    text
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that is stopped when dropped, also while panicking: SIGTERM, a bounded wait,
/// then SIGKILL to it and to its children (nginx workers).
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Process {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> Process {
        let out = fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            name: name.to_string(),
            child,
            log,
            stopped: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its direct children.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(children_of(self.pid()));
        pids
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `port` accepts connections; panics with the log if the process exits first.
    fn wait_listening(&mut self, port: u16) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited at start-up ({status}):\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} is not listening on {addr}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself, at most `limit`; kills it past that.
    fn wait_or_kill(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.stopped = true;
                return true;
            }
            sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let children = children_of(self.pid());
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        for pid in children {
            signal(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is one of our children.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Fields of /proc/PID/stat after the command name: state is [0], ppid [1], utime [11], stime [12].
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|f| f.get(1) == Some(&u64::from(parent))))
        .collect()
}

/// CPU time (user + system) of these processes, in seconds.
fn cpu_seconds(tools: &Tools, pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| proc_stat(*pid))
        .map(|f| f[11] + f[12])
        .sum();
    ticks as f64 / tools.clock_ticks
}

/// The `field` line of `/proc/PID/status` (`VmHWM`, `VmRSS`, ...), in KiB; 0 when unknown.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// VmHWM of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

fn start_origin(tools: &Tools, layout: Layout, dir: &Path) -> (Process, u16) {
    let port = free_port();
    fs::create_dir_all(dir.join("tmp")).expect("origin dir");
    let conf = fill(
        ORIGIN_TEMPLATE,
        &[
            ("DIR", dir.display().to_string()),
            ("PORT", port.to_string()),
            ("PAGE", origin_page()),
        ],
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).expect("write origin nginx.conf");
    // The origin is on the client's side of the machine: it is not what is measured.
    let mut c = command(tools, layout.client_cpus(), &tools.nginx);
    c.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut origin = Process::spawn("origin nginx", c, dir.join("stderr.log"));
    origin.wait_listening(port);
    (origin, port)
}

/// A 600-byte HTML page (no `'` or `$`: it goes into an nginx string).
fn origin_page() -> String {
    let head = "<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>Product 42</title></head>\n<body>\n<h1>Product 42</h1>\n<p>";
    let tail = "</p>\n</body>\n</html>\n";
    let filler = "Warm winter boots, waterproof, in four colours. ";
    let mut page = head.to_string();
    while page.len() + tail.len() < 600 {
        page.push_str(filler);
    }
    page.truncate(600 - tail.len());
    page.push_str(tail);
    page
}

/// A server under test, started in `dir`; `records` is the file that holds its records.
struct Server {
    process: Process,
    port: u16,
    records: Option<PathBuf>,
}

fn start_server(
    tools: &Tools,
    options: &Options,
    layout: Layout,
    target: Target,
    variant: &Variant,
    dir: &Path,
    origin_port: u16,
) -> Server {
    let port = free_port();
    let threads = layout.server_threads().to_string();
    let mut fields = vec![
        ("DIR", dir.display().to_string()),
        ("PORT", port.to_string()),
        ("ORIGIN_PORT", origin_port.to_string()),
    ];
    let (mut process, records) = match target {
        Target::Nginx => {
            fields.push(("WORKERS", threads));
            fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
            fs::create_dir_all(dir.join("empty")).expect("nginx dir");
            let conf_path = dir.join("nginx.conf");
            fs::write(&conf_path, fill(NGINX_TEMPLATE, &fields)).expect("write nginx.conf");
            let mut c = command(tools, layout.server_cpus(), &tools.nginx);
            c.arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.join("error.log"));
            let logged = variant.records_per_request > 0;
            (
                Process::spawn("nginx", c, dir.join("stderr.log")),
                logged.then(|| dir.join("access.log")),
            )
        }
        Target::Proxy(buffer) | Target::Baseline(buffer) => {
            let bin = match (target, &options.baseline) {
                (Target::Baseline(_), Some(path)) => path.clone(),
                _ => options.proxy.clone(),
            };
            fields.push(("THREADS", threads));
            fields.push(("BUFFER", buffer.name().to_string()));
            fields.push(("WRITE_KEY", WRITE_KEY.to_string()));
            let conf_path = dir.join("proxy.yaml");
            fs::write(&conf_path, fill(PROXY_TEMPLATE, &fields)).expect("write proxy.yaml");
            let mut c = command(tools, layout.server_cpus(), &bin);
            c.arg("-c").arg(&conf_path).env("RUST_LOG", "warn");
            let logged = variant.records_per_request > 0;
            (
                Process::spawn("postback-proxy", c, dir.join("proxy.log")),
                logged.then(|| dir.join("sink/events.jsonl")),
            )
        }
    };
    process.wait_listening(port);
    Server {
        process,
        port,
        records,
    }
}

/// Sends the variant's request once and checks the answer.
fn probe(server: &Server, variant: &Variant, target: Target) {
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let mut stream = TcpStream::connect(addr).expect("probe: connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("probe: timeout");
    stream
        .write_all(&variant.raw_request(server.port))
        .expect("probe: write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    let status_line = answer.lines().next().unwrap_or("").to_string();
    let status_ok = status_line.starts_with(&format!("http/1.1 {} ", variant.status));
    if !status_ok || !answer.contains(variant.contains) {
        panic!(
            "{}: {} answered `{status_line}` (expected {} with `{}`):\n{answer}\n{}",
            variant.name,
            target.name(),
            variant.status,
            variant.contains,
            server.process.log_tail()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Default)]
struct WrkReport {
    requests: u64,
    duration_us: u64,
    status_errors: u64,
    socket_errors: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

fn parse_wrk(output: &str) -> Option<WrkReport> {
    let line = output.lines().find(|l| l.starts_with("THROUGHPUT "))?;
    let fields: BTreeMap<&str, u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |k: &str| fields.get(k).copied();
    Some(WrkReport {
        requests: get("requests")?,
        duration_us: get("duration_us")?,
        status_errors: get("status_errors")?,
        socket_errors: get("connect_errors")?
            + get("read_errors")?
            + get("write_errors")?
            + get("timeouts")?,
        p50_us: get("p50_us")? as f64,
        p99_us: get("p99_us")? as f64,
        p999_us: get("p999_us")? as f64,
    })
}

fn run_wrk(
    tools: &Tools,
    layout: Layout,
    options: &Options,
    script: &Path,
    port: u16,
    dir: &Path,
) -> WrkReport {
    let wrk_threads = layout.server_threads();
    let mut c = command(tools, layout.client_cpus(), &tools.wrk);
    c.arg(format!("-t{wrk_threads}"))
        .arg(format!("-c{}", options.connections.max(wrk_threads)))
        .arg(format!("-d{}s", options.duration_secs))
        .arg("--timeout")
        .arg("5s")
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"));
    let log = dir.join("wrk.out");
    let mut wrk = Process::spawn("wrk", c, log.clone());
    if !wrk.wait_or_kill(Duration::from_secs(options.duration_secs + 30)) {
        panic!("wrk did not finish in time:\n{}", wrk.log_tail());
    }
    let output = fs::read_to_string(&log).unwrap_or_default();
    parse_wrk(&output).unwrap_or_else(|| panic!("cannot read wrk's report:\n{output}"))
}

/// Counts the lines of a growing file, reading only what was appended since the last call.
struct LineCounter {
    path: PathBuf,
    offset: u64,
    lines: u64,
}

impl LineCounter {
    fn count(&mut self) -> u64 {
        if let Ok(mut file) = fs::File::open(&self.path) {
            if file.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = file.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    self.offset += n as u64;
                    self.lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
                }
            }
        }
        self.lines
    }
}

struct RunResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    cpu_per_100k: f64,
    peak_rss_mib: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    tools: &Tools,
    options: &Options,
    layout: Layout,
    variant: &Variant,
    target: Target,
    origin_port: u16,
    round: usize,
) -> RunResult {
    let dir = scratch_dir();
    let script = dir.path().join("wrk.lua");
    fs::write(&script, variant.wrk_script()).expect("write wrk script");
    let mut server = start_server(
        tools,
        options,
        layout,
        target,
        variant,
        dir.path(),
        origin_port,
    );
    probe(&server, variant, target);

    let pids = server.process.pids();
    let cpu_before = cpu_seconds(tools, &pids);
    let wrk = run_wrk(tools, layout, options, &script, server.port, dir.path());
    let ok = wrk.requests - wrk.status_errors;
    if wrk.status_errors > 0 {
        panic!(
            "{} / {}: {} of {} answers were not 2xx/3xx\n{}",
            variant.name,
            target.name(),
            wrk.status_errors,
            wrk.requests,
            server.process.log_tail()
        );
    }

    // Every answer wrk counted as accepted must be a record (a line of nginx's access log), plus
    // the probe's. wrk stops with up to one request in flight per connection, which the server
    // may still have taken: at most that many more.
    let mut checked = String::new();
    if let Some(path) = &server.records {
        let per_request = match target {
            Target::Nginx => 1,
            Target::Proxy(_) | Target::Baseline(_) => variant.records_per_request,
        };
        let expected = (ok + 1) * per_request;
        let most = expected + options.connections as u64 * per_request;
        let mut counter = LineCounter {
            path: path.clone(),
            offset: 0,
            lines: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(30 + options.duration_secs);
        while counter.count() < expected && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
        let got = counter.count();
        if got < expected || got > most {
            panic!(
                "{} / {}: {} holds {got} records, expected {expected} (at most {most}): \
                 {ok} accepted answers and the probe, {per_request} record(s) each\n{}",
                variant.name,
                target.name(),
                path.display(),
                server.process.log_tail()
            );
        }
        checked = format!("  records {} ok", thousands(got as f64));
    }
    let cpu = cpu_seconds(tools, &pids) - cpu_before;
    let peak_rss_mib = target
        .is_proxy()
        .then(|| peak_rss_kib(server.process.pid()) as f64 / 1024.0);
    server.process.stop();

    let result = RunResult {
        rps: wrk.requests as f64 / (wrk.duration_us as f64 / 1e6),
        p50_ms: wrk.p50_us / 1000.0,
        p99_ms: wrk.p99_us / 1000.0,
        p999_ms: wrk.p999_us / 1000.0,
        cpu_per_100k: cpu / wrk.requests.max(1) as f64 * 100_000.0,
        peak_rss_mib,
    };
    println!(
        "  {:<11} {:<12} {:<15} round {}: {:>9} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>6.2} ms  CPU {:.2} s/100k{}{}{}",
        variant.name,
        layout.name(),
        target.name(),
        round + 1,
        thousands(result.rps),
        result.p50_ms,
        result.p99_ms,
        result.p999_ms,
        result.cpu_per_100k,
        result
            .peak_rss_mib
            .map(|m| format!("  RSS {m:.1} MiB"))
            .unwrap_or_default(),
        checked,
        if wrk.socket_errors > 0 {
            format!("  ({} socket errors)", wrk.socket_errors)
        } else {
            String::new()
        },
    );
    result
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints a markdown table with its columns aligned, so it reads as plain text too.
fn print_table(header: &[&str], right: &[bool], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if right[i] {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(
        widths
            .iter()
            .zip(right)
            .map(|(w, r)| {
                if *r {
                    format!("{}:", "-".repeat(w - 1))
                } else {
                    "-".repeat(*w)
                }
            })
            .collect(),
    );
    for row in rows {
        line(row.clone());
    }
}

type Results = BTreeMap<(Layout, usize, Target), Vec<RunResult>>;

fn report(options: &Options, variants: &[Variant], results: &Results) {
    let stat = |key: &(Layout, usize, Target), f: fn(&RunResult) -> f64| {
        median(
            results
                .get(key)
                .map_or(Vec::new(), |r| r.iter().map(f).collect()),
        )
    };
    let mut rows = Vec::new();
    let mut latency_rows = Vec::new();
    for layout in &options.layouts {
        for (v, variant) in variants.iter().enumerate() {
            let nginx = (*layout, v, Target::Nginx);
            if !results.contains_key(&nginx) {
                continue;
            }
            for target in variant.targets(options.baseline.is_some()) {
                let (Target::Proxy(buffer) | Target::Baseline(buffer)) = target else {
                    continue;
                };
                let proxy = (*layout, v, target);
                let mut label = if variant.records_per_request > 0 {
                    format!("{}, {}", variant.label, buffer.name())
                } else {
                    variant.label.to_string()
                };
                if matches!(target, Target::Baseline(_)) {
                    label.push_str(" [baseline]");
                }
                let (proxy_rps, nginx_rps) = (stat(&proxy, |r| r.rps), stat(&nginx, |r| r.rps));
                rows.push(vec![
                    label.clone(),
                    layout.name().to_string(),
                    thousands(proxy_rps),
                    thousands(nginx_rps),
                    format!("{:.2}x", proxy_rps / nginx_rps),
                    format!(
                        "{:.2} / {:.2} ms",
                        stat(&proxy, |r| r.p99_ms),
                        stat(&nginx, |r| r.p99_ms)
                    ),
                    format!("{:.2}", stat(&proxy, |r| r.cpu_per_100k)),
                    format!("{:.2}", stat(&nginx, |r| r.cpu_per_100k)),
                    format!(
                        "{:.1} MiB",
                        stat(&proxy, |r| r.peak_rss_mib.unwrap_or(f64::NAN))
                    ),
                ]);
                latency_rows.push(vec![
                    label,
                    layout.name().to_string(),
                    format!(
                        "{:.2} / {:.2}",
                        stat(&proxy, |r| r.p50_ms),
                        stat(&nginx, |r| r.p50_ms)
                    ),
                    format!(
                        "{:.2} / {:.2}",
                        stat(&proxy, |r| r.p99_ms),
                        stat(&nginx, |r| r.p99_ms)
                    ),
                    format!(
                        "{:.2} / {:.2}",
                        stat(&proxy, |r| r.p999_ms),
                        stat(&nginx, |r| r.p999_ms)
                    ),
                ]);
            }
        }
    }
    println!(
        "\nMedian of {} round(s) of {} s, {} connections. Markdown, for BENCHMARKS.md:\n",
        options.rounds, options.duration_secs, options.connections
    );
    print_table(
        &[
            "variant",
            "layout",
            "proxy req/s",
            "nginx req/s",
            "proxy/nginx",
            "p99 proxy / nginx",
            "CPU s/100k proxy",
            "CPU s/100k nginx",
            "proxy peak RSS",
        ],
        &[false, false, true, true, true, true, true, true, true],
        &rows,
    );
    println!("\nLatency in ms, proxy / nginx:\n");
    print_table(
        &["variant", "layout", "p50", "p99", "p99.9"],
        &[false, false, true, true, true],
        &latency_rows,
    );
}

// ---------------------------------------------------------------------------------------------

/// `--write-setup DIR`: the proxy's configuration (one thread, the disk buffer, port 18080, the
/// origin on 18081, files under DIR) and every variant's wrk script (`DIR/VARIANT.lua`), for
/// `benches/profile/` to run the bench's own requests under a profiler.
fn write_setup(dir: &Path) {
    fs::create_dir_all(dir).expect("create the set-up folder");
    let fields = [
        ("DIR", dir.display().to_string()),
        ("PORT", "18080".to_string()),
        ("ORIGIN_PORT", "18081".to_string()),
        ("THREADS", "1".to_string()),
        ("BUFFER", Buffer::Disk.name().to_string()),
        ("WRITE_KEY", WRITE_KEY.to_string()),
    ];
    fs::write(dir.join("proxy.yaml"), fill(PROXY_TEMPLATE, &fields)).expect("write proxy.yaml");
    for variant in variants() {
        let script = dir.join(format!("{}.lua", variant.name));
        fs::write(script, variant.wrk_script()).expect("write a wrk script");
    }
}

fn main() {
    let options = parse_options();
    if let Some(dir) = &options.write_setup {
        write_setup(dir);
        return;
    }
    let all = variants();
    for name in &options.only {
        if !all.iter().any(|v| v.name == name) {
            let names: Vec<&str> = all.iter().map(|v| v.name).collect();
            fail(&format!(
                "unknown variant `{name}`; variants: {}",
                names.join(", ")
            ));
        }
    }
    let selected: Vec<usize> = (0..all.len())
        .filter(|i| options.only.is_empty() || options.only.iter().any(|n| n == all[*i].name))
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 && options.layouts.contains(&Layout::Pinned) {
        fail("the pinned layout needs 2 CPUs; use --layout shared");
    }
    let tools = ensure_tools();
    println!(
        "throughput: {} s per run, {} round(s), {} connections, {} CPUs; proxy {}{}; {}",
        options.duration_secs,
        options.rounds,
        options.connections,
        cpus,
        options.proxy.display(),
        options
            .baseline
            .as_ref()
            .map(|b| format!(", baseline {}", b.display()))
            .unwrap_or_default(),
        version(&tools.nginx)
    );

    let mut results: Results = BTreeMap::new();
    for layout in &options.layouts {
        let origin_dir = scratch_dir();
        let (mut origin, origin_port) = start_origin(&tools, *layout, origin_dir.path());
        for &v in &selected {
            let variant = &all[v];
            for round in 0..options.rounds {
                for target in variant.targets(options.baseline.is_some()) {
                    let result = measure(
                        &tools,
                        &options,
                        *layout,
                        variant,
                        target,
                        origin_port,
                        round,
                    );
                    results
                        .entry((*layout, v, target))
                        .or_default()
                        .push(result);
                }
            }
        }
        origin.stop();
    }
    report(&options, &all, &results);
    if options.half_sent > 0 {
        half_sent_heads(&tools, &options, &all);
    }
}

// ---------------------------------------------------------------------------------------------
// Memory with half-sent request heads (slowloris)

/// VmRSS of these processes together, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| status_kib(pid, "VmRSS")).sum()
}

/// For nginx, the proxy and the baseline (pinned layout, disk buffer, the pixel's
/// configuration): resident memory idle and while `options.half_sent` connections each hold
/// half a request head; and how many of them the server still holds open after 2 s.
fn half_sent_heads(tools: &Tools, options: &Options, variants: &[Variant]) {
    let variant = &variants[0];
    let origin_dir = scratch_dir();
    let (mut origin, origin_port) = start_origin(tools, Layout::Pinned, origin_dir.path());
    let mut targets = vec![Target::Nginx, Target::Proxy(Buffer::Disk)];
    if options.baseline.is_some() {
        targets.push(Target::Baseline(Buffer::Disk));
    }
    let half = b"GET /postback/v3/event/web/pageviews?td_format=pixel&page=%2F HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow";
    let mut rows = Vec::new();
    for target in targets {
        let dir = scratch_dir();
        let mut server = start_server(
            tools,
            options,
            Layout::Pinned,
            target,
            variant,
            dir.path(),
            origin_port,
        );
        probe(&server, variant, target);
        sleep(Duration::from_millis(500));
        let pids = server.process.pids();
        let idle = rss_kib(&pids);
        let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
        let mut conns = Vec::with_capacity(options.half_sent);
        for _ in 0..options.half_sent {
            let Ok(mut c) = TcpStream::connect(addr) else {
                break;
            };
            let _ = c.write_all(half);
            conns.push(c);
        }
        sleep(Duration::from_secs(2));
        let loaded = rss_kib(&pids);
        // Still open: a read that would block (nothing came back, no close).
        let mut open = 0;
        for c in &conns {
            c.set_nonblocking(true).ok();
            let mut byte = [0u8; 1];
            if matches!((&*c).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                open += 1;
            }
        }
        drop(conns);
        server.process.stop();
        let per = (loaded.saturating_sub(idle)) as f64 / options.half_sent.max(1) as f64;
        println!(
            "  half-sent heads  {:<15} RSS idle {:.1} MiB, with {} half-sent heads {:.1} MiB ({per:.1} KiB each), {open} still open",
            target.name(),
            idle as f64 / 1024.0,
            options.half_sent,
            loaded as f64 / 1024.0,
        );
        rows.push(vec![
            target.name(),
            format!("{:.1} MiB", idle as f64 / 1024.0),
            format!("{:.1} MiB", loaded as f64 / 1024.0),
            format!("{per:.1} KiB"),
            open.to_string(),
        ]);
    }
    origin.stop();
    println!(
        "\nResident memory with {} connections that each sent half a request head (2 s after):\n",
        options.half_sent
    );
    print_table(
        &[
            "server",
            "RSS idle",
            "RSS with the heads",
            "per connection",
            "still open",
        ],
        &[false, true, true, true, true],
        &rows,
    );
}

fn version(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}
