//! Log sinks: where delivered records end up.
//!
//! A sink takes whole batches. It is called from the delivery writer only, one batch at a time,
//! and knows nothing about HTTP or buffering: it writes, and says whether the batch is delivered.

mod file;
mod fluent;
mod http;
mod kafka;
mod stdout;

use async_trait::async_trait;

pub use file::FileSink;
pub use fluent::FluentSink;
pub use http::HttpSink;
pub use kafka::KafkaSink;
pub use stdout::StdoutSink;

use crate::config::{Problem, SinkConfig};
use crate::record::Record;

/// A record in a batch that the sink refused for good (it will never take it), with the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Index in the batch.
    pub index: usize,
    /// Why the sink will never take it; written to `rejected.jsonl`.
    pub reason: String,
}

/// One batch handed to [`LogSink::write_batch`]: the records, and an id for the batch.
///
/// The batch dereferences to its records (`batch.len()`, `batch.iter()`, `&batch[..]`).
pub struct Batch<'a> {
    records: &'a [Record],
    id: String,
}

impl<'a> Batch<'a> {
    /// A batch of `records` with the id `id` (see [`Batch::id`]).
    pub fn new(records: &'a [Record], id: String) -> Self {
        Batch { records, id }
    }

    /// The records, in the order they were accepted.
    pub fn records(&self) -> &'a [Record] {
        self.records
    }

    /// An id for this batch: the same id is passed every time the same records are retried, also
    /// after a restart when the buffer is `disk`, so a sink whose peer de-duplicates by id (the `td`
    /// sink) delivers exactly once. With `buffer: memory` it is unique per process only.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl<'a> IntoIterator for &Batch<'a> {
    type Item = &'a Record;
    type IntoIter = std::slice::Iter<'a, Record>;
    fn into_iter(self) -> Self::IntoIter {
        self.records.iter()
    }
}

impl std::ops::Deref for Batch<'_> {
    type Target = [Record];
    fn deref(&self) -> &[Record] {
        self.records
    }
}

/// A batch write that did not go through; the whole batch is tried again later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

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
}

/// Checks the configuration of sink `name` without touching anything; `--check` and start-up.
pub fn validate(name: &str, cfg: &SinkConfig) -> Vec<Problem> {
    let field = format!("sinks.{name}");
    match cfg {
        SinkConfig::File(f) => FileSink::validate(f, &field),
        SinkConfig::Http(h) => HttpSink::validate(h, &field),
        SinkConfig::Kafka(k) => KafkaSink::validate(k, &field),
        SinkConfig::Fluent(f) => FluentSink::validate(f, &field),
        SinkConfig::Stdout => Vec::new(),
    }
}

/// Opens the sink `name` (a validated configuration); runs once at start-up.
pub fn open(name: &str, cfg: &SinkConfig) -> Result<Box<dyn LogSink>, Problem> {
    match cfg {
        SinkConfig::File(f) => FileSink::open(f)
            .map(|s| Box::new(s) as Box<dyn LogSink>)
            .map_err(|e| Problem::new(format!("sinks.{name}.path"), e.to_string())),
        SinkConfig::Http(h) => HttpSink::open(h)
            .map(|s| Box::new(s) as Box<dyn LogSink>)
            .map_err(|e| Problem::new(format!("sinks.{name}.url"), e)),
        SinkConfig::Kafka(k) => KafkaSink::open(name, k)
            .map(|s| Box::new(s) as Box<dyn LogSink>)
            .map_err(|e| Problem::new(format!("sinks.{name}.brokers"), e)),
        SinkConfig::Fluent(f) => FluentSink::open(name, f)
            .map(|s| Box::new(s) as Box<dyn LogSink>)
            .map_err(|e| Problem::new(format!("sinks.{name}.address"), e)),
        SinkConfig::Stdout => Ok(Box::new(StdoutSink::new())),
    }
}
