//! SPEC sections 1 and 2: `--check`, problems reported by field, unknown keys, and the defaults
//! of a minimal configuration.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::proxy::binary;
use common::*;

/// Writes `yaml` into a fresh directory and runs `postback-proxy <flag> FILE --check` there.
fn check_with(flag: &str, yaml: &str) -> (Output, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(binary())
        .arg(flag)
        .arg(&path)
        .arg("--check")
        .current_dir(dir.path())
        .output()
        .expect("run postback-proxy --check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn check(yaml: &str) -> (Output, String, String) {
    check_with("-c", yaml)
}

/// The harness configuration, as text.
fn harness_yaml() -> String {
    Settings::new("127.0.0.1:3000").yaml(Path::new("/tmp/pp-check"), 18080, 19090)
}

fn assert_refused(yaml: &str, fields: &[&str]) {
    let (out, stdout, stderr) = check(yaml);
    assert!(
        !out.status.success(),
        "--check accepted a bad configuration:\n{yaml}\nstdout: {stdout}"
    );
    assert!(
        !stdout.contains("configuration OK"),
        "stdout says OK for a bad configuration: {stdout}"
    );
    for field in fields {
        assert!(
            stderr.contains(field),
            "stderr does not name `{field}`:\n{stderr}\nconfiguration:\n{yaml}"
        );
    }
}

#[test]
fn check_accepts_a_valid_configuration() {
    for flag in ["-c", "--config"] {
        let (out, stdout, stderr) = check_with(flag, &harness_yaml());
        assert!(
            out.status.success(),
            "{flag}: --check refused the harness configuration: {stderr}"
        );
        assert_eq!(stdout.trim(), "configuration OK", "{flag}");
    }
    // The shipped configuration is valid too.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/postback-proxy.yaml"),
    )
    .unwrap();
    let (out, stdout, stderr) = check(&shipped);
    assert!(out.status.success(), "conf/postback-proxy.yaml: {stderr}");
    assert_eq!(stdout.trim(), "configuration OK");
}

#[test]
fn check_names_a_route_with_a_missing_sink() {
    let yaml = harness_yaml().replacen(
        "  - path: /postback/v3/event/{database}/{table}\n    sink: main",
        "  - path: /postback/v3/event/{database}/{table}\n    sink: nowhere",
        1,
    );
    assert_ne!(yaml, harness_yaml());
    assert_refused(&yaml, &["routes[0].sink"]);
}

#[test]
fn check_refuses_unknown_keys_naming_them() {
    // A typo at the top, nested in a section, and in a sink.
    let yaml = format!("{}\nlisten_addr: 1\n", harness_yaml());
    assert_refused(&yaml, &["listen_addr"]);
    let yaml = harness_yaml().replacen("  max_columns: 20", "  max_colums: 20", 1);
    assert_refused(&yaml, &["max_colums"]);
    let yaml = harness_yaml().replacen("{ type: file, path:", "{ type: file, pth:", 1);
    assert_ne!(yaml, harness_yaml());
    assert_refused(&yaml, &["pth"]);
}

#[test]
fn check_names_an_upstream_peer_that_does_not_resolve() {
    let yaml = harness_yaml().replacen(
        "peers: [\"127.0.0.1:3000\"]",
        "peers: [\"127.0.0.1:3000\", \"no-such-host.invalid:80\"]",
        1,
    );
    assert_ne!(yaml, harness_yaml());
    assert_refused(&yaml, &["upstream.peers[1]"]);
    let yaml = harness_yaml().replacen("peers: [\"127.0.0.1:3000\"]", "peers: []", 1);
    assert_refused(&yaml, &["upstream.peers"]);
}

#[test]
fn check_reports_every_problem_on_its_own_line() {
    let yaml = harness_yaml()
        .replacen(
            "  - path: /postback/v3/event/{database}/{table}\n    sink: main",
            "  - path: /postback/v3/event/{database}/{table}\n    sink: nowhere",
            1,
        )
        .replacen(
            "peers: [\"127.0.0.1:3000\"]",
            "peers: [\"no-such-host.invalid:80\"]",
            1,
        )
        .replacen(
            "allowed_origins: [\"https://www.example.com\"]",
            "allowed_origins: [\"www.example.com\"]",
            1,
        );
    let (out, _, stderr) = check(&yaml);
    assert!(!out.status.success());
    for field in [
        "routes[0].sink",
        "upstream.peers[0]",
        "postback.cors.allowed_origins[0]",
    ] {
        let lines = stderr.lines().filter(|l| l.contains(field)).count();
        assert_eq!(lines, 1, "`{field}` should be named on one line:\n{stderr}");
    }
}

