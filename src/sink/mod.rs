//! Log sinks: where delivered records end up.
//!
//! A sink takes whole batches. It is called from the delivery side only, one batch at a time,
//! and knows nothing about HTTP or buffering: it writes, and says whether the batch is delivered.
//!
//! This module is the registry: the [`LogSink`] trait, its [`Batch`], [`Rejection`] and
//! [`SinkError`], and [`SinkConfig`], the `sinks:` entry, with one line per kind of sink. Each
//! kind lives in its own module with its configuration type, its validation and its code; a new
//! kind adds its module and one line to `registry!` below.

mod batch;
mod file;
mod fluent;
mod http;
mod kafka;
mod stdout;
mod td;
#[cfg(test)]
pub(crate) mod test_support;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

pub use batch::Batch;
pub use batch::EncodedRecords;
pub use file::{FileSink, FileSinkConfig, RotateConfig};
pub use fluent::{FluentSink, FluentSinkConfig};
pub use http::{HttpSink, HttpSinkConfig};
pub use kafka::{Acks, Compression, KafkaSink, KafkaSinkConfig};
pub use stdout::{StdoutSink, StdoutSinkConfig};
pub use td::{TdSink, TdSinkConfig};

use crate::config::Problem;

/// A record in a batch that the sink refused for good (it will never take it), with the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Index in the batch.
    pub index: usize,
    /// Why the sink will never take it; written to `rejected.jsonl`.
    pub reason: String,
}

