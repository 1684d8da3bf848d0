//! `buffer: disk`: a segmented append-only log per sink, so a crash loses nothing accepted.
//!
//! Layout, under `{delivery.dir}/{sink}/`: segments `00000000000000000001.log`, ..., the
//! `checkpoint`, `intent` and `id` files ([`checkpoint`]) and a `lock` file that says which
//! process owns (reads and deletes) the buffer ([`takeover`]). Each record is one [`frame`].
//!
//! Requests append through [`writer`] (group commit: the first request of a group writes the
//! whole group with one `write(2)`; fsync on every group or on an interval, by a small fsync
//! thread). Each start opens a new segment, so appends never go to an old one. The sink's lane
//! reads through [`reader`], only ever up to the committed end, and the checkpoint moves only
//! after the sink confirmed a batch. Damaged bytes (a torn tail, a flipped bit) are skipped up to
//! the next valid frame and counted.

pub mod checkpoint;
pub mod frame;
pub mod reader;
pub mod takeover;
pub mod writer;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info, warn};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

use super::FsyncPolicy;
use crate::metrics;
use crate::sync::{lock, sub_saturating};

pub use frame::{decode_frame, encode_frame, Frame, HEADER, MAX_FRAME_PAYLOAD};
use reader::ReadState;
use writer::{Group, LiveSegment, WriteErrors, WriteState};

/// A position in the log: segment number and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// The on-disk buffer of one sink.
pub struct DiskLog {
    sink: String,
    /// `postback_records_total{sink, result="accepted"}` and `delivery_queue_records{sink}`,
    /// resolved once.
    accepted: IntCounter,
    queued: IntGauge,
    dir: PathBuf,
    /// Part of every batch id: see [`checkpoint`].
    id: String,
    max_bytes: u64,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    write: Mutex<WriteState>,
    live: Mutex<LiveSegment>,
    /// Wakes the fsync thread early at shutdown.
    sync_wake: Condvar,
    read: Mutex<ReadState>,
    arrived: Notify,
    /// Bytes appended and not yet delivered, plus those waiting in the pending group.
    spool_bytes: AtomicU64,
    /// Records appended and not yet delivered (those from before a restart are counted in the
    /// background after the start, so the number is low for a moment).
    records: AtomicU64,
    /// The size of the last append (or refused append): what [`DiskLog::has_room`] makes room for.
    last_push: AtomicU64,
    /// The last append failed (a full disk): not ready until one succeeds.
    errors: Mutex<WriteErrors>,
    failing: AtomicBool,
    /// This process holds the buffer's lock: it reads, acknowledges and deletes. Another process
    /// (the old one during an upgrade) may append to its own segments meanwhile.
    owner: AtomicBool,
    lock_file: File,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
    /// The thread counting the records a previous run left; joined at close, so that the last
    /// handle's drop releases the buffer's lock at once.
    count_thread: Mutex<Option<JoinHandle<()>>>,
}

impl DiskLog {
    /// Opens (or creates) the log of sink `sink` under `dir`, recovers the checkpoint, and starts
    /// a new segment for appends. Runs once at start-up; no thread starts before
    /// [`DiskLog::start_threads`] (after any daemon fork).
    pub fn open(
        sink: &str,
        dir: &Path,
        max_bytes: u64,
        fsync: FsyncPolicy,
    ) -> std::io::Result<DiskLog> {
        let segment_bytes = (max_bytes / 8).clamp(1 << 20, 64 << 20);
        Self::open_with_segments(sink, dir, max_bytes, fsync, segment_bytes)
    }

    fn open_with_segments(
        sink: &str,
        dir: &Path,
        max_bytes: u64,
        fsync: FsyncPolicy,
        segment_bytes: u64,
    ) -> std::io::Result<DiskLog> {
        let dir = dir.join(sink);
        std::fs::create_dir_all(&dir)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        let owner = match lock_file.try_lock() {
            Ok(()) => true,
            Err(TryLockError::WouldBlock) => false,
            Err(TryLockError::Error(e)) => return Err(e),
        };
        let id = checkpoint::log_id(&dir)?;
        let recovered = if owner {
            checkpoint::recover(&dir)?
        } else {
            warn!(
                "sink {sink}: the buffer in {} is in use by another process (an upgrade?); \
                 appending to a new segment and delivering once that process exits",
                dir.display()
            );
            checkpoint::Recovered {
                start: Position {
                    segment: 0,
                    offset: 0,
                },
                spool: 0,
                in_flight: None,
            }
        };
        let start = recovered.start;
        let live = create_segment(&dir, (max_segment(&dir)? + 1).max(start.segment))?;
        if recovered.spool > 0 {
            info!(
                "sink {sink}: {} bytes from before the restart are waiting in {}",
                recovered.spool,
                dir.display()
            );
        }
        metrics::SPOOL_BYTES
            .with_label_values(&[sink])
            .set(recovered.spool as i64);
        let live_file = OpenOptions::new()
            .append(true)
            .open(segment_path(&dir, live))?;
        let end = Position {
            segment: live,
            offset: 0,
        };
        Ok(DiskLog {
            sink: sink.to_owned(),
            accepted: metrics::RECORDS.with_label_values(&[sink, "accepted"]),
            queued: metrics::QUEUE_RECORDS.with_label_values(&[sink]),
            dir,
            id,
            max_bytes,
            segment_bytes,
            fsync,
            write: Mutex::new(WriteState {
                pending: Group::new(Vec::new()),
                led: false,
                closed: false,
                end,
                spare: Vec::new(),
            }),
            live: Mutex::new(LiveSegment {
                file: Some(live_file),
                end,
                dirty: false,
                unflushed: false,
                retired: Vec::new(),
            }),
            sync_wake: Condvar::new(),
            read: Mutex::new(ReadState::new(start, recovered.in_flight)),
            arrived: Notify::new(),
            spool_bytes: AtomicU64::new(recovered.spool),
            records: AtomicU64::new(0),
            last_push: AtomicU64::new(HEADER as u64),
            errors: Mutex::new(WriteErrors::default()),
            failing: AtomicBool::new(false),
            owner: AtomicBool::new(owner),
            lock_file,
            sync_thread: Mutex::new(None),
            count_thread: Mutex::new(None),
        })
    }