#[test]
fn check_names_other_bad_values() {
    let cases = [
        (
            harness_yaml().replacen(
                "listen:\n  - address: 127.0.0.1:18080",
                "listen:\n  - address: nowhere",
                1,
            ),
            "listen[0].address",
        ),
        (
            harness_yaml().replacen("  max_columns: 20", "  max_columns: 0", 1),
            "postback.max_columns",
        ),
        (
            harness_yaml().replacen(
                "trusted_proxies: [\"127.0.0.1/32\"]",
                "trusted_proxies: [\"not-an-ip\"]",
                1,
            ),
            "client_ip.trusted_proxies[0]",
        ),
        (
            harness_yaml().replacen(
                "allowed_hosts: [\"example.com\", \"*.example.com\"]",
                "allowed_hosts: [\"exa mple.com\"]",
                1,
            ),
            "postback.redirect.allowed_hosts[0]",
        ),
        (
            harness_yaml().replacen(
                "  - path: /px/{table}.gif\n",
                "  - path: /px/{tabel}.gif\n",
                1,
            ),
            "routes[1].path",
        ),
        (
            harness_yaml().replacen(
                &format!("    - key: \"{OTHER_KEY}\"\n"),
                "    - key: \"\"\n",
                1,
            ),
            "auth.write_keys[1].key",
        ),
    ];
    for (yaml, field) in cases {
        assert_ne!(
            yaml,
            harness_yaml(),
            "the test did not change the configuration for {field}"
        );
        assert_refused(&yaml, &[field]);
    }
}

#[test]
fn a_missing_configuration_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .arg("-c")
        .arg(dir.path().join("absent.yaml"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.yaml"));
}

#[tokio::test]
async fn a_minimal_configuration_gets_the_default_route_and_sink() {
    let origin = Origin::start();
    let peer = origin.peer();
    let proxy = Proxy::start_yaml(
        |_dir, port, _admin| {
            format!(
                "listen: [{{address: \"127.0.0.1:{port}\"}}]\nupstream: {{peers: [\"{peer}\"]}}\n\
                 auth: {{write_keys: [{{key: \"{KEY}\"}}]}}\n\
                 server: {{grace_period_seconds: 1, graceful_shutdown_timeout_seconds: 2}}\n"
            )
        },
        false,
        |dir| dir.join("data/events.jsonl"),
    );
    let r = proxy
        .get(&format!(
            "/postback/v3/event/anydb/t?td_write_key={KEY}&a=1"
        ))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(r.body, b"{}", "the default format is json");
    // Only the Treasure Data route: /px/... goes upstream.
    let r = get(&proxy.url("/px/t.gif"), &[]).await;
    assert_eq!(r.header("x-origin").as_deref(), Some("yes"));
    let records = proxy.records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["database"], "anydb");
    assert_eq!(records[0]["table"], "t");
    assert_eq!(records[0]["record"]["a"], "1");
}

#[tokio::test]
async fn without_write_keys_every_postback_is_refused() {
    let origin = Origin::start();
    let peer = origin.peer();
    let proxy = Proxy::start_yaml(
        |_dir, port, _admin| {
            format!(
                "listen: [{{address: \"127.0.0.1:{port}\"}}]\nupstream: {{peers: [\"{peer}\"]}}\n"
            )
        },
        false,
        |dir| dir.join("data/events.jsonl"),
    );
    for q in ["", "?td_write_key=anything", "?td_write_key=1%2F0123"] {
        let r = get(&proxy.url(&format!("/postback/v3/event/web/t{q}")), &[]).await;
        assert_eq!(r.status, 403, "{q}: {:?}", r.text());
        assert_eq!(r.json()["error"], "forbidden");
    }
    assert!(proxy.lines().is_empty());
}

#[tokio::test]
async fn admin_listener_answers_health_readiness_and_metrics() {
    let (_origin, proxy) = harness();
    let r = get(&proxy.admin_url("/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    let r = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let r = get(
        &proxy.url(&format!("/postback/v3/event/web/m?td_write_key={KEY}")),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    get(&proxy.url("/passthrough"), &[]).await;
    proxy.records(1);
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    let names = [
        "postback_requests_total{",
        "postback_records_total{",
        "delivery_queue_records",
        "upstream_responses_total{",
    ];
    assert_contains_all(&text, &names, "/metrics");
    // The admin endpoints are not on the public listener.
    let r = get(&proxy.url("/metrics"), &[]).await;
    assert_eq!(r.header("x-origin").as_deref(), Some("yes"));
}