/// The cause kept inside a [`SinkError`].
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A batch write that did not go through; the whole batch is tried again later.
///
/// The variants say what kind of failure it was, so the lane can tell an unreachable peer
/// (`/sinks` says `down`) from a peer that answered but refused for now.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The peer could not be reached: connection refused or reset, name not resolved, every
    /// Kafka broker down.
    #[error("cannot connect to {peer}: {cause}")]
    Unreachable {
        /// The address or URL tried.
        peer: String,
        #[source]
        cause: Cause,
    },
    /// Reading or writing failed (a local file, or a socket already open).
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. `cannot write data/events.jsonl`.
        what: String,
        source: std::io::Error,
    },
    /// The peer answered, and refused the batch for now (HTTP 5xx, 429, 401, ...).
    #[error("{peer} answered {status}: {detail}")]
    Refused {
        /// The URL or peer that answered.
        peer: String,
        /// The status it answered with.
        status: u16,
        /// What it said (an excerpt; no secrets).
        detail: String,
    },
    /// No answer in time.
    #[error("{0}")]
    Timeout(String),
    /// Anything else: the peer broke the protocol, the client library failed, ...
    #[error("{message}")]
    Other {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl SinkError {
    /// The peer `peer` could not be reached because of `cause`.
    pub fn unreachable(peer: impl Into<String>, cause: impl Into<Cause>) -> Self {
        SinkError::Unreachable {
            peer: peer.into(),
            cause: cause.into(),
        }
    }

    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        SinkError::Io {
            what: what.into(),
            source,
        }
    }

    /// Any other failure, described by `message`.
    pub fn other(message: impl Into<String>) -> Self {
        SinkError::Other {
            message: message.into(),
            cause: None,
        }
    }

    /// Any other failure, described by `message`, caused by `cause`.
    pub fn caused(message: impl Into<String>, cause: impl Into<Cause>) -> Self {
        SinkError::Other {
            message: message.into(),
            cause: Some(cause.into()),
        }
    }

    /// Whether the peer is known to be unreachable: the lane marks the sink `down` at once.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SinkError::Unreachable { .. })
    }

    /// The HTTP status the peer answered with, for [`SinkError::Refused`].
    pub fn status(&self) -> Option<u16> {
        match self {
            SinkError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A destination for records.
///
/// Implement it to deliver records anywhere; register an instance under a name and routes can
/// name it like a built-in sink. The delivery side calls it from the sink's own lane, one batch at a
/// time, and does the buffering, batching, retries, state and metrics around it.
#[async_trait]
pub trait LogSink: Send + Sync {
    /// Writes `batch`. `Ok` means delivered: every record is with the sink except those listed
    /// as rejected for good. `Err` means nothing can be assumed delivered; the caller retries the
    /// whole batch with backoff (delivery is at least once).
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError>;

    /// Runs once at shutdown, after the last batch: flush and close.
    async fn close(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// What the sink knows of its peer between batches: `Some(reason)` while it knows the peer is
    /// unreachable (Kafka: every broker down, from the client's own error events), `None` when it
    /// knows nothing against it. The sink's lane asks about once a second, so `/sinks` can say
    /// `down` before a batch times out. The reason is shown to operators: no secrets in it.
    fn peer_down(&self) -> Option<String> {
        None
    }

    /// `true` when the sink relies on [`Batch::id`] staying the same for the same records after
    /// a restart, as the `td` sink does to de-duplicate: with `buffer: disk` the range of each
    /// batch is then made durable (written and fsynced) before its first send. The default,
    /// `false`, saves those two fsyncs per batch; after a crash the sink gets the same records
    /// again, in batches that may be cut differently and carry other ids.
    fn needs_stable_batch_ids(&self) -> bool {
        false
    }

    /// The sink as an append-only file on this machine, or `None` (the default). With
    /// `delivery.buffer: disk`, delivery then appends each group of accepted records to it
    /// before answering, instead of to a buffer it would copy them from afterwards: the file is
    /// its own buffer. Asked once, at start-up.
    fn local_log(&self) -> Option<Arc<dyn LocalLog>> {
        None
    }
}

/// An append-only file of JSON lines on this machine (the `file` sink, see
/// [`LogSink::local_log`]). Appends come from the requests' own tasks, one group at a time, in
/// order; durability comes from [`LocalLog::sync`], which delivery calls per `delivery.fsync`.
pub trait LocalLog: Send + Sync {
    /// Appends `lines` (whole JSON lines, each ending in `\n`) with as few writes as the file's
    /// rotation allows, rotating first when due; a line is never split across files. On
    /// failure, nothing of `lines` stays in the file.
    fn append(&self, lines: &[u8]) -> std::io::Result<()>;

    /// Makes everything appended so far durable: the current file's data, and the files rotated
    /// away since the last call. Blocks for the disk; called off the requests' threads.
    fn sync(&self) -> std::io::Result<()>;

    /// Starts the kernel's writeback of what was appended, without waiting for it (a hint; the
    /// next [`LocalLog::sync`] then finds little left to write).
    fn start_writeback(&self) {}

    /// The directory the file is in: where delivery probes for free space after a failed append.
    fn dir(&self) -> &Path;
}

/// What each kind of sink gives the registry: implemented by its configuration type.
trait SinkKind {
    /// Checks the configuration, connecting nowhere; problems are reported under
    /// `field` (`sinks.NAME`) and its sub-fields.
    fn validate(&self, field: &str) -> Vec<Problem>;
    /// Opens the sink `name` (a validated configuration); a problem names the field at fault.
    fn open(&self, name: &str, field: &str) -> Result<Box<dyn LogSink>, Problem>;
}

/// The kinds of sink: `Variant(config type)`, its `type:` word the variant in lower case.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($config:ty),)*) => {
        /// One entry of `sinks:`, chosen by its `type:`.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
        pub enum SinkConfig {
            $($(#[$doc])* $variant($config),)*
        }

        impl SinkConfig {
            fn kind(&self) -> &dyn SinkKind {
                match self {
                    $(SinkConfig::$variant(c) => c,)*
                }
            }
        }
    };
}

registry! {
    /// JSON lines appended to a file, rotated by size and age.
    File(FileSinkConfig),
    /// JSON lines on standard output.
    Stdout(StdoutSinkConfig),
    /// NDJSON batches POSTed to a collector.
    Http(HttpSinkConfig),
    /// Messages produced to Kafka topics.
    Kafka(KafkaSinkConfig),
    /// The Fluentd forward protocol (td-agent, Fluentd, Fluent Bit).
    Fluent(FluentSinkConfig),
    /// Treasure Data's bulk import API, exactly once with the disk buffer.
    Td(TdSinkConfig),
}

/// Checks the configuration of sink `name` without touching anything; `--check` and start-up.
pub fn validate(name: &str, cfg: &SinkConfig) -> Vec<Problem> {
    cfg.kind().validate(&format!("sinks.{name}"))
}

/// Opens the sink `name` (a validated configuration); runs once at start-up.
pub fn open(name: &str, cfg: &SinkConfig) -> Result<Box<dyn LogSink>, Problem> {
    cfg.kind().open(name, &format!("sinks.{name}"))
}

/// Without `sinks:`, `main` is a `file` sink at `data/events.jsonl`.
pub(crate) fn default_sinks() -> std::collections::BTreeMap<String, SinkConfig> {
    [(
        "main".to_string(),
        SinkConfig::File(FileSinkConfig::default()),
    )]
    .into()
}

/// The last time a sink could not reach its peer, until it reaches it again: what the fluent,
/// http and td sinks answer [`LogSink::peer_down`] with.
#[derive(Debug, Default)]
pub(crate) struct PeerDown(std::sync::Mutex<Option<String>>);

impl PeerDown {
    /// What is known against the peer now.
    pub(crate) fn get(&self) -> Option<String> {
        crate::sync::lock(&self.0).clone()
    }

    /// The peer is down for `reason`.
    pub(crate) fn set(&self, reason: String) {
        *crate::sync::lock(&self.0) = Some(reason);
    }

    /// The peer answered.
    pub(crate) fn clear(&self) {
        crate::sync::lock(&self.0).take();
    }

    /// Notes what `result` says of the peer: an `Unreachable` error sets it down, an answer
    /// (`Ok`, or a refusal with a status) clears it, and anything else (a timeout) says nothing
    /// new; `result` is passed on.
    pub(crate) fn track<T>(&self, result: Result<T, SinkError>) -> Result<T, SinkError> {
        match &result {
            Err(e) if e.is_unreachable() => self.set(e.to_string()),
            Ok(_) | Err(SinkError::Refused { .. }) => self.clear(),
            Err(_) => {}
        }
        result
    }
}

/// "`{field}.{sub}`: must be more than 0" when `zero`.
pub(crate) fn more_than_zero(field: &str, sub: &str, zero: bool) -> Option<Problem> {
    zero.then(|| Problem::new(format!("{field}.{sub}"), "must be more than 0"))
}

/// Each record of `batch` as a JSON line, one after the other (the stdout and http sinks).
pub(crate) fn json_lines(batch: &Batch<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() * 256);
    batch.write_json_lines(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_word_parses() {
        for yaml in [
            "{type: stdout}",
            "{type: file, path: x.jsonl}",
            "{type: http, url: 'http://127.0.0.1:1/'}",
            "{type: kafka, brokers: ['k:1']}",
            "{type: fluent, address: '127.0.0.1:24224'}",
            "{type: td, api_key: k}",
        ] {
            let cfg: SinkConfig = serde_saphyr::from_str(yaml).expect(yaml);
            assert_eq!(validate("s", &cfg), Vec::new(), "{yaml}");
        }
        let err = serde_saphyr::from_str::<SinkConfig>("{type: stdout, path: x}").unwrap_err();
        assert!(err.to_string().contains("path"), "{err}");
        let err = serde_saphyr::from_str::<SinkConfig>("{type: carrier}").unwrap_err();
        assert!(err.to_string().contains("carrier"), "{err}");
    }

    #[test]
    fn only_unreachable_is_unreachable() {
        let e = SinkError::unreachable("h:1", std::io::Error::other("refused"));
        assert!(e.is_unreachable());
        assert_eq!(e.to_string(), "cannot connect to h:1: refused");
        assert!(std::error::Error::source(&e).is_some());
        assert!(!SinkError::other("x").is_unreachable());
        let e = SinkError::Refused {
            peer: "u".into(),
            status: 503,
            detail: "busy".into(),
        };
        assert_eq!(
            (e.status(), e.to_string().as_str()),
            (Some(503), "u answered 503: busy")
        );
    }
}
