//! The Kafka sink end to end: the real `postback-proxy` binary produces to a real
//! Kafka-protocol broker, [tansu](https://crates.io/crates/tansu) (written by others, in-memory
//! storage), and an independent rdkafka consumer reads the messages back.
//!
//! The broker binary is `$TANSU_BIN`, by default `/root/.cache/postback-proxy/tansu/bin/tansu`
//! (`cargo install tansu --version 0.6.0 --features dynostore --locked --root /root/.cache/postback-proxy/tansu`).
//! Without it these tests fail: they never pass by skipping.
//!
//! tansu does not create topics on its own (a Metadata request for a missing topic answers
//! `UNKNOWN_TOPIC_OR_PARTITION`), so the tests create theirs with `tansu topic create`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

/// The write key of the test configuration (database `web`).
const KEY: &str = "1/kafka0123456789abcdef";
const KEY_IN_URL: &str = "1%2Fkafka0123456789abcdef";
const DEFAULT_TANSU: &str = "/root/.cache/postback-proxy/tansu/bin/tansu";
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

/// The tansu binary; a clear failure when it is missing.
fn tansu_bin() -> PathBuf {
    let path = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TANSU));
    assert!(
        path.is_file(),
        "the Kafka-protocol broker tansu is missing at {} (set TANSU_BIN, or install it: \
         cargo install tansu --version 0.6.0 --features dynostore --locked --root /root/.cache/postback-proxy/tansu); \
         the Kafka end-to-end tests cannot run without it",
        path.display()
    );
    path
}

