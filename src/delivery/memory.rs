//! `buffer: memory`: a bounded in-memory queue per sink; fast, and a crash loses what it holds.
//! Each record waits as the JSON the disk buffer's frames hold (one allocation, no map per
//! record); the lane hands the sink a batch of them as the disk buffer does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

use super::DeliveryError;
use crate::metrics;
use crate::record::RecordRef;
use crate::sink::EncodedRecords;
use crate::sync::{lock, sub_saturating};

struct State {
    /// Each record's JSON, with when it was accepted.
    records: VecDeque<(Instant, Box<[u8]>)>,
    closed: bool,
    /// Lengths of the records taken and not yet done with (delivered or given up).
    taken_bytes: u64,
}

/// Records accepted for one sink and not yet delivered.
pub struct MemoryQueue {
    sink: String,
    /// `postback_records_total{sink, result="accepted"}` and `delivery_queue_records{sink}`,
    /// resolved once.
    accepted: IntCounter,
    queued: IntGauge,
    state: Mutex<State>,
    capacity: usize,
    arrived: Notify,
    /// Records and bytes accepted and not yet done with (queued or in the batch in flight).
    waiting: AtomicU64,
    bytes: AtomicU64,
    /// Numbers the batches: their ids are unique in this process only.
    batches: AtomicU64,
}

impl MemoryQueue {
    /// An empty queue for the sink `sink` holding at most `capacity` records.
    pub fn new(sink: &str, capacity: usize) -> Self {
        MemoryQueue {
            sink: sink.to_owned(),
            accepted: metrics::RECORDS.with_label_values(&[sink, "accepted"]),
            queued: metrics::QUEUE_RECORDS.with_label_values(&[sink]),
            state: Mutex::new(State {
                records: VecDeque::new(),
                closed: false,
                taken_bytes: 0,
            }),
            capacity,
            arrived: Notify::new(),
            waiting: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    /// Takes all of `records` or none of them.
    pub fn push(&self, records: &[RecordRef<'_>]) -> Result<(), DeliveryError> {
        let n = records.len();
        let encoded: Vec<Box<[u8]>> = records
            .iter()
            .map(|r| {
                let mut json = Vec::with_capacity(r.approx_len());
                r.write_json(&mut json);
                json.into_boxed_slice()
            })
            .collect();
        let bytes: usize = encoded.iter().map(|json| json.len()).sum();
        let now = Instant::now();
        {
            let mut state = lock(&self.state);
            if state.closed {
                return Err(DeliveryError::Closed);
            }
            if state.records.len() + n > self.capacity {
                return Err(DeliveryError::Full);
            }
            state
                .records
                .extend(encoded.into_iter().map(|json| (now, json)));
        }
        self.waiting.fetch_add(n as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.accepted.inc_by(n as u64);
        self.queued.add(n as i64);
        self.arrived.notify_one();
        Ok(())
    }

    /// Moves up to `max_records` records (and about `max_bytes`) after those already in `batch`
    /// into it; returns how many.
    pub fn take(&self, batch: &mut EncodedRecords, max_records: usize, max_bytes: usize) -> usize {
        let mut state = lock(&self.state);
        let mut bytes = batch.text_len();
        let mut taken = 0;
        while batch.len() < max_records {
            let Some((_, next)) = state.records.front() else {
                break;
            };
            let len = next.len();
            if !batch.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            state.taken_bytes += len as u64;
            if let Some((_, json)) = state.records.pop_front() {
                batch.push(&json);
            }
            taken += 1;
        }
        taken
    }

    /// An id for the batch about to be sent: unique in this process (at least once only).
    pub fn batch_id(&self) -> String {
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}-{n:x}", process_id(), self.sink)
    }

    /// Waits until records may have arrived since the last call.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Refuses further records; those queued stay to be taken.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.arrived.notify_one();
    }

    /// `true` while the queue has room.
    pub fn has_room(&self) -> bool {
        lock(&self.state).records.len() < self.capacity
    }

    /// How long the oldest queued record has waited.
    pub fn oldest_age(&self) -> Option<Duration> {
        lock(&self.state).records.front().map(|(t, _)| t.elapsed())
    }

    /// Records accepted and not yet delivered (queued, or in the batch in flight).
    pub fn records_waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// About how many bytes of records wait (their JSON length).
    pub fn bytes_waiting(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The `n` records taken last were delivered or given up: lowers the counts.
    pub fn done(&self, n: usize) {
        let bytes = std::mem::take(&mut lock(&self.state).taken_bytes);
        sub_saturating(&self.waiting, n as u64);
        sub_saturating(&self.bytes, bytes);
        self.queued.sub(n as i64);
    }
}

/// This process, in a batch id: its pid and start time, so a restart does not reuse ids.
fn process_id() -> &'static str {
    static ID: once_cell::sync::Lazy<String> = once_cell::sync::Lazy::new(|| {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        format!("{:x}{:x}", std::process::id(), start)
    });
    &ID
}
