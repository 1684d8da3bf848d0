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

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{listening, Proc};
use common::proxy::{check, sink_test_yaml};
use common::{closed_port, eventually, free_port, Proxy};
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
        let mut proc = Proc::start(
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
        proc.wait_listening(port, Duration::from_secs(30));
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
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("topic-create.log");
        let status = Proc::start(
            "tansu topic create",
            Command::new(tansu_bin())
                .args(["topic", "create", name])
                .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
                .args(["--partitions", &partitions.to_string()]),
            log.clone(),
        )
        .wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "tansu topic create {name}: {status}\n{}\nbroker log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            self.proc.log()
        );
    }
}

/// The YAML of the proxy with the sink `main` producing to `brokers`; `sink_extra` is more YAML
/// for the sink (`key: value` lines, indented by 4).
fn kafka_yaml(dir: &Path, port: u16, brokers: &str, sink_extra: &str) -> String {
    let sink = format!(
        "    type: kafka\n    brokers: [\"{brokers}\"]\n    topic: \"{{database}}.{{table}}\"\n    \
         timeout: 5s\n{sink_extra}"
    );
    sink_test_yaml(dir, port, closed_port(), KEY, &sink, "1s")
}

/// Starts the real proxy (the harness's, with its port retry and an admin listener) with a Kafka
/// sink, after `--check` accepted its configuration.
fn start_proxy(brokers: &str, sink_extra: &str) -> Proxy {
    let proxy = Proxy::start_yaml(
        |dir, port, admin| {
            let mut yaml = kafka_yaml(dir, port, brokers, sink_extra);
            if let Some(admin) = admin {
                yaml.push_str(&format!("admin:\n  address: 127.0.0.1:{admin}\n"));
            }
            yaml
        },
        true,
        |dir| dir.join("events.jsonl"),
    );
    let (out, stdout, stderr) = check("-c", &proxy.config_path, proxy.dir.path());
    assert!(
        out.status.success(),
        "--check refuses the configuration: {stdout}{stderr}"
    );
    proxy
}

