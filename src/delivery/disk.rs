//! `buffer: disk`: a segmented append-only log per sink, so a crash loses nothing accepted.
//!
//! Layout, under `{delivery.dir}/{sink}/`: segments `00000000000000000001.log`, ... and a
//! `checkpoint` file (`SEGMENT OFFSET`) naming the first byte not yet delivered.
//!
//! Each record is one frame: `len: u32 LE`, `crc32: u32 LE` (of the next two fields),
//! `appended_ms: u64 LE` (when it was accepted), then `len` bytes of the record's JSON. A torn or
//! corrupt frame is detected by its length or checksum; the reader warns and skips the rest of that
//! segment (appends never go to an old segment: each start opens a new one).
//!
//! Appends are group-committed: requests hand their frames to the writer thread and wait; the
//! thread takes everything that arrived, issues one `write(2)`, fsyncs when the policy says so,
//! and wakes every request of that group at once. The reader only ever reads up to the committed
//! end, and the checkpoint moves only after the sink confirmed a batch.

use std::fs::TryLockError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use tokio::sync::{watch, Notify};

use super::DeliveryError;
use crate::config::FsyncPolicy;
use crate::metrics;
use crate::record::Record;
use crate::sync::lock;

const HEADER: usize = 16;
/// A frame longer than this is corrupt (records are bounded by the request limits long before).
const MAX_FRAME: usize = 64 << 20;
const READ_CHUNK: usize = 1 << 20;

