//! Delivery: from accepted records to sinks, at least once.
//!
//! [`Delivery`] owns one lane per configured sink. [`Delivery::accept`] is what the proxy awaits
//! before it answers a postback: once it returns `Ok`, the records are the lane's responsibility.
//! A lane is a buffer ([`disk::DiskLog`], the default, which survives a crash; or
//! [`memory::MemoryQueue`]) and a writer on the delivery thread that forms batches
//! (`max_records`, `max_bytes`, `max_wait`), hands them to the sink, retries a failing sink with
//! exponential backoff and jitter for as long as it takes, and only then releases the batch from
//! the buffer. Records the sink refuses for good go to `{dir}/rejected.jsonl`.
//!
//! The delivery thread is started by [`Delivery::start`] (from a Pingora background service, so it
//! runs after a `--daemon` fork) and stopped by [`Delivery::finish`] after the server has stopped
//! answering: it delivers what the sinks take before the deadline; with the disk buffer the rest
//! stays on disk for the next start.

pub mod disk;
mod lane;
pub mod memory;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use tokio::sync::watch;

use crate::config::{BufferKind, DeliveryConfig, Problem, WhenFull};
use crate::metrics;
use crate::postback::route::SinkId;
use crate::record::Record;
use crate::sink::LogSink;

use disk::DiskLog;
pub use lane::BatchPolicy;
use memory::MemoryQueue;

/// Why records were not accepted; the proxy answers 503 with `Retry-After`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the delivery buffer is full")]
    Full,
    #[error("the proxy is shutting down")]
    Closed,
    #[error("the delivery buffer cannot be written")]
    Failed,
}

/// Where a lane's records wait.
pub enum Buffer {
    Memory(MemoryQueue),
    Disk(Arc<DiskLog>),
}

impl Buffer {
    async fn push(&self, records: Vec<Record>) -> Result<(), DeliveryError> {
        match self {
            Buffer::Memory(q) => q.push(records),
            Buffer::Disk(d) => d.push(records).await,
        }
    }

    fn take(&self, batch: &mut Vec<Record>, max_records: usize, max_bytes: usize) -> usize {
        match self {
            Buffer::Memory(q) => q.take(batch, max_records, max_bytes),
            Buffer::Disk(d) => d.take(batch, max_records, max_bytes),
        }
    }

    async fn arrived(&self) {
        match self {
            Buffer::Memory(q) => q.arrived().await,
            Buffer::Disk(d) => d.arrived().await,
        }
    }

    /// The last batch taken (`n` records) is with the sink.
    fn delivered(&self, n: usize) {
        match self {
            Buffer::Memory(q) => q.done(n),
            Buffer::Disk(d) => d.ack(),
        }
    }

    /// The last batch taken could not be delivered before the shutdown deadline.
    fn give_up(&self, sink: &str, n: usize) {
        match self {
            Buffer::Memory(q) => {
                error!("sink {sink}: giving up at shutdown; {n} records were not delivered and are lost");
                metrics::RECORDS
                    .with_label_values(&[sink, "lost"])
                    .inc_by(n as u64);
                q.done(n);
            }
            Buffer::Disk(d) => {
                info!(
                    "sink {sink}: {n} records (and any after them) stay in the disk buffer for the next start ({} bytes)",
                    d.spool_bytes()
                );
            }
        }
    }

    fn close(&self) {
        match self {
            Buffer::Memory(q) => q.close(),
            Buffer::Disk(d) => d.close(),
        }
    }

    fn has_room(&self) -> bool {
        match self {
            Buffer::Memory(q) => q.has_room(),
            Buffer::Disk(d) => d.has_room(),
        }
    }

    fn oldest_age(&self) -> Option<Duration> {
        match self {
            Buffer::Memory(q) => q.oldest_age(),
            Buffer::Disk(d) => d.oldest_age(),
        }
    }
}

/// What the proxy side and the writer of one lane share.
pub struct Lane {
    pub name: String,
    pub buffer: Buffer,
    /// Cleared while the sink fails, set again when it takes a batch.
    pub healthy: AtomicBool,
}

/// Accepted records on their way to the sinks.
pub struct Delivery {
    lanes: Vec<Arc<Lane>>,
    writers: Mutex<Vec<lane::Writer>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `None` while running; at shutdown, the instant after which a failing sink is given up on.
    closing: watch::Sender<Option<Instant>>,
    started: AtomicBool,
    when_full: WhenFull,
}

