//! One sink's lane: batches from its buffer into the sink, retried until delivered, on a thread
//! and runtime of its own so that a sink that hangs delays no other sink.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};
use tokio::sync::watch;
use tokio::time::sleep_until;

use super::receiver::{Receiver, Taken};
use super::status::SinkState;
use super::DeliveryConfig;
use crate::metrics;
use crate::record::Record;
use crate::sink::{Batch, LogSink, Rejection};

/// How often the lane asks the sink about its peer ([`LogSink::peer_down`]).
const PEER_POLL: Duration = Duration::from_secs(1);

/// How long the lane gives up its core after delivering a full batch (a backlog). A lane with a
/// backlog is CPU-bound, and on a kernel without preemption (`PREEMPT_NONE`, the usual server
/// build) it would keep a core it shares with the proxy's answers for a whole scheduler tick,
/// several ms, between them; this pause lets the answers waiting on that core run. At 1,000
/// records a batch it caps nothing that matters.
const BACKLOG_PACE: Duration = Duration::from_micros(50);

/// How long a sink's close may take at shutdown.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

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

/// The lane of one sink.
pub struct Lane {
    pub name: String,
    pub receiver: Receiver,
    pub sink: Box<dyn LogSink>,
    pub policy: BatchPolicy,
    pub rejected_path: PathBuf,
    pub state: Arc<SinkState>,
}

impl Lane {
    /// Runs the lane on a thread of its own, with its own current-thread runtime, until `closing`
    /// is set and the buffer is drained (or the drain deadline passed).
    pub fn spawn(
        self,
        closing: watch::Receiver<Option<Instant>>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("lane-{}", self.name))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!("sink {}: cannot start the delivery runtime: {e}", self.name);
                        return;
                    }
                };
                runtime.block_on(self.run(closing));
            })
    }

    async fn run(self, closing: watch::Receiver<Option<Instant>>) {
        tokio::select! {
            _ = self.batches(closing) => {}
            _ = self.watch_peer() => {}
        }
        match tokio::time::timeout(CLOSE_LIMIT, self.sink.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("sink {}: close failed: {e}", self.name),
            Err(_) => error!(
                "sink {}: close did not finish within {CLOSE_LIMIT:?}",
                self.name
            ),
        }
    }

    /// Asks the sink about its peer about once a second, also while a batch waits or retries.
    async fn watch_peer(&self) {
        let mut tick = tokio::time::interval(PEER_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.state.peer(self.sink.peer_down());
        }
    }

    /// Forms batches and delivers them until `closing` is set and the buffer is empty.
    async fn batches(&self, mut closing: watch::Receiver<Option<Instant>>) {
        let (max_records, max_bytes) = (self.policy.max_records, self.policy.max_bytes);
        let mut batch = Taken::new(&self.name);
        loop {
            batch = self.receiver.take(batch, max_records, max_bytes).await;
            if batch.is_empty() {
                if closing.borrow().is_some() {
                    break;
                }
                tokio::select! {
                    _ = self.receiver.arrived() => {}
                    _ = closing.changed() => {}
                }
                continue;
            }
            // A batch that is not full waits out max_wait (unless shutting down) and takes what
            // arrived meanwhile. It is not woken per arrival: under load that would cost a
            // thread wake-up per request.
            let backlog = batch.len() >= max_records;
            if !backlog && closing.borrow().is_none() {
                tokio::select! {
                    _ = sleep_until(tokio::time::Instant::now() + self.policy.max_wait) => {}
                    _ = closing.changed() => {}
                }
                batch = self.receiver.take(batch, max_records, max_bytes).await;
            }
            let id = self
                .receiver
                .seal(&self.name, self.sink.needs_stable_batch_ids())
                .await;
            if self.deliver(&batch.batch(id), &closing).await {
                self.receiver.delivered(batch.len()).await;
                batch.clear();
                if backlog {
                    // A blocking sleep on purpose: the point is to leave the core, and the
                    // lane's runtime has nothing else to run meanwhile.
                    std::thread::sleep(BACKLOG_PACE);
                }
            } else {
                self.receiver.give_up(&self.name, batch.len());
                break;
            }
        }
    }

    /// Writes `batch` until the sink takes it (`true`); at shutdown, gives up at the drain
    /// deadline (`false`).
    async fn deliver(&self, batch: &Batch<'_>, closing: &watch::Receiver<Option<Instant>>) -> bool {
        let mut backoff = self.policy.retry_initial;
        metrics::BATCH_RECORDS
            .with_label_values(&[&self.name])
            .observe(batch.len() as f64);
        loop {
            let result = tokio::select! {
                result = self.sink.write_batch(batch) => result,
                // A sink that never answers is given up on at the drain deadline too.
                _ = drain_deadline(closing.clone()) => return false,
            };
            match result {
                Ok(rejections) => {
                    let delivered = batch.len() - rejections.len();
                    self.state.batch_delivered(delivered);
                    metrics::RECORDS
                        .with_label_values(&[&self.name, "delivered"])
                        .inc_by(delivered as u64);
                    if !rejections.is_empty() {
                        self.write_rejected(batch, &rejections).await;
                    }
                    return true;
                }
                Err(e) => {
                    self.state.batch_failed(&e.to_string());
                    metrics::SINK_ERRORS.with_label_values(&[&self.name]).inc();
                    warn!(
                        "sink {}: batch of {} records failed, retrying in about {:?}: {e}",
                        self.name,
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

    /// Appends records the sink refused for good to `rejected.jsonl`, with the reason (on the
    /// blocking pool: a slow disk does not stall the lane's timers).
    async fn write_rejected(&self, batch: &[Record], rejections: &[Rejection]) {
        metrics::RECORDS
            .with_label_values(&[&self.name, "rejected"])
            .inc_by(rejections.len() as u64);
        let mut out = Vec::new();
        for r in rejections {
            let Some(record) = batch.get(r.index) else {
                continue;
            };
            let line = serde_json::json!({"sink": self.name, "reason": r.reason, "record": record});
            out.extend_from_slice(line.to_string().as_bytes());
            out.push(b'\n');
        }
        let path = self.rejected_path.clone();
        let result = tokio::task::spawn_blocking(move || append(&path, &out))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match result {
            Ok(()) => warn!(
                "sink {}: {} records rejected for good, written to {}",
                self.name,
                rejections.len(),
                self.rejected_path.display()
            ),
            Err(e) => error!(
                "sink {}: {} records rejected for good and cannot be written to {}: {e}",
                self.name,
                rejections.len(),
                self.rejected_path.display()
            ),
        }
    }
}

fn append(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(bytes)
}

/// Returns once the shutdown's drain deadline has passed (never while running).
async fn drain_deadline(mut closing: watch::Receiver<Option<Instant>>) {
    let deadline = loop {
        if let Some(deadline) = *closing.borrow_and_update() {
            break deadline;
        }
        if closing.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::time::sleep_until(deadline.into()).await;
}

/// A random duration between half of `d` and `d`, so that many proxies do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}
