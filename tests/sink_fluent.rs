//! The `fluent` sink end to end: the real binary takes pixels and delivers them over the Fluentd
//! forward protocol to an independent peer, `tests/peers/fluent_peer.py` (Python and the `msgpack`
//! package: `python3 -m pip install msgpack`), which writes every entry it receives as a JSON line.
//!
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::proxy::{check, sink_test_yaml};
use common::{free_port, now, Proc, Proxy};
use serde_json::{json, Value};

const KEY: &str = "fluent-test-key-0123456789";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0";
/// How long any wait in these tests may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/fluent_peer.py")
}

/// The forward peer; killed when dropped.
struct Peer {
    /// Its log is its stderr.
    proc: Proc,
    port: u16,
    out: PathBuf,
}

impl Peer {
    /// Starts the peer on `port` (0: any), writing into `dir`; `faults` are its options.
    fn start(dir: &Path, port: u16, faults: &[&str]) -> Peer {
        let out = dir.join("peer.jsonl");
        let stderr = dir.join("peer.stderr");
        let mut child = Command::new("python3")
            .arg(peer_script())
            .arg(&out)
            .arg("--port")
            .arg(port.to_string())
            .arg("--exit-on-stdin-eof")
            .args(faults)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        // Its stdin stays open (`--exit-on-stdin-eof`) until the peer is dropped.
        let mut proc = Proc::adopt("the fluent peer", child, stderr);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(PATIENCE).unwrap_or_default();
        let Ok(port) = line.trim().parse::<u16>() else {
            proc.kill();
            panic!(
                "the fluent peer did not start (is msgpack installed? python3 -m pip install msgpack); stdout {line:?}, stderr:\n{}",
                proc.log()
            );
        };
        Peer { proc, port, out }
    }

    /// Every entry so far (whole lines only). Panics on a protocol error the peer reported.
    fn entries(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let entries: Vec<Value> = complete
            .lines()
            .map(|l| serde_json::from_str(l).expect("the peer writes JSON lines"))
            .collect();
        if let Some(e) = entries.iter().find(|e| e.get("error").is_some()) {
            panic!("the peer saw a protocol error: {e}");
        }
        entries
    }

    fn stderr(&self) -> String {
        self.proc.log()
    }