/// Sends pixels with reqwest; answers are (status, body).
struct Client {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Client {
    fn new() -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = common::client_builder()
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
                .unwrap_or_else(|e| panic!("GET {url}: {e}\nproxy log:\n{}", proxy.stderr()));
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
                proxy.stderr()
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

#[test]
fn pixels_become_kafka_messages() {
    let tansu = Tansu::start(free_port());
    tansu.create_topic("web.pageviews", 3);
    let proxy = start_proxy(&tansu.bootstrap(), "");
    let client = Client::new();
    let start = common::now();
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
        proxy.stderr()
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
            (start - 5..=common::now() + 5).contains(&time),
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
    let proxy = start_proxy(
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
        proxy.stderr()
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
    assert_eq!(got, want, "proxy log:\n{}", proxy.stderr());
}

#[test]
fn records_accepted_while_the_broker_is_down_arrive_when_it_is_up() {
    let port = free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    assert!(!listening(port, Duration::from_millis(200)));
    // The proxy starts although no broker answers, and accepts pixels into its disk buffer.
    let proxy = start_proxy(&bootstrap, "");
    let client = Client::new();
    const N: usize = 25;
    client.accepted(&proxy, "pageviews", 0..N);
    // The first batch fails (no acknowledgement within the sink's 5 s timeout) and is retried.
    assert!(
        eventually(Duration::from_secs(40), || proxy.stderr().contains(
            "no acknowledgement for a message to topic web.pageviews"
        )),
        "no failed delivery while the broker is down\nproxy log:\n{}",
        proxy.stderr()
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
        proxy.stderr()
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
        .stderr()
        .lines()
        .filter(|l| l.contains("librdkafka"))
        .count();
    assert!(
        noise < 30,
        "{noise} librdkafka lines in the log\n{}",
        proxy.stderr()
    );
}

#[test]
fn a_topic_that_does_not_exist_is_logged_and_retried_until_it_does() {
    let tansu = Tansu::start(free_port());
    tansu.create_topic("web.pageviews", 1);
    let proxy = start_proxy(&tansu.bootstrap(), "");
    let client = Client::new();
    client.accepted(&proxy, "missing", 0..3);
    assert!(
        eventually(Duration::from_secs(40), || {
            let log = proxy.stderr();
            log.lines().any(|l| {
                l.contains("ERROR") && l.contains("web.missing") && l.contains("does not exist")
            })
        }),
        "no clear error about the missing topic\nproxy log:\n{}",
        proxy.stderr()
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
        proxy.stderr()
    );
}

/// The proxy's own checks keep a bad sink configuration from starting.
#[test]
fn check_reports_kafka_fields() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        r#"upstream: { peers: ["127.0.0.1:1"] }
sinks:
  main: { type: kafka, brokers: [], topic: "{db}" }
"#,
    )
    .unwrap();
    let (out, stdout, stderr) = check("-c", &config, dir.path());
    let text = format!("{stdout}{stderr}");
    assert!(!out.status.success(), "{text}");
    let lines = [
        "sinks.main.brokers: must not be empty",
        "sinks.main.topic: ",
    ];
    common::assert_contains_all(&text, &lines, "the --check output");
    // A word outside `acks` or `compression`'s set is refused as the file is parsed, with its line.
    for (yaml, words) in [
        ("acks: leader", ["must be all, -1, 0 or 1", "line 3"]),
        ("compression: brotli", ["brotli", "line 3"]),
    ] {
        std::fs::write(
            &config,
            format!("upstream: {{ peers: [\"127.0.0.1:1\"] }}\nsinks:\n  main: {{ type: kafka, brokers: [\"k:1\"], {yaml} }}\n"),
        )
        .unwrap();
        let (out, stdout, stderr) = check("-c", &config, dir.path());
        let text = format!("{stdout}{stderr}");
        assert!(!out.status.success(), "{text}");
        common::assert_contains_all(&text, &words, "the --check output");
    }
}

/// The sink's state in `/sinks` (`up` or `down`).
fn sink_state(proxy: &Proxy) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sinks = rt
        .block_on(common::get(&proxy.admin_url("/sinks"), &[]))
        .json();
    sinks[0]["state"].as_str().unwrap_or_default().to_owned()
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
    let proxy = start_proxy(&bootstrap, "");
    let client = Client::new();
    client.accepted(&proxy, "pageviews", 0..10);
    let arrived = |want: &BTreeSet<String>| -> BTreeSet<String> {
        let msgs = read_topic(&bootstrap, "web.pageviews", want, Duration::from_secs(60));
        counts(&msgs).into_keys().collect()
    };
    assert_eq!(arrived(&ns(0..10)), ns(0..10));
    assert_eq!(sink_state(&proxy), "up");

    // Stopped while postbacks flow: `/sinks` says so within 5 s, and the instance stays ready.
    drop(tansu);
    let stopped = Instant::now();
    for n in 10..20 {
        client.accepted(&proxy, "pageviews", [n]);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        eventually(
            Duration::from_secs(5).saturating_sub(stopped.elapsed()),
            || { sink_state(&proxy) == "down" }
        ) || sink_state(&proxy) == "down",
        "/sinks does not say the sink is down\nproxy log:\n{}",
        proxy.stderr()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ready = rt.block_on(common::get(&proxy.admin_url("/readyz"), &[]));
    assert_eq!(
        ready.status, 200,
        "a sink outage alone keeps the instance ready"
    );
    assert!(
        proxy.stderr().contains("every Kafka broker is unreachable"),
        "the sink does not say its broker is down\nproxy log:\n{}",
        proxy.stderr()
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
        proxy.stderr()
    );
    eprintln!(
        "every record arrived {:?} after the broker came back",
        back.elapsed()
    );
    assert!(eventually(Duration::from_secs(10), || sink_state(&proxy) == "up"));
}
