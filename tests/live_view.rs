//! The admin listener's live view (contract section 6), in a real browser: headless Chromium
//! (driven from `tests/browser/live.mjs`) opens the page, pixels fired through the proxy appear
//! with their columns, a refused postback appears with its reason, and the sink table turns
//! `down` when the test stops the sink's HTTP collector. Needs what `tests/browser.rs` needs.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::Arc;

use common::browser::{chromium_or_fail, spawn_node};
use common::collector::{Collector, Received};
use common::proxy::free_port;
use common::{Origin, Proxy, Settings, KEY};
use serde_json::Value;

#[test]
fn the_live_view_shows_records_refusals_and_sink_state() {
    let chromium = chromium_or_fail();
    let origin = Origin::start();
    let collector_port = free_port();
    let received = Arc::new(Received::default());
    let collector = Collector::start(collector_port, received.clone(), None);
    let mut settings = Settings::new(origin.peer());
    settings.sink_yaml = Some(format!(
        "{{ type: http, url: \"http://127.0.0.1:{collector_port}/bulk\", timeout: 2s }}"
    ));
    let proxy = Proxy::start_with(settings);
    let screenshot = std::env::temp_dir().join(format!("live-view-{}.png", std::process::id()));
    let signal = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let signal_path = signal.to_path_buf();
    drop(signal);

    let mut child = spawn_node(
        &chromium,
        "live.mjs",
        &[
            &proxy.admin_url("/"),
            &proxy.url("/postback/v3/event/web/pageviews"),
            KEY,
            screenshot.to_str().unwrap(),
            signal_path.to_str().unwrap(),
        ],
        Stdio::null(),
    );
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut collector = Some(collector);
    let mut result = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("read the driver's output");
        if line == "stop the sink" {
            drop(collector.take());
            std::fs::write(&signal_path, b"stopped").unwrap();
        } else if line.starts_with('{') {
            result = Some(line);
        }
    }
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success(),
        "live.mjs failed ({status}); stderr:\n{stderr}"
    );
    let seen: Value = serde_json::from_str(&result.expect("live.mjs printed its JSON")).unwrap();

    // Newest first, each with its database.table and its columns.
    let rows = seen["rows"].as_array().unwrap();
    let columns: Vec<&str> = rows.iter().map(|r| r[2].as_str().unwrap()).collect();
    for (row, n) in rows.iter().zip([3, 2, 1]) {
        assert_eq!(row[1], "web.pageviews");
        let cols = row[2].as_str().unwrap();
        assert!(cols.contains(&format!("page=/live-{n}")), "{columns:?}");
        assert!(cols.contains("td_ip=127.0.0.1"), "{cols}");
        assert!(cols.contains("time="), "{cols}");
    }
    assert_eq!(
        seen["filtered"], 1,
        "the text filter keeps the one matching record"
    );
    assert_eq!(seen["badStatus"], 403);
    let refused = &seen["refused"][0];
    assert_eq!(refused[1], "403");
    assert_eq!(refused[2], "forbidden: the write key is not valid");
    assert_eq!(refused[3], "/postback/v3/event/web/pageviews");
    assert_eq!(seen["keyOnPage"], false, "the write key never shows");
    assert_eq!(seen["sinksBefore"][0][0], "main");
    assert_eq!(seen["sinksBefore"][0][1], "up");
    assert_eq!(seen["sinksAfter"][0][1], "down");
    // Requests by outcome, from /metrics: four accepted, one forbidden.
    let rates = seen["rates"].as_array().unwrap();
    let total = |outcome: &str| {
        rates
            .iter()
            .find(|r| r[0] == outcome)
            .map(|r| r[2].as_str().unwrap().to_owned())
    };
    assert_eq!(total("accepted").as_deref(), Some("4"), "{rates:?}");
    assert_eq!(total("forbidden").as_deref(), Some("1"), "{rates:?}");
    eprintln!(
        "records shown {} ms after the pixels were fired; screenshot at {}",
        seen["shownAfterMs"],
        screenshot.display()
    );
    // `LIVE_VIEW_SCREENSHOT=docs/live-view.png cargo test --test live_view` refreshes the
    // README's picture.
    if let Ok(path) = std::env::var("LIVE_VIEW_SCREENSHOT") {
        std::fs::copy(&screenshot, path).expect("copy the screenshot");
    }
}
