//! The producer's client context: librdkafka's logs, errors and statistics, turned into log lines
//! (naming the sink, rate-limited) and into what the sink knows of its brokers.
//!
//! While brokers are down librdkafka reports the same few errors many times a second: each kind
//! is logged at most once per [`QUIET_PERIOD`], with the count of those left out.
//!
//! The brokers count as unreachable from librdkafka's `AllBrokersDown` error event (every broker
//! connection down) until its statistics, reported every second, show a broker `UP` again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Deserialize;

use crate::sync::lock;

/// How often one kind of librdkafka message (a facility, an error code) is logged at most.
pub(super) const QUIET_PERIOD: Duration = Duration::from_secs(30);

/// The context of one sink's producer.
pub(super) struct SinkContext {
    name: String,
    last_logged: Mutex<HashMap<String, (Instant, u64)>>,
    brokers: BrokerWatch,
}

/// What the context learns of the brokers, shared with the sink (librdkafka owns the context).
#[derive(Clone, Debug, Default)]
pub(super) struct BrokerWatch(Arc<Mutex<Brokers>>);

impl BrokerWatch {
    /// `Some(reason)` while every broker is known unreachable.
    pub(super) fn peer_down(&self) -> Option<String> {
        lock(&self.0).down.clone()
    }
}

/// What the sink knows of its brokers.
#[derive(Debug, Default)]
struct Brokers {
    /// Why every broker is unreachable, while it is.
    down: Option<String>,
    /// The last transport error librdkafka reported (a refused connection, a name not resolved).
    last_error: Option<String>,
}

/// The part of librdkafka's statistics the sink reads.
#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    brokers: HashMap<String, BrokerStats>,
}

#[derive(Deserialize)]
struct BrokerStats {
    state: String,
}

impl SinkContext {
    pub(super) fn new(name: &str) -> SinkContext {
        SinkContext {
            name: name.to_string(),
            last_logged: Mutex::new(HashMap::new()),
            brokers: BrokerWatch::default(),
        }
    }

    /// The watch on this context's brokers.
    pub(super) fn watch(&self) -> BrokerWatch {
        self.brokers.clone()
    }

    #[cfg(test)]
    fn peer_down(&self) -> Option<String> {
        self.brokers.peer_down()
    }

    /// Notes an error event of librdkafka.
    fn note_error(&self, code: Option<RDKafkaErrorCode>, reason: &str) {
        let mut brokers = lock(&self.brokers.0);
        match code {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                let last = brokers.last_error.as_deref().unwrap_or(reason);
                let down = format!("every Kafka broker is unreachable ({last})");
                if brokers.down.is_none() {
                    warn!("sink {}: {down}", self.name);
                }
                brokers.down = Some(down);
            }
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SSL,
            ) => brokers.last_error = Some(reason.to_string()),
            _ => {}
        }
    }

    /// Notes librdkafka's statistics: a broker `UP` means the brokers are reachable.
    fn note_stats(&self, json: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<Stats>(json) else {
            return;
        };
        let up = stats
            .brokers
            .iter()
            .any(|(name, b)| b.state == "UP" && !name.ends_with("/internal"));
        if up {
            let mut brokers = lock(&self.brokers.0);
            if brokers.down.take().is_some() {
                info!("sink {}: a Kafka broker is reachable again", self.name);
            }
            brokers.last_error = None;
        }
    }

    /// `Some(n)` when a message of `kind` may be logged now, `n` of its kind having been left
    /// out since the last one; `None` to leave it out.
    fn admit(&self, kind: &str) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    fn admit_at(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut last = lock(&self.last_logged);
        match last.get_mut(kind) {
            Some((at, skipped)) if now.duration_since(*at) < QUIET_PERIOD => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                last.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// `" (N similar messages left out)"`, or nothing.
fn left_out(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages left out)")
    }
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let Some(skipped) = self.admit(&format!("log {fac}")) else {
            return;
        };
        let (name, more) = (&self.name, left_out(skipped));
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", "sink {name}: {fac} {message}{more}")
            }
            RDKafkaLogLevel::Warning => {
                warn!(target: "librdkafka", "sink {name}: {fac} {message}{more}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", "sink {name}: {fac} {message}{more}")
            }
            RDKafkaLogLevel::Debug => {
                debug!(target: "librdkafka", "sink {name}: {fac} {message}{more}")
            }
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.note_stats(statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        self.note_error(code, reason);
        let kind = match code {
            Some(code) => format!("error {code:?}"),
            None => format!("error {error}"),
        };
        let Some(skipped) = self.admit(&kind) else {
            return;
        };
        // Brokers down, connections refused, ...: librdkafka reconnects by itself, and a batch
        // that cannot be delivered fails and is retried; so a warning, not an error.
        warn!(
            target: "librdkafka",
            "sink {}: kafka: {error}: {reason}{}",
            self.name,
            left_out(skipped)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_librdkafka_messages_are_logged_once_per_period() {
        let ctx = SinkContext::new("k");
        let t0 = Instant::now();
        let kind = "error AllBrokersDown";
        assert_eq!(ctx.admit_at(kind, t0), Some(0));
        assert_eq!(ctx.admit_at(kind, t0 + Duration::from_secs(1)), None);
        assert_eq!(ctx.admit_at(kind, t0 + Duration::from_secs(29)), None);
        assert_eq!(
            ctx.admit_at("log FAIL", t0 + Duration::from_secs(29)),
            Some(0)
        );
        // A period later, the next one is logged with the count of those left out.
        assert_eq!(ctx.admit_at(kind, t0 + QUIET_PERIOD), Some(2));
        assert_eq!(ctx.admit_at(kind, t0 + QUIET_PERIOD), None);
        assert_eq!(ctx.admit_at(kind, t0 + QUIET_PERIOD * 2), Some(1));
        assert_eq!(left_out(0), "");
        assert_eq!(left_out(2), " (2 similar messages left out)");
    }

    #[test]
    fn all_brokers_down_until_the_statistics_show_one_up() {
        let ctx = SinkContext::new("k");
        assert_eq!(ctx.peer_down(), None);
        ctx.note_error(
            Some(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused",
        );
        assert_eq!(
            ctx.peer_down(),
            None,
            "one broker failing is not all of them"
        );
        ctx.note_error(
            Some(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        let down = ctx.peer_down().unwrap();
        assert!(
            down.starts_with("every Kafka broker is unreachable") && down.contains("refused"),
            "{down}"
        );
        let stats = |state: &str| {
            format!(
                r#"{{"name":"x","brokers":{{"127.0.0.1:9/bootstrap":{{"state":"{state}","nodeid":-1}}}}}}"#
            )
        };
        ctx.note_stats(stats("TRY_CONNECT").as_bytes());
        assert!(ctx.peer_down().is_some());
        ctx.note_stats(b"not json");
        assert!(ctx.peer_down().is_some());
        ctx.note_stats(stats("UP").as_bytes());
        assert_eq!(ctx.peer_down(), None);
    }
}
