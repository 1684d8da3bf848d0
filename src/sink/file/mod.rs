//! `type: file`: JSON lines appended to a file, rotated by size and age.
//!
//! Rotation renames the current file to `NAME-YYYYMMDDTHHMMSSZ.EXT` (with `-N` added if that exists)
//! and starts a new one. It happens only between records, so a line is never split across files; a
//! single record larger than `max_bytes` gets a file of its own. Age is checked when records
//! arrive, so a quiet file may stay open past its interval until the next record.
//!
//! The file is written in one of two ways. With `delivery.buffer: disk` it is its own buffer
//! ([`LogSink::local_log`]): requests append their lines through `delivery::direct`, and an fsync
//! thread there calls [`LocalLog::sync`]. Otherwise (`buffer: memory`, or `via_buffer: true`) the
//! sink's lane hands it batches ([`LogSink::write_batch`]), each appended and fsynced before the
//! lane moves on. A file rotated away is fsynced by the next sync in either case.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use log::warn;

mod config;

pub use config::{FileSinkConfig, RotateConfig};

use super::{Batch, LocalLog, LogSink, Rejection, SinkError};
use crate::sync::lock;

struct Current {
    file: File,
    written: u64,
    opened: Instant,
}

/// An append-only JSON lines file.
pub struct FileSink {
    log: Arc<FileLog>,
    /// `via_buffer: true`: not offered as a [`LocalLog`], so records go through the disk buffer.
    via_buffer: bool,
}

/// The file itself: appends, rotation and fsync, for the sink's lane ([`LogSink::write_batch`])
/// and for delivery's direct appends ([`LocalLog`]).
struct FileLog {
    path: PathBuf,
    /// The directory the file is in.
    dir: PathBuf,
    max_bytes: u64,
    interval: Option<Duration>,
    current: Mutex<Current>,
    /// Files rotated away and not yet fsynced: [`LocalLog::sync`] does it, so that a rotation
    /// never waits for the disk while a request waits for its append.
    retired: Mutex<Vec<File>>,
}

impl FileSink {
    /// Opens (creating the directory and file if needed) the file for appending.
    pub fn open(cfg: &FileSinkConfig) -> std::io::Result<FileSink> {
        let dir = match cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                dir.to_path_buf()
            }
            None => PathBuf::from("."),
        };
        let mut current = open_current(&cfg.path)?;
        end_torn_line(&mut current, &cfg.path)?;
        let log = FileLog {
            path: cfg.path.clone(),
            dir,
            max_bytes: cfg.rotate.max_bytes.0,
            interval: cfg.rotate.interval.map(|i| i.0),
            current: Mutex::new(current),
            retired: Mutex::new(Vec::new()),
        };
        Ok(FileSink {
            log: Arc::new(log),
            via_buffer: cfg.via_buffer,
        })
    }
}

impl FileLog {
    /// Moves to a new file; the old one is fsynced by the next [`LocalLog::sync`].
    fn rotate(&self, current: &mut Current) -> std::io::Result<()> {
        std::fs::rename(&self.path, rotated_name(&self.path))?;
        let old = std::mem::replace(current, open_current(&self.path)?);
        lock(&self.retired).push(old.file);
        Ok(())
    }

    /// Writes `data` with one `write(2)`; on failure, cuts the file back so no partial line
    /// stays behind.
    fn write(current: &mut Current, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Err(e) = current.file.write_all(data) {
            let _ = current.file.set_len(current.written);
            return Err(e);
        }
        current.written += data.len() as u64;
        Ok(())
    }

    /// Appends whole `lines`, rotating by age first, and by size between two lines: as many
    /// lines go into one write as fit the file's `max_bytes` (at least one into an empty file).
    fn append_lines(&self, current: &mut Current, mut lines: &[u8]) -> std::io::Result<()> {
        if self
            .interval
            .is_some_and(|i| current.written > 0 && current.opened.elapsed() >= i)
        {
            self.rotate(current)?;
        }
        while !lines.is_empty() {
            let room = self.max_bytes.saturating_sub(current.written);
            let take = if lines.len() as u64 <= room {
                lines.len()
            } else {
                let fit = &lines[..room as usize];
                match fit.iter().rposition(|&b| b == b'\n') {
                    Some(end) => end + 1,
                    None if current.written == 0 => lines
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(lines.len(), |end| end + 1),
                    None => 0,
                }
            };
            Self::write(current, &lines[..take])?;
            lines = &lines[take..];
            if !lines.is_empty() {
                self.rotate(current)?;
            }
        }
        Ok(())
    }

    fn write_batch(&self, batch: &Batch<'_>) -> std::io::Result<()> {
        let mut lines = Vec::with_capacity(batch.len() * 256);
        batch.write_json_lines(&mut lines);
        self.append(&lines)?;
        self.sync()
    }
}

impl LocalLog for FileLog {
    fn append(&self, lines: &[u8]) -> std::io::Result<()> {
        let mut current = lock(&self.current);
        self.append_lines(&mut current, lines)
    }

    fn sync(&self) -> std::io::Result<()> {
        let mut retired = std::mem::take(&mut *lock(&self.retired));
        while let Some(file) = retired.last() {
            if let Err(e) = file.sync_data() {
                // Kept for the next sync, which tries them again.
                lock(&self.retired).append(&mut retired);
                return Err(e);
            }
            retired.pop();
        }
        let file = lock(&self.current).file.try_clone()?;
        file.sync_data()
    }

