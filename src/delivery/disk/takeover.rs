//! Upgrades: two processes on one buffer. The one holding the `lock` file owns the buffer (reads,
//! acknowledges, deletes); the other only appends to its own new segment and, once the owner
//! exits and the lock is free, takes the buffer over.

use std::sync::atomic::Ordering;

use log::{error, info};

use super::checkpoint::recover;
use super::reader::ReadState;
use super::{max_segment, DiskLog};
use crate::sync::lock;

impl DiskLog {
    /// Starts the thread that waits for the lock and then takes the buffer over.
    pub(super) fn start_takeover_thread(self: &std::sync::Arc<Self>) -> std::io::Result<()> {
        let log = self.clone();
        std::thread::Builder::new()
            .name(format!("spool-lock-{}", self.sink))
            .spawn(move || match log.lock_file.lock() {
                Ok(()) => log.take_over(),
                Err(e) => error!("sink {}: cannot lock the buffer: {e}", log.sink),
            })?;
        Ok(())
    }

    /// The previous owner of the buffer exited: pick up its checkpoint, move appends to a segment
    /// after all of its segments, and start reading.
    fn take_over(&self) {
        let mut live = lock(&self.live);
        match recover(&self.dir) {
            Ok(recovered) => {
                let start = recovered.start;
                *lock(&self.read) = ReadState::new(start, recovered.in_flight);
                let pending = lock(&self.write).pending.bytes.len() as u64;
                self.spool_bytes
                    .store(recovered.spool + pending, Ordering::SeqCst);
                let next =
                    (max_segment(&self.dir).unwrap_or(live.end.segment) + 1).max(start.segment);
                self.switch_segment(&mut live, next, true);
                drop(live);
                self.count_recovered(true);
                self.owner.store(true, Ordering::SeqCst);
                self.arrived.notify_one();
                info!(
                    "sink {}: took over the buffer; delivering from {start:?}",
                    self.sink
                );
            }
            Err(e) => error!("sink {}: cannot take over the buffer: {e}", self.sink),
        }
    }
}
