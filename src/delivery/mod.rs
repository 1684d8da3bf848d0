//! Delivery: from accepted records to sinks, at least once.
//!
//! [`Delivery`] owns one lane per configured sink. [`Delivery::accept`] is what the proxy awaits
//! before it answers a postback: once it returns `Ok`, the records are in the buffer of every
//! sink the route names, and each lane is responsible for its copy. A sink's buffer is
//! [`disk::DiskLog`] (the default, which survives a crash) or [`memory::MemoryQueue`]; requests
//! reach it through its [`Sender`], the lane through its [`Receiver`]. A sink that is itself a
//! file on this machine ([`crate::sink::LogSink::local_log`]: the `file` sink) is, with the disk
//! buffer, its own buffer: requests append to it through [`direct::DirectLog`], and it has no lane.
//!
//! Each lane (`lane.rs`) runs on a thread and runtime of its own: it forms batches
//! (`max_records`, `max_bytes`, `max_wait`), hands them to the sink with a stable id, retries a
//! failing sink with exponential backoff and jitter for as long as it takes, and only then
//! releases the batch from the buffer. Records the sink refuses for good go to
//! `{dir}/rejected.jsonl`. Its [`SinkStatus`] (`/sinks`, `sink_up`) says whether the sink is up.
//!
//! [`Delivery::ready`] is `/readyz`: every buffer has room and can be written, and no shutdown
//! has begun. A failing sink does not make it false: the buffers are there to absorb outages.
//!
//! The lanes are started by [`Delivery::start`] (from a Pingora background service, so they run
//! after a `--daemon` fork) and stopped by [`Delivery::finish`] after the server has stopped
//! answering: they deliver what the sinks take before the deadline; with the disk buffer the rest
//! stays on disk for the next start.

pub mod config;
pub mod direct;
pub mod disk;
mod group;
mod lane;
pub mod memory;
pub mod receiver;
pub mod sender;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use tokio::sync::watch;

use crate::config::Problem;
use crate::metrics;
use crate::record::RecordRef;
use crate::sink::{LocalLog, LogSink};
use crate::sync::lock;

pub use config::{BatchConfig, BufferKind, DeliveryConfig, FsyncPolicy, RetryConfig, WhenFull};
use direct::DirectLog;
use disk::DiskLog;
pub use lane::BatchPolicy;
use memory::MemoryQueue;
pub use receiver::Receiver;
use sender::Inbox;
pub use sender::Sender;
pub use status::SinkStatus;

/// Index of a sink in [`Delivery`], resolved from the sink's name at start-up (the order of the
/// sinks given to [`Delivery::open`]).
pub type SinkId = usize;

/// The sinks one request's records go to: a single [`SinkId`], or several (`&[SinkId]`,
/// `&Vec<SinkId>`, `[SinkId; N]`).
pub trait Sinks {
    /// The ids, in order.
    fn ids(&self) -> &[SinkId];
}

impl Sinks for SinkId {
    fn ids(&self) -> &[SinkId] {
        std::slice::from_ref(self)
    }
}

impl Sinks for [SinkId] {
    fn ids(&self) -> &[SinkId] {
        self
    }
}

impl<const N: usize> Sinks for [SinkId; N] {
    fn ids(&self) -> &[SinkId] {
        self
    }
}

impl Sinks for Vec<SinkId> {
    fn ids(&self) -> &[SinkId] {
        self
    }
}

impl<T: Sinks + ?Sized> Sinks for &T {
    fn ids(&self) -> &[SinkId] {
        (**self).ids()
    }
}

/// The largest record (its JSON) the disk buffer takes: a longer one is refused with
/// [`DeliveryError::TooLarge`] before the client is answered.
pub const MAX_RECORD_BYTES: usize = disk::MAX_FRAME_PAYLOAD;

/// The largest `postback.max_body_bytes` whose records always fit [`MAX_RECORD_BYTES`]: a record's
/// JSON can be up to six times the body it came from (every byte escaped as `\u00XX`).
pub const MAX_BODY_BYTES: u64 = (MAX_RECORD_BYTES / 6) as u64;

/// Why records were not accepted: the proxy answers 503 with `Retry-After`, or 413 for
/// [`DeliveryError::TooLarge`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the delivery buffer is full")]
    Full,
    #[error("the proxy is shutting down")]
    Closed,
    #[error("the delivery buffer cannot be written")]
    Failed,
    #[error("the record is larger than the delivery buffer takes")]
    TooLarge,
}

