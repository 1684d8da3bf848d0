//! One sink's writer: batches from its queue into the sink, retried until delivered.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};
use tokio::sync::watch;
use tokio::time::sleep_until;

use super::Lane;
use crate::config::DeliveryConfig;
use crate::metrics;
use crate::record::Record;
use crate::sink::{Batch, LogSink, Rejection};

/// How batches are formed and failures retried (`delivery.batch`, `delivery.retry`).
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl BatchPolicy {
    /// The policy of `delivery:`.
    pub fn from_config(cfg: &DeliveryConfig) -> Self {
        BatchPolicy {
            max_records: cfg.batch.max_records,
            max_bytes: usize::try_from(cfg.batch.max_bytes.0).unwrap_or(usize::MAX),
            max_wait: cfg.batch.max_wait.0,
            retry_initial: cfg.retry.initial.0,
            retry_max: cfg.retry.max.0,
        }
    }
}

/// The writer of one lane.
pub struct Writer {
    lane: Arc<Lane>,
    sink: Box<dyn LogSink>,
    policy: BatchPolicy,
    rejected_path: PathBuf,
}

impl Writer {
    /// The writer that moves `lane`'s records into `sink`.
    pub fn new(
        lane: Arc<Lane>,
        sink: Box<dyn LogSink>,
        policy: BatchPolicy,
        rejected_path: PathBuf,
    ) -> Self {
        Writer {
            lane,
            sink,
            policy,
            rejected_path,
        }
    }

    /// Runs on the delivery thread until `closing` is set and the queue is empty.
    pub async fn run(self, mut closing: watch::Receiver<Option<Instant>>) {
        let mut batch = Vec::with_capacity(self.policy.max_records);
        loop {
            self.lane
                .buffer
                .take(&mut batch, self.policy.max_records, self.policy.max_bytes);
            if batch.is_empty() {
                if closing.borrow().is_some() {
                    break;
                }
                tokio::select! {
                    _ = self.lane.buffer.arrived() => {}
                    _ = closing.changed() => {}
                }
                continue;
            }
            // A batch that is not full waits out max_wait (unless shutting down) and takes what
            // arrived meanwhile. It is not woken per arrival: under load that would cost a
            // thread wake-up per request.
            if batch.len() < self.policy.max_records && closing.borrow().is_none() {
                tokio::select! {
                    _ = sleep_until(tokio::time::Instant::now() + self.policy.max_wait) => {}
                    _ = closing.changed() => {}
                }
                self.lane
                    .buffer
                    .take(&mut batch, self.policy.max_records, self.policy.max_bytes);
            }
            if self.deliver(&batch, &closing).await {
                self.lane.buffer.delivered(batch.len());
                batch.clear();
            } else {
                self.lane.buffer.give_up(&self.lane.name, batch.len());
                break;
            }
        }
        if let Err(e) = self.sink.close().await {
            error!("sink {}: close failed: {e}", self.lane.name);
        }
    }

    /// Writes `batch` until the sink takes it (`true`); at shutdown, gives up at the drain
    /// deadline (`false`).
    async fn deliver(&self, batch: &[Record], closing: &watch::Receiver<Option<Instant>>) -> bool {
        let mut backoff = self.policy.retry_initial;
        metrics::BATCH_RECORDS
            .with_label_values(&[&self.lane.name])
            .observe(batch.len() as f64);
        loop {
            match self
                .sink
                .write_batch(&Batch::new(batch, String::new()))
                .await
            {
                Ok(rejections) => {
                    self.lane.healthy.store(true, Ordering::Relaxed);
                    let delivered = batch.len() - rejections.len();
                    metrics::RECORDS
                        .with_label_values(&[&self.lane.name, "delivered"])
                        .inc_by(delivered as u64);
                    if !rejections.is_empty() {
                        self.write_rejected(batch, &rejections);
                    }
                    return true;
                }
                Err(e) => {
                    self.lane.healthy.store(false, Ordering::Relaxed);
                    metrics::SINK_ERRORS
                        .with_label_values(&[&self.lane.name])
                        .inc();
                    warn!(
                        "sink {}: batch of {} records failed, retrying in about {:?}: {e}",
                        self.lane.name,
                        batch.len(),
                        backoff
                    );
                    let mut wake = Instant::now() + jitter(backoff);
                    if let Some(deadline) = *closing.borrow() {
                        if Instant::now() >= deadline {
                            return false;
                        }
                        wake = wake.min(deadline);
                    }
                    tokio::time::sleep_until(wake.into()).await;
                    backoff = (backoff * 2).min(self.policy.retry_max);
                }
            }
        }
    }

    /// Appends records the sink refused for good to `rejected.jsonl`, with the reason.
    fn write_rejected(&self, batch: &[Record], rejections: &[Rejection]) {
        metrics::RECORDS
            .with_label_values(&[&self.lane.name, "rejected"])
            .inc_by(rejections.len() as u64);
        let mut out = Vec::new();
        for r in rejections {
            let Some(record) = batch.get(r.index) else {
                continue;
            };
            let line =
                serde_json::json!({"sink": self.lane.name, "reason": r.reason, "record": record});
            out.extend_from_slice(line.to_string().as_bytes());
            out.push(b'\n');
        }
        let result = self
            .rejected_path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.rejected_path)
            })
            .and_then(|mut f| f.write_all(&out));
        match result {
            Ok(()) => warn!(
                "sink {}: {} records rejected for good, written to {}",
                self.lane.name,
                rejections.len(),
                self.rejected_path.display()
            ),
            Err(e) => error!(
                "sink {}: {} records rejected for good and cannot be written to {}: {e}",
                self.lane.name,
                rejections.len(),
                self.rejected_path.display()
            ),
        }
    }
}

/// A random duration between half of `d` and `d`, so that many proxies do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}
