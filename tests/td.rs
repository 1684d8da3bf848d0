//! The `td` sink end to end: the real binary imports into a stand-in for Treasure Data's bulk
//! import API that the test starts. The stand-in decodes each body with libraries of its own
//! (flate2 for the gzip, rmpv for the msgpack), records every request, and de-duplicates imports
//! by their `unique_id` as Treasure Data does.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, now, Origin, Proxy, Settings, KEY, WAIT};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The API key of the test configuration.
const TD_KEY: &str = "1/td-test-key-0123456789";

/// One import request as the stand-in saw it.
#[derive(Clone, Debug)]
struct Import {
    database: String,
    table: String,
    id: String,
    authorization: String,
    /// The records, each `time` and its string columns; a value of another type is kept as
    /// `{"bad type": ...}` so that the checks see it.
    records: Vec<Value>,
}

/// What the stand-in knows and does.
#[derive(Default)]
struct State {
    /// Every import request answered 200, in order (repeated ids included).
    imports: Vec<Import>,
    /// The records of each unique id, from its first import: what Treasure Data keeps.
    kept: BTreeMap<String, Vec<Value>>,
    /// Tables that exist (`db.table`); an import into another one is answered 404.
    tables: BTreeSet<String>,
    /// `POST /v3/table/create/...` and `/v3/database/create/...` paths, in order.
    creates: Vec<String>,
    /// Statuses to answer the next import requests with, before any is accepted.
    script: VecDeque<u16>,
    /// Answer every import with 401.
    refuse_key: bool,
    /// Imports answered with a scripted status: (status, id).
    failed: Vec<(u16, String)>,
    /// Hold the next import's answer this long (after recording it).
    stall_next: Option<Duration>,
}

#[derive(Clone, Default)]
struct Api(Arc<Mutex<State>>);

impl Api {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    /// Every kept record, from all unique ids.
    fn kept_records(&self) -> Vec<Value> {
        self.with(|s| s.kept.values().flatten().cloned().collect())
    }

    /// Waits until every `n` in `ns` was kept; returns the kept records.
    fn wait_kept(&self, ns: &BTreeSet<String>, proxy: &Proxy) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let kept = self.kept_records();
            let seen: BTreeSet<String> = kept
                .iter()
                .filter_map(|r| r["n"].as_str().map(str::to_owned))
                .collect();
            if ns.is_subset(&seen) {
                return kept;
            }
            assert!(
                Instant::now() < deadline,
                "missing {:?} after {WAIT:?}\nproxy log:\n{}",
                ns.difference(&seen).collect::<Vec<_>>(),
                proxy.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Decodes a gzip of consecutive msgpack maps with flate2 and rmpv.
fn decode(body: &[u8]) -> Vec<Value> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut raw)
        .expect("the body is gzip");
    let mut cursor = std::io::Cursor::new(&raw[..]);
    let mut out = Vec::new();
    while (cursor.position() as usize) < raw.len() {
        let value = rmpv::decode::read_value(&mut cursor).expect("msgpack");
        let rmpv::Value::Map(pairs) = value else {
            panic!("not a map: {value:?}")
        };
        let mut record = serde_json::Map::new();
        for (k, v) in pairs {
            let k = k.as_str().expect("a string key").to_string();
            let v = match (&k[..], v) {
                ("time", rmpv::Value::Integer(i)) => Value::from(i.as_i64().unwrap()),
                (_, rmpv::Value::String(s)) if k != "time" => {
                    Value::from(s.into_str().expect("UTF-8"))
                }
                (_, other) => serde_json::json!({ "bad type": other.to_string() }),
            };
            record.insert(k, v);
        }
        out.push(Value::Object(record));
    }
    out
}

