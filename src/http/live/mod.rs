//! The live view's data: a bounded ring of the latest accepted records and refused postbacks,
//! and a broadcast of each as it happens, for the admin listener's page (`/`), `/events/recent`
//! and `/events/stream`.
//!
//! Each event is written as JSON once, when it happens. A postback never waits for a viewer: the
//! broadcast drops what a slow viewer has not read (it is told how many it missed), and the ring
//! forgets its oldest events.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::postback::reply::Refusal;
use crate::record::RecordRef;
use crate::sync::lock;

/// How many events a viewer may fall behind before it misses some.
const STREAM_BACKLOG: usize = 1024;

/// One event, as the page receives it: its JSON text.
pub type LiveEvent = Arc<str>;

/// The recent events and their broadcast; disabled (and free) with a capacity of 0.
pub struct LiveView {
    capacity: usize,
    ring: Mutex<VecDeque<LiveEvent>>,
    stream: broadcast::Sender<LiveEvent>,
    seq: AtomicU64,
}

/// A refused postback, as the page receives it. (A record's event is written by
/// [`record_event`].)
#[derive(Serialize)]
#[serde(tag = "kind", rename = "refused")]
struct Refused<'a> {
    seq: u64,
    at_ms: u64,
    route: &'a str,
    /// The path alone: the query may hold a write key.
    path: &'a str,
    status: u16,
    error: &'static str,
    message: &'a str,
}

/// `{"kind":"record","seq":…,"at_ms":…,"route":…,` then the record's members (`database`,
/// `table`, `record`): the record's JSON as the disk buffer writes it, not a second serializer.
fn record_event(seq: u64, at_ms: u64, route: &str, record: &RecordRef<'_>) -> Option<LiveEvent> {
    let mut json = Vec::with_capacity(64 + route.len() + record.approx_len());
    json.extend_from_slice(b"{\"kind\":\"record\",\"seq\":");
    serde_json::to_writer(&mut json, &seq).ok()?;
    json.extend_from_slice(b",\"at_ms\":");
    serde_json::to_writer(&mut json, &at_ms).ok()?;
    json.extend_from_slice(b",\"route\":");
    serde_json::to_writer(&mut json, route).ok()?;
    json.push(b',');
    record.write_json_members(&mut json);
    json.push(b'}');
    String::from_utf8(json).ok().map(LiveEvent::from)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LiveView {
    /// Keeps the last `capacity` events (`admin.recent_records`); 0 keeps and sends none.
    pub fn new(capacity: usize) -> LiveView {
        let (stream, _) = broadcast::channel(STREAM_BACKLOG);
        LiveView {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            stream,
            seq: AtomicU64::new(0),
        }
    }

    /// Whether events are kept at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Runs for every postback with records, before they are handed to delivery: their events,
    /// to [`LiveView::publish`] once delivery accepted them (`None` with the live view off).
    pub fn render(&self, route: &str, records: &[RecordRef<'_>]) -> Option<Vec<LiveEvent>> {
        if !self.enabled() {
            return None;
        }
        let at_ms = now_ms();
        let events = records
            .iter()
            .filter_map(|record| {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
                record_event(seq, at_ms, route, record)
            })
            .collect();
        Some(events)
    }

    /// Shows `events` (from [`LiveView::render`]): what the sinks receive.
    pub fn publish(&self, events: Vec<LiveEvent>) {
        for event in events {
            self.push(event);
        }
    }

    /// Runs for every refused postback: its status and reason (which never hold the key).
    pub fn refused(&self, route: &str, path: &str, refusal: &Refusal) {
        if !self.enabled() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let event = Refused {
            seq,
            at_ms: now_ms(),
            route,
            path,
            status: refusal.kind.status(),
            error: refusal.kind.code(),
            message: &refusal.message,
        };
        if let Ok(json) = serde_json::to_string(&event) {
            self.push(json.into());
        }
    }

    fn push(&self, json: LiveEvent) {
        {
            let mut ring = lock(&self.ring);
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(json.clone());
        }
        // No viewer: nothing to do. A lagging viewer misses the oldest (and is told).
        let _ = self.stream.send(json);
    }

    /// The kept events, oldest first, as one JSON document: `{"capacity":N,"events":[...]}`.
    pub fn recent_json(&self) -> String {
        let ring = lock(&self.ring);
        let mut out = String::with_capacity(64 + ring.iter().map(|e| e.len() + 1).sum::<usize>());
        out.push_str(&format!("{{\"capacity\":{},\"events\":[", self.capacity));
        for (i, e) in ring.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(e);
        }
        out.push_str("]}");
        out
    }

    /// A new viewer of the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.stream.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postback::reply::ErrorKind;

    fn record(page: &str) -> RecordRef<'_> {
        RecordRef::new("web", "pv", 7, vec![("page".into(), page.into())])
    }

    #[test]
    fn keeps_the_latest_and_broadcasts_each() {
        let live = LiveView::new(2);
        let mut viewer = live.subscribe();
        let events = live.render("/r", &[record("/a"), record("/b")]).unwrap();
        live.publish(events);
        live.refused(
            "/r",
            "/postback/v3/event/web/pv",
            &Refusal::new(ErrorKind::Forbidden, "the write key is not valid"),
        );
        let recent: serde_json::Value = serde_json::from_str(&live.recent_json()).unwrap();
        let events = recent["events"].as_array().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["kind"], "record");
        assert_eq!(events[0]["record"]["page"], "/b");
        assert_eq!(events[0]["database"], "web");
        assert_eq!(events[1]["kind"], "refused");
        assert_eq!(events[1]["status"], 403);
        assert_eq!(events[1]["error"], "forbidden");
        let first = viewer.try_recv().unwrap();
        let mut first: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert!(first["at_ms"].as_u64().is_some_and(|t| t > 0), "{first}");
        first.as_object_mut().unwrap().remove("at_ms");
        assert_eq!(
            first,
            serde_json::json!({"kind": "record", "seq": 1, "route": "/r", "database": "web",
                "table": "pv", "record": {"time": 7, "page": "/a"}})
        );
    }

    #[test]
    fn a_capacity_of_zero_keeps_nothing() {
        let live = LiveView::new(0);
        let mut viewer = live.subscribe();
        assert!(live.render("/r", &[record("/a")]).is_none());
        assert_eq!(live.recent_json(), "{\"capacity\":0,\"events\":[]}");
        assert!(viewer.try_recv().is_err());
    }
}
