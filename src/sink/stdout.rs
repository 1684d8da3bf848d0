//! `type: stdout`: one JSON record per line on standard output.

use std::io::Write;

use async_trait::async_trait;

use super::{Batch, LogSink, Rejection, SinkError};

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
        let mut buf = Vec::with_capacity(batch.len() * 256);
        for record in batch {
            record.to_json_line(&mut buf);
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&buf)
            .and_then(|()| out.flush())
            .map_err(|e| SinkError(format!("cannot write to stdout: {e}")))?;
        Ok(Vec::new())
    }
}