    /// Waits until the entries hold a record with every `n` of `ns` (duplicates allowed), and
    /// returns them all.
    async fn wait_for(&self, ns: &BTreeSet<String>, proxy: &Proxy) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let entries = self.entries();
            let seen: BTreeSet<String> = entries
                .iter()
                .filter_map(|e| e["record"]["n"].as_str().map(str::to_owned))
                .collect();
            if ns.is_subset(&seen) {
                return entries;
            }
            if Instant::now() > deadline {
                panic!(
                    "after {PATIENCE:?} the peer has {} of {} records: {entries:#?}\npeer stderr:\n{}\nproxy stderr:\n{}",
                    ns.intersection(&seen).count(),
                    ns.len(),
                    self.stderr(),
                    proxy.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts the real proxy (the harness's, with its port retry) with `sink` as the YAML of
/// `sinks.main` (indented by 4).
fn start_proxy(sink: &str) -> Proxy {
    Proxy::start_yaml(
        |dir, port, _admin| yaml(dir, port, free_port(), sink),
        false,
        |dir| dir.join("events.jsonl"),
    )
}

/// Sends a pixel for `table` with the columns `n` and `q`, recorded at `time`; asserts it was
/// accepted.
async fn accepted_pixel(proxy: &Proxy, client: &reqwest::Client, table: &str, n: &str, time: i64) {
    if let Err(e) = pixel(client, proxy.port, table, n, time).await {
        panic!("{e}; proxy stderr:\n{}", proxy.stderr());
    }
}

fn yaml(dir: &Path, port: u16, upstream: u16, sink: &str) -> String {
    sink_test_yaml(dir, port, upstream, KEY, sink, "500ms")
}

fn fluent_sink(port: u16, extra: &str) -> String {
    format!("    type: fluent\n    address: 127.0.0.1:{port}\n{extra}")
}

/// Sends a pixel for `table` to the proxy on `port`: the columns `n` and `q` (which needs
/// escaping in every format), recorded at `time`. `Ok` when it was accepted.
async fn pixel(
    client: &reqwest::Client,
    port: u16,
    table: &str,
    n: &str,
    time: i64,
) -> Result<(), String> {
    let url = format!(
        "http://127.0.0.1:{port}/postback/v3/event/web/{table}?td_write_key={KEY}&td_format=pixel\
         &n={n}&q=a%22b%0Ac%20%C3%BC%7B%7D&td_record_time={time}"
    );
    let response = tokio::time::timeout(PATIENCE, client.get(&url).header("user-agent", UA).send())
        .await
        .map_err(|_| format!("{url}: no answer in {PATIENCE:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let kind = response.headers().get("content-type").cloned();
    if status != 200 || kind.as_ref().is_none_or(|k| k != "image/gif") {
        return Err(format!("{url}: answered {status}, content-type {kind:?}"));
    }
    Ok(())
}

/// The `record` map the peer must see for pixel `n`.
fn expected_record(n: &str) -> Value {
    json!({"n": n, "q": "a\"b\nc ü{}"})
}

/// Checks every entry: tag, time, columns; each `n` of `ns` present, no other.
fn check_entries(
    entries: &[Value],
    tag_of: impl Fn(&str) -> String,
    time: i64,
    ns: &BTreeSet<String>,
) {
    for e in entries {
        let n = e["record"]["n"]
            .as_str()
            .unwrap_or_else(|| panic!("no n: {e}"));
        assert!(ns.contains(n), "an entry nobody sent: {e}");
        assert_eq!(e["tag"], tag_of(n), "{e}");
        assert_eq!(e["time"], time, "{e}");
        assert_eq!(e["record"], expected_record(n), "{e}");
        assert_eq!(e["mode"], "forward", "{e}");
    }
}

fn table_of(n: &str) -> &'static str {
    if n.starts_with('c') {
        "clicks"
    } else {
        "pageviews"
    }
}

/// Sends pixels `n` for their tables concurrently, asserting each was accepted.
async fn send_all(proxy: &Proxy, client: &reqwest::Client, ns: &BTreeSet<String>, time: i64) {
    let handles: Vec<_> = ns
        .iter()
        .map(|n| {
            let (client, port, n) = (client.clone(), proxy.port, n.clone());
            tokio::spawn(async move { pixel(&client, port, table_of(&n), &n, time).await })
        })
        .collect();
    for h in handles {
        if let Err(e) = h.await.unwrap() {
            panic!("{e}; proxy stderr:\n{}", proxy.stderr());
        }
    }
}

/// Pixels `p1..=pN` for `pageviews` and `c1..=cN` for `clicks`.
fn names(n: usize) -> BTreeSet<String> {
    (1..=n)
        .flat_map(|i| [format!("p{i}"), format!("c{i}")])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pixels_reach_fluentd_with_tag_time_and_columns_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(dir.path(), 0, &[]);
    let proxy = start_proxy(&fluent_sink(peer.port, "    require_ack: true\n"));
    let client = common::client();
    let time = now() - 60;
    // One pixel alone first, then two tables concurrently, so batches hold several tags.
    accepted_pixel(&proxy, &client, "pageviews", "p0", time).await;
    let mut ns = names(20);
    send_all(&proxy, &client, &ns, time).await;
    ns.insert("p0".into());
    let entries = peer.wait_for(&ns, &proxy).await;
    check_entries(&entries, |n| format!("td.web.{}", table_of(n)), time, &ns);
    // A healthy peer gets each record once.
    assert_eq!(entries.len(), ns.len(), "{entries:#?}");
    // Acknowledged: every message had a chunk, and one chunk (one message) holds one tag.
    let mut tags_by_chunk: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &entries {
        let chunk = e["chunk"]
            .as_str()
            .unwrap_or_else(|| panic!("no chunk: {e}"));
        assert!(!chunk.is_empty());
        tags_by_chunk
            .entry(chunk.to_owned())
            .or_default()
            .insert(e["tag"].as_str().unwrap().to_owned());
    }
    for (chunk, tags) in &tags_by_chunk {
        assert_eq!(tags.len(), 1, "chunk {chunk} holds several tags: {tags:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_wait_while_fluentd_is_down_and_arrive_once_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Nothing listens yet: the proxy starts all the same and accepts pixels into its buffer.
    let proxy = start_proxy(&fluent_sink(port, ""));
    let client = common::client();
    let time = now() - 60;
    let ns = names(5);
    send_all(&proxy, &client, &ns, time).await;
    // The sink has tried and failed at least once.
    proxy.wait_log("sink main: batch of", PATIENCE);
    let peer = Peer::start(dir.path(), port, &[]);
    let entries = peer.wait_for(&ns, &proxy).await;
    check_entries(&entries, |n| format!("td.web.{}", table_of(n)), time, &ns);
    // After the peer started, records sent now go straight through.
    let later: BTreeSet<String> = ["p100".to_string()].into();
    send_all(&proxy, &client, &later, time).await;
    let all: BTreeSet<String> = ns.union(&later).cloned().collect();
    let entries = peer.wait_for(&all, &proxy).await;
    check_entries(&entries, |n| format!("td.web.{}", table_of(n)), time, &all);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_connections_wrong_and_missing_acks_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    // Messages 1 and 2: connection closed without an ack; 3: recorded but a wrong ack; 4: never
    // acknowledged (the sink's timeout runs out).
    let peer = Peer::start(
        dir.path(),
        0,
        &["--drop-first", "2", "--wrong-ack", "1", "--silent", "1"],
    );
    let proxy = start_proxy(&fluent_sink(
        peer.port,
        "    require_ack: true\n    timeout: 500ms\n",
    ));
    let client = common::client();
    let time = now() - 60;
    let ns = names(5);
    send_all(&proxy, &client, &ns, time).await;
    let entries = peer.wait_for(&ns, &proxy).await;
    check_entries(&entries, |n| format!("td.web.{}", table_of(n)), time, &ns);
    let stderr = peer.stderr();
    assert_eq!(stderr.matches("dropping a message").count(), 2, "{stderr}");
    assert_eq!(stderr.matches("ignoring a message").count(), 1, "{stderr}");
    // The wrongly acknowledged message was recorded, then sent again: at least once.
    assert!(
        entries.len() > ns.len(),
        "no record was sent twice: {entries:#?}"
    );
    let log = proxy.stderr();
    assert!(log.contains("acknowledged chunk"), "{log}");
    assert!(log.contains("did not acknowledge"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_tag_template_without_acks() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(dir.path(), 0, &[]);
    let proxy = start_proxy(&fluent_sink(
        peer.port,
        "    tag: \"app.{table}.from.{database}\"\n    require_ack: false\n",
    ));
    let client = common::client();
    let time = now() - 120;
    let ns = names(3);
    send_all(&proxy, &client, &ns, time).await;
    let entries = peer.wait_for(&ns, &proxy).await;
    check_entries(
        &entries,
        |n| format!("app.{}.from.web", table_of(n)),
        time,
        &ns,
    );
    assert_eq!(entries.len(), ns.len(), "{entries:#?}");
    for e in &entries {
        assert_eq!(e["chunk"], Value::Null, "no ack asked: {e}");
    }
}

#[test]
fn check_reports_bad_fluent_settings_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    let sink = "    type: fluent\n    address: \"127.0.0.1\"\n    tag: \"\"\n";
    fs::write(&config, yaml(dir.path(), free_port(), free_port(), sink)).unwrap();
    let (out, stdout, stderr) = check("-c", &config, dir.path());
    let text = format!("{stdout}{stderr}");
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("sinks.main.address"), "{text}");
    assert!(text.contains("sinks.main.tag: must not be empty"), "{text}");

    let good = fluent_sink(free_port(), "");
    fs::write(&config, yaml(dir.path(), free_port(), free_port(), &good)).unwrap();
    let (out, _stdout, stderr) = check("-c", &config, dir.path());
    assert!(
        out.status.success(),
        "a fluent sink whose server is down is a valid configuration: {stderr}"
    );
}
