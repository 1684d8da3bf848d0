//! The disk buffer as a whole: appends, reads, restarts, rotation, takeover, full buffers.

use std::fs::OpenOptions;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::delivery::DeliveryError;
use crate::record::{Record, RecordBody, RecordRef};
use crate::sink::{Batch, EncodedRecords};
use crate::units::HumanDuration;

/// A small record numbered `i` (its `time` and its one column).
pub(super) fn record(i: usize) -> Record {
    Record {
        database: "web".into(),
        table: "t".into(),
        body: RecordBody {
            time: i as i64,
            columns: [("i".to_string(), i.to_string())].into_iter().collect(),
        },
    }
}

/// `DiskLog::push` of owned records.
async fn push(log: &DiskLog, records: &[Record]) -> Result<(), DeliveryError> {
    let borrowed: Vec<RecordRef<'_>> = records.iter().map(RecordRef::from).collect();
    log.push(&borrowed).await
}

/// `DiskLog::take`, with the records decoded for the assertions (as a sink asking for them gets
/// them).
trait TakeRecords {
    fn take_records(&self, batch: &mut Vec<Record>, max_records: usize, max_bytes: usize) -> usize;
}

impl TakeRecords for DiskLog {
    fn take_records(&self, batch: &mut Vec<Record>, max_records: usize, max_bytes: usize) -> usize {
        let mut encoded = EncodedRecords::new("main");
        let n = self.take(
            &mut encoded,
            max_records.saturating_sub(batch.len()),
            max_bytes,
        );
        batch.extend_from_slice(Batch::encoded(&encoded, String::new()).records());
        n
    }
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
    while log.take_records(&mut batch, 1000, 1 << 20) > 0 {}
    batch.iter().map(|r| r.body.time).collect()
}

/// Appends the records `range`, each alone (one frame each).
async fn push_each(log: &DiskLog, range: Range<usize>) {
    for i in range {
        push(log, &[record(i)]).await.unwrap();
    }
}

/// Acknowledges what was taken, checks that nothing is left on disk, and closes.
fn ack_all_and_close(log: &DiskLog, n: usize) {
    log.ack(n);
    assert_eq!(log.spool_bytes(), 0);
    log.close();
}

/// A buffer under `dir` given the records `0..n`, one frame each.
async fn open_with(dir: &Path, n: usize) -> Arc<DiskLog> {
    let log = open(dir, 1 << 30);
    push_each(&log, 0..n).await;
    log
}

/// A buffer under `dir` that was given the records `0..n`, one frame each, then closed: its
/// segment and the segment's bytes, to damage.
async fn closed_segment(dir: &Path, n: usize) -> (PathBuf, Vec<u8>) {
    let log = open_with(dir, n).await;
    log.close();
    drop(log);
    let seg = segment_path(&dir.join("main"), 1);
    let bytes = std::fs::read(&seg).unwrap();
    (seg, bytes)
}

#[tokio::test]
async fn appends_read_back_and_resume_at_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(dir.path(), 10).await;
    let mut batch = Vec::new();
    assert_eq!(log.take_records(&mut batch, 4, 1 << 20), 4);
    log.ack(0);
    assert_eq!(log.take_records(&mut Vec::new(), 3, 1 << 20), 3); // taken, never acknowledged
    log.close();
    drop(log);

    // After a restart the unacknowledged records come again; new appends follow them.
    let log = open(dir.path(), 1 << 30);
    push(&log, &[record(10), record(11)]).await.unwrap();
    assert_eq!(take_all(&log), (4..12).collect::<Vec<_>>());
    ack_all_and_close(&log, 0);
}

#[tokio::test]
async fn torn_tail_is_skipped_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 30);
    push(&log, &(0..3).map(record).collect::<Vec<_>>())
        .await
        .unwrap();
    log.close();
    drop(log);
    // A crash in the middle of a write: half a frame at the end of the segment.
    let seg = segment_path(&dir.path().join("main"), 1);
    let mut half = Vec::new();
    encode_frame(&RecordRef::from(&record(99)), 1, &mut half);
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&half[..half.len() / 2]).unwrap();
    drop(f);

    let log = open(dir.path(), 1 << 30);
    push(&log, &[record(3)]).await.unwrap();
    assert_eq!(take_all(&log), vec![0, 1, 2, 3]);
    ack_all_and_close(&log, 0);
}