    fn start_writeback(&self) {
        #[cfg(target_os = "linux")]
        if let Ok(file) = lock(&self.current).file.try_clone() {
            use std::os::fd::AsRawFd;
            // SAFETY: `file` is an open descriptor owned for the whole call; the range (0, 0)
            // means the whole file, and the call only starts writeback of its dirty pages. A
            // failure is harmless: the next sync writes what this did not, and reports.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

fn open_current(path: &Path) -> std::io::Result<Current> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let written = file.metadata()?.len();
    Ok(Current {
        file,
        written,
        opened: Instant::now(),
    })
}

/// Ends the file's last line when it has no `\n` (a crash in mid-write, or a power loss inside
/// the fsync interval): the torn line stays as it was, and the next line starts on its own
/// instead of being glued to it.
fn end_torn_line(current: &mut Current, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if current.written == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    current.file.read_exact_at(&mut last, current.written - 1)?;
    if last[0] != b'\n' {
        warn!(
            "{} ends in a torn line (a crash in mid-write?); ending it, so that the next record starts a line of its own",
            path.display()
        );
        FileLog::write(current, b"\n")?;
    }
    Ok(())
}

/// `events.jsonl` -> `events-20261127T150405Z.jsonl`, or `...Z-1.jsonl` when that exists.
fn rotated_name(path: &Path) -> PathBuf {
    let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut n = 0;
    loop {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let candidate = path.with_file_name(format!("{stem}-{stamp}{suffix}{ext}"));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

#[async_trait]
impl LogSink for FileSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        self.log
            .write_batch(batch)
            .map_err(|e| SinkError::io(format!("cannot write {}", self.log.path.display()), e))?;
        Ok(Vec::new())
    }

    async fn close(&self) -> Result<(), SinkError> {
        self.log
            .sync()
            .map_err(|e| SinkError::io(format!("cannot sync {}", self.log.path.display()), e))
    }

    fn local_log(&self) -> Option<Arc<dyn LocalLog>> {
        if self.via_buffer {
            None
        } else {
            Some(self.log.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::sink::test_support::{test_record, write};
    use crate::units::{ByteSize, HumanDuration};

    fn record(i: usize) -> Record {
        test_record("web", "t", 1, &[("i", &format!("{i:04}"))])
    }

    fn config(
        path: PathBuf,
        max_bytes: ByteSize,
        interval: Option<HumanDuration>,
    ) -> FileSinkConfig {
        FileSinkConfig {
            path,
            rotate: RotateConfig {
                max_bytes,
                interval,
            },
            via_buffer: false,
        }
    }

    fn lines_in(dir: &Path) -> (usize, Vec<String>) {
        let mut all = Vec::new();
        let mut files = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            files += 1;
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(text.ends_with('\n'), "a file ends with a whole line");
            all.extend(text.lines().map(str::to_owned));
        }
        all.sort();
        (files, all)
    }

    #[tokio::test]
    async fn appends_and_rotates_by_size_without_splitting_lines() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path().join("out/events.jsonl"), ByteSize(200), None);
        let sink = FileSink::open(&cfg).unwrap();
        let batch: Vec<Record> = (0..10).map(record).collect();
        write(&sink, &batch[..7]).await.unwrap();
        write(&sink, &batch[7..]).await.unwrap();
        sink.close().await.unwrap();
        let (files, lines) = lines_in(&dir.path().join("out"));
        let mut one = Vec::new();
        batch[0].to_json_line(&mut one);
        let per_file = 200 / one.len();
        assert!(per_file >= 2);
        assert_eq!(files, 10_usize.div_ceil(per_file));
        let expected: Vec<String> = batch
            .iter()
            .map(|r| {
                let mut v = Vec::new();
                r.to_json_line(&mut v);
                String::from_utf8(v).unwrap().trim_end().to_owned()
            })
            .collect();
        assert_eq!(lines, expected);
        for entry in std::fs::read_dir(dir.path().join("out")).unwrap() {
            assert!(entry.unwrap().metadata().unwrap().len() <= 200);
        }
    }

    #[tokio::test]
    async fn a_torn_last_line_is_ended_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"tor").unwrap();
        let sink = FileSink::open(&config(path.clone(), ByteSize::mib(1), None)).unwrap();
        write(&sink, &[record(1)]).await.unwrap();
        let mut one = Vec::new();
        record(1).to_json_line(&mut one);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("{{\"a\":1}}\n{{\"tor\n{}", String::from_utf8(one).unwrap())
        );
        // A file that ends well is left as it is.
        drop(sink);
        let sink = FileSink::open(&config(path.clone(), ByteSize::mib(1), None)).unwrap();
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[tokio::test]
    async fn rotates_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path().join("events.jsonl"),
            ByteSize::mib(1),
            Some(HumanDuration::millis(1)),
        );
        let sink = FileSink::open(&cfg).unwrap();
        write(&sink, &[record(1)]).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        write(&sink, &[record(2)]).await.unwrap();
        let (files, lines) = lines_in(dir.path());
        assert_eq!((files, lines.len()), (2, 2));
        assert!(rotated_name(&cfg.path)
            .to_string_lossy()
            .contains("events-"));
    }
}
