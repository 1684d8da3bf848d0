//! Appends: group commit into the live segment, segment rotation, fsync (per group or on an
//! interval), and what happens when a write fails (a full disk).
//!
//! The first request of a group leads it: it yields once, so that every request the runtime has
//! ready joins the group, then writes the whole group with one `write(2)` and wakes the others.
//! Nothing crosses threads on the way, and an idle proxy pays no wait. A failed write is cut back
//! so the segment holds whole frames only; every request of that group gets
//! [`DeliveryError::Failed`], the failure is counted and logged at most once per
//! [`LOG_INTERVAL`], and the next group tries again.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use tokio::sync::watch;

use super::frame::{encode_frame, HEADER, MAX_FRAME_PAYLOAD};
use super::{create_segment, now_ms, segment_path, DiskLog, Position};
use crate::delivery::group::{lead_or_wait, space_is_back, Outcome};
use crate::delivery::{DeliveryError, FsyncPolicy};
use crate::metrics;
use crate::record::RecordRef;
use crate::sync::lock;

/// How often, between two interval fsyncs, the fsync thread starts the kernel's writeback of
/// what was appended. The fsync then finds little left to write: the writeback's CPU (block
/// allocation, page-cache walks, several ms for a second of appends under load) comes in small
/// slices instead of one burst that holds the core while answers wait.
pub const WRITEBACK_STEP: Duration = Duration::from_millis(10);

/// At most one log line per this interval about failing appends.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

type Done = watch::Sender<Outcome>;
/// A request's wait for its group's write.
type Waiting = watch::Receiver<Outcome>;

/// Frames waiting to be written, and everyone waiting for them.
pub(super) struct Group {
    pub bytes: Vec<u8>,
    pub done: Done,
}

impl Group {
    /// A new group whose frames go into `bytes` (empty; a previous group's, see
    /// [`WriteState::spare`]).
    pub fn new(bytes: Vec<u8>) -> Group {
        debug_assert!(bytes.is_empty());
        Group {
            bytes,
            done: watch::channel(None).0,
        }
    }
}

/// The largest buffer kept for the next group: a batch of big JSON bodies may make one group
/// large, and its memory should not stay taken.
const MAX_SPARE: usize = 1 << 20;

