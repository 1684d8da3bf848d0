//! A sink that is its own buffer: with `buffer: disk`, the records for a [`LocalLog`] sink (the
//! `file` sink) are appended to its file before the answer, not to a disk buffer that a lane
//! would copy them from afterwards. Each record is written once, and no lane runs for the sink.
//!
//! Appends use the disk buffer's group commit: the first request of a group yields once, so that
//! every request the runtime has ready joins it, then writes the whole group with one `write(2)`
//! and wakes the others. Durability follows `delivery.fsync` as for the buffer: before the
//! answer (`always`), or by a small thread on an interval that also starts the file's writeback
//! every [`WRITEBACK_STEP`]. A failed append is answered 503 and counted
//! (`delivery_buffer_write_errors_total`); until one succeeds again, `/readyz` says 503, and a
//! probe file beside the sink's file says when there is space again.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use prometheus::IntCounter;
use tokio::sync::watch;

use super::disk::writer::{LOG_INTERVAL, WRITEBACK_STEP};
use super::group::{lead_or_wait, space_is_back, Outcome};
use super::status::SinkState;
use super::{DeliveryError, FsyncPolicy};
use crate::metrics;
use crate::record::RecordRef;
use crate::sink::LocalLog;
use crate::sync::lock;

/// The largest group buffer kept for the next group.
const MAX_SPARE: usize = 1 << 20;