#[tokio::test]
async fn segments_rotate_and_delivered_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_segments(dir.path(), 1 << 30, 200);
    push_each(&log, 0..20).await;
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
    log.ack(0);
    assert!(count() <= 2, "delivered segments deleted");
    // Their space is freed: once the fsync thread has synced the segments rotated away from
    // (every 50 ms here), no deleted one is held open, by the writer or by the reader.
    let held = || -> Vec<String> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .filter(|target| target.starts_with(&*dir.path().to_string_lossy()))
            .filter(|target| target.ends_with("(deleted)"))
            .collect()
    };
    for _ in 0..100 {
        if held().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held(), Vec::<String>::new(), "deleted segments still open");
    log.close();
}

#[tokio::test]
async fn a_second_process_appends_and_takes_over_when_the_first_exits() {
    let dir = tempfile::tempdir().unwrap();
    let old = open(dir.path(), 1 << 30);
    push(&old, &[record(0), record(1)]).await.unwrap();
    // The new process during an upgrade: the lock is held, so it appends but does not read.
    let new = open(dir.path(), 1 << 30);
    push(&new, &[record(2)]).await.unwrap();
    assert_eq!(take_all(&new), Vec::<i64>::new());
    push(&old, &[record(3)]).await.unwrap();
    // The old one delivers part of its records, then exits.
    let mut batch = Vec::new();
    old.take_records(&mut batch, 1, 1 << 20);
    old.ack(0);
    old.close();
    drop(old); // releases the lock
    push(&new, &[record(4)]).await.unwrap();
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
    ack_all_and_close(&new, 0);
}

#[tokio::test]
async fn full_buffer_refuses_and_drop_counts() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 300);
    let mut refused = 0;
    for i in 0..10 {
        if push(&log, &[record(i)]).await == Err(DeliveryError::Full) {
            refused += 1;
        }
    }
    assert!(refused > 0);
    let accepted = take_all(&log);
    assert_eq!(accepted.len(), 10 - refused);
    log.ack(0);
    assert!(
        push(&log, &[record(50)]).await.is_ok(),
        "room again once delivered"
    );
    log.close();
}

#[tokio::test]
async fn a_flipped_bit_mid_segment_skips_only_the_damaged_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = closed_segment(dir.path(), 10).await;
    // Flip a bit in the payload of the fourth frame.
    let frame = bytes.len() / 10;
    bytes[3 * frame + HEADER + 5] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();

    let before = metrics::SPOOL_SKIPPED_BYTES
        .with_label_values(&["main"])
        .get();
    let log = open(dir.path(), 1 << 30);
    push(&log, &[record(10)]).await.unwrap();
    let mut want: Vec<i64> = (0..11).filter(|i| *i != 3).collect();
    want.sort();
    assert_eq!(take_all(&log), want);
    let skipped = metrics::SPOOL_SKIPPED_BYTES
        .with_label_values(&["main"])
        .get()
        - before;
    assert!(skipped >= frame as u64, "counted {skipped} skipped bytes");
    ack_all_and_close(&log, 10);
}

#[tokio::test]
async fn a_damaged_length_does_not_cost_the_rest_of_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = closed_segment(dir.path(), 6).await;
    let frame = bytes.len() / 6;
    // A plausible length that runs past the segment's end.
    bytes[frame + 2] = 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let log = open(dir.path(), 1 << 30);
    assert_eq!(take_all(&log), vec![0, 2, 3, 4, 5]);
    log.close();
}

