//! Delivery that loses nothing: the disk buffer, retries and the `http` sink, end to end against a
//! real HTTP collector that the tests start, stop and make fail.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::collector::{Collector, Received};
use common::proxy::{free_port, tear_newest_segment};
use common::{client, Origin, Proxy, Settings, KEY, WAIT};
use serde_json::Value;

/// Harness settings with the disk buffer and an `http` sink posting to `127.0.0.1:collector_port`.
fn http_settings(origin: &Origin, collector_port: u16, gzip: bool) -> Settings {
    let mut s = Settings::new(origin.peer());
    s.buffer = "disk".into();
    s.sink_yaml = Some(format!(
        "{{ type: http, url: \"http://127.0.0.1:{collector_port}/bulk\", gzip: {gzip}, timeout: 5s }}"
    ));
    s
}

/// An origin, a free port for the collector, an empty store for what the collector will receive,
/// and [`http_settings`] for them.
fn http_setup(gzip: bool) -> (Origin, u16, Arc<Received>, Settings) {
    let origin = Origin::start();
    let port = free_port();
    let settings = http_settings(&origin, port, gzip);
    (origin, port, Received::new(), settings)
}

/// Sends pixels `n = from..to` with `concurrency` requests in flight; returns the `n` of every
/// request answered 200.
async fn pixels(proxy: &Proxy, from: usize, to: usize, concurrency: usize) -> Vec<usize> {
    let client = client();
    let mut accepted = Vec::new();
    let ns: Vec<usize> = (from..to).collect();
    for chunk in ns.chunks(concurrency) {
        let requests = chunk.iter().map(|&n| {
            let url = proxy.url(&format!(
                "/postback/v3/event/web/pageviews?td_format=pixel&td_write_key={KEY}&n={n}"
            ));
            let client = client.clone();
            async move {
                let ok = match client
                    .get(url)
                    .header(
                        "user-agent",
                        "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
                    )
                    .send()
                    .await
                {
                    Ok(resp) => resp.status() == 200,
                    Err(_) => false,
                };
                (n, ok)
            }
        });
        for (n, ok) in futures_join(requests).await {
            if ok {
                accepted.push(n);
            }
        }
    }
    accepted
}

/// Runs the futures concurrently on the current runtime.
async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("request task"));
    }
    out
}

/// How many times each `n` arrived at the collector.
fn arrivals(records: &[Value]) -> BTreeMap<usize, usize> {
    let mut seen = BTreeMap::new();
    for r in records {
        assert_eq!(r["database"], "web");
        assert_eq!(r["table"], "pageviews");
        let n: usize = r["record"]["n"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("record without n: {r}"));
        *seen.entry(n).or_default() += 1;
    }
    seen
}

/// Waits until every `n` in `accepted` has arrived; returns the number of duplicates.
fn wait_all_arrived(received: &Received, accepted: &[usize]) -> usize {
    let records = received.wait_until(WAIT, "every accepted record", |records| {
        let seen = arrivals(records);
        accepted.iter().all(|n| seen.contains_key(n))
    });
    let seen = arrivals(&records);
    seen.values().map(|c| c - 1).sum()
}

