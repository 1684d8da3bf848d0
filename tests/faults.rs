//! Delivery under faults (contract section 6, issue 11): a corrupt byte in the disk buffer, a full
//! filesystem under `delivery.dir`, and a sink that hangs beside one that works. Real binary,
//! real peers; every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::collector::{Collector, Received};
use common::proxy::free_port;
use common::{client, get, send, Origin, Proxy, Settings, KEY, WAIT};
use serde_json::Value;

/// The URL path of pixel number `n`.
fn pixel(n: usize) -> String {
    format!("/postback/v3/event/web/pageviews?td_format=pixel&td_write_key={KEY}&n={n}")
}

/// The distinct `n` of the records.
fn numbers(records: &[Value]) -> BTreeSet<usize> {
    records
        .iter()
        .filter_map(|r| r["record"]["n"].as_str()?.parse().ok())
        .collect()
}

/// Settings with the disk buffer and the `main` sink posting to a collector on `port`.
fn to_collector(origin: &Origin, port: u16) -> Settings {
    let mut s = Settings::new(origin.peer());
    s.buffer = "disk".into();
    s.sink_yaml = Some(format!(
        "{{ type: http, url: \"http://127.0.0.1:{port}/bulk\", timeout: 5s }}"
    ));
    s
}

/// The value of the metric line starting with `series` (name and labels), 0 when absent.
async fn metric(proxy: &Proxy, series: &str) -> f64 {
    let text = get(&proxy.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn readyz(proxy: &Proxy) -> u16 {
    get(&proxy.admin_url("/readyz"), &[]).await.status
}

/// The segments of sink `main`'s disk buffer under `buffer`, largest first.
fn segments(buffer: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<(u64, PathBuf)> = std::fs::read_dir(buffer.join("main"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    segs.sort_by_key(|s| std::cmp::Reverse(s.0));
    segs.into_iter().map(|(_, p)| p).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bit_flipped_mid_segment_costs_only_its_record_and_is_counted() {
    let origin = Origin::start();
    let port = free_port();
    let settings = to_collector(&origin, port);
    let mut proxy = Proxy::start_with(settings.clone());
    let n = 200;
    for i in 0..n {
        assert_eq!(get(&proxy.url(&pixel(i)), &[]).await.status, 200);
    }
    proxy.kill();

    // Between the two runs, one bit in the middle of the segment flips.
    let dir = proxy.take_dir();
    let segment = segments(&dir.path().join("buffer"))[0].clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x04;
    std::fs::write(&segment, &bytes).unwrap();

    let received = Received::new();
    let _collector = Collector::start(port, received.clone(), None);
    let proxy = Proxy::start_in(Some(dir), settings);
    let records = received.wait_until(WAIT, "every record but the damaged one", |r| {
        numbers(r).len() >= n - 1
    });
    let seen = numbers(&records);
    assert_eq!(seen.len(), n - 1, "exactly one record is lost: {seen:?}");
    assert!(seen.iter().all(|i| *i < n));
    // The records after the damage were delivered, not only those before it.
    assert!(seen.contains(&(n - 1)) && seen.contains(&0));
    let skipped = metric(&proxy, "delivery_spool_skipped_bytes_total{sink=\"main\"}").await;
    assert!(skipped > 0.0, "the skipped bytes are counted");
    // A record accepted after the restart arrives too.
    assert_eq!(get(&proxy.url(&pixel(n)), &[]).await.status, 200);
    received.wait_until(WAIT, "the record after the restart", |r| {
        numbers(r).contains(&n)
    });
}

/// A tmpfs of `size` mounted on a temporary directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (and a message) when this process cannot mount: not root, or no permission.
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a small tmpfs for delivery.dir needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!("SKIPPED: cannot mount a tmpfs ({other:?})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_answers_only_503s_loses_no_200_and_recovers() {
    let Some(tmpfs) = Tmpfs::mount("256k") else {
        return;
    };
    let origin = Origin::start();
    let port = free_port();
    let settings = to_collector(&origin, port);
    let buffer = tmpfs.path().to_path_buf();
    let proxy = Proxy::start_yaml(
        |dir, port, admin| {
            settings.yaml(dir, port, admin.unwrap()).replace(
                &format!("dir: {}/buffer", dir.display()),
                &format!("dir: {}", buffer.display()),
            )
        },
        true,
        |dir| dir.join("events.jsonl"),
    );

    // The collector is down: records pile up until the filesystem is full.
    let client = client();
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut next = 0;
    while refused < 200 {
        assert!(next < 20_000, "the disk never filled up");
        let tasks: Vec<_> = (next..next + 16)
            .map(|i| {
                let request = client.get(proxy.url(&pixel(i)));
                tokio::spawn(async move { (i, send(request).await.status) })
            })
            .collect();
        next += 16;
        for t in tasks {
            match t.await.unwrap() {
                (i, 200) => accepted.push(i),
                (_, 503) => refused += 1,
                (i, other) => panic!("pixel {i}: status {other}"),
            }
        }
    }
    assert!(accepted.len() > 100, "{} accepted", accepted.len());
    assert_eq!(readyz(&proxy).await, 503, "not ready while appends fail");
    assert!(metric(&proxy, "delivery_buffer_write_errors_total{sink=\"main\"}").await >= 1.0);
    let stderr = proxy.stderr();
    let lines = stderr
        .lines()
        .filter(|l| l.contains("cannot append to the buffer"))
        .count();
    assert!(
        (1..=4).contains(&lines),
        "{refused} refused requests logged in {lines} lines"
    );

    // The sink returns: what was accepted is delivered, which frees the space, and appends
    // resume by themselves.
    let received = Received::new();
    let _collector = Collector::start(port, received.clone(), None);
    received.wait_until(WAIT, "every record answered 200", |r| {
        let seen = numbers(r);
        accepted.iter().all(|i| seen.contains(i))
    });
    let deadline = Instant::now() + WAIT;
    let mut later = next;
    loop {
        if get(&proxy.url(&pixel(later)), &[]).await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "appends never resumed");
        later += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    received.wait_until(WAIT, "the record after the recovery", |r| {
        numbers(r).contains(&later)
    });
    let deadline = Instant::now() + WAIT;
    while readyz(&proxy).await != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn a_hung_sink_beside_the_file_sink_does_not_delay_it() {
    // A collector that accepts connections and never answers.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hung.incoming() {
            held.push(stream);
        }
    });
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.buffer = "disk".into();
    let proxy = Proxy::start_yaml(
        |dir, port, admin| {
            let yaml = settings.yaml(dir, port, admin.unwrap());
            let sinks = "sinks:\n  main: ";
            let at = yaml.find(sinks).expect("a sinks section");
            let line_end = at + yaml[at..].find('\n').unwrap();
            let mut yaml = format!(
                "{}\n  hung: {{ type: http, url: \"http://{hung_addr}/bulk\", timeout: 60s }}{}",
                &yaml[..line_end],
                &yaml[line_end..]
            );
            yaml = yaml.replacen("    sink: main\n", "    sink: [main, hung]\n", 1);
            yaml
        },
        true,
        |dir| dir.join("events.jsonl"),
    );
    let n = 50;
    for i in 0..n {
        assert_eq!(get(&proxy.url(&pixel(i)), &[]).await.status, 200);
    }
    // Proxy::records waits a bounded while: the file sink holds every record although its
    // neighbour on the route never answers.
    let records = proxy.records(n);
    let seen = numbers(&records);
    assert_eq!(seen, (0..n).collect::<BTreeSet<_>>());
    assert_eq!(
        readyz(&proxy).await,
        200,
        "a hung sink does not make it unready"
    );
}

/// `GET /sinks`, as JSON.
async fn sinks(proxy: &Proxy) -> Value {
    get(&proxy.admin_url("/sinks"), &[]).await.json()
}

/// The entry of sink `name` in `/sinks`.
async fn sink_status(proxy: &Proxy, name: &str) -> Value {
    let all = sinks(proxy).await;
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no sink {name} in /sinks: {all}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_outage_shows_in_sinks_and_leaves_the_instance_ready() {
    let origin = Origin::start();
    let port = free_port();
    let proxy = Proxy::start_with(to_collector(&origin, port));
    for i in 0..20 {
        assert_eq!(get(&proxy.url(&pixel(i)), &[]).await.status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let down = loop {
        let s = sink_status(&proxy, "main").await;
        if s["state"] == "down" {
            break s;
        }
        assert!(Instant::now() < deadline, "not down within 5 s: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(down["last_error"].is_string(), "{down}");
    assert!(down["since"].is_string(), "{down}");
    assert_eq!(down["records_waiting"], 20, "{down}");
    assert!(down["bytes_waiting"].as_u64().unwrap() > 0, "{down}");
    assert!(down["failed"].as_u64().unwrap() >= 1, "{down}");
    assert_eq!(
        readyz(&proxy).await,
        200,
        "a sink outage alone leaves it ready"
    );
    assert_eq!(metric(&proxy, "sink_up{sink=\"main\"}").await, 0.0);

    let received = Received::new();
    let _collector = Collector::start(port, received.clone(), None);
    received.wait_until(WAIT, "every record", |r| numbers(r).len() == 20);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = sink_status(&proxy, "main").await;
        if s["state"] == "up" && s["delivered"] == 20 && s["records_waiting"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never up again: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&proxy, "sink_up{sink=\"main\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_sigterm_readyz_never_answers_200() {
    let origin = Origin::start();
    let proxy = Proxy::start(origin.peer());
    assert_eq!(readyz(&proxy).await, 200);
    // Pingora stops accepting connections at SIGTERM; a health check whose request was already
    // on its way is still answered, and that answer must say "not ready".
    let mut check = std::net::TcpStream::connect(("127.0.0.1", proxy.admin_port)).unwrap();
    check
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    check
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\n")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.sigterm();
    // The signal has arrived once the listener is gone; the readiness flag is set at that moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", proxy.admin_port)).is_ok() {
        assert!(Instant::now() < deadline, "the admin listener never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    check.write_all(b"\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = check.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503 "),
        "the health check in flight at SIGTERM got: {answer:?}"
    );
    assert!(answer.contains("shutting down"), "{answer}");

    // New connections find no listener, never a 200.
    let client = client();
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        if let Ok(resp) = client.get(proxy.admin_url("/readyz")).send().await {
            assert_ne!(resp.status(), 200, "/readyz answered 200 after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends pixels `from..to`, 16 at a time; returns the numbers answered 200 and those answered 503
/// (any other status fails the test).
async fn send_pixels(proxy: &Proxy, from: usize, to: usize) -> (Vec<usize>, Vec<usize>) {
    let client = client();
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for start in (from..to).step_by(16) {
        let tasks: Vec<_> = (start..(start + 16).min(to))
            .map(|i| {
                let request = client.get(proxy.url(&pixel(i)));
                tokio::spawn(async move { (i, send(request).await.status) })
            })
            .collect();
        for t in tasks {
            match t.await.unwrap() {
                (i, 200) => accepted.push(i),
                (i, 503) => refused.push(i),
                (i, other) => panic!("pixel {i}: status {other}"),
            }
        }
    }
    (accepted, refused)
}

/// The distinct `n` of the records in the JSON lines file `path`, asserting whole lines.
fn numbers_in(path: &Path) -> BTreeSet<usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "a torn line");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect();
    numbers(&records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_file_sink_is_its_own_buffer_every_200_is_in_it_when_the_answer_leaves() {
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.buffer = "disk".into();
    let mut proxy = Proxy::start_with(settings.clone());
    let (accepted, refused) = send_pixels(&proxy, 0, 300).await;
    assert_eq!((accepted.len(), refused.len()), (300, 0));
    // Killed at once, no lane to wait for: every answered record is in the file already.
    proxy.kill();
    let dir = proxy.take_dir();
    let events = dir.path().join("events.jsonl");
    assert_eq!(numbers_in(&events), accepted.iter().copied().collect());
    assert!(
        !dir.path().join("buffer/main").exists(),
        "nothing went through the disk buffer"
    );
    // The next start appends after them; nothing is delivered twice.
    let proxy = Proxy::start_in(Some(dir), settings);
    assert_eq!(get(&proxy.url(&pixel(300)), &[]).await.status, 200);
    assert_eq!(proxy.records(301).len(), 301);
    let status = sink_status(&proxy, "main").await;
    assert_eq!(
        (
            &status["state"],
            &status["delivered"],
            &status["records_waiting"]
        ),
        (&Value::from("up"), &Value::from(1), &Value::from(0)),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_under_the_file_sink_answers_503_keeps_every_200_and_recovers() {
    let Some(tmpfs) = Tmpfs::mount("256k") else {
        return;
    };
    // Room that the test gives back later, as an operator would by moving old files away.
    let filler = tmpfs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 128 << 10]).unwrap();
    let events = tmpfs.path().join("events.jsonl");
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.buffer = "disk".into();
    settings.sink_yaml = Some(format!(
        "{{ type: file, path: {:?} }}",
        events.display().to_string()
    ));
    let proxy = Proxy::start_with(settings);

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut next = 0;
    while refused.len() < 100 {
        assert!(next < 20_000, "the disk never filled up");
        let (a, r) = send_pixels(&proxy, next, next + 64).await;
        accepted.extend(a);
        refused.extend(r);
        next += 64;
    }
    assert!(accepted.len() > 100, "{} accepted", accepted.len());
    // Every 200 is in the file, and nothing of a 503.
    assert_eq!(numbers_in(&events), accepted.iter().copied().collect());
    assert_eq!(readyz(&proxy).await, 503, "not ready while appends fail");
    let errors = metric(&proxy, "delivery_buffer_write_errors_total{sink=\"main\"}").await;
    assert_eq!(errors, refused.len() as f64);
    let status = sink_status(&proxy, "main").await;
    assert_eq!(status["state"], "down", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{status}"
    );

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + WAIT;
    while readyz(&proxy).await != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&proxy.url(&pixel(next)), &[]).await.status, 200);
    assert!(numbers_in(&events).contains(&next));
    assert_eq!(sink_status(&proxy, "main").await["state"], "up");
    drop(proxy);
}
