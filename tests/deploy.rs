//! The operator's kit in `deploy/` against SPEC section 6 (the admin listener): every metric the
//! Grafana dashboard (`deploy/grafana-dashboard.json`) and the Prometheus alert rules
//! (`deploy/alerts.yml`) query is one the real binary exports on `/metrics`, and the systemd unit
//! (`deploy/postback-proxy.service`) agrees with the configuration made for it
//! (`deploy/postback-proxy.yaml`). `deploy/check.sh` runs the real tools on the same files
//! (`systemd-analyze verify`, `promtool check rules`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::proxy::{check, tear_newest_segment};
use common::{closed_port, eventually, harness, Origin, Proxy, Settings, KEY};
use serde_json::Value;

/// Metrics the kit queries that this build does not export yet. The test reports them and fails
/// once one of them is exported, so that the name moves out of this list (and is checked like
/// every other one from then on).
const NOT_YET_EXPORTED: &[&str] = &[];

/// The prefixes of the proxy's own metric names (`up` and other names Prometheus makes are not
/// the proxy's to export).
const PREFIXES: &[&str] = &["postback_", "delivery_", "sink_", "upstream_", "request_"];

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(deploy(name)).unwrap_or_else(|e| panic!("read deploy/{name}: {e}"))
}

/// The proxy's metric names in a PromQL query.
fn metric_names(query: &str) -> BTreeSet<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| PREFIXES.iter().any(|p| t.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// Every query of the dashboard: its panels' targets (rows nest panels) and its variables.
fn dashboard_queries() -> Vec<String> {
    fn walk(panels: &[Value], out: &mut Vec<String>) {
        for p in panels {
            walk(p["panels"].as_array().map_or(&[][..], Vec::as_slice), out);
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(
                    t["expr"]
                        .as_str()
                        .expect("a target without expr")
                        .to_owned(),
                );
            }
        }
    }
    let dash: Value = serde_json::from_str(&read("grafana-dashboard.json"))
        .expect("deploy/grafana-dashboard.json is JSON");
    let mut out = Vec::new();
    walk(dash["panels"].as_array().expect("panels"), &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// Every `expr` of the alert rules.
fn alert_queries() -> Vec<String> {
    let rules: Value =
        serde_saphyr::from_str(&read("alerts.yml")).expect("deploy/alerts.yml is YAML");
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| r["expr"].as_str().expect("a rule without expr").to_owned())
        .collect()
}

/// Metric name -> the files whose queries name it.
fn queried() -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut out: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for (file, queries) in [
        ("grafana-dashboard.json", dashboard_queries()),
        ("alerts.yml", alert_queries()),
    ] {
        assert!(!queries.is_empty(), "deploy/{file} has no queries");
        for q in &queries {
            let names = metric_names(q);
            // Prometheus's own `up` (the scrape failed) is the one other name allowed.
            assert!(
                !names.is_empty() || q.starts_with("up{"),
                "deploy/{file}: no metric of the proxy in {q:?}"
            );
            for n in names {
                out.entry(n).or_default().insert(file);
            }
        }
    }
    out
}