thread_local! {
    /// The lines of one append, encoded before the group's lock is taken.
    static LINES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The group being formed, and the appends' bookkeeping.
struct Pending {
    lines: Vec<u8>,
    records: u64,
    done: watch::Sender<Outcome>,
    /// A request has taken the lead of this group and will write it.
    led: bool,
    closed: bool,
    /// The last written group's buffer, emptied, for the next group.
    spare: Vec<u8>,
    /// Written since the last fsync / since the last start of writeback.
    dirty: bool,
    unflushed: bool,
    /// Failed appends since the last log line about them, and when that line was.
    logged: Option<Instant>,
    suppressed: u64,
}

/// One sink's records, appended straight to its [`LocalLog`] (see [`crate::sink::LogSink::local_log`]).
pub struct DirectLog {
    name: String,
    log: Arc<dyn LocalLog>,
    fsync: FsyncPolicy,
    state: Arc<SinkState>,
    /// `postback_records_total{sink, result}` for `accepted` and `delivered`, resolved once.
    accepted: IntCounter,
    delivered: IntCounter,
    pending: Mutex<Pending>,
    /// Orders the groups' writes (taken before `pending`, never the other way round).
    writing: Mutex<()>,
    /// The last append failed: not ready until one succeeds (or the probe finds space).
    failing: AtomicBool,
    /// When [`DirectLog::writable`] last probed for space (its own lock: the probe writes a
    /// file, and appends must not wait for it).
    probed: Mutex<Option<Instant>>,
    sync_wake: Condvar,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
}

impl DirectLog {
    /// Appends for sink `name` go to `log`, the sink's own file.
    pub fn new(
        name: &str,
        log: Arc<dyn LocalLog>,
        fsync: FsyncPolicy,
        state: Arc<SinkState>,
    ) -> DirectLog {
        DirectLog {
            name: name.to_owned(),
            log,
            fsync,
            state,
            accepted: metrics::RECORDS.with_label_values(&[name, "accepted"]),
            delivered: metrics::RECORDS.with_label_values(&[name, "delivered"]),
            pending: Mutex::new(Pending {
                lines: Vec::new(),
                records: 0,
                done: watch::channel(None).0,
                led: false,
                closed: false,
                spare: Vec::new(),
                dirty: false,
                unflushed: false,
                logged: None,
                suppressed: 0,
            }),
            probed: Mutex::new(None),
            writing: Mutex::new(()),
            failing: AtomicBool::new(false),
            sync_wake: Condvar::new(),
            sync_thread: Mutex::new(None),
        }
    }

    /// Starts the fsync thread (with an fsync interval); called once from the delivery start.
    pub fn start_threads(self: &Arc<Self>) -> std::io::Result<()> {
        if let FsyncPolicy::Every(interval) = self.fsync {
            let log = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("fsync-{}", self.name))
                .spawn(move || log.sync_loop(interval.0))?;
            *lock(&self.sync_thread) = Some(handle);
        }
        Ok(())
    }

    /// Appends `records` as JSON lines: returns once they are written to the file (and fsynced
    /// with `fsync: always`). All or none are taken.
    pub async fn push(&self, records: &[RecordRef<'_>]) -> Result<(), DeliveryError> {
        let joined = LINES.with_borrow_mut(|lines| {
            lines.clear();
            lines.reserve(records.iter().map(|r| r.approx_len() + 1).sum());
            for record in records {
                record.write_json(lines);
                lines.push(b'\n');
            }
            let joined = self.join_group(lines, records.len() as u64);
            if lines.capacity() > MAX_SPARE {
                *lines = Vec::new();
            }
            joined
        });
        let (done, lead) = joined?;
        // Should the leader be cancelled before it wrote its group, the guard writes it.
        let lead = lead.then(|| (LeadGuard(self), self.commit()));
        let result = lead_or_wait(done, lead, "the sink was closed").await;
        result.map_err(|_| {
            metrics::BUFFER_WRITE_ERRORS
                .with_label_values(&[&self.name])
                .inc();
            DeliveryError::Failed
        })
    }

    fn join_group(
        &self,
        lines: &[u8],
        n: u64,
    ) -> Result<(watch::Receiver<Outcome>, bool), DeliveryError> {
        let mut pending = lock(&self.pending);
        if pending.closed {
            return Err(DeliveryError::Closed);
        }
        pending.lines.extend_from_slice(lines);
        pending.records += n;
        let lead = !std::mem::replace(&mut pending.led, true);
        Ok((pending.done.subscribe(), lead))
    }

    /// Writes the pending group (the leader's job), fsyncs it with `fsync: always`, and wakes
    /// everyone waiting for it.
    async fn commit(&self) {
        let (done, mut result) = self.write_pending();
        if result.is_ok() && self.fsync == FsyncPolicy::Always {
            let log = self.log.clone();
            result = match tokio::task::spawn_blocking(move || log.sync()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Arc::from(format!("fsync failed: {e}"))),
                Err(e) => Err(Arc::from(format!("fsync failed: {e}"))),
            };
        }
        let _ = done.send(Some(result));
    }

    /// Takes the pending group and appends it. Returns whom to wake, and the result.
    fn write_pending(&self) -> (watch::Sender<Outcome>, Result<(), Arc<str>>) {
        let _writing = lock(&self.writing);
        let (mut lines, records, done) = {
            let mut pending = lock(&self.pending);
            pending.led = false;
            let spare = std::mem::take(&mut pending.spare);
            let lines = std::mem::replace(&mut pending.lines, spare);
            let records = std::mem::take(&mut pending.records);
            let done = std::mem::replace(&mut pending.done, watch::channel(None).0);
            (lines, records, done)
        };
        let result = if lines.is_empty() {
            Ok(())
        } else {
            self.log.append(&lines)
        };
        lines.clear();
        let mut pending = lock(&self.pending);
        if lines.capacity() <= MAX_SPARE {
            pending.spare = lines;
        }
        let result = match result {
            Ok(()) => {
                pending.dirty |= records > 0;
                pending.unflushed |= records > 0;
                drop(pending);
                if records > 0 {
                    self.appended(records);
                }
                Ok(())
            }
            Err(e) => {
                let message = format!("cannot append to the file: {e}");
                self.log_failure(&mut pending, &message);
                drop(pending);
                self.state.batch_failed(&message);
                Err(Arc::from(message))
            }
        };
        (done, result)
    }

    /// `records` were appended: they are accepted and, the file being the sink, delivered.
    fn appended(&self, records: u64) {
        self.accepted.inc_by(records);
        self.delivered.inc_by(records);
        self.state.batch_delivered(records as usize);
        if self.failing.swap(false, Ordering::Relaxed) {
            info!("sink {}: appending works again", self.name);
        }
    }

    /// Logs a failed append, at most once per [`LOG_INTERVAL`] with the count of those not logged.
    fn log_failure(&self, pending: &mut Pending, message: &str) {
        self.failing.store(true, Ordering::Relaxed);
        if pending.logged.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            pending.suppressed += 1;
            return;
        }
        pending.logged = Some(Instant::now());
        let suppressed = std::mem::take(&mut pending.suppressed);
        error!(
            "sink {}: {message}; answering 503 until it works again ({suppressed} more failed appends since the last message)",
            self.name
        );
    }

    /// `false` while appends fail (a full disk). At most once a second while failing, tries to
    /// write a small file beside the sink's file: when that works, space is back and this says
    /// `true` again (the next append confirms it).
    pub fn writable(&self) -> bool {
        if !self.failing.load(Ordering::Relaxed) {
            return true;
        }
        let probe = self.log.dir().join(format!(".{}.space.probe", self.name));
        let ok = space_is_back(&mut lock(&self.probed), &probe);
        if ok {
            self.failing.store(false, Ordering::Relaxed);
        }
        ok
    }

    /// Refuses further appends, writes and fsyncs what is pending and stops the fsync thread.
    /// Runs at shutdown, after the server stopped answering.
    pub fn close(&self) {
        lock(&self.pending).closed = true;
        let (done, result) = self.write_pending();
        let _ = done.send(Some(result));
        self.sync_wake.notify_all();
        if let Some(handle) = lock(&self.sync_thread).take() {
            let _ = handle.join();
        }
        if let Err(e) = self.log.sync() {
            error!("sink {}: fsync at shutdown failed: {e}", self.name);
        }
    }

    /// The fsync thread (`fsync: 1s` and the like): fsyncs what was appended, every `interval`,
    /// and while appends come in, starts their writeback every [`WRITEBACK_STEP`].
    fn sync_loop(&self, interval: Duration) {
        let mut next_sync = Instant::now() + interval;
        loop {
            let (closing, dirty, unflushed) = {
                let pending = lock(&self.pending);
                let until_sync = next_sync.saturating_duration_since(Instant::now());
                let wait = if pending.unflushed {
                    until_sync.min(WRITEBACK_STEP)
                } else {
                    until_sync
                };
                let (mut pending, _) = self
                    .sync_wake
                    .wait_timeout_while(pending, wait, |p| !p.closed)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                let syncing = pending.closed || now >= next_sync;
                let dirty = syncing && std::mem::take(&mut pending.dirty);
                let unflushed = std::mem::take(&mut pending.unflushed);
                (pending.closed, dirty, unflushed)
            };
            if dirty {
                next_sync = Instant::now() + interval;
                if let Err(e) = self.log.sync() {
                    error!("sink {}: fsync failed: {e}", self.name);
                }
            } else if unflushed {
                self.log.start_writeback();
            }
            if Instant::now() >= next_sync {
                next_sync = Instant::now() + interval;
            }
            if closing {
                return;
            }
        }
    }
}