impl Delivery {
    /// Checks `delivery:`; problems name the field.
    pub fn validate(cfg: &DeliveryConfig) -> Vec<Problem> {
        let mut problems = Vec::new();
        if cfg.queue_records == 0 {
            problems.push(Problem::new("delivery.queue_records", "must be at least 1"));
        }
        if cfg.max_bytes.0 < 4096 {
            problems.push(Problem::new("delivery.max_bytes", "must be at least 4KiB"));
        }
        if cfg.dir.as_os_str().is_empty() {
            problems.push(Problem::new("delivery.dir", "must not be empty"));
        }
        if cfg.batch.max_records == 0 {
            problems.push(Problem::new(
                "delivery.batch.max_records",
                "must be at least 1",
            ));
        }
        if cfg.batch.max_bytes.0 == 0 {
            problems.push(Problem::new(
                "delivery.batch.max_bytes",
                "must be more than 0",
            ));
        }
        if cfg.retry.initial.0.is_zero() || cfg.retry.initial > cfg.retry.max {
            problems.push(Problem::new(
                "delivery.retry.initial",
                "must be more than 0 and at most delivery.retry.max",
            ));
        }
        problems
    }

    /// One lane per `(name, sink)`, in [`SinkId`] order; opens the disk buffers (recovering what a
    /// previous run left). Nothing is delivered until [`Delivery::start`].
    pub fn open(
        cfg: &DeliveryConfig,
        sinks: Vec<(String, Box<dyn LogSink>)>,
    ) -> std::io::Result<Delivery> {
        let (closing, _) = watch::channel(None);
        let policy = BatchPolicy::from_config(cfg);
        let rejected_path = cfg.dir.join("rejected.jsonl");
        let mut lanes = Vec::new();
        let mut writers = Vec::new();
        for (name, sink) in sinks {
            let buffer = match cfg.buffer {
                BufferKind::Memory => Buffer::Memory(MemoryQueue::new(&name, cfg.queue_records)),
                BufferKind::Disk => Buffer::Disk(Arc::new(DiskLog::open(
                    &name,
                    &cfg.dir,
                    cfg.max_bytes.0,
                    cfg.fsync,
                )?)),
            };
            let lane = Arc::new(Lane {
                name,
                buffer,
                healthy: AtomicBool::new(true),
            });
            writers.push(lane::Writer::new(
                lane.clone(),
                sink,
                policy.clone(),
                rejected_path.clone(),
            ));
            lanes.push(lane);
        }
        Ok(Delivery {
            lanes,
            writers: Mutex::new(writers),
            thread: Mutex::new(None),
            closing,
            started: AtomicBool::new(false),
            when_full: cfg.when_full,
        })
    }

    /// Runs for every accepted postback, before the answer: takes `records` for the sink `sink`.
    /// `Ok` means the records will reach the sink (or were counted as dropped under
    /// `when_full: drop`); `Err` means none were taken.
    pub async fn accept(&self, sink: SinkId, records: Vec<Record>) -> Result<(), DeliveryError> {
        if records.is_empty() {
            return Ok(());
        }
        let Some(lane) = self.lanes.get(sink) else {
            return Err(DeliveryError::Closed);
        };
        let n = records.len() as u64;
        match lane.buffer.push(records).await {
            Err(DeliveryError::Full) if self.when_full == WhenFull::Drop => {
                metrics::RECORDS
                    .with_label_values(&[&lane.name, "dropped"])
                    .inc_by(n);
                Ok(())
            }
            result => result,
        }
    }

    /// `true` while every sink takes records and every buffer has room (`/readyz`).
    pub fn ready(&self) -> bool {
        self.lanes
            .iter()
            .all(|l| l.healthy.load(Ordering::Relaxed) && l.buffer.has_room())
    }

    /// Brings the gauges that are read rather than counted up to date; runs before each scrape.
    pub fn update_gauges(&self) {
        for lane in &self.lanes {
            let age = lane.buffer.oldest_age().map_or(0.0, |d| d.as_secs_f64());
            metrics::OLDEST_AGE
                .with_label_values(&[&lane.name])
                .set(age);
        }
    }

    /// Starts the delivery thread (and the disk writers). Called once, after any daemon fork;
    /// later calls do nothing.
    pub fn start(&self) -> std::io::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for lane in &self.lanes {
            if let Buffer::Disk(d) = &lane.buffer {
                d.start_threads()?;
            }
        }
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        let closing = self.closing.subscribe();
        let handle = std::thread::Builder::new()
            .name("delivery".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!("cannot start the delivery runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let tasks: Vec<_> = writers
                        .into_iter()
                        .map(|w| tokio::spawn(w.run(closing.clone())))
                        .collect();
                    for task in tasks {
                        let _ = task.await;
                    }
                });
            })?;
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Runs once at shutdown, after the server stopped answering: refuses new records, writes
    /// what is pending to the buffers, delivers what the sinks take before `deadline` passes,
    /// closes the sinks and waits for the delivery thread.
    pub fn finish(&self, deadline: Duration) {
        if let Err(e) = self.start() {
            error!("cannot start the delivery thread to drain the buffers: {e}");
            return;
        }
        for lane in &self.lanes {
            lane.buffer.close();
        }
        let _ = self.closing.send(Some(Instant::now() + deadline));
        if let Some(handle) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        info!("delivery finished");
    }
}
