//! The sender side of a sink's buffer: what a request calls to hand its records over.

use super::{Buffer, DeliveryError};
use crate::record::RecordRef;

/// Hands records to one sink's buffer.
pub struct Sender(pub(super) Buffer);

impl Sender {
    /// Takes all of `records` or none; returns once they are in the buffer (written to the log
    /// with `buffer: disk`).
    pub async fn push(&self, records: &[RecordRef<'_>]) -> Result<(), DeliveryError> {
        match &self.0 {
            Buffer::Memory(q) => q.push(records),
            Buffer::Disk(d) => d.push(records).await,
        }
    }

    /// `true` while the buffer has room.
    pub fn has_room(&self) -> bool {
        match &self.0 {
            Buffer::Memory(q) => q.has_room(),
            Buffer::Disk(d) => d.has_room(),
        }
    }

    /// `false` while appends fail (a full disk under the disk buffer).
    pub fn writable(&self) -> bool {
        match &self.0 {
            Buffer::Memory(_) => true,
            Buffer::Disk(d) => d.writable(),
        }
    }

    /// Refuses further records (and with `buffer: disk`, writes what is pending). At shutdown.
    pub fn close(&self) {
        match &self.0 {
            Buffer::Memory(q) => q.close(),
            Buffer::Disk(d) => d.close(),
        }
    }
}