async fn readyz(proxy: &Proxy) -> u16 {
    client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Waits (bounded) until `/readyz` answers `status`.
async fn wait_readyz(proxy: &Proxy, status: u16) {
    for _ in 0..1500 {
        if readyz(proxy).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "/readyz never answered {status}; stderr:\n{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_down_then_kill_9_then_restart_delivers_every_accepted_record() {
    let (_origin, port, received, settings) = http_setup(false);
    let mut proxy = Proxy::start_with(settings.clone());

    let accepted = pixels(&proxy, 0, 3000, 32).await;
    assert_eq!(
        accepted.len(),
        3000,
        "every pixel is accepted while the sink is down"
    );
    assert!(received.records().is_empty());
    proxy.kill();

    let _collector = Collector::start(port, received.clone(), None);
    let dir = proxy.take_dir();
    let proxy = Proxy::start_in(Some(dir), settings);
    let duplicates = wait_all_arrived(&received, &accepted);
    eprintln!("3000 accepted, all delivered after kill -9 and restart, {duplicates} duplicates");
    assert!(!proxy.stderr().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_keeps_every_accepted_record() {
    let (_origin, port, received, settings) = http_setup(true);
    let collector = Collector::start(port, received.clone(), None);
    let mut proxy = Proxy::start_with(settings.clone());

    let load = {
        let urls: Vec<String> = (0..4000)
            .map(|n| {
                proxy.url(&format!(
                    "/postback/v3/event/web/pageviews?td_write_key={KEY}&n={n}"
                ))
            })
            .collect();
        tokio::spawn(async move {
            let client = client();
            let mut accepted = Vec::new();
            for (chunk_no, chunk) in urls.chunks(16).enumerate() {
                let results = futures_join(chunk.iter().cloned().enumerate().map(|(i, url)| {
                    let client = client.clone();
                    let n = chunk_no * 16 + i;
                    async move {
                        let ok = client
                            .get(url)
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == 200);
                        (n, ok)
                    }
                }))
                .await;
                let before = accepted.len();
                accepted.extend(results.into_iter().filter(|(_, ok)| *ok).map(|(n, _)| n));
                if accepted.len() == before && chunk_no > 0 {
                    break; // the proxy stopped answering
                }
            }
            accepted
        })
    };
    // SIGTERM once some records went through, while requests are still being sent.
    received.wait_until(WAIT, "the first records", |r| r.len() >= 200);
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let accepted = load.await.unwrap();
    assert!(accepted.len() >= 200, "{} accepted", accepted.len());

    // What was not delivered before the exit is delivered after the next start.
    let dir = proxy.take_dir();
    let _proxy = Proxy::start_in(Some(dir), settings);
    let duplicates = wait_all_arrived(&received, &accepted);
    eprintln!(
        "{} accepted before SIGTERM, all delivered, {duplicates} duplicates",
        accepted.len()
    );
    assert!(
        received
            .content_types()
            .iter()
            .all(|t| t == "application/x-ndjson"),
        "{:?}",
        received.content_types()
    );
    drop(collector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_buffer_answers_503_and_recovers_when_the_sink_returns() {
    let (_origin, port, received, mut settings) = http_setup(false);
    settings.delivery_extra = vec!["max_bytes: 8KiB".into()];
    let proxy = Proxy::start_with(settings);

    let client = client();
    let mut accepted = Vec::new();
    let mut refused = None;
    for n in 0..500 {
        let resp = client
            .get(proxy.url(&format!(
                "/postback/v3/event/web/pageviews?td_write_key={KEY}&n={n}"
            )))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => accepted.push(n),
            503 => {
                refused = Some(resp);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let refused = refused.expect("a 503 once the buffer is full");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "unavailable");
    assert!(
        accepted.len() > 10,
        "{} accepted before the buffer filled",
        accepted.len()
    );
    assert_eq!(readyz(&proxy).await, 503);

    let _collector = Collector::start(port, received.clone(), None);
    let duplicates = wait_all_arrived(&received, &accepted);
    wait_readyz(&proxy, 200).await;
    // There is room again.
    let resp = client
        .get(proxy.url(&format!(
            "/postback/v3/event/web/pageviews?td_write_key={KEY}&n=9999"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    received.wait_until(WAIT, "the record sent after recovery", |r| {
        arrivals(r).contains_key(&9999)
    });
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("postback_requests_total{outcome=\"unavailable\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("sink_errors_total{sink=\"main\"}"),
        "{metrics}"
    );
    eprintln!(
        "{} accepted, then 503; all delivered, {duplicates} duplicates",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_that_fails_now_and_then_loses_nothing() {
    let (_origin, port, received, mut settings) = http_setup(true);
    let _collector = Collector::start(port, received.clone(), Some(3));
    settings.batch_max_records = 20;
    let proxy = Proxy::start_with(settings);

    let accepted = pixels(&proxy, 0, 1500, 24).await;
    assert_eq!(accepted.len(), 1500);
    let duplicates = wait_all_arrived(&received, &accepted);
    assert!(received.failed() > 0, "the collector refused some batches");
    assert_eq!(
        duplicates, 0,
        "a refused batch is not kept, so nothing arrives twice"
    );
    // Every record arrived exactly as accepted.
    let sample = received
        .records()
        .into_iter()
        .find(|r| r["record"]["n"] == "7")
        .unwrap();
    assert!(sample["record"]["time"].is_i64());
    assert_eq!(sample["record"].as_object().unwrap().len(), 2, "{sample}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_tail_is_skipped_with_a_warning_and_the_rest_delivered() {
    let (_origin, port, received, settings) = http_setup(false);
    let mut proxy = Proxy::start_with(settings.clone());
    let accepted = pixels(&proxy, 0, 50, 10).await;
    assert_eq!(accepted.len(), 50);
    proxy.kill();

    // A crash in the middle of a write: a frame cut short at the end of the newest segment.
    let dir = proxy.take_dir();
    tear_newest_segment(&dir.path().join("buffer/main"));

    let _collector = Collector::start(port, received.clone(), None);
    let proxy = Proxy::start_in(Some(dir), settings);
    wait_all_arrived(&received, &accepted);
    // Records accepted after the restart are delivered too.
    let later = pixels(&proxy, 50, 60, 5).await;
    wait_all_arrived(&received, &later);
    let stderr = proxy.stderr();
    assert!(stderr.contains("torn or corrupt"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_the_collector_refuses_for_good_go_to_rejected_jsonl() {
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.buffer = "disk".into();
    // The origin answers 400 on /status/400: a collector that refuses the batch for good.
    settings.sink_yaml = Some(format!(
        "{{ type: http, url: \"http://{}/status/400\" }}",
        origin.peer()
    ));
    let proxy = Proxy::start_with(settings);
    let accepted = pixels(&proxy, 0, 5, 5).await;
    assert_eq!(accepted.len(), 5);
    let rejected = proxy.dir.path().join("buffer/rejected.jsonl");
    let mut lines = Vec::new();
    for _ in 0..1500 {
        lines = std::fs::read_to_string(&rejected)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        if lines.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 5, "stderr:\n{}", proxy.stderr());
    let mut ns: Vec<String> = lines
        .iter()
        .map(|l| l["record"]["record"]["n"].as_str().unwrap().to_owned())
        .collect();
    ns.sort();
    assert_eq!(ns, ["0", "1", "2", "3", "4"]);
    assert_eq!(lines[0]["sink"], "main");
    assert!(
        lines[0]["reason"].as_str().unwrap().contains("400"),
        "{}",
        lines[0]
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("postback_records_total{result=\"rejected\",sink=\"main\"} 5"),
        "{metrics}"
    );
}
