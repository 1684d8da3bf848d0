//! Records per second into each sink at batch sizes 1, 100 and 1000, against real peers on
//! loopback: a file, an HTTP collector (a small hyper server here), Kafka (the tansu broker) and
//! Fluentd forward with acks (the Python test peer in tests/peers/).
//!
//! Run: `cargo bench --bench sinks` (options: `-- --records 20000 --only file,http,kafka,fluent`).
//! Needs what `scripts/setup.sh` installs (tansu, python3 with msgpack). Each (sink, batch size)
//! writes `--records` pixel-sized records through `LogSink::write_batch`, one batch at a time as
//! the delivery writer does, and reports records/s.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use postback_proxy::record::{Record, RecordBody};
use postback_proxy::sink::SinkConfig;
use postback_proxy::sink::{self, LogSink};

const BATCH_SIZES: [usize; 3] = [1, 100, 1000];

fn pixel_record(i: usize) -> Record {
    let columns = [
        ("page", format!("/products/{i}")),
        (
            "referrer",
            "https://www.example.com/search?q=shoes".to_string(),
        ),
        ("td_ip", "203.0.113.7".to_string()),
        (
            "td_ua",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0".to_string(),
        ),
        ("td_global_id", format!("5f0b8a52-1c3e-4c0e-9d7e-{i:012}")),
        ("campaign", "winter_sale".to_string()),
        ("ab", "b".to_string()),
        ("screen", "1920x1080".to_string()),
    ];
    Record {
        database: "web".into(),
        table: "pageviews".into(),
        body: RecordBody {
            time: 1_764_245_000,
            columns: columns
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        },
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tansu_bin() -> PathBuf {
    std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("postback-proxy/tansu/bin/tansu")
        })
}

/// A tansu broker with the topic `web.pageviews`; returns it and its port.
fn start_kafka(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let bin = tansu_bin();
    assert!(
        bin.exists(),
        "tansu is missing at {} (run scripts/setup.sh)",
        bin.display()
    );
    let log = std::fs::File::create(dir.join("tansu.log")).expect("log file");
    let child = Command::new(&bin)
        .args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &url,
        ])
        .args(["--advertised-listener-url", &url])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("tansu starts");
    let proc = Proc(child);
    wait_listening(port, "tansu");
    let status = Command::new(&bin)
        .args([
            "topic",
            "create",
            "web.pageviews",
            "--broker",
            &url,
            "--partitions",
            "3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("tansu topic create runs");
    assert!(status.success(), "tansu topic create failed");
    (proc, port)
}

/// The Python Fluentd-forward peer (acknowledging every chunk); returns it and its port.
fn start_fluent(dir: &Path) -> (Proc, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/fluent_peer.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(dir.join("fluent.jsonl"))
        .args(["--port", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the peer prints its port");
    let port = line.trim().parse().expect("a port (is msgpack installed?)");
    (Proc(child), port)
}

/// An HTTP collector that reads each batch and answers 200.
fn start_http(runtime: &tokio::runtime::Runtime) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let records: usize = arg("--records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let only: Vec<String> = arg("--only")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| {
            ["file", "http", "kafka", "fluent"]
                .map(String::from)
                .to_vec()
        });
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let batch: Vec<Record> = (0..records).map(pixel_record).collect();

    let mut peers = Vec::new();
    let mut sinks: Vec<(String, String)> = Vec::new();
    for name in &only {
        let yaml = match name.as_str() {
            "file" => format!(
                "{{type: file, path: {:?}}}",
                dir.path().join("events.jsonl")
            ),
            "http" => format!(
                "{{type: http, url: \"http://127.0.0.1:{}/bulk\"}}",
                start_http(&runtime)
            ),
            "kafka" => {
                let (proc, port) = start_kafka(dir.path());
                peers.push(proc);
                format!("{{type: kafka, brokers: [\"127.0.0.1:{port}\"], topic: web.pageviews}}")
            }
            "fluent" => {
                let (proc, port) = start_fluent(dir.path());
                peers.push(proc);
                format!("{{type: fluent, address: \"127.0.0.1:{port}\", require_ack: true}}")
            }
            other => panic!("unknown sink {other}"),
        };
        sinks.push((name.clone(), yaml));
    }

    println!("\n| sink | batch 1 | batch 100 | batch 1000 |");
    println!("|---|---:|---:|---:|");
    for (name, yaml) in sinks {
        let cfg: SinkConfig = serde_saphyr::from_str(&yaml).expect("sink configuration");
        let sink: Box<dyn LogSink> = sink::open(&name, &cfg).expect("sink opens");
        let mut cells = Vec::new();
        for size in BATCH_SIZES {
            // Batch size 1 is slow for the network sinks: a tenth of the records keeps it short.
            let n = if size == 1 { records / 10 } else { records };
            let started = Instant::now();
            runtime.block_on(async {
                for chunk in batch[..n].chunks(size) {
                    let mut tries = 0;
                    while let Err(e) = sink
                        .write_batch(&sink::Batch::new(chunk, String::new()))
                        .await
                    {
                        tries += 1;
                        assert!(tries < 50, "{name}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
            let rate = n as f64 / started.elapsed().as_secs_f64();
            eprintln!("{name:<7} batch {size:>5}: {rate:>10.0} records/s");
            cells.push(format!("{rate:.0}"));
        }
        runtime.block_on(async {
            let _ = sink.close().await;
        });
        println!("| {name} | {} |", cells.join(" | "));
    }
    drop(peers);
}