/// A sink's buffer, shared by its sender and receiver sides.
#[derive(Clone)]
enum Buffer {
    Memory(Arc<MemoryQueue>),
    Disk(Arc<DiskLog>),
}

impl Buffer {
    fn records_waiting(&self) -> u64 {
        match self {
            Buffer::Memory(q) => q.records_waiting(),
            Buffer::Disk(d) => d.records_waiting(),
        }
    }

    fn bytes_waiting(&self) -> u64 {
        match self {
            Buffer::Memory(q) => q.bytes_waiting(),
            Buffer::Disk(d) => d.spool_bytes(),
        }
    }

    fn oldest_age(&self) -> Option<Duration> {
        match self {
            Buffer::Memory(q) => q.oldest_age(),
            Buffer::Disk(d) => d.oldest_age(),
        }
    }
}

/// What [`Delivery`] keeps of each sink: the sender side, the state, and the buffer's figures
/// (`None` for a sink that is its own buffer: nothing waits).
struct LaneHandle {
    name: String,
    sender: Sender,
    buffer: Option<Buffer>,
    state: Arc<status::SinkState>,
}

/// Accepted records on their way to the sinks.
pub struct Delivery {
    lanes: Vec<LaneHandle>,
    /// The lanes' delivering halves, until [`Delivery::start`] moves them to their threads.
    pending: Mutex<Vec<lane::Lane>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// `None` while running; at shutdown, the instant after which a failing sink is given up on.
    closing: watch::Sender<Option<Instant>>,
    started: AtomicBool,
    shutting_down: AtomicBool,
    when_full: WhenFull,
}

impl Delivery {
    /// Checks `delivery:`; problems name the field.
    pub fn validate(cfg: &DeliveryConfig) -> Vec<Problem> {
        cfg.problems()
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
        let mut pending = Vec::new();
        for (name, sink) in sinks {
            metrics::register_sink(&name);
            let state = Arc::new(status::SinkState::new(&name));
            if let Some(log) = direct_log(cfg, &name, sink.as_ref())? {
                let direct = Arc::new(DirectLog::new(&name, log, cfg.fsync, state.clone()));
                lanes.push(LaneHandle {
                    name,
                    sender: Sender(Inbox::Direct(direct)),
                    buffer: None,
                    state,
                });
                continue;
            }
            let (buffer, inbox) = match cfg.buffer {
                BufferKind::Memory => {
                    let queue = Arc::new(MemoryQueue::new(&name, cfg.queue_records));
                    (Buffer::Memory(queue.clone()), Inbox::Memory(queue))
                }
                BufferKind::Disk => {
                    let log = Arc::new(DiskLog::open(&name, &cfg.dir, cfg.max_bytes.0, cfg.fsync)?);
                    (Buffer::Disk(log.clone()), Inbox::Disk(log))
                }
            };
            pending.push(lane::Lane {
                name: name.clone(),
                receiver: Receiver(buffer.clone()),
                sink,
                policy: policy.clone(),
                rejected_path: rejected_path.clone(),
                state: state.clone(),
            });
            lanes.push(LaneHandle {
                name,
                sender: Sender(inbox),
                buffer: Some(buffer),
                state,
            });
        }
        Ok(Delivery {
            lanes,
            pending: Mutex::new(pending),
            threads: Mutex::new(Vec::new()),
            closing,
            started: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            when_full: cfg.when_full,
        })
    }