thread_local! {
    /// The frames of one append, encoded before the group's lock is taken (one buffer per
    /// thread, reused: no allocation per request).
    static FRAMES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(super) struct WriteState {
    /// The group being formed; its first request leads it.
    pub pending: Group,
    /// A request has taken the lead of `pending` and will write it.
    pub led: bool,
    pub closed: bool,
    /// The end of what is written: the reader reads up to here.
    pub end: Position,
    /// The last written group's buffer, emptied: the next group's, so that a group does not
    /// grow a new one from nothing.
    pub spare: Vec<u8>,
}

/// The live segment; its mutex orders the writes.
pub(super) struct LiveSegment {
    pub file: Option<File>,
    pub end: Position,
    /// Written since the last fsync.
    pub dirty: bool,
    /// Written since the fsync thread last started writeback (see [`WRITEBACK_STEP`]).
    pub unflushed: bool,
    /// Segments rotated away from and not yet fsynced.
    pub retired: Vec<File>,
}

/// Failed appends since the last log line about them.
#[derive(Default)]
pub(super) struct WriteErrors {
    logged: Option<Instant>,
    suppressed: u64,
    /// The last time [`DiskLog::writable`] tried for space.
    probed: Option<Instant>,
}

impl DiskLog {
    /// Appends `records`: returns once they are written to the log (and fsynced with
    /// `fsync: always`). All or none are taken. A record whose frame would exceed
    /// [`MAX_FRAME_PAYLOAD`] is refused ([`DeliveryError::TooLarge`]) before anything is written.
    pub async fn push(&self, records: &[RecordRef<'_>]) -> Result<(), DeliveryError> {
        let n = records.len() as u64;
        let appended = now_ms();
        let joined = FRAMES.with_borrow_mut(|frames| {
            frames.clear();
            frames.reserve(records.iter().map(|r| r.approx_len() + HEADER).sum());
            let joined = self.join_group(records, appended, frames);
            if frames.capacity() > MAX_SPARE {
                *frames = Vec::new();
            }
            joined
        });
        let (done, lead) = joined?;
        // Should the leader be cancelled before it wrote its group, the guard writes it.
        let lead = lead.then(|| (LeadGuard(self), self.commit()));
        match lead_or_wait(done, lead, "the buffer was closed").await {
            Ok(()) => {
                self.add_records(n);
                self.accepted.inc_by(n);
                Ok(())
            }
            Err(_) => {
                metrics::BUFFER_WRITE_ERRORS
                    .with_label_values(&[&self.sink])
                    .inc();
                Err(DeliveryError::Failed)
            }
        }
    }

    /// `false` while appends fail (a full disk). At most once a second while failing, tries to
    /// write a small file beside the segments: when that works, space is back and this says
    /// `true` again (the next append confirms it).
    pub fn writable(&self) -> bool {
        if !self.failing.load(Ordering::Relaxed) {
            return true;
        }
        let ok = space_is_back(
            &mut lock(&self.errors).probed,
            &self.dir.join("space.probe"),
        );
        if ok {
            self.failing.store(false, Ordering::Relaxed);
        }
        ok
    }

    /// Encodes `records` into `frames` and adds them to the pending group. Returns a receiver
    /// for the group's result, and whether this request leads the group.
    fn join_group(
        &self,
        records: &[RecordRef<'_>],
        appended: u64,
        frames: &mut Vec<u8>,
    ) -> Result<(Waiting, bool), DeliveryError> {
        for record in records {
            if encode_frame(record, appended, frames) > MAX_FRAME_PAYLOAD {
                return Err(DeliveryError::TooLarge);
            }
        }
        let size = frames.len() as u64;
        self.last_push.store(size, Ordering::Relaxed);
        let mut state = lock(&self.write);
        if state.closed {
            return Err(DeliveryError::Closed);
        }
        if self.spool_bytes.load(Ordering::Relaxed) + size > self.max_bytes {
            return Err(DeliveryError::Full);
        }
        self.spool_bytes.fetch_add(size, Ordering::Relaxed);
        state.pending.bytes.extend_from_slice(frames);
        let lead = !std::mem::replace(&mut state.led, true);
        Ok((state.pending.done.subscribe(), lead))
    }

    /// Writes the pending group (the leader's job), fsyncs it with `fsync: always`, and wakes
    /// everyone waiting for it.
    async fn commit(&self) {
        let (group, result, sync) = self.write_pending();
        let result = match (result, sync) {
            (Ok(()), Some(file)) => {
                match tokio::task::spawn_blocking(move || file.sync_data()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(Arc::from(format!("fsync of the buffer failed: {e}"))),
                    Err(e) => Err(Arc::from(format!("fsync of the buffer failed: {e}"))),
                }
            }
            (result, _) => result,
        };
        if let Some(group) = group {
            let _ = group.done.send(Some(result));
        }
    }

    /// Takes the pending group and appends it to the live segment with one `write(2)`. Returns
    /// the group, the result, and with `fsync: always` a handle to fsync before answering.
    #[allow(clippy::type_complexity)]
    pub(super) fn write_pending(&self) -> (Option<Group>, Result<(), Arc<str>>, Option<File>) {
        let mut live = lock(&self.live);
        let mut group = {
            let mut state = lock(&self.write);
            state.led = false;
            let bytes = std::mem::take(&mut state.spare);
            std::mem::replace(&mut state.pending, Group::new(bytes))
        };
        if group.bytes.is_empty() {
            return (Some(group), Ok(()), None);
        }
        let result = self.append(&mut live, &group.bytes);
        let size = group.bytes.len() as u64;
        let mut spent = std::mem::take(&mut group.bytes);
        spent.clear();
        let mut state = lock(&self.write);
        if spent.capacity() <= MAX_SPARE {
            state.spare = spent;
        }
        if result.is_err() {
            self.spool_bytes.fetch_sub(size, Ordering::Relaxed);
            return (Some(group), result, None);
        }
        state.end = live.end;
        drop(state);
        self.arrived.notify_one();
        let sync = match self.fsync {
            FsyncPolicy::Always => live.file.as_ref().and_then(|f| f.try_clone().ok()),
            FsyncPolicy::Every(_) => {
                live.dirty = true;
                live.unflushed = true;
                None
            }
        };
        if live.end.offset >= self.segment_bytes {
            let next = live.end.segment + 1;
            self.switch_segment(&mut live, next, false);
        }
        (Some(group), Ok(()), sync)
    }

    fn append(&self, live: &mut LiveSegment, bytes: &[u8]) -> Result<(), Arc<str>> {
        let Some(f) = live.file.as_mut() else {
            return Err(Arc::from("the live segment is not open"));
        };
        match f.write_all(bytes) {
            Ok(()) => {
                live.end.offset += bytes.len() as u64;
                if self.failing.swap(false, Ordering::Relaxed) {
                    let suppressed = std::mem::take(&mut lock(&self.errors).suppressed);
                    info!(
                        "sink {}: appending to the buffer works again ({suppressed} more failed appends since the last message)",
                        self.sink
                    );
                }
                Ok(())
            }
            Err(e) => {
                self.failing.store(true, Ordering::Relaxed);
                // Cut back whatever part was written, so the log holds whole frames only (should
                // even that fail, the reader skips the torn tail). Then continue in a new segment,
                // so that this one is deleted once delivered: on a full disk, the space comes
                // back as the sink catches up.
                // (Not past another process's segments during an upgrade: see switch_segment.)
                let cut = f.set_len(live.end.offset).is_ok();
                if !cut || live.end.offset > 0 {
                    let next = live.end.segment + 1;
                    self.switch_segment(live, next, false);
                }
                self.log_write_error(&e);
                Err(Arc::from(format!("cannot append to the buffer: {e}")))
            }
        }
    }

    /// Logs a failed append, at most once per [`LOG_INTERVAL`] with the count of those not logged.
    fn log_write_error(&self, e: &std::io::Error) {
        let mut errors = lock(&self.errors);
        if errors.logged.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            errors.suppressed += 1;
            return;
        }
        errors.logged = Some(Instant::now());
        let suppressed = std::mem::take(&mut errors.suppressed);
        error!(
            "sink {}: cannot append to the buffer in {}, answering 503 until it works again: {e} \
             ({suppressed} more failed appends since the last message)",
            self.sink,
            self.dir.display()
        );
    }

    /// The fsync thread (`fsync: 1s` and the like): fsyncs what was written, every `interval`.
    /// While appends come in, it also starts their writeback every [`WRITEBACK_STEP`]; an idle
    /// buffer wakes it once per `interval` only.
    pub(super) fn sync_loop(&self, interval: Duration) {
        let mut next_sync = Instant::now() + interval;
        let mut busy = false;
        loop {
            let closing = {
                let state = lock(&self.write);
                if state.closed {
                    true
                } else {
                    let until_sync = next_sync.saturating_duration_since(Instant::now());
                    let wait = if busy {
                        until_sync.min(WRITEBACK_STEP)
                    } else {
                        until_sync
                    };
                    let (state, _) = self
                        .sync_wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    state.closed
                }
            };
            if !closing && Instant::now() < next_sync {
                busy = self.start_writeback();
                continue;
            }
            next_sync = Instant::now() + interval;
            let (file, retired) = {
                let mut live = lock(&self.live);
                live.unflushed = false;
                let file = if std::mem::take(&mut live.dirty) {
                    live.file.as_ref().and_then(|f| f.try_clone().ok())
                } else {
                    None
                };
                (file, std::mem::take(&mut live.retired))
            };
            busy = file.is_some();
            for f in retired.iter().chain(file.as_ref()) {
                if let Err(e) = f.sync_data() {
                    error!("sink {}: fsync of the buffer failed: {e}", self.sink);
                }
            }
            if closing {
                return;
            }
        }
    }

    /// Starts the kernel's writeback of the live segment's dirty pages, without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; durability still comes from the fsync).
    /// Returns whether anything had been appended since the last call.
    fn start_writeback(&self) -> bool {
        let file = {
            let mut live = lock(&self.live);
            if !std::mem::take(&mut live.unflushed) {
                return false;
            }
            live.file.as_ref().and_then(|f| f.try_clone().ok())
        };
        #[cfg(target_os = "linux")]
        if let Some(file) = file {
            use std::os::fd::AsRawFd;
            // SAFETY: `file` is an open descriptor owned for the whole call; the range (0, 0)
            // means the whole file, and the call only starts writeback of its dirty pages.
            let rc = unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
            if rc != 0 {
                // Only a hint, tried every 10 ms: the interval fsync writes what this did not,
                // and it is the one that logs and counts a failing disk.
                let e = std::io::Error::last_os_error();
                debug!(
                    "sink {}: starting the buffer's writeback failed: {e}",
                    self.sink
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        drop(file);
        true
    }

    /// Moves appends to segment `next` (with `bump`, the next free number from there). Without
    /// `bump`, an existing `next` belongs to another process (the newer one during an upgrade):
    /// keep appending to the current segment rather than write after its segments.
    pub(super) fn switch_segment(&self, live: &mut LiveSegment, next: u64, bump: bool) {
        let created = if bump {
            create_segment(&self.dir, next)
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(segment_path(&self.dir, next))
                .map(|_| next)
        };
        let opened = created.and_then(|seg| {
            OpenOptions::new()
                .append(true)
                .open(segment_path(&self.dir, seg))
                .map(|f| (seg, f))
        });
        match opened {
            Ok((segment, f)) => {
                if let Some(old) = live.file.replace(f) {
                    match self.fsync {
                        FsyncPolicy::Always => {}
                        FsyncPolicy::Every(_) => live.retired.push(old),
                    }
                }
                live.end = Position { segment, offset: 0 };
                lock(&self.write).end = live.end;
            }
            Err(e) => warn!(
                "sink {}: not starting a new segment, continuing in {}: {e}",
                self.sink, live.end.segment
            ),
        }
    }
}

/// Writes the pending group if its leader is dropped before it did (a cancelled request), so the
/// other requests of the group are not left waiting.
struct LeadGuard<'a>(&'a DiskLog);

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let (group, result, sync) = self.0.write_pending();
        let result = match (result, sync) {
            (Ok(()), Some(file)) => file
                .sync_data()
                .map_err(|e| Arc::from(format!("fsync of the buffer failed: {e}"))),
            (result, _) => result,
        };
        if let Some(group) = group {
            let _ = group.done.send(Some(result));
        }
    }
}
