//! Reading for the sink's lane: batches from the checkpoint on, up to the committed end; the
//! batch's id and intent; acknowledgement (the checkpoint moves, delivered segments go).
//!
//! A damaged frame (a torn tail, a flipped bit, a length that cannot be) does not cost the rest
//! of its segment: the reader looks for the next offset where a frame's header, checksum and
//! record are valid, counts the bytes in between as skipped, and goes on from there.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::{error, info, warn};

use super::checkpoint::{write_checkpoint, write_intent};
use super::frame::{check_frame, Checked, HEADER};
use super::{segment_path, segments, since_ms, DiskLog, Position};
use crate::metrics;
use crate::record::Record;
use crate::sink::EncodedRecords;
use crate::sync::lock;

const READ_CHUNK: usize = 1 << 20;

/// A frame whose checksum holds, found by `read_frame`: where its payload is in the read chunk.
struct Found {
    payload: std::ops::Range<usize>,
    appended_ms: u64,
    size: usize,
}

pub(super) struct ReadState {
    pub at: Position,
    /// Where the batch being formed (or in flight) starts: the checkpoint.
    pub batch_start: Position,
    /// Rebuilding the batch that was in flight before a restart: it ends here, whatever the
    /// batch limits say.
    pub rebuild_to: Option<Position>,
    /// The batch is complete (rebuilt, or its intent written): nothing more joins it until it
    /// is acknowledged.
    pub sealed: bool,
    /// Bytes of the current segment read into memory, starting at `chunk_start`.
    pub chunk: Vec<u8>,
    pub chunk_start: u64,
    /// Bytes consumed (delivered or skipped) since the last checkpoint.
    pub consumed: u64,
    /// When the oldest record taken but not yet acknowledged was appended.
    pub oldest_ms: Option<u64>,
    /// Up to where the page cache of delivered frames has been let go (see `drop_delivered`).
    pub uncached_to: Position,
    /// The length of a segment the writer has left, `(segment, bytes)`, as last seen: asked
    /// of the file system again only once reading reaches it, not once per frame.
    pub left_len: Option<(u64, u64)>,
    /// The segment being read, `(segment, file)`: opened once, not once per chunk, and closed
    /// when reading moves to the next segment (so that a delivered segment's space is freed).
    pub file: Option<(u64, File)>,
}

impl ReadState {
    /// Reading from `start`; `in_flight` is the batch a previous process sent and did not see
    /// confirmed.
    pub fn new(start: Position, in_flight: Option<(Position, Position)>) -> ReadState {
        ReadState {
            at: start,
            batch_start: in_flight.map_or(start, |(from, _)| from),
            rebuild_to: in_flight.map(|(_, to)| to),
            sealed: false,
            chunk: Vec::new(),
            chunk_start: start.offset,
            consumed: 0,
            oldest_ms: None,
            uncached_to: start,
            left_len: None,
            file: None,
        }
    }
}

impl DiskLog {
    /// Reads up to `max_records` records (about `max_bytes`) past what was already taken into
    /// `batch`, as the JSON the frames hold (checksums checked; records are decoded only for a
    /// sink that asks for them); returns how many. Called by the lane only. After a restart, the
    /// first batch is the one that was in flight, exactly (its records, whatever the limits say).
    pub fn take(&self, batch: &mut EncodedRecords, max_records: usize, max_bytes: usize) -> usize {
        if !self.owner.load(Ordering::SeqCst) {
            return 0;
        }
        let end = lock(&self.write).end;
        let mut read = lock(&self.read);
        if read.sealed {
            return 0;
        }
        let (max_records, max_bytes) = if read.rebuild_to.is_some() {
            (usize::MAX, usize::MAX)
        } else {
            (max_records, max_bytes)
        };
        let mut bytes = 0usize;
        let mut taken = 0;
        while batch.len() < max_records && bytes < max_bytes && read.at < end {
            if let Some(to) = read.rebuild_to {
                if read.at >= to {
                    break;
                }
            }
            let seg_end = if read.at.segment == end.segment {
                end.offset
            } else if let Some(len) = read.left_len.and_then(|(seg, len)| {
                (seg == read.at.segment && read.at.offset < len).then_some(len)
            }) {
                len
            } else {
                match std::fs::metadata(segment_path(&self.dir, read.at.segment)) {
                    Ok(m) => {
                        read.left_len = Some((read.at.segment, m.len()));
                        m.len()
                    }
                    Err(_) => {
                        // A missing segment: nothing to read there.
                        next_segment(&mut read, 0);
                        continue;
                    }
                }
            };
            if read.at.offset >= seg_end {
                if read.at.segment == end.segment {
                    break;
                }
                next_segment(&mut read, 0);
                continue;
            }
            match self.read_frame(&mut read, seg_end) {
                Ok(Some(found)) => {
                    read.at.offset += found.size as u64;
                    read.consumed += found.size as u64;
                    read.oldest_ms.get_or_insert(found.appended_ms);
                    bytes += found.size;
                    batch.push(&read.chunk[found.payload]);
                    taken += 1;
                }
                Ok(None) => {
                    self.resync(&mut read, seg_end, end);
                }
                Err(e) => {
                    let skipped = seg_end - read.at.offset;
                    error!(
                        "sink {}: cannot read segment {} at offset {}, skipping its last {skipped} bytes: {e}",
                        self.sink, read.at.segment, read.at.offset
                    );
                    self.skipped(&mut read, skipped, seg_end, end);
                }
            }
        }
        if let Some(to) = read.rebuild_to {
            if read.at >= to || read.at >= end {
                read.rebuild_to = None;
                read.sealed = !batch.is_empty();
            }
        }
        taken
    }