/// The series names in a `/metrics` text.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// A proxy with the memory buffer and the file sink after accepted, refused, flagged and
/// proxied requests, with its records delivered: its `/metrics`.
async fn metrics_of_a_working_proxy() -> String {
    let (_origin, proxy) = harness();
    let pixel = format!("/postback/v3/event/web/pageviews?td_write_key={KEY}&page=/");
    assert_eq!(proxy.get(&pixel).await.status, 200);
    let bot = common::get(&proxy.url(&pixel), &[("user-agent", "Googlebot/2.1")]).await;
    assert_eq!(bot.status, 200);
    let refused = proxy.get("/postback/v3/event/web/pageviews?page=/").await;
    assert_eq!(refused.status, 403);
    assert_eq!(proxy.get("/passthrough").await.status, 200);
    proxy.records(2);
    // Delivered: the counters of a written batch are there once the sink has the records.
    let mut text = proxy.metrics().await;
    for _ in 0..100 {
        if text.contains("result=\"delivered\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = proxy.metrics().await;
    }
    text
}

/// A proxy with the disk buffer and an `http` sink whose collector is down, restarted after a
/// crash in mid-write (a torn frame at the end of its buffer), with records waiting: its
/// `/metrics`.
async fn metrics_of_a_proxy_whose_sink_is_down() -> String {
    let origin = Origin::start();
    let down = || {
        let mut s = Settings::new(origin.peer());
        s.buffer = "disk".into();
        s.sink_yaml = Some(format!(
            "{{ type: http, url: \"http://127.0.0.1:{}/bulk\", timeout: 1s }}",
            closed_port()
        ));
        s
    };
    let mut proxy = Proxy::start_with(down());
    let pixel = format!("/postback/v3/event/web/pageviews?td_write_key={KEY}&page=/");
    for _ in 0..3 {
        assert_eq!(proxy.get(&pixel).await.status, 200);
    }
    proxy.kill();
    let dir = proxy.take_dir();
    tear_newest_segment(&dir.path().join("buffer/main"));

    let proxy = Proxy::start_in(Some(dir), down());
    assert_eq!(proxy.get(&pixel).await.status, 200);
    let wanted = ["sink_errors_total{", "delivery_spool_skipped_bytes_total{"];
    let admin = proxy.admin_url("/metrics");
    let seen = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        eventually(Duration::from_secs(30), || {
            let text = rt.block_on(common::get(&admin, &[])).text();
            wanted.iter().all(|w| text.contains(w))
        })
    })
    .await
    .unwrap();
    assert!(
        seen,
        "no failed write or skipped bytes in /metrics; stderr:\n{}",
        proxy.stderr()
    );
    proxy.metrics().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let queried = queried();
    let text = format!(
        "{}\n{}",
        metrics_of_a_working_proxy().await,
        metrics_of_a_proxy_whose_sink_is_down().await
    );
    let exported = exported(&text);
    eprintln!("the kit queries: {:?}", queried.keys().collect::<Vec<_>>());
    let mut missing = Vec::new();
    for (name, files) in &queried {
        let there = exported.contains(name);
        if NOT_YET_EXPORTED.contains(&name.as_str()) {
            assert!(
                !there,
                "{name} is exported now: remove it from NOT_YET_EXPORTED in tests/deploy.rs"
            );
            eprintln!("not exported yet (NOT_YET_EXPORTED), queried by {files:?}: {name}");
        } else if !there {
            missing.push(format!("{name} (queried by {files:?})"));
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not in /metrics:\n  {}\n/metrics:\n{text}",
        missing.join("\n  ")
    );
}

/// `Key=value` lines of the unit, in order.
fn unit_values(key: &str) -> Vec<String> {
    read("postback-proxy.service")
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

fn unit_value(key: &str) -> String {
    let all = unit_values(key);
    assert_eq!(all.len(), 1, "{key}= in the unit: {all:?}");
    all[0].clone()
}

#[test]
fn the_systemd_unit_and_its_configuration_agree() {
    let config: Value = serde_saphyr::from_str(&read("postback-proxy.yaml"))
        .expect("deploy/postback-proxy.yaml is YAML");
    let (runtime, state, etc) = (
        format!("/run/{}/", unit_value("RuntimeDirectory")),
        format!("/var/lib/{}/", unit_value("StateDirectory")),
        format!("/etc/{}/", unit_value("ConfigurationDirectory")),
    );
    // Hardened as issue 14 asks; forking, so that systemd follows the PID file across upgrades.
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("Type", "forking"),
    ] {
        assert_eq!(unit_value(key), value, "{key}=");
    }
    let pid_file = config["server"]["pid_file"].as_str().unwrap();
    assert_eq!(unit_value("PIDFile"), pid_file);
    assert!(pid_file.starts_with(&runtime), "{pid_file}");
    let sock = config["server"]["upgrade_sock"].as_str().unwrap();
    assert!(sock.starts_with(&runtime), "{sock}");
    // The only places the service may write: the buffer and the file sink in StateDirectory.
    let dir = config["delivery"]["dir"].as_str().unwrap();
    assert!(dir.starts_with(&state), "{dir}");
    for (name, sink) in config["sinks"].as_object().unwrap() {
        if let Some(path) = sink["path"].as_str() {
            assert!(path.starts_with(&state), "sinks.{name}.path: {path}");
        }
    }
    // Every command runs the binary on the configuration in ConfigurationDirectory.
    let file = format!("{etc}postback-proxy.yaml");
    let start = unit_value("ExecStart");
    assert!(start.contains(&format!("-c {file} ")), "{start}");
    assert!(start.ends_with("--daemon"), "{start}");
    let reload = unit_values("ExecReload");
    assert_eq!(
        reload.len(),
        3,
        "check, SIGQUIT, then the new process: {reload:?}"
    );
    assert!(
        reload[0].ends_with(&format!("-c {file} --check")),
        "{reload:?}"
    );
    assert_eq!(reload[1], "/bin/kill -QUIT $MAINPID");
    assert!(
        reload[2].ends_with(&format!("-c {file} --upgrade --daemon")),
        "{reload:?}"
    );
    // And the configuration is valid.
    let cwd = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) = check("-c", &deploy("postback-proxy.yaml"), cwd.path());
    assert!(out.status.success(), "deploy/postback-proxy.yaml: {stderr}");
    assert_eq!(stdout.trim(), "configuration OK");
}

