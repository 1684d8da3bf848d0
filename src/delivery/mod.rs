//! Delivery: from accepted records to sinks, at least once.
//!
//! [`Delivery`] owns one lane per configured sink. [`Delivery::accept`] is what the proxy awaits
//! before it answers a postback: once it returns `Ok`, the records are the lane's responsibility.
//! Each lane's writer runs on the delivery thread, forms batches (`max_records`, `max_bytes`,
//! `max_wait`), hands them to the sink, and retries a failing sink with exponential backoff and
//! jitter for as long as it takes. Records the sink refuses for good go to `{dir}/rejected.jsonl`.
//!
//! The delivery thread is started by [`Delivery::start`] (from a Pingora background service, so it
//! runs after a `--daemon` fork) and stopped by [`Delivery::finish`] after the server has stopped
//! accepting: it drains every queue into its sink before it returns.

mod lane;
mod memory;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use tokio::sync::watch;

use crate::config::{DeliveryConfig, Problem};
use crate::record::Record;
use crate::route::SinkId;
use crate::sink::LogSink;

pub use lane::BatchPolicy;
use memory::MemoryQueue;

/// Why records were not accepted; the proxy answers 503 with `Retry-After`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the delivery buffer is full")]
    Full,
    #[error("the proxy is shutting down")]
    Closed,
}

/// Accepted records on their way to the sinks.
pub struct Delivery {
    queues: Vec<Arc<MemoryQueue>>,
    writers: Mutex<Vec<lane::Writer>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `None` while running; at shutdown, the instant after which a failing sink is given up on.
    closing: watch::Sender<Option<Instant>>,
    started: AtomicBool,
}

impl Delivery {
    /// Checks `delivery:`; problems name the field.
    pub fn validate(cfg: &DeliveryConfig) -> Vec<Problem> {
        let mut problems = Vec::new();
        if cfg.queue_records == 0 {
            problems.push(Problem::new("delivery.queue_records", "must be at least 1"));
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

    /// One lane per `(name, sink)`, in [`SinkId`] order. Nothing runs until [`Delivery::start`].
    pub fn new(cfg: &DeliveryConfig, sinks: Vec<(String, Box<dyn LogSink>)>) -> Delivery {
        let (closing, _) = watch::channel(None);
        let policy = BatchPolicy::from_config(cfg);
        let rejected_path: PathBuf = cfg.dir.join("rejected.jsonl");
        let mut queues = Vec::new();
        let mut writers = Vec::new();
        for (name, sink) in sinks {
            let queue = Arc::new(MemoryQueue::new(&name, cfg.queue_records, cfg.when_full));
            writers.push(lane::Writer::new(
                name,
                queue.clone(),
                sink,
                policy.clone(),
                rejected_path.clone(),
            ));
            queues.push(queue);
        }
        Delivery {
            queues,
            writers: Mutex::new(writers),
            thread: Mutex::new(None),
            closing,
            started: AtomicBool::new(false),
        }
    }

    /// Runs for every accepted postback, before the answer: takes `records` for the sink `sink`.
    /// `Ok` means the records will reach the sink (or were counted as dropped under
    /// `when_full: drop`); `Err` means none were taken.
    pub async fn accept(&self, sink: SinkId, records: Vec<Record>) -> Result<(), DeliveryError> {
        if records.is_empty() {
            return Ok(());
        }
        match self.queues.get(sink) {
            Some(queue) => queue.push(records),
            None => Err(DeliveryError::Closed),
        }
    }

    /// `true` while every sink takes records and every queue has room (`/readyz`).
    pub fn ready(&self) -> bool {
        self.queues.iter().all(|q| q.ready())
    }

    /// Starts the delivery thread. Called once, after any daemon fork; later calls do nothing.
    pub fn start(&self) -> std::io::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
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

    /// Runs once at shutdown, after the server stopped answering: refuses new records, delivers
    /// everything queued (retrying a failing sink for up to `deadline`), closes the sinks and waits
    /// for the delivery thread. Starts the thread first if it never ran.
    pub fn finish(&self, deadline: Duration) {
        for q in &self.queues {
            q.close();
        }
        if let Err(e) = self.start() {
            error!("cannot start the delivery thread to drain the queues: {e}");
            return;
        }
        let _ = self.closing.send(Some(Instant::now() + deadline));
        if let Some(handle) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        info!("delivery finished");
    }
}