    /// The records taken since the last acknowledgement are the batch: returns its id and, when
    /// `durable` (the sink needs stable batch ids), makes its range durable first (the `intent`
    /// file, fsynced), so the same records get the same id again after a restart. An error means
    /// the intent could not be written: the batch may still be sent, but after a crash it may be
    /// rebuilt differently (a duplicate, never a loss).
    pub fn seal(&self, durable: bool) -> (String, std::io::Result<()>) {
        let mut read = lock(&self.read);
        let (from, to) = (read.batch_start, read.at);
        let id = format!(
            "{}-{:x}.{:x}-{:x}.{:x}",
            self.id, from.segment, from.offset, to.segment, to.offset
        );
        let written = if read.sealed {
            Ok(()) // rebuilt from the intent that is on disk
        } else {
            read.sealed = true;
            if durable {
                write_intent(&self.dir, from, to)
            } else {
                Ok(())
            }
        };
        (id, written)
    }

    /// Moves `read.at` past `skipped` bytes to `seg_end`, the end of its segment.
    fn skipped(&self, read: &mut ReadState, skipped: u64, seg_end: u64, end: Position) {
        metrics::SPOOL_SKIPPED_BYTES
            .with_label_values(&[&self.sink])
            .inc_by(skipped);
        if read.at.segment == end.segment {
            read.consumed += skipped;
            read.at.offset = seg_end;
        } else {
            next_segment(read, skipped);
        }
    }

    /// At a damaged frame: moves `read.at` to the next offset of the segment where a whole valid
    /// frame starts (or to the segment's end), and counts what lies between as skipped.
    fn resync(&self, read: &mut ReadState, seg_end: u64, end: Position) {
        let from = read.at.offset;
        let mut at = from + 1;
        while at + HEADER as u64 <= seg_end {
            read.at.offset = at;
            // A place to go on from must hold a whole record, not just a plausible checksum.
            let found = self.read_frame(read, seg_end).ok().flatten();
            if found
                .is_some_and(|f| serde_json::from_slice::<Record>(&read.chunk[f.payload]).is_ok())
            {
                let skipped = at - from;
                warn!(
                    "sink {}: skipped {skipped} bytes of corrupt data in segment {} at offset {from}",
                    self.sink, read.at.segment
                );
                metrics::SPOOL_SKIPPED_BYTES
                    .with_label_values(&[&self.sink])
                    .inc_by(skipped);
                read.consumed += skipped;
                return;
            }
            at += 1;
        }
        read.at.offset = from;
        let skipped = seg_end - from;
        warn!(
            "sink {}: skipping {skipped} bytes of torn or corrupt data at the end of segment {} (offset {from})",
            self.sink, read.at.segment
        );
        self.skipped(read, skipped, seg_end, end);
    }

    /// The frame at `read.at` if it is whole and its checksum holds (`None`: torn or corrupt),
    /// reading the segment in chunks that never pass `seg_end`.
    fn read_frame(&self, read: &mut ReadState, seg_end: u64) -> std::io::Result<Option<Found>> {
        let mut need = HEADER;
        loop {
            let at = read.at.offset;
            let chunk_end = read.chunk_start + read.chunk.len() as u64;
            if read.chunk_start <= at && at + need as u64 <= chunk_end {
                let start = (at - read.chunk_start) as usize;
                match check_frame(&read.chunk[start..]) {
                    Checked::Incomplete { need: n } => need = n,
                    Checked::Corrupt(_) => return Ok(None),
                    Checked::Valid {
                        appended_ms, size, ..
                    } => {
                        return Ok(Some(Found {
                            payload: start + HEADER..start + size,
                            appended_ms,
                            size,
                        }))
                    }
                }
            }
            if at + need as u64 > seg_end {
                return Ok(None);
            }
            let want = (seg_end - at).min(READ_CHUNK.max(need) as u64) as usize;
            read.chunk.resize(want, 0);
            let segment = read.at.segment;
            let file = match &mut read.file {
                Some((open, file)) if *open == segment => file,
                slot => {
                    &mut slot
                        .insert((segment, File::open(segment_path(&self.dir, segment))?))
                        .1
                }
            };
            file.read_exact_at(&mut read.chunk, at)?;
            read.chunk_start = at;
        }
    }