/// A daemon started by the test, found by its PID file; SIGKILLed when dropped if still running.
struct Daemon {
    pid_file: PathBuf,
}

impl Daemon {
    fn pid(&self) -> i32 {
        let text = std::fs::read_to_string(&self.pid_file)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.pid_file.display()));
        text.trim().parse().expect("a PID in the PID file")
    }
}

/// `true` while process `pid` runs (a zombie waiting to be reaped has exited).
fn alive(pid: i32) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    });
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists && !zombie
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(&self.pid_file) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs one of the unit's command lines with the binary under test, `config` for the unit's
/// configuration file and `main_pid` for `$MAINPID`; asserts it succeeds within 30 s.
fn run_unit_command(line: &str, config: &Path, main_pid: i32) {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| match w {
            "/usr/local/bin/postback-proxy" => common::proxy::binary().to_owned(),
            "/etc/postback-proxy/postback-proxy.yaml" => config.display().to_string(),
            "$MAINPID" => main_pid.to_string(),
            w => w.to_owned(),
        })
        .collect();
    let dir = config.parent().unwrap();
    let log = dir.join("unit-commands.log");
    let status = common::Proc::start(
        "a unit command",
        std::process::Command::new(&words[0])
            .args(&words[1..])
            .current_dir(dir),
        log.clone(),
    )
    .wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "{line} ({words:?}): {status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// What `systemctl start` and then `systemctl reload` do, without systemd: ExecStart (a daemon
/// writing its PID file), then every ExecReload line in order, while pixels keep coming. Not one
/// request fails, the PID file names the new process, the old one exits, every record arrives.
#[test]
fn the_units_reload_upgrades_with_no_failed_request() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::new(origin.peer());
    let (port, admin) = (common::free_port(), common::free_port());
    let yaml = settings.yaml(dir.path(), port, admin).replacen(
        "server:\n",
        &format!("server:\n  error_log: {}/error.log\n", dir.path().display()),
        1,
    );
    let config = dir.path().join("postback-proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let daemon = Daemon {
        pid_file: dir.path().join("proxy.pid"),
    };
    let log = || std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();

    run_unit_command(&unit_value("ExecStartPre"), &config, 0);
    run_unit_command(&unit_value("ExecStart"), &config, 0);
    let old = daemon.pid();
    assert!(
        eventually(Duration::from_secs(20), || {
            common::process::owns_listener(old as u32, port)
                && common::process::listening(port, Duration::from_secs(1))
        }),
        "the daemon does not listen on {port}; log:\n{}",
        log()
    );

    // Pixels, one after another, until told to stop: (sent, failures).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = common::client();
            let (mut sent, mut failures) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let url = format!(
                    "http://127.0.0.1:{port}/postback/v3/event/web/reload?td_write_key={KEY}&n={sent}"
                );
                match rt.block_on(client.get(&url).send()) {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!("{sent}: {}", r.status())),
                    Err(e) => failures.push(format!("{sent}: {e}")),
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (sent, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    for line in unit_values("ExecReload") {
        run_unit_command(&line, &config, old);
    }
    let new = daemon.pid();
    assert_ne!(new, old, "the PID file still names the old process");
    assert!(
        eventually(Duration::from_secs(30), || !alive(old)),
        "the old process did not exit; log:\n{}",
        log()
    );
    assert!(alive(new), "the new process is gone; log:\n{}", log());
    assert!(common::process::owns_listener(new as u32, port));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (sent, failures) = load.join().unwrap();
    eprintln!(
        "{sent} requests across the reload, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed across the reload: {failures:?}\nlog:\n{}",
        failures.len(),
        log()
    );

    // Every accepted record arrives, and the new process stops on SIGTERM as systemctl stop asks.
    let events = dir.path().join("events.jsonl");
    let count = || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"reload\""))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(20), || count() >= sent),
        "{} of {sent} records in the sink; log:\n{}",
        count(),
        log()
    );
    unsafe { libc::kill(new, libc::SIGTERM) };
    assert!(
        eventually(Duration::from_secs(30), || !alive(new)),
        "the new process did not stop on SIGTERM; log:\n{}",
        log()
    );
}
