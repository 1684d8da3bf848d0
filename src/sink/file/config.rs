//! `type: file`: its configuration and the checks on it.

use std::path::PathBuf;

use serde::Deserialize;
use smart_default::SmartDefault;

use super::FileSink;
use crate::config::Problem;
use crate::sink::{more_than_zero, LogSink, SinkKind};
use crate::units::{ByteSize, HumanDuration};

/// `type: file`.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    #[serde(default = "default_file_path")]
    #[default(default_file_path())]
    pub path: PathBuf,
    #[serde(default)]
    pub rotate: RotateConfig,
    /// With `delivery.buffer: disk`, records are appended to the file itself before the answer
    /// (the file is its own buffer). `true`: through the disk buffer instead, as for any other
    /// sink, so that no request waits for this file (one on a slow or network filesystem).
    #[serde(default)]
    pub via_buffer: bool,
}

pub(crate) fn default_file_path() -> PathBuf {
    "data/events.jsonl".into()
}

/// When the file sink starts a new file.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct RotateConfig {
    #[default(ByteSize::mib(256))]
    pub max_bytes: ByteSize,
    /// Rotate files older than this; none: by size only.
    #[default(Some(HumanDuration::secs(3600)))]
    pub interval: Option<HumanDuration>,
}

impl SinkKind for FileSinkConfig {
    fn validate(&self, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.path.file_name().is_none() {
            problems.push(Problem::new(format!("{field}.path"), "must name a file"));
        }
        problems.extend(more_than_zero(
            field,
            "rotate.max_bytes",
            self.rotate.max_bytes.0 == 0,
        ));
        let interval = self.rotate.interval;
        problems.extend(more_than_zero(
            field,
            "rotate.interval",
            interval.is_some_and(|i| i.0.is_zero()),
        ));
        problems
    }

    fn open(&self, _name: &str, field: &str) -> Result<Box<dyn LogSink>, Problem> {
        let sink = FileSink::open(self)
            .map_err(|e| Problem::new(format!("{field}.path"), e.to_string()))?;
        Ok(Box::new(sink))
    }
}
