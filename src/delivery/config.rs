//! `delivery:` in the configuration file: the buffer, its limits, batching and retries; and the
//! checks on them.

use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::config::Problem;
use crate::units::{ByteSize, HumanDuration};

/// Where accepted records wait for their sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    /// A bounded queue in memory: fast; a crash loses what is queued.
    Memory,
    /// An append-only log on disk: a crash loses nothing.
    Disk,
}

/// What happens to a postback when the buffer is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Answer 503 with `Retry-After`; nothing accepted is lost.
    Reject,
    /// Answer as usual and count the dropped record.
    Drop,
}

/// How often the disk buffer is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every answer.
    Always,
    /// On this interval: the window a power loss can cost.
    Every(HumanDuration),
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "always" {
            return Ok(FsyncPolicy::Always);
        }
        humantime::parse_duration(&text)
            .map(|d| FsyncPolicy::Every(HumanDuration(d)))
            .map_err(|_| de::Error::custom(format!("`{text}` is neither `always` nor a duration")))
    }
}

/// `delivery:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub buffer: BufferKind,
    pub dir: PathBuf,
    pub max_bytes: ByteSize,
    pub queue_records: usize,
    pub fsync: FsyncPolicy,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub when_full: WhenFull,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            buffer: BufferKind::Disk,
            dir: "data/buffer".into(),
            max_bytes: ByteSize::gib(1),
            queue_records: 65536,
            fsync: FsyncPolicy::Every(HumanDuration::secs(1)),
            batch: BatchConfig::default(),
            retry: RetryConfig::default(),
            when_full: WhenFull::Reject,
        }
    }
}

/// `delivery.batch:`: how records are grouped for the sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_records: usize,
    pub max_bytes: ByteSize,
    pub max_wait: HumanDuration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 1000,
            max_bytes: ByteSize::mib(1),
            max_wait: HumanDuration::millis(100),
        }
    }
}

/// `delivery.retry:`: backoff for a failing sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: HumanDuration::millis(100),
            max: HumanDuration::secs(30),
        }
    }
}

impl DeliveryConfig {
    /// Checks `delivery:`; problems name the field.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.queue_records == 0 {
            problems.push(Problem::new("delivery.queue_records", "must be at least 1"));
        }
        if self.max_bytes.0 < 4096 {
            problems.push(Problem::new("delivery.max_bytes", "must be at least 4KiB"));
        }
        if self.dir.as_os_str().is_empty() {
            problems.push(Problem::new("delivery.dir", "must not be empty"));
        }
        if self.batch.max_records == 0 {
            problems.push(Problem::new(
                "delivery.batch.max_records",
                "must be at least 1",
            ));
        }
        if self.batch.max_bytes.0 == 0 {
            problems.push(Problem::new(
                "delivery.batch.max_bytes",
                "must be more than 0",
            ));
        }
        if self.retry.initial.0.is_zero() || self.retry.initial > self.retry.max {
            problems.push(Problem::new(
                "delivery.retry.initial",
                "must be more than 0 and at most delivery.retry.max",
            ));
        }
        problems
    }
}
