//! `type: stdout`: one JSON record per line on standard output.

use std::io::Write;

use async_trait::async_trait;
use serde::Deserialize;

use super::{json_lines, Batch, LogSink, Rejection, SinkError, SinkKind};
use crate::config::Problem;

/// `type: stdout`: nothing to configure.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

impl SinkKind for StdoutSinkConfig {
    fn validate(&self, _field: &str) -> Vec<Problem> {
        Vec::new()
    }

    fn open(&self, _name: &str, _field: &str) -> Result<Box<dyn LogSink>, Problem> {
        Ok(Box::new(StdoutSink::new()))
    }
}

/// Writes each batch to standard output in one locked write.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl StdoutSink {
    /// The stdout sink.
    pub fn new() -> Self {
        StdoutSink
    }
}

#[async_trait]
impl LogSink for StdoutSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        let buf = json_lines(batch);
        let mut out = std::io::stdout().lock();
        out.write_all(&buf)
            .and_then(|()| out.flush())
            .map_err(|e| SinkError::io("cannot write to stdout", e))?;
        Ok(Vec::new())
    }
}