    /// Starts the fsync thread (with an fsync interval), the count of the records left by a
    /// previous run and, when another process holds the buffer, a thread that waits for it to
    /// exit; called once from the delivery start.
    pub fn start_threads(self: &Arc<Self>) -> std::io::Result<()> {
        if let FsyncPolicy::Every(interval) = self.fsync {
            let log = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("fsync-{}", self.sink))
                .spawn(move || log.sync_loop(interval.0))?;
            *lock(&self.sync_thread) = Some(handle);
        }
        if self.owner.load(Ordering::SeqCst) {
            let log = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("count-{}", self.sink))
                .spawn(move || log.count_recovered(false))?;
            *lock(&self.count_thread) = Some(handle);
        } else {
            self.start_takeover_thread()?;
        }
        Ok(())
    }

    /// Refuses further appends, writes and fsyncs what is pending, and stops the fsync thread.
    /// Runs at shutdown, after the server stopped answering.
    pub fn close(&self) {
        lock(&self.write).closed = true;
        let (group, result, _) = self.write_pending();
        if let Some(group) = group {
            let _ = group.done.send(Some(result));
        }
        if let Some(f) = &lock(&self.live).file {
            if let Err(e) = f.sync_data() {
                error!("sink {}: fsync of the buffer failed: {e}", self.sink);
            }
        }
        self.sync_wake.notify_all();
        if let Some(handle) = lock(&self.sync_thread).take() {
            let _ = handle.join();
        }
        if let Some(handle) = lock(&self.count_thread).take() {
            let _ = handle.join();
        }
        self.arrived.notify_one();
    }

    /// `true` while the buffer has room for another append as large as the last one.
    pub fn has_room(&self) -> bool {
        self.spool_bytes.load(Ordering::Relaxed) + self.last_push.load(Ordering::Relaxed)
            <= self.max_bytes
    }

    /// Bytes waiting in the buffer.
    pub fn spool_bytes(&self) -> u64 {
        self.spool_bytes.load(Ordering::Relaxed)
    }

    /// Records waiting in the buffer. Those left by a previous run are counted by a background
    /// thread just after the start, so for a moment (and after damage) this is an estimate.
    pub fn records_waiting(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    fn add_records(&self, n: u64) {
        self.records.fetch_add(n, Ordering::Relaxed);
        self.queued.set(self.records.load(Ordering::Relaxed) as i64);
    }

    fn sub_records(&self, n: u64) {
        sub_saturating(&self.records, n);
        self.queued.set(self.records.load(Ordering::Relaxed) as i64);
    }
}

/// Whether the buffer of sink `sink` under `dir` holds records its sink has yet to get:
/// undelivered bytes from an earlier run, or a buffer another process has open (the old one,
/// during an upgrade). Runs at start-up, to decide whether a sink that is its own buffer can be
/// appended to directly; a buffer that was never used says `false`, and nothing is created. As at
/// any start, the segments before the checkpoint (delivered) are deleted.
pub fn holds_records(dir: &Path, sink: &str) -> std::io::Result<bool> {
    let dir = dir.join(sink);
    let lock_file = match OpenOptions::new().write(true).open(dir.join("lock")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match lock_file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(true),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    Ok(checkpoint::recover(&dir)?.spool > 0)
}

pub(super) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.log"))
}

/// UNIX milliseconds now, for a frame's `appended_ms` and the age of the oldest record (a few
/// milliseconds' resolution, read once per append).
pub(super) fn now_ms() -> u64 {
    crate::clock::coarse_unix_millis()
}

pub(super) fn since_ms(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

/// The highest segment number in `dir` (0 when there is none).
fn max_segment(dir: &Path) -> std::io::Result<u64> {
    Ok(segments(dir)?.last().copied().unwrap_or(0))
}

/// The segment numbers in `dir`, in order.
pub(super) fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut segments: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse::<u64>().ok()
        })
        .collect();
    segments.sort_unstable();
    Ok(segments)
}

/// Creates a new, empty segment numbered `at_least` or the next free number after it.
fn create_segment(dir: &Path, at_least: u64) -> std::io::Result<u64> {
    let mut n = at_least.max(1);
    loop {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(segment_path(dir, n))
        {
            Ok(_) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e),
        }
    }
}
