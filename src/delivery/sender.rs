//! The sender side of a sink's buffer: what a request calls to hand its records over.

use std::sync::Arc;

use super::direct::DirectLog;
use super::disk::DiskLog;
use super::memory::MemoryQueue;
use super::DeliveryError;
use crate::record::RecordRef;

/// Hands records to one sink's buffer (or, for a sink that is its own buffer, to the sink).
pub struct Sender(pub(super) Inbox);

/// Where a sink's records go first.
pub(super) enum Inbox {
    Memory(Arc<MemoryQueue>),
    Disk(Arc<DiskLog>),
    /// The sink's own file: see [`super::direct`].
    Direct(Arc<DirectLog>),
}

impl Sender {
    /// Takes all of `records` or none; returns once they are in the buffer (written to the log
    /// with `buffer: disk`, to the file for a sink that is its own buffer).
    pub async fn push(&self, records: &[RecordRef<'_>]) -> Result<(), DeliveryError> {
        match &self.0 {
            Inbox::Memory(q) => q.push(records),
            Inbox::Disk(d) => d.push(records).await,
            Inbox::Direct(d) => d.push(records).await,
        }
    }

    /// `true` while the buffer has room (always, for a sink that is its own buffer: a full disk
    /// shows in [`Sender::writable`]).
    pub fn has_room(&self) -> bool {
        match &self.0 {
            Inbox::Memory(q) => q.has_room(),
            Inbox::Disk(d) => d.has_room(),
            Inbox::Direct(_) => true,
        }
    }

    /// `false` while appends fail (a full disk under the disk buffer).
    pub fn writable(&self) -> bool {
        match &self.0 {
            Inbox::Memory(_) => true,
            Inbox::Disk(d) => d.writable(),
            Inbox::Direct(d) => d.writable(),
        }
    }

    /// Refuses further records (and with `buffer: disk`, writes what is pending). At shutdown.
    pub fn close(&self) {
        match &self.0 {
            Inbox::Memory(q) => q.close(),
            Inbox::Disk(d) => d.close(),
            Inbox::Direct(d) => d.close(),
        }
    }
}
