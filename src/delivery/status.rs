//! What `/sinks` and `sink_up{sink}` say about each sink: up or down since when, the last error,
//! and the lane's counts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use log::{info, warn};
use serde::Serialize;

use crate::metrics;
use crate::sync::lock;

/// One sink's state, as `GET /sinks` shows it (one JSON object per sink).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SinkStatus {
    /// The sink's name in `sinks:`.
    pub name: String,
    /// `"up"` or `"down"`.
    pub state: &'static str,
    /// When the sink entered `state` (or the process started), RFC 3339 in UTC, to the second.
    pub since: String,
    /// The last failure (a failed batch, or the sink's own word on its peer), or `null` when
    /// nothing failed since the start. Kept after the sink is up again.
    pub last_error: Option<String>,
    /// Records accepted and not yet delivered (with `buffer: disk`, records left by a previous
    /// run are counted in the background just after the start).
    pub records_waiting: u64,
    /// Bytes waiting: the disk buffer's undelivered bytes, or the records' JSON length in memory.
    pub bytes_waiting: u64,
    /// How long the oldest waiting record has waited (0 when none; with `buffer: disk`, known for
    /// the batch being delivered).
    pub oldest_age_seconds: f64,
    /// Records the sink took since the start.
    pub delivered: u64,
    /// Failed batch writes since the start (each is retried).
    pub failed: u64,
}

struct Inner {
    up: bool,
    since: SystemTime,
    last_error: Option<String>,
    /// Down because the sink said its peer is unreachable, not because a batch failed.
    down_by_peer: bool,
}

/// The state of one sink, shared by its lane (which sets it) and `/sinks` (which reads it).
pub struct SinkState {
    name: String,
    inner: Mutex<Inner>,
    /// A batch failed and is being retried.
    pub(super) retrying: AtomicBool,
    pub(super) delivered: AtomicU64,
    pub(super) failed: AtomicU64,
}

/// The longest error kept for `/sinks`.
const MAX_ERROR: usize = 512;

impl SinkState {
    /// A sink that is up since now.
    pub fn new(name: &str) -> SinkState {
        metrics::SINK_UP.with_label_values(&[name]).set(1);
        SinkState {
            name: name.to_owned(),
            inner: Mutex::new(Inner {
                up: true,
                since: SystemTime::now(),
                last_error: None,
                down_by_peer: false,
            }),
            retrying: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// A batch went through; the sink took `n` of its records.
    pub fn batch_delivered(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        self.retrying.store(false, Ordering::Relaxed);
        self.set_up();
    }

    /// A batch failed with `error`.
    pub fn batch_failed(&self, error: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.retrying.store(true, Ordering::Relaxed);
        self.set_down(error, false);
    }

    /// What the sink says about its peer between batches ([`crate::sink::LogSink::peer_down`]).
    pub fn peer(&self, down: Option<String>) {
        match down {
            Some(reason) => self.set_down(&reason, true),
            None => {
                let by_peer = lock(&self.inner).down_by_peer;
                if by_peer && !self.retrying.load(Ordering::Relaxed) {
                    self.set_up();
                }
            }
        }
    }

    fn set_up(&self) {
        let mut inner = lock(&self.inner);
        inner.down_by_peer = false;
        if !inner.up {
            inner.up = true;
            inner.since = SystemTime::now();
            metrics::SINK_UP.with_label_values(&[&self.name]).set(1);
            info!("sink {}: up again", self.name);
        }
    }

    fn set_down(&self, error: &str, by_peer: bool) {
        let mut error = error.to_owned();
        if error.len() > MAX_ERROR {
            let mut cut = MAX_ERROR;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let mut inner = lock(&self.inner);
        inner.last_error = Some(error);
        if inner.up {
            inner.up = false;
            inner.since = SystemTime::now();
            inner.down_by_peer = by_peer;
            metrics::SINK_UP.with_label_values(&[&self.name]).set(0);
            warn!(
                "sink {}: down: {}",
                self.name,
                inner.last_error.as_deref().unwrap_or_default()
            );
        } else if !by_peer {
            inner.down_by_peer = false;
        }
    }

    /// The status with the buffer's figures filled in by the caller.
    pub fn status(&self) -> SinkStatus {
        let inner = lock(&self.inner);
        SinkStatus {
            name: self.name.clone(),
            state: if inner.up { "up" } else { "down" },
            since: humantime::format_rfc3339_seconds(inner.since).to_string(),
            last_error: inner.last_error.clone(),
            records_waiting: 0,
            bytes_waiting: 0,
            oldest_age_seconds: 0.0,
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_on_failure_or_peer_and_up_at_the_next_success() {
        let s = SinkState::new("status-test");
        assert_eq!(s.status().state, "up");
        s.batch_failed("connection refused");
        let st = s.status();
        assert_eq!(
            (st.state, st.last_error.as_deref(), st.failed),
            ("down", Some("connection refused"), 1)
        );
        s.peer(None); // the peer looks fine, but a batch is being retried
        assert_eq!(s.status().state, "down");
        s.batch_delivered(3);
        assert_eq!((s.status().state, s.status().delivered), ("up", 3));
        s.peer(Some("all brokers down".into()));
        assert_eq!(s.status().state, "down");
        assert_eq!(
            metrics::SINK_UP.with_label_values(&["status-test"]).get(),
            0
        );
        s.peer(None);
        assert_eq!(s.status().state, "up");
        assert_eq!(
            s.status().last_error.as_deref(),
            Some("all brokers down"),
            "the last error stays"
        );
    }
}
