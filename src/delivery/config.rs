//! `delivery:` in the configuration file: the buffer, its limits, batching and retries; and the
//! checks on them.

use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use smart_default::SmartDefault;

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
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    #[default(BufferKind::Disk)]
    pub buffer: BufferKind,
    #[default("data/buffer")]
    pub dir: PathBuf,
    #[default(ByteSize::gib(1))]
    pub max_bytes: ByteSize,
    #[default(65536)]
    pub queue_records: usize,
    #[default(FsyncPolicy::Every(HumanDuration::secs(1)))]
    pub fsync: FsyncPolicy,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    #[default(WhenFull::Reject)]
    pub when_full: WhenFull,
}

/// `delivery.batch:`: how records are grouped for the sink.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    #[default(1000)]
    pub max_records: usize,
    #[default(ByteSize::mib(1))]
    pub max_bytes: ByteSize,
    #[default(HumanDuration::millis(100))]
    pub max_wait: HumanDuration,
}

/// `delivery.retry:`: backoff for a failing sink.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[default(HumanDuration::millis(100))]
    pub initial: HumanDuration,
    #[default(HumanDuration::secs(30))]
    pub max: HumanDuration,
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