/// A loopback port nothing listens on now, outside the ephemeral range (so that clients, which
/// bind port 0, do not take it in the meantime).
fn free_port() -> u16 {
    for _ in 0..500 {
        let port = fastrand::u16(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// A child process, killed and reaped when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `port` accepts connections; panics (with the log) if the process exits or
    /// 30 s pass.
    fn wait_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log()
                );
            }
            if listening(port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {port} after 30 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tansu broker on `127.0.0.1:port`, in memory.
struct Tansu {
    proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Tansu {
    fn start(port: u16) -> Tansu {
        let bin = tansu_bin();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut proc = Proc::spawn(
            "tansu",
            Command::new(bin)
                .arg("broker")
                .args(["--storage-engine", "memory://tansu/"])
                .args(["--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .current_dir(dir.path())
                .env("RUST_LOG", "warn"),
            dir.path().join("tansu.log"),
        );
        proc.wait_listening(port);
        Tansu {
            proc,
            port,
            _dir: dir,
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `tansu topic create`, waited for (30 s at most).
    fn create_topic(&self, name: &str, partitions: u32) {
        let mut child = Command::new(tansu_bin())
            .args(["topic", "create", name])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--partitions", &partitions.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tansu topic create");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tansu topic create {name} did not finish in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        assert!(
            status.success(),
            "tansu topic create {name}: {status}\n{}\n{}\nbroker log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.proc.log()
        );
    }
}

/// The real proxy with a Kafka sink; its working directory is a temporary directory.
struct Proxy {
    proc: Proc,
    port: u16,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the binary with the sink `main` producing to `brokers`; `sink_extra` is more
    /// YAML for the sink (`key: value` lines, indented by 4).
    fn start(brokers: &str, sink_extra: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let closed = free_port();
        let d = dir.path().display();
        let yaml = format!(
            r#"server:
  threads: 2
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 2
  upgrade_sock: {d}/upgrade.sock
  pid_file: {d}/proxy.pid

listen:
  - address: 127.0.0.1:{port}

upstream:
  peers: ["127.0.0.1:{closed}"]

auth:
  write_keys:
    - key: "{KEY}"
      databases: ["web"]

sinks:
  main:
    type: kafka
    brokers: ["{brokers}"]
    topic: "{{database}}.{{table}}"
    timeout: 5s
{sink_extra}
delivery:
  buffer: disk
  dir: {d}/buffer
  batch: {{ max_wait: 10ms }}
  retry: {{ initial: 50ms, max: 1s }}
"#
        );
        let config = dir.path().join("postback-proxy.yaml");
        fs::write(&config, yaml).unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_postback-proxy"))
            .arg("-c")
            .arg(&config)
            .arg("--check")
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "--check refuses the configuration: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut proc = Proc::spawn(
            "postback-proxy",
            Command::new(env!("CARGO_BIN_EXE_postback-proxy"))
                .arg("-c")
                .arg(&config)
                .current_dir(dir.path())
                .env("RUST_LOG", "info"),
            dir.path().join("proxy.log"),
        );
        proc.wait_listening(port);
        Proxy { proc, port, dir }
    }

    fn rejected(&self) -> String {
        fs::read_to_string(self.dir.path().join("buffer/rejected.jsonl")).unwrap_or_default()
    }
}

/// Sends pixels with reqwest; answers are (status, body).
struct Client {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Client {
    fn new() -> Client {
        postback_proxy::tls::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Client { rt, http }
    }

    /// `GET /postback/v3/event/web/{table}?td_write_key=KEY&n={n}&td_global_id=td_global_id{extra}`
    /// with the cookie `_td_global=gid-{n}`.
    fn pixel(&self, proxy: &Proxy, table: &str, n: usize, extra: &str) -> (u16, String) {
        let url = format!(
            "http://127.0.0.1:{}/postback/v3/event/web/{table}?td_write_key={KEY_IN_URL}&n={n}\
             &td_global_id=td_global_id{extra}",
            proxy.port
        );
        self.rt.block_on(async {
            let r = self
                .http
                .get(&url)
                .header("cookie", format!("_td_global=gid-{n}"))
                .header("user-agent", USER_AGENT)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}\nproxy log:\n{}", proxy.proc.log()));
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        })
    }

    /// Sends pixels `ns` of table `table`; each must be accepted.
    fn accepted(&self, proxy: &Proxy, table: &str, ns: impl IntoIterator<Item = usize>) {
        for n in ns {
            let (status, body) = self.pixel(proxy, table, n, "");
            assert_eq!(
                (status, body.as_str()),
                (200, "{}"),
                "pixel {n} not accepted\nproxy log:\n{}",
                proxy.proc.log()
            );
        }
    }
}

/// Reads `topic` from the beginning of every partition, with a consumer of its own, until every
/// `n` in `want` was seen or `within` passed; returns every message read.
fn read_topic(
    bootstrap: &str,
    topic: &str,
    want: &BTreeSet<String>,
    within: Duration,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "postback-proxy-kafka-test")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + within;
    let partitions = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) if md.topics().len() == 1 && md.topics()[0].error().is_none() => {
                let ids: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
                if !ids.is_empty() {
                    break ids;
                }
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "no metadata for topic {topic}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out: Vec<OwnedMessage> = Vec::new();
    let mut seen = BTreeSet::new();
    while !want.is_subset(&seen) && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let m = m.detach();
                if let Some(n) = value(&m).get("n").and_then(Value::as_str) {
                    seen.insert(n.to_string());
                }
                out.push(m);
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    // A little longer, so that unexpected extra messages show too.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

fn value(m: &OwnedMessage) -> Value {
    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null)
}

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn ns(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|n| n.to_string()).collect()
}

/// Every message's `n`, with how often it arrived.
fn counts(msgs: &[OwnedMessage]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for m in msgs {
        let n = value(m)["n"].as_str().unwrap_or("?").to_string();
        *c.entry(n).or_insert(0) += 1;
    }
    c
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls `cond` every 100 ms for up to `within`.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pixels_become_kafka_messages() {
    let tansu = Tansu::start(free_port());
    tansu.create_topic("web.pageviews", 3);
    let proxy = Proxy::start(&tansu.bootstrap(), "");
    let client = Client::new();
    let start = now();
    const N: usize = 30;
    client.accepted(&proxy, "pageviews", 0..N);

    let msgs = read_topic(
        &tansu.bootstrap(),
        "web.pageviews",
        &ns(0..N),
        Duration::from_secs(60),
    );
    let c = counts(&msgs);
    assert_eq!(
        c.keys().cloned().collect::<BTreeSet<_>>(),
        ns(0..N),
        "the records in web.pageviews (n: count)\nproxy log:\n{}",
        proxy.proc.log()
    );
    let mut partition_of_key: BTreeMap<Vec<u8>, i32> = BTreeMap::new();
    for m in &msgs {
        let v = value(m);
        let n = v["n"].as_str().unwrap().to_string();
        let gid = format!("gid-{n}");
        assert_eq!(m.topic(), "web.pageviews");
        assert_eq!(m.key(), Some(gid.as_bytes()), "key of record {n}");
        let time = v["time"].as_i64().expect("time is an integer");
        assert!(
            (start - 5..=now() + 5).contains(&time),
            "time {time} of record {n}"
        );
        assert_eq!(
            v,
            serde_json::json!({"time": time, "n": n, "td_global_id": gid}),
            "value of record {n}"
        );
        assert_eq!(header(m, "database").as_deref(), Some("web"));
        assert_eq!(header(m, "table").as_deref(), Some("pageviews"));
        assert!((0..3).contains(&m.partition()));
        // One key, one partition (a duplicate must land where the first one did).
        let p = *partition_of_key
            .entry(gid.into_bytes())
            .or_insert(m.partition());
        assert_eq!(p, m.partition());
    }
    let used: BTreeSet<i32> = msgs.iter().map(Message::partition).collect();
    assert!(
        used.len() > 1,
        "30 keys all went to partition(s) {used:?}: the key does not drive the partition"
    );
    assert_eq!(proxy.rejected(), "", "nothing is rejected");
}

#[test]
fn a_message_too_large_for_kafka_is_rejected_and_the_others_delivered() {
    let tansu = Tansu::start(free_port());
    tansu.create_topic("web.pageviews", 1);
    // librdkafka refuses messages over message.max.bytes itself.
    let proxy = Proxy::start(
        &tansu.bootstrap(),
        "    properties: { message.max.bytes: \"1000\" }\n",
    );
    let client = Client::new();
    client.accepted(&proxy, "pageviews", 0..3);
    let blob = "x".repeat(3000);
    let (status, body) = client.pixel(&proxy, "pageviews", 3, &format!("&blob={blob}"));
    assert_eq!((status, body.as_str()), (200, "{}"));
    client.accepted(&proxy, "pageviews", 4..6);

    assert!(
        eventually(Duration::from_secs(30), || proxy.rejected().contains(&blob)),
        "record 3 is not in rejected.jsonl\nproxy log:\n{}",
        proxy.proc.log()
    );
    let rejected: Vec<Value> = proxy
        .rejected()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["sink"], "main");
    assert_eq!(rejected[0]["record"]["record"]["n"], "3");
    let reason = rejected[0]["reason"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("message size too large"),
        "reason: {reason}"
    );

    let want: BTreeSet<String> = [0, 1, 2, 4, 5].iter().map(ToString::to_string).collect();
    let msgs = read_topic(
        &tansu.bootstrap(),
        "web.pageviews",
        &want,
        Duration::from_secs(60),
    );
    let got: BTreeSet<String> = counts(&msgs).into_keys().collect();
    assert_eq!(got, want, "proxy log:\n{}", proxy.proc.log());
}

#[test]
fn records_accepted_while_the_broker_is_down_arrive_when_it_is_up() {
    let port = free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    assert!(!listening(port));
    // The proxy starts although no broker answers, and accepts pixels into its disk buffer.
    let proxy = Proxy::start(&bootstrap, "");
    let client = Client::new();
    const N: usize = 25;
    client.accepted(&proxy, "pageviews", 0..N);
    // The first batch fails (no acknowledgement within the sink's 5 s timeout) and is retried.
    assert!(
        eventually(Duration::from_secs(40), || proxy.proc.log().contains(
            "no acknowledgement for a message to topic web.pageviews"
        )),
        "no failed delivery while the broker is down\nproxy log:\n{}",
        proxy.proc.log()
    );

    let tansu = Tansu::start(port);
    tansu.create_topic("web.pageviews", 2);
    client.accepted(&proxy, "pageviews", N..N + 5);
    let msgs = read_topic(
        &bootstrap,
        "web.pageviews",
        &ns(0..N + 5),
        Duration::from_secs(90),
    );
    let c = counts(&msgs);
    assert_eq!(
        c.keys().cloned().collect::<BTreeSet<_>>(),
        ns(0..N + 5),
        "every accepted record arrives (n: count {c:?})\nproxy log:\n{}",
        proxy.proc.log()
    );
    let duplicates: usize = c.values().map(|k| k - 1).sum();
    eprintln!(
        "broker down then up: {} messages for {} records, {duplicates} duplicates",
        msgs.len(),
        N + 5
    );
    assert_eq!(proxy.rejected(), "", "nothing is rejected");
    // librdkafka repeats connection errors many times a second; the sink logs each kind of
    // them once per 30 s.
    let noise = proxy
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("librdkafka"))
        .count();
    assert!(
        noise < 30,
        "{noise} librdkafka lines in the log\n{}",
        proxy.proc.log()
    );
}

#[test]
fn a_topic_that_does_not_exist_is_logged_and_retried_until_it_does() {
    let tansu = Tansu::start(free_port());
    tansu.create_topic("web.pageviews", 1);
    let proxy = Proxy::start(&tansu.bootstrap(), "");
    let client = Client::new();
    client.accepted(&proxy, "missing", 0..3);
    assert!(
        eventually(Duration::from_secs(40), || {
            let log = proxy.proc.log();
            log.lines().any(|l| {
                l.contains("ERROR") && l.contains("web.missing") && l.contains("does not exist")
            })
        }),
        "no clear error about the missing topic\nproxy log:\n{}",
        proxy.proc.log()
    );
    // Nothing is rejected for it: once the topic exists, the records arrive.
    assert_eq!(proxy.rejected(), "");
    tansu.create_topic("web.missing", 1);
    let msgs = read_topic(
        &tansu.bootstrap(),
        "web.missing",
        &ns(0..3),
        Duration::from_secs(60),
    );
    assert_eq!(
        counts(&msgs).into_keys().collect::<BTreeSet<_>>(),
        ns(0..3),
        "proxy log:\n{}",
        proxy.proc.log()
    );
}

/// What `--check` says of `config`, which it must refuse.
fn refused_by_check(config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_postback-proxy"))
        .arg("-c")
        .arg(config)
        .arg("--check")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    text
}

/// The proxy's own checks keep a bad sink configuration from starting.
#[test]
fn check_reports_kafka_fields() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    fs::write(
        &config,
        r#"upstream: { peers: ["127.0.0.1:1"] }
sinks:
  main: { type: kafka, brokers: [], topic: "{db}" }
"#,
    )
    .unwrap();
    let text = refused_by_check(&config);
    for line in [
        "sinks.main.brokers: must not be empty",
        "sinks.main.topic: ",
    ] {
        assert!(text.contains(line), "{line:?} missing in:\n{text}");
    }
    // A word outside `acks` or `compression`'s set is refused as the file is parsed, with its line.
    for (yaml, words) in [
        ("acks: leader", ["must be all, -1, 0 or 1", "line 3"]),
        ("compression: brotli", ["brotli", "line 3"]),
    ] {
        fs::write(
            &config,
            format!("upstream: {{ peers: [\"127.0.0.1:1\"] }}\nsinks:\n  main: {{ type: kafka, brokers: [\"k:1\"], {yaml} }}\n"),
        )
        .unwrap();
        let text = refused_by_check(&config);
        for word in words {
            assert!(text.contains(word), "{word:?} missing in:\n{text}");
        }
    }
}

#[test]
fn a_broker_that_comes_back_empty_gets_every_record() {
    // A broker that restarts without its data (tansu with memory storage, a rebuilt cluster)
    // does not know the idempotent producer's id and sequence numbers any more: the sink starts
    // a new producer, and every record accepted during and after the outage arrives.
    let port = free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    let tansu = Tansu::start(port);
    tansu.create_topic("web.pageviews", 2);
    let proxy = Proxy::start(&bootstrap, "");
    let client = Client::new();
    client.accepted(&proxy, "pageviews", 0..10);
    let arrived = |want: &BTreeSet<String>| -> BTreeSet<String> {
        let msgs = read_topic(&bootstrap, "web.pageviews", want, Duration::from_secs(60));
        counts(&msgs).into_keys().collect()
    };
    assert_eq!(arrived(&ns(0..10)), ns(0..10));

    // Stopped while postbacks flow.
    drop(tansu);
    for n in 10..20 {
        client.accepted(&proxy, "pageviews", [n]);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .proc
            .log()
            .contains("every Kafka broker is unreachable")),
        "the sink does not know its broker is down\nproxy log:\n{}",
        proxy.proc.log()
    );

    // Back, empty.
    let tansu = Tansu::start(port);
    tansu.create_topic("web.pageviews", 2);
    let back = Instant::now();
    client.accepted(&proxy, "pageviews", 20..30);
    let got = arrived(&ns(10..30));
    assert!(
        ns(10..30).is_subset(&got),
        "missing: {:?}\nproxy log:\n{}",
        ns(10..30).difference(&got).collect::<Vec<_>>(),
        proxy.proc.log()
    );
    eprintln!(
        "every record arrived {:?} after the broker came back",
        back.elapsed()
    );
}