    /// The batch taken since the last call (`n` records) is delivered: move the checkpoint past
    /// it and delete the segments left behind.
    pub fn ack(&self, n: usize) {
        let (at, consumed, uncached) = {
            let mut read = lock(&self.read);
            read.oldest_ms = None;
            read.sealed = false;
            let at = read.at;
            read.batch_start = at;
            let uncached = std::mem::replace(&mut read.uncached_to, at);
            self.drop_delivered(read.file.as_ref(), uncached, at);
            (at, std::mem::take(&mut read.consumed), uncached)
        };
        self.sub_records(n as u64);
        if self.spool_bytes.fetch_sub(consumed, Ordering::Relaxed) == consumed {
            // Nothing waits: forget what the estimate of records from a previous run got wrong.
            self.sub_records(u64::MAX);
        }
        metrics::SPOOL_BYTES
            .with_label_values(&[&self.sink])
            .set(self.spool_bytes.load(Ordering::Relaxed) as i64);
        // Should the checkpoint not be written (a full disk), the delivered segments still go:
        // after a restart, reading starts at the first segment that is left (some records may
        // be sent again; none is lost), and deleting them is what frees the space.
        if let Err(e) = write_checkpoint(&self.dir, at) {
            warn!("sink {}: cannot write the checkpoint (records may be sent again after a restart): {e}", self.sink);
        }
        // Segments are left behind only when the batch crossed into a later one. (One that could
        // not be deleted is tried again at the next crossing, and at the next start.)
        if uncached.segment == at.segment {
            return;
        }
        let live = lock(&self.write).end.segment;
        let Ok(segments) = segments(&self.dir) else {
            return;
        };
        for seg in segments {
            if seg < at.segment && seg < live {
                if let Err(e) = std::fs::remove_file(segment_path(&self.dir, seg)) {
                    warn!(
                        "sink {}: cannot delete delivered segment {seg}: {e}",
                        self.sink
                    );
                }
            }
        }
    }

    /// Lets the kernel go of the page cache holding the frames delivered from `from` to `to`, a
    /// batch at a time (called by `ack`). Without this, a segment's cache (up to 64 MiB) is freed in one piece
    /// when its file is deleted and closed, a burst of several ms that holds the core while
    /// answers wait. Pages still dirty or under writeback are left for that final close. A hint
    /// only: nothing is read again from a delivered frame, and a failure changes nothing.
    /// `open` is the reader's open segment, used when it is the one (the common case: a batch
    /// within the segment being read); any other is opened.
    fn drop_delivered(&self, open: Option<&(u64, File)>, from: Position, to: Position) {
        let uncache_in = |segment, offset, len| match open {
            Some((open, file)) if *open == segment => uncache(file, offset, len),
            _ => {
                if let Ok(file) = File::open(segment_path(&self.dir, segment)) {
                    uncache(&file, offset, len);
                }
            }
        };
        if from.segment < to.segment {
            // The rest of the segment left behind (a length of 0 is "to the end").
            uncache_in(from.segment, from.offset, 0);
            uncache_in(to.segment, 0, to.offset);
        } else if from.segment == to.segment && from.offset < to.offset {
            uncache_in(to.segment, from.offset, to.offset - from.offset);
        }
    }

    /// Waits until records may have been appended since the last call.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Age of the oldest record not yet delivered, if one is being delivered now.
    pub fn oldest_age(&self) -> Option<Duration> {
        lock(&self.read).oldest_ms.map(since_ms)
    }

    /// Counts the frames from the read position to the end of the segments before the live one
    /// (what a previous process left) and adds them to the records waiting. With `replace`, the
    /// count replaces the number instead (after a takeover, every segment is counted).
    pub(super) fn count_recovered(&self, replace: bool) {
        let from = lock(&self.read).at;
        let live = lock(&self.write).end.segment;
        let mut n = 0u64;
        for seg in segments(&self.dir).unwrap_or_default() {
            if seg < from.segment || (!replace && seg >= live) {
                continue;
            }
            let Ok(bytes) = std::fs::read(segment_path(&self.dir, seg)) else {
                continue;
            };
            let mut at = if seg == from.segment {
                from.offset as usize
            } else {
                0
            };
            while at + HEADER <= bytes.len() {
                let len =
                    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                if len == 0 {
                    break;
                }
                at += HEADER + len as usize;
                if at <= bytes.len() {
                    n += 1;
                }
            }
        }
        if replace {
            self.records.store(0, Ordering::Relaxed);
        }
        self.add_records(n);
        if n > 0 {
            info!("sink {}: about {n} records wait in the buffer", self.sink);
        }
    }
}

fn next_segment(read: &mut ReadState, skipped: u64) {
    read.consumed += skipped;
    read.at = Position {
        segment: read.at.segment + 1,
        offset: 0,
    };
    read.chunk.clear();
    read.chunk_start = 0;
    read.file = None;
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` on `len` bytes of `file` from `offset` (0: to the end).
/// The kernel drops the whole clean pages in the range.
fn uncache(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: `file` is an open descriptor for the whole call, which only drops cache.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
