//! The receiver side of a sink's buffer: what the sink's lane calls to form batches and release
//! them. With `buffer: disk`, the reads and the checkpoint and intent writes run on the lane's
//! blocking pool, off its async path, so a slow disk never stalls the lane's timers.

use std::sync::Arc;

use log::{error, info, warn};

use super::disk::DiskLog;
use super::Buffer;
use crate::metrics;
use crate::sink::{Batch, EncodedRecords};

/// Takes batches from one sink's buffer.
pub struct Receiver(pub(super) Buffer);

/// The records taken for the batch being formed, as the JSON the buffer holds them in.
pub struct Taken {
    encoded: EncodedRecords,
}

impl Taken {
    /// None yet, for the sink `sink`.
    pub fn new(sink: &str) -> Self {
        Taken {
            encoded: EncodedRecords::new(sink),
        }
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.encoded.len()
    }

    /// `true` when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets them (they were delivered), keeping the allocations.
    pub fn clear(&mut self) {
        self.encoded.clear();
    }

    /// The records as the batch `id` for the sink.
    pub fn batch(&self, id: String) -> Batch<'_> {
        Batch::encoded(&self.encoded, id)
    }
}

impl Receiver {
    /// Moves up to `max_records` records (about `max_bytes`) after those already in `batch` into
    /// it, and gives it back.
    pub async fn take(&self, mut batch: Taken, max_records: usize, max_bytes: usize) -> Taken {
        match &self.0 {
            Buffer::Memory(q) => {
                q.take(&mut batch.encoded, max_records, max_bytes);
                batch
            }
            Buffer::Disk(d) => {
                blocking(d, move |d| {
                    d.take(&mut batch.encoded, max_records, max_bytes);
                    batch
                })
                .await
            }
        }
    }

    /// Waits until records may have arrived since the last call.
    pub async fn arrived(&self) {
        match &self.0 {
            Buffer::Memory(q) => q.arrived().await,
            Buffer::Disk(d) => d.arrived().await,
        }
    }

    /// The records taken since the last release are the batch: returns its id. With
    /// `buffer: disk` and `stable_id` (the sink needs it) its range is made durable first, so
    /// after a crash the same records come again, first, under the same id.
    pub async fn seal(&self, sink: &str, stable_id: bool) -> String {
        match &self.0 {
            Buffer::Memory(q) => q.batch_id(),
            Buffer::Disk(d) => {
                let (id, written) = blocking(d, move |d| d.seal(stable_id)).await;
                if let Err(e) = written {
                    warn!("sink {sink}: cannot record the batch's range before sending it (after a crash it may be sent again under another id): {e}");
                }
                id
            }
        }
    }

    /// The last batch taken (`n` records) is with the sink.
    pub async fn delivered(&self, n: usize) {
        match &self.0 {
            Buffer::Memory(q) => q.done(n),
            Buffer::Disk(d) => blocking(d, move |d| d.ack(n)).await,
        }
    }

    /// The last batch taken could not be delivered before the shutdown deadline.
    pub fn give_up(&self, sink: &str, n: usize) {
        match &self.0 {
            Buffer::Memory(q) => {
                error!("sink {sink}: giving up at shutdown; {n} records were not delivered and are lost");
                metrics::RECORDS
                    .with_label_values(&[sink, "lost"])
                    .inc_by(n as u64);
                q.done(n);
            }
            Buffer::Disk(d) => {
                info!(
                    "sink {sink}: {n} records (and any after them) stay in the disk buffer for the next start ({} bytes)",
                    d.spool_bytes()
                );
            }
        }
    }
}

/// Runs `f` on the blocking pool of the lane's runtime.
async fn blocking<T: Send + 'static>(
    log: &Arc<DiskLog>,
    f: impl FnOnce(&DiskLog) -> T + Send + 'static,
) -> T {
    let log = log.clone();
    match tokio::task::spawn_blocking(move || f(&log)).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