#[tokio::test]
async fn the_batch_in_flight_is_rebuilt_with_its_id_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(dir.path(), 5).await;
    let mut batch = Vec::new();
    log.take_records(&mut batch, 2, 1 << 20);
    let (first, written) = log.seal(true);
    written.unwrap();
    log.ack(2);
    let mut batch = Vec::new();
    log.take_records(&mut batch, 2, 1 << 20);
    assert_eq!(
        log.take_records(&mut batch, 3, 1 << 20),
        1,
        "not sealed yet"
    );
    let (id, written) = log.seal(true);
    written.unwrap();
    assert_ne!(id, first);
    assert_eq!(
        log.take_records(&mut batch, 10, 1 << 20),
        0,
        "sealed: nothing joins"
    );
    let sent: Vec<i64> = batch.iter().map(|r| r.body.time).collect();
    assert_eq!(sent, vec![2, 3, 4]);
    log.close(); // then a crash: the batch was sent, never acknowledged
    drop(log);

    // Records arrive after the restart; the first batch is still exactly the one in flight.
    let log = open(dir.path(), 1 << 30);
    push_each(&log, 5..8).await;
    let mut again = Vec::new();
    log.take_records(&mut again, 1, 1 << 20);
    assert_eq!(log.take_records(&mut again, 1000, 1 << 20), 0);
    assert_eq!(again.iter().map(|r| r.body.time).collect::<Vec<_>>(), sent);
    assert_eq!(log.seal(true).0, id);
    log.ack(3);
    assert_eq!(take_all(&log), vec![5, 6, 7]);
    let (next, _) = log.seal(true);
    assert_ne!(next, id);
    log.close();
}

#[tokio::test]
async fn without_stable_ids_no_intent_is_written_and_a_crash_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 30);
    push_each(&log, 0..5).await;
    let mut sent = Vec::new();
    assert_eq!(log.take_records(&mut sent, 3, 1 << 20), 3);
    log.seal(false).1.unwrap();
    assert!(
        !dir.path().join("intent").exists(),
        "no intent without stable ids"
    );
    assert_eq!(
        log.take_records(&mut sent, 9, 1 << 20),
        0,
        "sealed: nothing joins"
    );
    log.close(); // a crash: the batch was sent, never acknowledged
    drop(log);

    // The same records come again (in batches cut by the limits), none lost.
    let restarted = open(dir.path(), 1 << 30);
    let times = take_all(&restarted);
    restarted.close();
    assert_eq!(
        times,
        vec![0, 1, 2, 3, 4],
        "every record again after the crash"
    );
}

#[tokio::test]
async fn a_record_beyond_the_frame_limit_is_refused_before_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 30);
    let mut big = record(1);
    big.body
        .columns
        .insert("blob".into(), "x".repeat(MAX_FRAME_PAYLOAD));
    assert_eq!(push(&log, &[big]).await, Err(DeliveryError::TooLarge));
    assert_eq!(log.spool_bytes(), 0);
    push(&log, &[record(2)]).await.unwrap();
    assert_eq!(take_all(&log), vec![2]);
    log.close();
}

#[test]
fn the_checkpoint_is_overwritten_in_place_and_an_earlier_line_is_still_read() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint");
    let at = |segment, offset| Position { segment, offset };
    // The variable-width line earlier versions wrote, the longest one among them.
    for (earlier, want) in [
        ("7 123456\n".to_string(), at(7, 123456)),
        (
            format!("{} {}\n", u64::MAX, u64::MAX),
            at(u64::MAX, u64::MAX),
        ),
    ] {
        std::fs::write(&path, &earlier).unwrap();
        assert_eq!(checkpoint::read_checkpoint(dir.path()), Some(want));
        let inode = std::fs::metadata(&path).unwrap().ino();
        checkpoint::write_checkpoint(dir.path(), at(3, 9)).unwrap();
        assert_eq!(checkpoint::read_checkpoint(dir.path()), Some(at(3, 9)));
        // The same file, not a new one put in its place; one fixed-width line, nothing left over.
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "00000000000000000003 00000000000000000009\n"
        );
    }
    assert!(!dir.path().join("checkpoint.tmp").exists());
}
