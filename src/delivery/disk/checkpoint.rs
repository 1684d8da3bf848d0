//! Where delivery stands, on disk: the checkpoint, the intent of the batch in flight, the log's
//! id, and recovery at start-up (or at takeover) from what a previous process left.
//!
//! - `checkpoint` (`SEGMENT OFFSET`): the first byte not yet delivered. It moves only after the
//!   sink confirmed a batch.
//! - `intent` (`SEGMENT OFFSET SEGMENT OFFSET`): the range of the batch being sent, written and
//!   fsynced before its first send. When it starts at the checkpoint after a restart, that batch
//!   was sent (perhaps) and not confirmed: the reader rebuilds exactly that range first, so the
//!   same records travel again under the same id.
//! - `id`: random, written when the directory is first used; part of every batch id, so two
//!   buffers (two proxies, or a buffer deleted and created again) never give two different batches
//!   the same id.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{segment_path, segments, Position};

pub(super) fn read_checkpoint(dir: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(dir.join("checkpoint")).ok()?;
    let mut parts = text.split_whitespace();
    let segment = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some(Position { segment, offset })
}

/// Moves the checkpoint to `at`, after each delivered batch. The file is overwritten in place
/// with a line of fixed width (42 bytes, inside one disk sector), not replaced by a new file: a
/// replaced inode is freed on every batch, and on a filesystem mounted with `discard` that frees
/// its block with a synchronous discard, a disk round trip per batch. A crash leaves the old line
/// or the new one; should it ever leave neither, reading starts at the first segment (records
/// are sent again, none is lost).
pub(super) fn write_checkpoint(dir: &Path, at: Position) -> std::io::Result<()> {
    let line = format!("{:020} {:020}\n", at.segment, at.offset);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("checkpoint"))?;
    // Every line, of this width or of the earlier variable-width one, is at most 42 bytes: this
    // one covers all of the previous.
    file.write_all_at(line.as_bytes(), 0)
}

/// The range of the batch in flight, as [`write_intent`] left it.
pub(super) fn read_intent(dir: &Path) -> Option<(Position, Position)> {
    let text = std::fs::read_to_string(dir.join("intent")).ok()?;
    let n: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [s1, o1, s2, o2] = n[..] else {
        return None;
    };
    Some((
        Position {
            segment: s1,
            offset: o1,
        },
        Position {
            segment: s2,
            offset: o2,
        },
    ))
}

/// Makes the range `[from, to)` of the batch about to be sent durable: written, fsynced, renamed
/// into place, and the directory fsynced.
pub(super) fn write_intent(dir: &Path, from: Position, to: Position) -> std::io::Result<()> {
    let tmp = dir.join("intent.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(
        f,
        "{} {} {} {}",
        from.segment, from.offset, to.segment, to.offset
    )?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, dir.join("intent"))?;
    File::open(dir)?.sync_all()
}

/// The log's id (16 hex digits), created at first use.
pub(super) fn log_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_owned());
        }
    }
    let id = format!("{:016x}", fastrand::u64(..));
    let tmp = dir.join("id.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{id}")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, path)?;
    Ok(id)
}

/// What recovery found: where reading starts, how many bytes wait from there on, and the range of
/// the batch that was in flight when the previous process stopped (if it starts there).
pub(super) struct Recovered {
    pub start: Position,
    pub spool: u64,
    pub in_flight: Option<(Position, Position)>,
}

/// For the owner of the buffer: deletes the segments before the checkpoint and says where
/// reading starts.
pub(super) fn recover(dir: &Path) -> std::io::Result<Recovered> {
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
    let in_flight =
        read_intent(dir).filter(|(from, to)| (*from == checkpoint || *from == start) && to > from);
    Ok(Recovered {
        start,
        spool,
        in_flight,
    })
}
