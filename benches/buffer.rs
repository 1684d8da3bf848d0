//! Append throughput of the delivery buffers: `buffer: disk` (group commit, fsync every second
//! and fsync always) against `buffer: memory`, in the same run, rounds interleaved.
//!
//! Run: `cargo bench --bench buffer` (options: `-- --records 200000 --producers 64 --rounds 3`).
//! Each round starts a fresh buffer with a sink that discards batches, then 64 concurrent tasks
//! accept one pixel-sized record each per call, as the proxy does per request, until the total is
//! reached. Reported: records/s and bytes/s of accepted records (median of the rounds).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use postback_proxy::delivery::Delivery;
use postback_proxy::delivery::{BufferKind, DeliveryConfig, FsyncPolicy};
use postback_proxy::record::{Record, RecordBody, RecordRef};
use postback_proxy::sink::{Batch, LogSink, Rejection, SinkError};
use postback_proxy::units::{ByteSize, HumanDuration};

/// A sink that takes everything at once.
struct NullSink;

#[async_trait]
impl LogSink for NullSink {
    async fn write_batch(&self, _batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        Ok(Vec::new())
    }
}

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
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
                .to_string(),
        ),
        (
            "td_global_id",
            "5f0b8a52-1c3e-4c0e-9d7e-2f1a6b3c4d5e".to_string(),
        ),
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

#[derive(Clone, Copy)]
enum Mode {
    Memory,
    DiskEverySecond,
    DiskAlways,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::DiskEverySecond => "disk, fsync 1s",
            Mode::DiskAlways => "disk, fsync always",
        }
    }
}

fn round(mode: Mode, records: usize, producers: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = DeliveryConfig {
        buffer: match mode {
            Mode::Memory => BufferKind::Memory,
            _ => BufferKind::Disk,
        },
        dir: dir.path().to_path_buf(),
        max_bytes: ByteSize::gib(4),
        queue_records: records + 1,
        fsync: match mode {
            Mode::DiskAlways => FsyncPolicy::Always,
            _ => FsyncPolicy::Every(HumanDuration::secs(1)),
        },
        ..DeliveryConfig::default()
    };
    let delivery = Arc::new(
        Delivery::open(
            &cfg,
            vec![("main".into(), Box::new(NullSink) as Box<dyn LogSink>)],
        )
        .expect("open"),
    );
    delivery.start().expect("start");
    let mut line = Vec::new();
    pixel_record(0).to_json_line(&mut line);
    let bytes_per_record = line.len();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let per_task = records / producers;
    let started = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..producers)
            .map(|p| {
                let delivery = delivery.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let record = pixel_record(p * per_task + i);
                        delivery
                            .accept(0, &[RecordRef::from(&record)])
                            .await
                            .expect("accepted");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("producer");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    delivery.finish(Duration::from_secs(10));
    let n = (per_task * producers) as f64;
    (n / elapsed, n * bytes_per_record as f64 / elapsed)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let records = arg("--records", 200_000);
    let producers = arg("--producers", 64);
    let rounds = arg("--rounds", 3);
    let modes = [Mode::Memory, Mode::DiskEverySecond, Mode::DiskAlways];
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    for r in 0..rounds {
        for (m, mode) in modes.iter().enumerate() {
            // fsync-always is far slower: a tenth of the records keeps the round short.
            let n = if matches!(mode, Mode::DiskAlways) {
                records / 10
            } else {
                records
            };
            let result = round(*mode, n, producers);
            eprintln!(
                "round {}: {:<20} {:>12.0} records/s",
                r + 1,
                mode.name(),
                result.0
            );
            results[m].push(result);
        }
    }
    let base = median(results[0].iter().map(|r| r.0).collect());
    println!(
        "\n{:<20} {:>14} {:>12} {:>10}",
        "buffer", "records/s", "MB/s", "vs memory"
    );
    for (m, mode) in modes.iter().enumerate() {
        let rps = median(results[m].iter().map(|r| r.0).collect());
        let bps = median(results[m].iter().map(|r| r.1).collect());
        println!(
            "{:<20} {:>14.0} {:>12.1} {:>9.2}x",
            mode.name(),
            rps,
            bps / 1e6,
            rps / base
        );
    }
}
