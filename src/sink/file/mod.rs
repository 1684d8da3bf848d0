//! `type: file`: JSON lines appended to a file, rotated by size and age.
//!
//! Rotation renames the current file to `NAME-YYYYMMDDTHHMMSSZ.EXT` (with `-N` added if that exists)
//! and starts a new one. It happens only between records, so a line is never split across files; a
//! single record larger than `max_bytes` gets a file of its own. Age is checked when a batch
//! arrives, so a quiet file may stay open past its interval until the next record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

mod config;

pub use config::{FileSinkConfig, RotateConfig};

use super::{Batch, LogSink, Rejection, SinkError};
use crate::sync::lock;

struct Current {
    file: File,
    written: u64,
    opened: Instant,
}

/// An append-only JSON lines file.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    interval: Option<Duration>,
    current: Mutex<Current>,
}

impl FileSink {
    /// Opens (creating the directory and file if needed) the file for appending.
    pub fn open(cfg: &FileSinkConfig) -> std::io::Result<FileSink> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let current = open_current(&cfg.path)?;
        Ok(FileSink {
            path: cfg.path.clone(),
            max_bytes: cfg.rotate.max_bytes.0,
            interval: cfg.rotate.interval.map(|i| i.0),
            current: Mutex::new(current),
        })
    }

    fn rotate(&self, current: &mut Current) -> std::io::Result<()> {
        current.file.sync_data()?;
        std::fs::rename(&self.path, rotated_name(&self.path))?;
        *current = open_current(&self.path)?;
        Ok(())
    }

    /// Appends `data`; on failure, cuts the file back so no partial line stays behind.
    fn append(current: &mut Current, data: &[u8]) -> std::io::Result<()> {
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

    fn write_lines(&self, batch: &Batch<'_>) -> std::io::Result<()> {
        let mut current = lock(&self.current);
        if self
            .interval
            .is_some_and(|i| current.written > 0 && current.opened.elapsed() >= i)
        {
            self.rotate(&mut current)?;
        }
        let mut pending = Vec::with_capacity(batch.len() * 256);
        for line in batch.json_lines() {
            let size = current.written + (pending.len() + line.len()) as u64;
            if size > self.max_bytes && current.written + pending.len() as u64 > 0 {
                Self::append(&mut current, &pending)?;
                pending.clear();
                self.rotate(&mut current)?;
            }
            pending.extend_from_slice(&line);
        }
        Self::append(&mut current, &pending)?;
        current.file.sync_data()
    }
}

fn open_current(path: &Path) -> std::io::Result<Current> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let written = file.metadata()?.len();
    Ok(Current {
        file,
        written,
        opened: Instant::now(),
    })
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
        self.write_lines(batch)
            .map_err(|e| SinkError::io(format!("cannot write {}", self.path.display()), e))?;
        Ok(Vec::new())
    }

    async fn close(&self) -> Result<(), SinkError> {
        let current = lock(&self.current);
        current
            .file
            .sync_all()
            .map_err(|e| SinkError::io(format!("cannot sync {}", self.path.display()), e))
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