/// Writes the pending group if its leader is dropped before it did (a cancelled request), so the
/// other requests of the group are not left waiting.
struct LeadGuard<'a>(&'a DirectLog);

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let (done, mut result) = self.0.write_pending();
        if result.is_ok() && self.0.fsync == FsyncPolicy::Always {
            result = self
                .0
                .log
                .sync()
                .map_err(|e| Arc::from(format!("fsync failed: {e}")));
        }
        let _ = done.send(Some(result));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{BufferKind, Delivery, DeliveryConfig};
    use super::*;
    use crate::sink::{FileSink, FileSinkConfig, LogSink};
    use crate::units::ByteSize;

    fn file_sink(path: &Path, max_bytes: ByteSize, via_buffer: bool) -> Box<dyn LogSink> {
        let mut cfg = FileSinkConfig {
            path: path.to_path_buf(),
            via_buffer,
            ..FileSinkConfig::default()
        };
        cfg.rotate.max_bytes = max_bytes;
        Box::new(FileSink::open(&cfg).unwrap())
    }

    fn open(dir: &Path, name: &str, sink: Box<dyn LogSink>) -> Delivery {
        let cfg = DeliveryConfig {
            buffer: BufferKind::Disk,
            dir: dir.join("buffer"),
            ..DeliveryConfig::default()
        };
        Delivery::open(&cfg, vec![(name.to_owned(), sink)]).unwrap()
    }

    fn record(i: i64) -> RecordRef<'static> {
        RecordRef::new("web", "t", i, vec![("i".into(), i.to_string().into())])
    }

    fn line(i: i64) -> String {
        let mut json = Vec::new();
        record(i).write_json(&mut json);
        String::from_utf8(json).unwrap()
    }

    fn lines_in(dir: &Path) -> Vec<String> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'), "whole lines only");
            all.extend(text.lines().map(str::to_owned));
        }
        all.sort();
        all
    }

    #[tokio::test]
    async fn an_accepted_record_is_in_the_file_before_the_answer_and_no_buffer_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/events.jsonl");
        let delivery = open(
            dir.path(),
            "direct-file",
            file_sink(&path, ByteSize::mib(1), false),
        );
        // Not even started: no lane runs for this sink.
        delivery.accept(0, &[record(1), record(2)]).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n{}\n", line(1), line(2))
        );
        assert!(!dir.path().join("buffer/direct-file").exists());
        let status = &delivery.sinks_status()[0];
        assert_eq!(
            (status.state, status.delivered, status.records_waiting),
            ("up", 2, 0)
        );
        assert!(delivery.ready());
        delivery.start().unwrap();
        delivery.accept(0, &[record(3)]).await.unwrap();
        delivery.finish(Duration::from_secs(1));
        assert_eq!(
            delivery.accept(0, &[record(4)]).await,
            Err(DeliveryError::Closed)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_make_whole_lines_rotated_by_size_between_lines() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Room for a few lines per file: groups are cut between lines across files.
        let sink = file_sink(&out.join("events.jsonl"), ByteSize(300), false);
        let delivery = Arc::new(open(dir.path(), "direct-rotate", sink));
        delivery.start().unwrap();
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let delivery = delivery.clone();
                tokio::spawn(async move { delivery.accept(0, &[record(i)]).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        delivery.finish(Duration::from_secs(1));
        let mut expected: Vec<String> = (0..400).map(line).collect();
        expected.sort();
        assert_eq!(lines_in(&out), expected);
        let files = std::fs::read_dir(&out).unwrap().count();
        assert!(files >= 50, "rotated by size: {files} files");
        for entry in std::fs::read_dir(&out).unwrap() {
            assert!(entry.unwrap().metadata().unwrap().len() <= 300);
        }
    }

    #[tokio::test]
    async fn records_left_in_the_buffer_go_through_it_and_the_next_start_is_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // An earlier run, through the buffer, whose lane never ran: two records wait on disk.
        let earlier = open(
            dir.path(),
            "left-over",
            file_sink(&path, ByteSize::mib(1), true),
        );
        earlier.accept(0, &[record(1), record(2)]).await.unwrap();
        drop(earlier);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");

        let delivery = open(
            dir.path(),
            "left-over",
            file_sink(&path, ByteSize::mib(1), false),
        );
        delivery.accept(0, &[record(3)]).await.unwrap();
        delivery.start().unwrap();
        delivery.finish(Duration::from_secs(5));
        drop(delivery);
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines, vec![line(1), line(2), line(3)]);

        let next = open(
            dir.path(),
            "left-over",
            file_sink(&path, ByteSize::mib(1), false),
        );
        next.accept(0, &[record(4)]).await.unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with(&format!("{}\n", line(4))),
            "appended before the answer: the buffer is empty now"
        );
        next.finish(Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_failed_append_is_refused_counted_and_shown() {
        let dir = tempfile::tempdir().unwrap();
        // Every write to /dev/full fails with "no space left on device".
        let delivery = open(
            dir.path(),
            "direct-full",
            file_sink(Path::new("/dev/full"), ByteSize::mib(1), false),
        );
        let errors = metrics::BUFFER_WRITE_ERRORS.with_label_values(&["direct-full"]);
        let before = errors.get();
        assert_eq!(
            delivery.accept(0, &[record(1)]).await,
            Err(DeliveryError::Failed)
        );
        assert_eq!(errors.get(), before + 1);
        let status = &delivery.sinks_status()[0];
        assert_eq!(
            (status.state, status.delivered, status.failed),
            ("down", 0, 1)
        );
        assert!(status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left")));
        delivery.finish(Duration::from_secs(1));
    }
}
