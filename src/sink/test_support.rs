//! Helpers for the sinks' unit tests.

use super::{Batch, LogSink, Rejection, SinkError};
use crate::record::{Record, RecordBody};

/// A record of `database`.`table` at `time` with `columns`.
pub(crate) fn test_record(
    database: &str,
    table: &str,
    time: i64,
    columns: &[(&str, &str)],
) -> Record {
    Record {
        database: database.into(),
        table: table.into(),
        body: RecordBody {
            time,
            columns: columns
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    }
}

/// Writes `records` to `sink` as one batch.
pub(crate) async fn write(
    sink: &dyn LogSink,
    records: &[Record],
) -> Result<Vec<Rejection>, SinkError> {
    sink.write_batch(&Batch::new(records, String::new())).await
}