/// A position in the log: segment number and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// Appends one record's frame to `out`.
pub fn encode_frame(record: &Record, appended_ms: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    // Serializing strings and integers into a Vec cannot fail.
    serde_json::to_writer(&mut *out, record).expect("record serializes");
    let len = (out.len() - start - HEADER) as u32;
    out[start + 8..start + 16].copy_from_slice(&appended_ms.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What [`decode_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A whole, valid frame of `size` bytes (header included).
    Record {
        record: Record,
        appended_ms: u64,
        size: usize,
    },
    /// The buffer ends before the frame does: `need` bytes are needed in all.
    Incomplete { need: usize },
    /// Not a valid frame: a torn write or corruption.
    Corrupt(&'static str),
}

/// Decodes the frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Frame {
    if buf.len() < HEADER {
        return Frame::Incomplete { need: HEADER };
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Frame::Corrupt("impossible frame length");
    }
    let size = HEADER + len;
    if buf.len() < size {
        return Frame::Incomplete { need: size };
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc32fast::hash(&buf[8..size]) != crc {
        return Frame::Corrupt("checksum mismatch");
    }
    let appended_ms = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    match serde_json::from_slice::<Record>(&buf[HEADER..size]) {
        Ok(record) => Frame::Record {
            record,
            appended_ms,
            size,
        },
        Err(_) => Frame::Corrupt("not a record"),
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.log"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Done = watch::Sender<Option<Result<(), Arc<str>>>>;

/// Frames waiting to be written, and everyone waiting for them.
struct Group {
    bytes: Vec<u8>,
    done: Done,
}

impl Group {
    fn new() -> Group {
        Group {
            bytes: Vec::new(),
            done: watch::channel(None).0,
        }
    }
}

struct WriteState {
    /// The group being formed; its first request leads it.
    pending: Group,
    /// A request has taken the lead of `pending` and will write it.
    led: bool,
    closed: bool,
    /// The end of what is written: the reader reads up to here.
    end: Position,
}

/// The live segment; its mutex orders the writes.
struct LiveSegment {
    file: Option<File>,
    end: Position,
    /// Written since the last fsync.
    dirty: bool,
    /// Segments rotated away from and not yet fsynced.
    retired: Vec<File>,
}

struct ReadState {
    at: Position,
    /// Bytes of the current segment read into memory, starting at `chunk_start`.
    chunk: Vec<u8>,
    chunk_start: u64,
    /// Bytes consumed (delivered or skipped) since the last checkpoint.
    consumed: u64,
    /// When the oldest record taken but not yet acknowledged was appended.
    oldest_ms: Option<u64>,
}

/// The on-disk buffer of one sink.
pub struct DiskLog {
    sink: String,
    dir: PathBuf,
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
    /// This process holds the buffer's lock: it reads, acknowledges and deletes. Another process
    /// (the old one during an upgrade) may append to its own segments meanwhile.
    owner: AtomicBool,
    lock_file: File,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
}

impl DiskLog {
    /// Opens (or creates) the log of sink `sink` under `dir`, recovers the checkpoint, and starts
    /// a new segment for appends. Runs once at start-up. The writer thread starts here too: it
    /// only appends, so it is safe to run before a daemon fork would matter (see
    /// [`DiskLog::start_writer`]).
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
        let (start, spool) = if owner {
            recover(&dir)?
        } else {
            warn!(
                "sink {sink}: the buffer in {} is in use by another process (an upgrade?); \
                 appending to a new segment and delivering once that process exits",
                dir.display()
            );
            (
                Position {
                    segment: 0,
                    offset: 0,
                },
                0,
            )
        };
        let live = create_segment(&dir, (max_segment(&dir)? + 1).max(start.segment))?;
        if spool > 0 {
            info!(
                "sink {sink}: {spool} bytes from before the restart are waiting in {}",
                dir.display()
            );
        }
        metrics::SPOOL_BYTES
            .with_label_values(&[sink])
            .set(spool as i64);
        let live_file = OpenOptions::new()
            .append(true)
            .open(segment_path(&dir, live))?;
        Ok(DiskLog {
            sink: sink.to_owned(),
            dir,
            max_bytes,
            segment_bytes,
            fsync,
            write: Mutex::new(WriteState {
                pending: Group::new(),
                led: false,
                closed: false,
                end: Position {
                    segment: live,
                    offset: 0,
                },
            }),
            live: Mutex::new(LiveSegment {
                file: Some(live_file),
                end: Position {
                    segment: live,
                    offset: 0,
                },
                dirty: false,
                retired: Vec::new(),
            }),
            sync_wake: Condvar::new(),
            read: Mutex::new(ReadState {
                at: start,
                chunk: Vec::new(),
                chunk_start: start.offset,
                consumed: 0,
                oldest_ms: None,
            }),
            arrived: Notify::new(),
            spool_bytes: AtomicU64::new(spool),
            owner: AtomicBool::new(owner),
            lock_file,
            sync_thread: Mutex::new(None),
        })
    }

    /// Starts the fsync thread (with an fsync interval) and, when another process holds the
    /// buffer, a thread that waits for it to exit; called once from [`super::Delivery::start`].
    pub fn start_threads(self: &Arc<Self>) -> std::io::Result<()> {
        if let FsyncPolicy::Every(interval) = self.fsync {
            let log = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("fsync-{}", self.sink))
                .spawn(move || log.sync_loop(interval.0))?;
            *lock(&self.sync_thread) = Some(handle);
        }
        if !self.owner.load(Ordering::SeqCst) {
            let log = self.clone();
            std::thread::Builder::new()
                .name(format!("spool-lock-{}", self.sink))
                .spawn(move || match log.lock_file.lock() {
                    Ok(()) => log.take_over(),
                    Err(e) => error!("sink {}: cannot lock the buffer: {e}", log.sink),
                })?;
        }
        Ok(())
    }

    /// The previous owner of the buffer exited: pick up its checkpoint, move appends to a segment
    /// after all of its segments, and start reading.
    fn take_over(&self) {
        let mut live = lock(&self.live);
        match recover(&self.dir) {
            Ok((start, spool)) => {
                {
                    let mut read = lock(&self.read);
                    read.at = start;
                    read.chunk.clear();
                    read.chunk_start = start.offset;
                    read.consumed = 0;
                }
                let pending = lock(&self.write).pending.bytes.len() as u64;
                self.spool_bytes.store(spool + pending, Ordering::SeqCst);
                let next =
                    (max_segment(&self.dir).unwrap_or(live.end.segment) + 1).max(start.segment);
                self.switch_segment(&mut live, next, true);
                self.owner.store(true, Ordering::SeqCst);
                self.arrived.notify_one();
                info!(
                    "sink {}: took over the buffer; delivering from {start:?}",
                    self.sink
                );
            }
            Err(e) => error!("sink {}: cannot take over the buffer: {e}", self.sink),
        }
    }

    /// Appends `records`: returns once they are written to the log (and fsynced with
    /// `fsync: always`). All or none are taken.
    ///
    /// Group commit: the first request of a group leads it. It yields once, so that every request
    /// the runtime has ready joins the group, then writes the whole group with one `write(2)` and
    /// wakes the others. Nothing crosses threads on the way, and an idle proxy pays no wait.
    pub async fn push(&self, records: Vec<Record>) -> Result<(), DeliveryError> {
        let n = records.len() as u64;
        let appended = now_ms();
        let mut frames = Vec::with_capacity(records.iter().map(|r| r.approx_len() + HEADER).sum());
        for record in &records {
            encode_frame(record, appended, &mut frames);
        }
        let size = frames.len() as u64;
        let (mut done, lead) = {
            let mut state = lock(&self.write);
            if state.closed {
                return Err(DeliveryError::Closed);
            }
            if self.spool_bytes.load(Ordering::Relaxed) + size > self.max_bytes {
                return Err(DeliveryError::Full);
            }
            self.spool_bytes.fetch_add(size, Ordering::Relaxed);
            state.pending.bytes.extend_from_slice(&frames);
            let lead = !std::mem::replace(&mut state.led, true);
            (state.pending.done.subscribe(), lead)
        };
        if lead {
            // Should this request be cancelled before it wrote its group, the guard writes it.
            let guard = LeadGuard(self);
            tokio::task::yield_now().await;
            self.commit().await;
            std::mem::forget(guard);
        }
        let result = match done.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or(Ok(())),
            Err(_) => Err(Arc::from("the buffer was closed")),
        };
        match result {
            Ok(()) => {
                metrics::RECORDS
                    .with_label_values(&[&self.sink, "accepted"])
                    .inc_by(n);
                Ok(())
            }
            Err(_) => Err(DeliveryError::Failed),
        }
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
    fn write_pending(&self) -> (Option<Group>, Result<(), Arc<str>>, Option<File>) {
        let mut live = lock(&self.live);
        let group = {
            let mut state = lock(&self.write);
            state.led = false;
            std::mem::replace(&mut state.pending, Group::new())
        };
        if group.bytes.is_empty() {
            return (Some(group), Ok(()), None);
        }
        let result = self.append(&mut live, &group.bytes);
        if result.is_err() {
            self.spool_bytes
                .fetch_sub(group.bytes.len() as u64, Ordering::Relaxed);
            return (Some(group), result, None);
        }
        lock(&self.write).end = live.end;
        self.arrived.notify_one();
        let sync = match self.fsync {
            FsyncPolicy::Always => live.file.as_ref().and_then(|f| f.try_clone().ok()),
            FsyncPolicy::Every(_) => {
                live.dirty = true;
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
                Ok(())
            }
            Err(e) => {
                error!("sink {}: cannot append to the buffer: {e}", self.sink);
                // Cut back whatever part was written, so the log holds whole frames only.
                let _ = f.set_len(live.end.offset);
                Err(Arc::from(format!("cannot append to the buffer: {e}")))
            }
        }
    }

    /// The fsync thread (`fsync: 1s` and the like): fsyncs what was written, every `interval`.
    fn sync_loop(&self, interval: Duration) {
        let mut closing = false;
        loop {
            {
                let state = lock(&self.write);
                if !state.closed {
                    let _ = self.sync_wake.wait_timeout(state, interval);
                } else {
                    closing = true;
                }
            }
            let (file, retired) = {
                let mut live = lock(&self.live);
                let file = if std::mem::take(&mut live.dirty) {
                    live.file.as_ref().and_then(|f| f.try_clone().ok())
                } else {
                    None
                };
                (file, std::mem::take(&mut live.retired))
            };
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

    /// Moves appends to segment `next` (with `bump`, the next free number from there). Without
    /// `bump`, an existing `next` belongs to another process (the newer one during an upgrade):
    /// keep appending to the current segment rather than write after its segments.
    fn switch_segment(&self, live: &mut LiveSegment, next: u64, bump: bool) {
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

    /// Reads up to `max_records` records (about `max_bytes`) past what was already taken into
    /// `batch`. Called by the lane's writer only.
    pub fn take(&self, batch: &mut Vec<Record>, max_records: usize, max_bytes: usize) -> usize {
        if !self.owner.load(Ordering::SeqCst) {
            return 0;
        }
        let end = lock(&self.write).end;
        let mut read = lock(&self.read);
        let mut bytes = 0usize;
        let mut taken = 0;
        while batch.len() < max_records && bytes < max_bytes && read.at < end {
            let seg_end = if read.at.segment == end.segment {
                end.offset
            } else {
                match std::fs::metadata(segment_path(&self.dir, read.at.segment)) {
                    Ok(m) => m.len(),
                    Err(_) => {
                        // A missing segment: nothing to read there.
                        self.next_segment(&mut read, 0);
                        continue;
                    }
                }
            };
            if read.at.offset >= seg_end {
                if read.at.segment == end.segment {
                    break;
                }
                self.next_segment(&mut read, 0);
                continue;
            }
            match self.read_frame(&mut read, seg_end) {
                Ok(Frame::Record {
                    record,
                    appended_ms,
                    size,
                }) => {
                    read.at.offset += size as u64;
                    read.consumed += size as u64;
                    read.oldest_ms.get_or_insert(appended_ms);
                    bytes += size;
                    batch.push(record);
                    taken += 1;
                }
                Ok(Frame::Incomplete { .. }) | Ok(Frame::Corrupt(_)) | Err(_) => {
                    let skipped = seg_end - read.at.offset;
                    warn!(
                        "sink {}: skipping {skipped} bytes of torn or corrupt data at the end of segment {} (offset {})",
                        self.sink, read.at.segment, read.at.offset
                    );
                    metrics::SPOOL_SKIPPED_BYTES
                        .with_label_values(&[&self.sink])
                        .inc_by(skipped);
                    if read.at.segment == end.segment {
                        read.consumed += skipped;
                        read.at.offset = seg_end;
                    } else {
                        self.next_segment(&mut read, skipped);
                    }
                }
            }
        }
        taken
    }

    fn next_segment(&self, read: &mut ReadState, skipped: u64) {
        read.consumed += skipped;
        read.at = Position {
            segment: read.at.segment + 1,
            offset: 0,
        };
        read.chunk.clear();
        read.chunk_start = 0;
    }

    /// The frame at `read.at`, reading the segment in chunks that never pass `seg_end`.
    fn read_frame(&self, read: &mut ReadState, seg_end: u64) -> std::io::Result<Frame> {
        let mut need = HEADER;
        loop {
            let at = read.at.offset;
            let chunk_end = read.chunk_start + read.chunk.len() as u64;
            if read.chunk_start <= at && at + need as u64 <= chunk_end {
                match decode_frame(&read.chunk[(at - read.chunk_start) as usize..]) {
                    Frame::Incomplete { need: n } => need = n,
                    frame => return Ok(frame),
                }
            }
            if at + need as u64 > seg_end {
                return Ok(Frame::Incomplete { need });
            }
            let want = (seg_end - at).min(READ_CHUNK.max(need) as u64) as usize;
            read.chunk.resize(want, 0);
            let file = File::open(segment_path(&self.dir, read.at.segment))?;
            file.read_exact_at(&mut read.chunk, at)?;
            read.chunk_start = at;
        }
    }

    /// The batch taken since the last call is delivered: move the checkpoint past it and delete
    /// the segments left behind.
    pub fn ack(&self) {
        let (at, consumed) = {
            let mut read = lock(&self.read);
            read.oldest_ms = None;
            (read.at, std::mem::take(&mut read.consumed))
        };
        self.spool_bytes.fetch_sub(consumed, Ordering::Relaxed);
        metrics::SPOOL_BYTES
            .with_label_values(&[&self.sink])
            .set(self.spool_bytes.load(Ordering::Relaxed) as i64);
        if let Err(e) = write_checkpoint(&self.dir, at) {
            error!("sink {}: cannot write the checkpoint (records may be sent again after a restart): {e}", self.sink);
            return;
        }
        let live = lock(&self.write).end.segment;
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let Some(seg) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if seg < at.segment && seg < live {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    warn!(
                        "sink {}: cannot delete delivered segment {seg}: {e}",
                        self.sink
                    );
                }
            }
        }
    }

    /// Waits until records may have been appended since the last call.
    pub async fn arrived(&self) {
        self.arrived.notified().await
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
        self.arrived.notify_one();
    }

    /// `true` while the buffer has room.
    pub fn has_room(&self) -> bool {
        self.spool_bytes.load(Ordering::Relaxed) < self.max_bytes
    }

    /// Age of the oldest record not yet delivered, if one is being delivered now.
    pub fn oldest_age(&self) -> Option<Duration> {
        let oldest = lock(&self.read).oldest_ms?;
        Some(Duration::from_millis(now_ms().saturating_sub(oldest)))
    }

    /// Bytes waiting in the buffer.
    pub fn spool_bytes(&self) -> u64 {
        self.spool_bytes.load(Ordering::Relaxed)
    }
}

fn read_checkpoint(dir: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(dir.join("checkpoint")).ok()?;
    let mut parts = text.split_whitespace();
    let segment = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some(Position { segment, offset })
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

/// The highest segment number in `dir` (0 when there is none).
fn max_segment(dir: &Path) -> std::io::Result<u64> {
    Ok(segments(dir)?.last().copied().unwrap_or(0))
}

/// The segment numbers in `dir`, in order.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
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

/// For the owner of the buffer: deletes the segments before the checkpoint and returns where
/// reading starts and how many bytes wait from there on.
fn recover(dir: &Path) -> std::io::Result<(Position, u64)> {
    let segments = segments(dir)?;
    let checkpoint = read_checkpoint(dir).unwrap_or(Position {
        segment: segments.first().copied().unwrap_or(0),
        offset: 0,
    });
    let mut spool = 0u64;
    for &s in &segments {
        let path = segment_path(dir, s);
        if s < checkpoint.segment {
            std::fs::remove_file(&path)?;
            continue;
        }
        let len = std::fs::metadata(&path)?.len();
        spool += if s == checkpoint.segment {
            len.saturating_sub(checkpoint.offset)
        } else {
            len
        };
    }
    // Reading starts at the checkpoint, or at the first segment after it that still exists.
    let start = if segments.contains(&checkpoint.segment) {
        checkpoint
    } else {
        Position {
            segment: segments
                .iter()
                .copied()
                .find(|s| *s > checkpoint.segment)
                .unwrap_or(checkpoint.segment + 1),
            offset: 0,
        }
    };
    Ok((start, spool))
}

fn write_checkpoint(dir: &Path, at: Position) -> std::io::Result<()> {
    let tmp = dir.join("checkpoint.tmp");
    std::fs::write(&tmp, format!("{} {}\n", at.segment, at.offset))?;
    std::fs::rename(tmp, dir.join("checkpoint"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordBody;
    use crate::units::HumanDuration;

    fn record(i: usize) -> Record {
        Record {
            database: "web".into(),
            table: "t".into(),
            body: RecordBody {
                time: i as i64,
                columns: [("i".to_string(), i.to_string())].into_iter().collect(),
            },
        }
    }

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut buf = Vec::new();
        encode_frame(&record(7), 123, &mut buf);
        let size = buf.len();
        assert_eq!(
            decode_frame(&buf),
            Frame::Record {
                record: record(7),
                appended_ms: 123,
                size
            }
        );
        assert_eq!(decode_frame(&buf[..10]), Frame::Incomplete { need: HEADER });
        assert_eq!(
            decode_frame(&buf[..size - 1]),
            Frame::Incomplete { need: size }
        );
        let mut flipped = buf.clone();
        flipped[size - 2] ^= 1;
        assert_eq!(decode_frame(&flipped), Frame::Corrupt("checksum mismatch"));
        assert_eq!(
            decode_frame(&[0u8; 32]),
            Frame::Corrupt("impossible frame length")
        );
    }

    fn open_segments(dir: &Path, max: u64, segment_bytes: u64) -> Arc<DiskLog> {
        let fsync = FsyncPolicy::Every(HumanDuration::millis(50));
        let log = DiskLog::open_with_segments("main", dir, max, fsync, segment_bytes);
        let log = Arc::new(log.unwrap());
        log.start_threads().unwrap();
        log
    }

    fn open(dir: &Path, max: u64) -> Arc<DiskLog> {
        open_segments(dir, max, 1 << 20)
    }

    fn take_all(log: &DiskLog) -> Vec<i64> {
        let mut batch = Vec::new();
        while log.take(&mut batch, 1000, 1 << 20) > 0 {}
        batch.iter().map(|r| r.body.time).collect()
    }

    #[tokio::test]
    async fn appends_read_back_and_resume_at_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1 << 30);
        for i in 0..10 {
            log.push(vec![record(i)]).await.unwrap();
        }
        let mut batch = Vec::new();
        assert_eq!(log.take(&mut batch, 4, 1 << 20), 4);
        log.ack();
        assert_eq!(log.take(&mut Vec::new(), 3, 1 << 20), 3); // taken, never acknowledged
        log.close();
        drop(log);

        // After a restart the unacknowledged records come again; new appends follow them.
        let log = open(dir.path(), 1 << 30);
        log.push(vec![record(10), record(11)]).await.unwrap();
        assert_eq!(take_all(&log), (4..12).collect::<Vec<_>>());
        log.ack();
        assert_eq!(log.spool_bytes(), 0);
        log.close();
    }

    #[tokio::test]
    async fn torn_tail_is_skipped_and_the_rest_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1 << 30);
        log.push((0..3).map(record).collect()).await.unwrap();
        log.close();
        drop(log);
        // A crash in the middle of a write: half a frame at the end of the segment.
        let seg = segment_path(&dir.path().join("main"), 1);
        let mut half = Vec::new();
        encode_frame(&record(99), 1, &mut half);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&half[..half.len() / 2]).unwrap();
        drop(f);

        let log = open(dir.path(), 1 << 30);
        log.push(vec![record(3)]).await.unwrap();
        assert_eq!(take_all(&log), vec![0, 1, 2, 3]);
        log.ack();
        assert_eq!(log.spool_bytes(), 0);
        log.close();
    }

    #[tokio::test]
    async fn segments_rotate_and_delivered_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_segments(dir.path(), 1 << 30, 200);
        for i in 0..20 {
            log.push(vec![record(i)]).await.unwrap();
        }
        let count = || {
            std::fs::read_dir(dir.path().join("main"))
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".log")
                })
                .count()
        };
        assert!(count() > 3, "rotated into several segments");
        assert_eq!(take_all(&log), (0..20).collect::<Vec<_>>());
        log.ack();
        assert!(count() <= 2, "delivered segments deleted");
        log.close();
    }

    #[tokio::test]
    async fn a_second_process_appends_and_takes_over_when_the_first_exits() {
        let dir = tempfile::tempdir().unwrap();
        let old = open(dir.path(), 1 << 30);
        old.push(vec![record(0), record(1)]).await.unwrap();
        // The new process during an upgrade: the lock is held, so it appends but does not read.
        let new = open(dir.path(), 1 << 30);
        new.push(vec![record(2)]).await.unwrap();
        assert_eq!(take_all(&new), Vec::<i64>::new());
        old.push(vec![record(3)]).await.unwrap();
        // The old one delivers part of its records, then exits.
        let mut batch = Vec::new();
        old.take(&mut batch, 1, 1 << 20);
        old.ack();
        old.close();
        drop(old); // releases the lock
        new.push(vec![record(4)]).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..200 {
            got.extend(take_all(&new));
            if got.len() >= 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        got.sort();
        assert_eq!(got, vec![1, 2, 3, 4]);
        new.ack();
        assert_eq!(new.spool_bytes(), 0);
        new.close();
    }

    #[tokio::test]
    async fn full_buffer_refuses_and_drop_counts() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 300);
        let mut refused = 0;
        for i in 0..10 {
            if log.push(vec![record(i)]).await == Err(DeliveryError::Full) {
                refused += 1;
            }
        }
        assert!(refused > 0);
        let accepted = take_all(&log);
        assert_eq!(accepted.len(), 10 - refused);
        log.ack();
        assert!(
            log.push(vec![record(50)]).await.is_ok(),
            "room again once delivered"
        );
        log.close();
    }
}
