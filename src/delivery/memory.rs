//! `buffer: memory`: a bounded in-memory queue per sink.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;

use super::DeliveryError;
use crate::metrics;
use crate::record::Record;

struct State {
    records: VecDeque<(Instant, Record)>,
    closed: bool,
}

/// Records accepted for one sink and not yet handed to it.
pub struct MemoryQueue {
    sink: String,
    state: Mutex<State>,
    capacity: usize,
    arrived: Notify,
}

impl MemoryQueue {
    /// An empty queue for the sink `sink` holding at most `capacity` records.
    pub fn new(sink: &str, capacity: usize) -> Self {
        MemoryQueue {
            sink: sink.to_owned(),
            state: Mutex::new(State {
                records: VecDeque::new(),
                closed: false,
            }),
            capacity,
            arrived: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes all of `records` or none of them.
    pub fn push(&self, records: Vec<Record>) -> Result<(), DeliveryError> {
        let n = records.len();
        let now = Instant::now();
        {
            let mut state = self.lock();
            if state.closed {
                return Err(DeliveryError::Closed);
            }
            if state.records.len() + n > self.capacity {
                return Err(DeliveryError::Full);
            }
            state.records.extend(records.into_iter().map(|r| (now, r)));
        }
        metrics::RECORDS
            .with_label_values(&[&self.sink, "accepted"])
            .inc_by(n as u64);
        metrics::QUEUE_RECORDS
            .with_label_values(&[&self.sink])
            .add(n as i64);
        self.arrived.notify_one();
        Ok(())
    }

    /// Moves up to `max_records` records (and about `max_bytes`) into `batch`; returns how many.
    pub fn take(&self, batch: &mut Vec<Record>, max_records: usize, max_bytes: usize) -> usize {
        let mut state = self.lock();
        let mut bytes: usize = batch.iter().map(Record::approx_len).sum();
        let mut taken = 0;
        while batch.len() < max_records {
            let Some((_, next)) = state.records.front() else {
                break;
            };
            let len = next.approx_len();
            if !batch.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            batch.extend(state.records.pop_front().map(|(_, r)| r));
            taken += 1;
        }
        taken
    }

    /// Waits until records may have arrived since the last call.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Refuses further records; those queued stay to be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_one();
    }

    /// `true` while the queue has room.
    pub fn has_room(&self) -> bool {
        self.lock().records.len() < self.capacity
    }

    /// How long the oldest queued record has waited.
    pub fn oldest_age(&self) -> Option<std::time::Duration> {
        self.lock().records.front().map(|(t, _)| t.elapsed())
    }

    /// `n` records were delivered or given up: lowers the queue gauge.
    pub fn done(&self, n: usize) {
        metrics::QUEUE_RECORDS
            .with_label_values(&[&self.sink])
            .sub(n as i64);
    }
}