fn reply(status: u16, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn handle(
    api: Api,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if authorization != format!("TD1 {TD_KEY}") || api.with(|s| s.refuse_key) {
        return Ok(reply(401, r#"{"error":"Authentication failed"}"#));
    }
    match (method.as_str(), &parts[..]) {
        ("PUT", ["v3", "table", "import_with_id", db, table, id, "msgpack.gz"]) => {
            let (db, table, id) = (db.to_string(), table.to_string(), id.to_string());
            if let Some(status) = api.with(|s| s.script.pop_front()) {
                api.with(|s| s.failed.push((status, id.clone())));
                return Ok(reply(status, r#"{"error":"scripted"}"#));
            }
            if !api.with(|s| s.tables.contains(&format!("{db}.{table}"))) {
                return Ok(reply(404, r#"{"error":"Table not found"}"#));
            }
            let records = decode(&body);
            let stall = api.with(|s| {
                s.imports.push(Import {
                    database: db,
                    table,
                    id: id.clone(),
                    authorization,
                    records: records.clone(),
                });
                s.kept.entry(id.clone()).or_insert(records);
                s.stall_next.take()
            });
            if let Some(stall) = stall {
                tokio::time::sleep(stall).await;
            }
            Ok(reply(200, &format!(r#"{{"unique_id":"{id}"}}"#)))
        }
        ("POST", ["v3", "table", "create", db, table, "log"]) => {
            api.with(|s| {
                s.creates.push(format!("table {db}.{table}"));
                s.tables.insert(format!("{db}.{table}"));
            });
            Ok(reply(200, "{}"))
        }
        _ => Ok(reply(400, r#"{"error":"unexpected request"}"#)),
    }
}

/// The stand-in API, served by a task of the test's runtime until dropped.
struct Server {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(api: Api) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let api = api.clone();
                let service = service_fn(move |req| handle(api.clone(), req));
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Server { port, task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Harness settings with the disk buffer and a `td` sink importing into the stand-in.
fn td_settings(origin: &Origin, server: &Server) -> Settings {
    let mut s = Settings::new(origin.peer());
    s.buffer = "disk".into();
    s.sink_yaml = Some(format!(
        "{{ type: td, endpoint: \"http://127.0.0.1:{}\", api_key: \"{TD_KEY}\", timeout: 5s }}",
        server.port
    ));
    s
}

/// The stand-in, set up by `setup`, and a proxy importing into it.
async fn start(setup: impl FnOnce(&mut State)) -> (Origin, Api, Server, Proxy) {
    let origin = Origin::start();
    let api = Api::default();
    api.with(setup);
    let server = Server::start(api.clone()).await;
    let proxy = Proxy::start_with(td_settings(&origin, &server));
    (origin, api, server, proxy)
}

/// Sends pixels `ns` to `web.{table}`; each must be accepted.
async fn pixels(proxy: &Proxy, table: &str, ns: std::ops::Range<usize>) {
    let client = client();
    for n in ns {
        let url = proxy.url(&format!(
            "/postback/v3/event/web/{table}?td_format=pixel&td_write_key={KEY}&n={n}"
        ));
        let status = client.get(url).send().await.unwrap().status();
        assert_eq!(status, 200, "pixel {n}\nproxy log:\n{}", proxy.stderr());
    }
}

fn ns(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|n| n.to_string()).collect()
}

/// How often each `n` is among `records`.
fn counts(records: &[Value]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for r in records {
        *c.entry(r["n"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_imported_with_the_api_shape_and_tables_created() {
    let (_origin, api, _server, proxy) = start(|_| {}).await;
    let start = now();
    pixels(&proxy, "pageviews", 0..20).await;
    pixels(&proxy, "clicks", 20..25).await;
    let kept = api.wait_kept(&ns(0..25), &proxy);

    // Neither table existed: each was created on its 404, then imported into.
    let creates = api.with(|s| s.creates.clone());
    let created: BTreeSet<&str> = creates.iter().map(String::as_str).collect();
    assert_eq!(
        created,
        BTreeSet::from(["table web.clicks", "table web.pageviews"]),
        "{creates:?}"
    );
    for import in api.with(|s| s.imports.clone()) {
        assert_eq!(import.authorization, format!("TD1 {TD_KEY}"));
        assert_eq!(import.database, "web");
        assert_eq!(import.id.len(), 32, "{import:?}");
        assert!(
            import.id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{import:?}"
        );
        assert!(!import.records.is_empty());
        for r in &import.records {
            let n: usize = r["n"].as_str().unwrap().parse().unwrap();
            let want = if n < 20 { "pageviews" } else { "clicks" };
            assert_eq!(import.table, want, "record {n} went to the wrong table");
        }
    }
    let once: BTreeMap<String, usize> = ns(0..25).into_iter().map(|n| (n, 1)).collect();
    assert_eq!(counts(&kept), once, "every record exactly once");
    for r in &kept {
        let time = r["time"].as_i64().expect("time is an integer");
        assert!((start - 5..=now() + 5).contains(&time), "{r}");
        for (k, v) in r.as_object().unwrap() {
            assert!(
                k == "time" || v.is_string(),
                "column {k} of {r} is not a string"
            );
        }
    }
    assert!(
        !proxy.stderr().contains("td-test-key"),
        "the key is in the log:\n{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_failing_answers_are_retried() {
    let (_origin, api, _server, proxy) = start(|s| {
        s.tables.insert("web.pageviews".into());
        s.script.extend([429, 500, 503]);
    })
    .await;
    pixels(&proxy, "pageviews", 0..5).await;
    let kept = api.wait_kept(&ns(0..5), &proxy);
    assert_eq!(counts(&kept).values().copied().max(), Some(1));
    let failed = api.with(|s| s.failed.clone());
    assert_eq!(
        failed.iter().map(|f| f.0).collect::<Vec<_>>(),
        [429, 500, 503],
        "{failed:?}"
    );
    let rejected = std::fs::read_to_string(proxy.dir.path().join("buffer/rejected.jsonl"));
    assert_eq!(
        rejected.unwrap_or_default(),
        "",
        "nothing is rejected for a retried answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_marks_the_sink_down_and_is_never_logged() {
    let (_origin, api, _server, proxy) = start(|s| {
        s.tables.insert("web.pageviews".into());
        s.refuse_key = true;
    })
    .await;
    pixels(&proxy, "pageviews", 0..3).await;
    let deadline = Instant::now() + WAIT;
    while !proxy.stderr().contains("the API key was refused") {
        assert!(
            Instant::now() < deadline,
            "no word of the refused key\nproxy log:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `/sinks` says down, with the reason and without the key.
    let sinks = client()
        .get(proxy.admin_url("/sinks"))
        .send()
        .await
        .unwrap();
    assert_eq!(sinks.status(), 200);
    let text = sinks.text().await.unwrap();
    assert!(text.contains("\"state\":\"down\""), "{text}");
    assert!(text.contains("the API key was refused"), "{text}");
    assert!(!text.contains("td-test-key"), "{text}");
    assert!(
        !proxy.stderr().contains("td-test-key"),
        "the key is in the log:\n{}",
        proxy.stderr()
    );
    // Once the key is accepted, the records arrive (they waited in the buffer).
    api.with(|s| s.refuse_key = false);
    api.wait_kept(&ns(0..3), &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_import_and_checkpoint_sends_the_same_batch_with_the_same_id() {
    let origin = Origin::start();
    let api = Api::default();
    api.with(|s| {
        s.tables.insert("web.pageviews".into());
        // The first import is recorded, then its answer held until the proxy is dead.
        s.stall_next = Some(Duration::from_secs(30));
    });
    let server = Server::start(api.clone()).await;
    let mut settings = td_settings(&origin, &server);
    settings.batch_max_wait = "300ms".into();
    let mut proxy = Proxy::start_with(settings.clone());
    pixels(&proxy, "pageviews", 0..10).await;
    let deadline = Instant::now() + WAIT;
    while api.with(|s| s.imports.is_empty()) {
        assert!(Instant::now() < deadline, "no import\n{}", proxy.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Sent, not answered, so not checkpointed: kill -9.
    proxy.kill();
    let first = api.with(|s| s.imports[0].clone());
    let dir = proxy.take_dir();
    let proxy = Proxy::start_in(Some(dir), settings);
    pixels(&proxy, "pageviews", 10..15).await;
    let kept = api.wait_kept(&ns(0..15), &proxy);
    // Every record exactly once in what Treasure Data keeps.
    assert!(
        counts(&kept).values().all(|&c| c == 1),
        "{:?}",
        counts(&kept)
    );
    // The first batch travelled again with the same id and the same records.
    let again: Vec<Import> = api.with(|s| {
        s.imports[1..]
            .iter()
            .filter(|i| i.id == first.id)
            .cloned()
            .collect()
    });
    assert!(
        !again.is_empty(),
        "the batch was not sent again with its id"
    );
    for a in again {
        assert_eq!(a.records, first.records);
    }
}