    /// Runs for every accepted postback, before the answer: gives `records` to every sink in
    /// `sinks` (a route may name several; each gets every record through its own buffer).
    ///
    /// `Ok` means every named buffer took the records (or, under `when_full: drop`, a full one
    /// counted them as dropped). Under `when_full: reject`, every buffer must have room before
    /// any takes them; should a later buffer still fail (a full disk, or a race for the last
    /// room) after an earlier one took the records, the answer is an error (503) and the earlier
    /// copy stays: a client's retry makes a duplicate there, never a loss.
    pub async fn accept(
        &self,
        sinks: impl Sinks,
        records: &[RecordRef<'_>],
    ) -> Result<(), DeliveryError> {
        let sinks = sinks.ids();
        if records.is_empty() || sinks.is_empty() {
            return Ok(());
        }
        let mut lanes = Vec::with_capacity(sinks.len());
        for &id in sinks {
            lanes.push(self.lanes.get(id).ok_or(DeliveryError::Closed)?);
        }
        if records.iter().any(|r| r.approx_len() > MAX_RECORD_BYTES) {
            return Err(DeliveryError::TooLarge);
        }
        if self.when_full == WhenFull::Reject && lanes.iter().any(|l| !l.sender.has_room()) {
            return Err(DeliveryError::Full);
        }
        let n = records.len() as u64;
        for lane in lanes {
            match lane.sender.push(records).await {
                Ok(()) => {}
                Err(DeliveryError::Full) if self.when_full == WhenFull::Drop => {
                    metrics::RECORDS
                        .with_label_values(&[&lane.name, "dropped"])
                        .inc_by(n);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `/readyz`: `true` while this instance can accept postbacks: no shutdown has begun, every
    /// buffer can be written (no full disk), and under `when_full: reject` every buffer has
    /// room. A failing sink alone never makes it `false`.
    pub fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst)
            && self.lanes.iter().all(|l| {
                l.sender.writable() && (self.when_full == WhenFull::Drop || l.sender.has_room())
            })
    }

    /// The shutdown has begun (SIGTERM): from now on [`Delivery::ready`] is `false`. Records are
    /// still accepted until [`Delivery::finish`].
    pub fn shutting_down(&self) {
        if !self.shutting_down.swap(true, Ordering::SeqCst) {
            info!("shutting down: no longer ready");
        }
    }

    /// `/sinks`: one entry per sink, in [`SinkId`] order.
    pub fn sinks_status(&self) -> Vec<SinkStatus> {
        self.lanes
            .iter()
            .map(|l| {
                let mut s = l.state.status();
                if let Some(buffer) = &l.buffer {
                    s.records_waiting = buffer.records_waiting();
                    s.bytes_waiting = buffer.bytes_waiting();
                    s.oldest_age_seconds = buffer.oldest_age().map_or(0.0, |d| d.as_secs_f64());
                }
                s
            })
            .collect()
    }

    /// Brings the gauges that are read rather than counted up to date; runs before each scrape.
    pub fn update_gauges(&self) {
        for lane in &self.lanes {
            let age = lane
                .buffer
                .as_ref()
                .and_then(Buffer::oldest_age)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::OLDEST_AGE
                .with_label_values(&[&lane.name])
                .set(age);
        }
    }

    /// Starts one thread per lane (and the disk buffers' threads). Called once, after any daemon
    /// fork; later calls do nothing.
    pub fn start(&self) -> std::io::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for lane in &self.lanes {
            match &lane.sender.0 {
                Inbox::Disk(d) => d.start_threads()?,
                Inbox::Direct(d) => d.start_threads()?,
                Inbox::Memory(_) => {}
            }
        }
        let pending = std::mem::take(&mut *lock(&self.pending));
        let mut threads = lock(&self.threads);
        for lane in pending {
            threads.push(lane.spawn(self.closing.subscribe())?);
        }
        Ok(())
    }

    /// Runs once at shutdown, after the server stopped answering: refuses new records, writes
    /// what is pending to the buffers, delivers what the sinks take before `deadline` passes,
    /// closes the sinks and waits for the lanes.
    pub fn finish(&self, deadline: Duration) {
        self.shutting_down();
        if let Err(e) = self.start() {
            error!("cannot start the delivery lanes to drain the buffers: {e}");
            return;
        }
        for lane in &self.lanes {
            lane.sender.close();
        }
        let _ = self.closing.send(Some(Instant::now() + deadline));
        let threads = std::mem::take(&mut *lock(&self.threads));
        for handle in threads {
            let _ = handle.join();
        }
        info!("delivery finished");
    }
}

/// The file a sink's records can be appended to directly (see [`direct`]): with `buffer: disk`,
/// for a sink that is its own buffer ([`LogSink::local_log`]), unless its buffer still holds
/// records from an earlier run or another process; those go through the buffer this run, and the
/// next start appends directly.
fn direct_log(
    cfg: &DeliveryConfig,
    name: &str,
    sink: &dyn LogSink,
) -> std::io::Result<Option<Arc<dyn LocalLog>>> {
    if cfg.buffer != BufferKind::Disk {
        return Ok(None);
    }
    let Some(log) = sink.local_log() else {
        return Ok(None);
    };
    if disk::holds_records(&cfg.dir, name)? {
        info!(
            "sink {name}: its disk buffer in {} still holds records (from an earlier run, or \
             another process); they and this run's records go through it, and the next start \
             appends to the sink's file directly",
            cfg.dir.join(name).display()
        );
        return Ok(None);
    }
    Ok(Some(log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Batch, Rejection, SinkError};
    use async_trait::async_trait;

    /// Keeps what it gets, with the batch ids.
    #[derive(Clone, Default)]
    struct Keep(Arc<Mutex<Vec<(String, i64)>>>);

    #[async_trait]
    impl LogSink for Keep {
        async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
            let mut kept = lock(&self.0);
            kept.extend(batch.iter().map(|r| (batch.id().to_owned(), r.body.time)));
            Ok(Vec::new())
        }
    }

    /// Never answers.
    struct Hang;

    #[async_trait]
    impl LogSink for Hang {
        async fn write_batch(&self, _batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
            std::future::pending().await
        }
        fn peer_down(&self) -> Option<String> {
            Some("no answer".into())
        }
    }

    fn record(i: i64) -> RecordRef<'static> {
        RecordRef::new("web", "t", i, Vec::new())
    }

    fn cfg(buffer: BufferKind, dir: &std::path::Path) -> DeliveryConfig {
        let mut cfg = DeliveryConfig {
            buffer,
            dir: dir.to_path_buf(),
            queue_records: 3,
            ..DeliveryConfig::default()
        };
        cfg.batch.max_wait = crate::units::HumanDuration::millis(5);
        cfg
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn fan_out_reaches_every_sink_and_a_hung_sink_delays_no_other() {
        for buffer in [BufferKind::Memory, BufferKind::Disk] {
            let dir = tempfile::tempdir().unwrap();
            let keep = Keep::default();
            let sinks: Vec<(String, Box<dyn LogSink>)> = vec![
                ("hang".into(), Box::new(Hang)),
                ("keep".into(), Box::new(keep.clone())),
            ];
            let delivery = Delivery::open(&cfg(buffer, dir.path()), sinks).unwrap();
            delivery.start().unwrap();
            for i in 0..3 {
                delivery.accept([0, 1], &[record(i)]).await.unwrap();
            }
            wait_for("the kept sink has every record", || {
                lock(&keep.0).len() == 3
            });
            let ids: Vec<i64> = lock(&keep.0).iter().map(|(_, t)| *t).collect();
            assert_eq!(ids, vec![0, 1, 2]);
            assert!(lock(&keep.0).iter().all(|(id, _)| !id.is_empty()));
            wait_for("the hung sink is down", || {
                delivery.sinks_status()[0].state == "down"
            });
            let status = delivery.sinks_status();
            assert_eq!(status[0].name, "hang");
            assert_eq!(status[0].last_error.as_deref(), Some("no answer"));
            assert_eq!(status[0].records_waiting, 3);
            assert_eq!((status[1].state, status[1].delivered), ("up", 3));
            assert!(
                delivery.ready(),
                "a sink that hangs does not make it unready"
            );
            delivery.shutting_down();
            assert!(!delivery.ready());
            delivery.finish(Duration::from_millis(100));
        }
    }

    #[tokio::test]
    async fn a_full_buffer_refuses_all_sinks_and_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let sinks: Vec<(String, Box<dyn LogSink>)> = vec![
            ("a".into(), Box::new(Keep::default())),
            ("b".into(), Box::new(Keep::default())),
        ];
        let delivery = Delivery::open(&cfg(BufferKind::Memory, dir.path()), sinks).unwrap();
        // Not started: nothing is delivered, the queues (3 records each) fill up.
        delivery.accept(1, &[record(0), record(1)]).await.unwrap();
        delivery.accept([0, 1], &[record(2)]).await.unwrap();
        assert!(!delivery.ready());
        assert_eq!(
            delivery.accept([0, 1], &[record(3)]).await,
            Err(DeliveryError::Full)
        );
        let status = delivery.sinks_status();
        assert_eq!(
            (status[0].records_waiting, status[1].records_waiting),
            (1, 3),
            "no copy taken by the sink that still had room"
        );
        let mut big = record(4);
        big.insert("x".into(), "y".repeat(MAX_RECORD_BYTES).into());
        assert_eq!(
            delivery.accept(0, &[big]).await,
            Err(DeliveryError::TooLarge)
        );
        delivery.finish(Duration::from_millis(100));
    }
}
