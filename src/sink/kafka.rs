//! `type: kafka`: each record is one message produced to a Kafka topic.
//!
//! The topic comes from the template (`{database}`, `{table}`), the value is the record's
//! `record` object as JSON, the key its `td_global_id` where it has one, and the headers
//! `database` and `table` say where it came from.
//!
//! A batch is delivered when the brokers acknowledged every message of it (as `acks` asks).
//! A message the brokers refuse for its content alone (too large, an invalid record) is rejected
//! for good; anything else (brokers down, timeouts, a topic that does not exist, leader
//! elections, ...) fails the whole batch, which the delivery layer retries: at least once.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use log::{debug, error, info, warn};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

use super::{Batch, LogSink, Rejection, SinkError};
use crate::config::{KafkaSinkConfig, Problem};
use crate::record::Record;

/// The values `acks` may take.
const ACKS: &[&str] = &["all", "-1", "0", "1"];
/// The values `compression` may take.
const COMPRESSIONS: &[&str] = &["none", "gzip", "snappy", "lz4", "zstd"];
/// Kafka's limit on the length of a topic name.
const MAX_TOPIC_LEN: usize = 249;
/// librdkafka's limit on `linger.ms`.
const MAX_LINGER: Duration = Duration::from_secs(900);
/// How much longer than `timeout` a batch may wait for its delivery reports (librdkafka reports
/// every message within `message.timeout.ms`; this only guards against a report that never comes).
const REPORT_SLACK: Duration = Duration::from_secs(5);
/// How long the check whether a topic exists waits for the brokers' answer.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `close()` waits for the producer to flush.
const MAX_CLOSE_FLUSH: Duration = Duration::from_secs(10);

/// One piece of a topic template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Database,
    Table,
}

/// A parsed topic template: `{database}` and `{table}` between literal text.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TopicTemplate(Vec<Part>);

impl TopicTemplate {
    /// Parses `template`; an unknown or unclosed placeholder is an error.
    fn parse(template: &str) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                return Err("has a '{' without its '}'".into());
            };
            let part = match &after[..close] {
                "database" => Part::Database,
                "table" => Part::Table,
                other => {
                    return Err(format!(
                        "has an unknown placeholder {{{other}}}: only {{database}} and {{table}}"
                    ))
                }
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &after[close + 1..];
        }
        text.push_str(rest);
        if text.contains('}') {
            return Err("has a '}' without its '{'".into());
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(TopicTemplate(parts))
    }

    /// The topic of a record of `database`.`table`.
    fn render(&self, database: &str, table: &str) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.0 {
            out.push_str(match part {
                Part::Text(t) => t,
                Part::Database => database,
                Part::Table => table,
            });
        }
        out
    }

    /// The template's literal text, placeholders left out.
    fn literal_len(&self) -> usize {
        self.0
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.len(),
                _ => 0,
            })
            .sum()
    }
}

/// Why a topic name is not one Kafka accepts, if it is not.
fn topic_name_problem(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("the topic name is empty".into());
    }
    if topic == "." || topic == ".." {
        return Some(format!("the topic name {topic:?} is not allowed"));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Some(format!(
            "the topic name {topic:?} is longer than Kafka's {MAX_TOPIC_LEN} characters"
        ));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some(format!(
            "the topic name {topic:?} may hold only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    None
}

/// Whether this librdkafka build has the compression codec `name` (`builtin.features`).
fn codec_supported(name: &str) -> bool {
    if matches!(name, "none" | "gzip") {
        // zlib is always in (rdkafka's `libz` feature); `none` needs nothing.
        return true;
    }
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|features| features.split(',').any(|f| f.trim() == name))
        .unwrap_or(false)
}

/// `duration` in milliseconds as librdkafka reads a float property (`5`, `0.5`).
fn millis_f64(d: Duration) -> String {
    format!("{}", d.as_secs_f64() * 1000.0)
}

/// The producer's configuration: our settings first, then `properties`, which win.
fn client_config(cfg: &KafkaSinkConfig, with_properties: bool) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.join(","))
        .set("client.id", &cfg.client_id)
        .set("acks", &cfg.acks)
        .set("compression.type", &cfg.compression)
        .set("linger.ms", millis_f64(cfg.linger.0))
        .set(
            "message.timeout.ms",
            cfg.timeout
                .0
                .as_millis()
                .clamp(1, i32::MAX as u128)
                .to_string(),
        );
    if matches!(cfg.acks.as_str(), "all" | "-1") {
        c.set("enable.idempotence", "true");
    }
    c.set_log_level(RDKafkaLogLevel::Info);
    if with_properties {
        for (k, v) in &cfg.properties {
            c.set(k, v);
        }
    }
    c
}

/// Routes librdkafka's logs and errors to the `log` crate, naming the sink. While brokers are
/// down librdkafka reports the same few errors many times a second: each kind is logged at most
/// once per [`QUIET_PERIOD`], with the count of those left out.
struct SinkContext {
    name: String,
    last_logged: Mutex<HashMap<String, (std::time::Instant, u64)>>,
}

/// How often one kind of librdkafka message (a facility, an error code) is logged at most.
const QUIET_PERIOD: Duration = Duration::from_secs(30);

impl SinkContext {
    fn new(name: &str) -> SinkContext {
        SinkContext {
            name: name.to_string(),
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when a message of `kind` may be logged now, `n` of its kind having been left
    /// out since the last one; `None` to leave it out.
    fn admit(&self, kind: &str) -> Option<u64> {
        self.admit_at(kind, std::time::Instant::now())
    }

    fn admit_at(&self, kind: &str, now: std::time::Instant) -> Option<u64> {
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
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

type Kafka = FutureProducer<SinkContext>;

/// Produces records to Kafka.
pub struct KafkaSink {
    name: String,
    topic: TopicTemplate,
    config: ClientConfig,
    timeout: Duration,
    producer: Mutex<Kafka>,
}

/// What became of one message.
enum Outcome {
    Delivered,
    /// Refused for what it holds (too large, an invalid record): the message, or every message
    /// sent with it in one request.
    Refused(String),
    /// Anything else: the batch is retried.
    Failed {
        reason: String,
        kind: Failure,
    },
}

/// What kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The brokers say the topic does not exist.
    MissingTopic,
    /// No acknowledgement within `timeout` (brokers down, or a topic that does not exist).
    TimedOut,
    Other,
}

/// Error codes that refuse a message for its content. Kafka answers them for a whole produce
/// request, so a message is known to be at fault only when it was sent alone.
fn refuses_content(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
    )
}

/// Error codes that mean the topic (or its partition) does not exist.
fn unknown_topic(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
    )
}

impl KafkaSink {
    /// Checks the configuration; problems are reported under `field`.
    pub fn validate(cfg: &KafkaSinkConfig, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem =
            |f: &str, m: String| problems.push(Problem::new(format!("{field}.{f}"), m));
        if cfg.brokers.is_empty() {
            problem("brokers", "must not be empty".into());
        }
        for (i, broker) in cfg.brokers.iter().enumerate() {
            let port_ok = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok || broker.contains(|c: char| c.is_whitespace() || c == ',') {
                problem(&format!("brokers[{i}]"), "must be host:port".into());
            }
        }
        match TopicTemplate::parse(&cfg.topic) {
            Err(e) => problem("topic", e),
            Ok(t) if t.0.is_empty() => problem("topic", "must not be empty".into()),
            Ok(t) => {
                // Database and table names are letters, digits and '_': check the rest.
                if let Some(p) = topic_name_problem(&t.render("d", "t")) {
                    problem("topic", p);
                } else if t.literal_len() >= MAX_TOPIC_LEN {
                    problem(
                        "topic",
                        format!("is longer than Kafka's {MAX_TOPIC_LEN} characters"),
                    );
                }
            }
        }
        if !ACKS.contains(&cfg.acks.as_str()) {
            problem("acks", "must be all, -1, 0 or 1".into());
        }
        if !COMPRESSIONS.contains(&cfg.compression.as_str()) {
            problem(
                "compression",
                "must be none, gzip, snappy, lz4 or zstd".into(),
            );
        } else if !codec_supported(&cfg.compression) {
            problem(
                "compression",
                format!(
                    "{} is not supported by this build (librdkafka was built without it); \
                     use lz4, snappy, gzip or none",
                    cfg.compression
                ),
            );
        }
        if cfg.linger.0 > MAX_LINGER {
            problem("linger", "must be at most 900s".into());
        }
        if cfg.timeout.0 < Duration::from_millis(1) {
            problem("timeout", "must be at least 1ms".into());
        } else if cfg.timeout.0 <= cfg.linger.0 {
            problem("timeout", "must be more than linger".into());
        }
        if cfg.timeout.0.as_millis() > i32::MAX as u128 {
            problem("timeout", "must be at most 24d".into());
        }
        // librdkafka checks each passed-through property name and value (connecting nowhere).
        for (k, v) in &cfg.properties {
            if let Err(e) = ClientConfig::new().set(k, v).create_native_config() {
                let message = match e {
                    KafkaError::ClientConfig(_, msg, _, _) => msg,
                    other => other.to_string(),
                };
                problems.push(Problem::new(format!("{field}.properties.{k}"), message));
            }
        }
        if problems.is_empty() {
            // And our settings with them (nothing above should let this fail).
            if let Err(e) = client_config(cfg, true).create_native_config() {
                problems.push(Problem::new(field.to_string(), e.to_string()));
            }
        }
        problems
    }

    /// Opens the sink `name` (a validated configuration). Connects lazily: brokers that are
    /// down now are no reason to fail.
    pub fn open(name: &str, cfg: &KafkaSinkConfig) -> Result<KafkaSink, String> {
        let topic = TopicTemplate::parse(&cfg.topic).map_err(|e| format!("topic {e}"))?;
        let config = client_config(cfg, true);
        let producer = create_producer(name, &config)?;
        Ok(KafkaSink {
            name: name.to_string(),
            topic,
            config,
            timeout: cfg.timeout.0,
            producer: Mutex::new(producer),
        })
    }

    fn producer(&self) -> Kafka {
        self.producer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `record` on the producer's queue, waiting while the queue is full.
    async fn enqueue(
        &self,
        producer: &Kafka,
        topic: &str,
        record: &Record,
        value: &[u8],
        deadline: Instant,
    ) -> Result<DeliveryFuture, KafkaError> {
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "database",
                value: Some(record.database.as_str()),
            })
            .insert(Header {
                key: "table",
                value: Some(record.table.as_str()),
            });
        let mut message: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(topic).payload(value).headers(headers);
        if let Some(key) = record.global_id() {
            message = message.key(key);
        }
        loop {
            match producer.send_result(message) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    message = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits for the delivery report of one message.
    async fn outcome(&self, topic: &str, future: DeliveryFuture, deadline: Instant) -> Outcome {
        match tokio::time::timeout_at(deadline, future).await {
            Err(_) => Outcome::Failed {
                reason: format!(
                    "no delivery report for a message to topic {topic} within {:?}",
                    self.timeout + REPORT_SLACK
                ),
                kind: Failure::TimedOut,
            },
            Ok(Err(_canceled)) => Outcome::Failed {
                reason: "the Kafka producer was closed".into(),
                kind: Failure::Other,
            },
            Ok(Ok(Ok(_delivery))) => Outcome::Delivered,
            Ok(Ok(Err((e, _message)))) => self.classify(topic, &e),
        }
    }

    /// What a produce error means for the batch.
    fn classify(&self, topic: &str, e: &KafkaError) -> Outcome {
        match e.rdkafka_error_code() {
            Some(code) if refuses_content(code) => Outcome::Refused(format!(
                "Kafka refuses the message for topic {topic} (too large, or not a valid \
                     record): {e}"
            )),
            Some(RDKafkaErrorCode::MessageTimedOut) => Outcome::Failed {
                reason: format!(
                    "no acknowledgement for a message to topic {topic} within {:?}: {e}",
                    self.timeout
                ),
                kind: Failure::TimedOut,
            },
            Some(code) if unknown_topic(code) => Outcome::Failed {
                reason: format!(
                    "topic {topic} does not exist on the Kafka brokers \
                     (create it, or let the brokers create topics): {e}"
                ),
                kind: Failure::MissingTopic,
            },
            _ => Outcome::Failed {
                reason: format!("producing to topic {topic} failed: {e}"),
                kind: Failure::Other,
            },
        }
    }

    /// After a failure: a producer in a fatal state (idempotence broken) is replaced.
    fn recover(&self, producer: &Kafka) {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return;
        };
        error!(
            "sink {}: the Kafka producer hit a fatal error ({code:?}: {reason}); starting a new one",
            self.name
        );
        match create_producer(&self.name, &self.config) {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self.producer.lock().unwrap_or_else(PoisonError::into_inner),
                    fresh,
                );
                // Dropping a producer blocks while it purges its queues.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => error!("sink {}: cannot start a new Kafka producer: {e}", self.name),
        }
    }
}

/// Those of `topics` that the brokers say do not exist; none when the brokers do not answer.
async fn missing_topics(producer: &Kafka, topics: Vec<String>) -> Vec<String> {
    if topics.is_empty() {
        return Vec::new();
    }
    let producer = producer.clone();
    let ask = tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for topic in topics {
            let Ok(md) = producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
            else {
                // Brokers down: no answer for the others either.
                break;
            };
            let gone = md.topics().iter().any(|t| {
                t.name() == topic
                    && t.error()
                        .is_some_and(|e| unknown_topic(RDKafkaErrorCode::from(e)))
            });
            if gone {
                missing.push(topic);
            }
        }
        missing
    });
    ask.await.unwrap_or_default()
}

fn create_producer(name: &str, config: &ClientConfig) -> Result<Kafka, String> {
    config
        .create_with_context(SinkContext::new(name))
        .map_err(|e| format!("cannot create the Kafka producer: {e}"))
}

/// The outcomes of a batch so far.
#[derive(Default)]
struct Tally {
    rejections: Vec<Rejection>,
    /// Refused with others in one request: (index, reason).
    refused: Vec<(usize, String)>,
    /// The first failure: the batch is retried.
    failure: Option<String>,
    missing_topics: Vec<String>,
    timed_out_topics: Vec<String>,
}

impl Tally {
    /// Message `index` (its value: `value`) is refused for good.
    fn reject(&mut self, index: usize, reason: String, value: &[u8]) {
        self.rejections.push(Rejection {
            index,
            reason: format!("{reason} (a value of {} bytes)", value.len()),
        });
    }

    fn note(&mut self, index: usize, topic: &str, outcome: Outcome) {
        match outcome {
            Outcome::Delivered => {}
            Outcome::Refused(reason) => self.refused.push((index, reason)),
            Outcome::Failed { reason, kind } => {
                let list = match kind {
                    Failure::MissingTopic => Some(&mut self.missing_topics),
                    Failure::TimedOut => Some(&mut self.timed_out_topics),
                    Failure::Other => None,
                };
                if let Some(list) = list {
                    if !list.iter().any(|t| t == topic) {
                        list.push(topic.to_string());
                    }
                }
                self.failure.get_or_insert(reason);
            }
        }
    }
}

#[async_trait]
impl LogSink for KafkaSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let producer = self.producer();
        let deadline = Instant::now() + self.timeout + REPORT_SLACK;
        let mut tally = Tally::default();

        // Send everything, then wait for every delivery report.
        let mut pending = Vec::with_capacity(batch.len());
        for (index, record) in batch.iter().enumerate() {
            let topic = self.topic.render(&record.database, &record.table);
            if let Some(reason) = topic_name_problem(&topic) {
                tally.rejections.push(Rejection { index, reason });
                continue;
            }
            let value = record.body_json();
            match self
                .enqueue(&producer, &topic, record, &value, deadline)
                .await
            {
                Ok(future) => pending.push((index, topic, future)),
                Err(e) => match self.classify(&topic, &e) {
                    // Checked locally, for this message alone (`message.max.bytes`).
                    Outcome::Refused(reason) => tally.reject(index, reason, &value),
                    other => {
                        tally.note(index, &topic, other);
                        break;
                    }
                },
            }
        }
        for (index, topic, future) in pending {
            let outcome = self.outcome(&topic, future, deadline).await;
            tally.note(index, &topic, outcome);
        }

        // Kafka refuses a whole produce request for one message in it: when several were
        // refused, send each alone to find the culprits. One alone was alone in its request.
        let refused = std::mem::take(&mut tally.refused);
        if tally.failure.is_none() && !refused.is_empty() {
            let alone = refused.len() == 1;
            let deadline = Instant::now() + self.timeout + REPORT_SLACK;
            for (index, reason) in refused {
                let record = &batch[index];
                let topic = self.topic.render(&record.database, &record.table);
                let value = record.body_json();
                let outcome = if alone {
                    Outcome::Refused(reason)
                } else {
                    match self
                        .enqueue(&producer, &topic, record, &value, deadline)
                        .await
                    {
                        Ok(future) => self.outcome(&topic, future, deadline).await,
                        Err(e) => self.classify(&topic, &e),
                    }
                };
                match outcome {
                    Outcome::Refused(reason) => tally.reject(index, reason, &value),
                    other => tally.note(index, &topic, other),
                }
                if tally.failure.is_some() {
                    break;
                }
            }
        }

        if tally.failure.is_some() && tally.missing_topics.is_empty() {
            // librdkafka times a message to a topic that does not exist out like one to brokers
            // that are down: ask the brokers which it is, for a clear log.
            let topics: Vec<String> = tally.timed_out_topics.iter().take(4).cloned().collect();
            for topic in missing_topics(&producer, topics).await {
                tally.failure = Some(format!(
                    "topic {topic} does not exist on the Kafka brokers \
                     (create it, or let the brokers create topics)"
                ));
                tally.missing_topics.push(topic);
            }
        }
        for topic in &tally.missing_topics {
            error!(
                "sink {}: Kafka topic {topic} does not exist; its records wait in the buffer \
                 and are retried until the topic is created",
                self.name
            );
        }
        if let Some(reason) = tally.failure {
            self.recover(&producer);
            return Err(SinkError(reason));
        }
        if !tally.rejections.is_empty() {
            tally.rejections.sort_by_key(|r| r.index);
        }
        Ok(tally.rejections)
    }

    async fn close(&self) -> Result<(), SinkError> {
        let producer = self.producer();
        let wait = self.timeout.min(MAX_CLOSE_FLUSH);
        let flushed = tokio::task::spawn_blocking(move || producer.flush(wait))
            .await
            .map_err(|e| SinkError(format!("flushing the Kafka producer failed: {e}")))?;
        flushed.map_err(|e| {
            SinkError(format!(
                "{} Kafka messages not acknowledged at close: {e}",
                self.producer().in_flight_count()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant as StdInstant;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message, OwnedMessage};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;
    use crate::record::RecordBody;

    fn config(yaml: &str) -> KafkaSinkConfig {
        serde_saphyr::from_str(yaml).expect("kafka sink YAML")
    }

    fn problems(yaml: &str) -> Vec<String> {
        KafkaSink::validate(&config(yaml), "sinks.k")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn record(table: &str, n: usize, gid: Option<&str>) -> Record {
        let mut columns = BTreeMap::new();
        columns.insert("n".to_string(), n.to_string());
        if let Some(g) = gid {
            columns.insert("td_global_id".to_string(), g.to_string());
        }
        Record {
            database: "web".into(),
            table: table.into(),
            body: RecordBody {
                time: 1_764_245_000 + n as i64,
                columns,
            },
        }
    }

    #[test]
    fn topic_template_renders_and_rejects_unknown_placeholders() {
        let t = TopicTemplate::parse("{database}.{table}").unwrap();
        assert_eq!(t.render("web", "pageviews"), "web.pageviews");
        let t = TopicTemplate::parse("td-{table}_{database}-{table}").unwrap();
        assert_eq!(t.render("web", "pv"), "td-pv_web-pv");
        // Replaced in one pass: a name that looks like a placeholder stays as it is.
        let t = TopicTemplate::parse("{database}/{table}").unwrap();
        assert_eq!(t.render("{table}", "x"), "{table}/x");
        assert_eq!(
            TopicTemplate::parse("events").unwrap().render("a", "b"),
            "events"
        );
        assert!(TopicTemplate::parse("{db}.{table}")
            .unwrap_err()
            .contains("{db}"));
        assert!(TopicTemplate::parse("{database").is_err());
        assert!(TopicTemplate::parse("database}").is_err());
        assert_eq!(TopicTemplate::parse("").unwrap().0, Vec::new());
    }

    #[test]
    fn repeated_librdkafka_messages_are_logged_once_per_period() {
        let ctx = SinkContext::new("k");
        let t0 = std::time::Instant::now();
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
    fn topic_names_kafka_refuses() {
        assert_eq!(topic_name_problem("web.pageviews"), None);
        assert_eq!(topic_name_problem("a-b_c.D9"), None);
        assert!(topic_name_problem("").is_some());
        assert!(topic_name_problem("..").is_some());
        assert!(topic_name_problem("a b").is_some());
        assert!(topic_name_problem("a/b").is_some());
        assert_eq!(topic_name_problem(&"x".repeat(249)), None);
        assert!(topic_name_problem(&"x".repeat(250))
            .unwrap()
            .contains("249"));
    }

    #[test]
    fn validation() {
        assert_eq!(
            problems("brokers: ['127.0.0.1:9092']"),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(
                "{brokers: ['k1:9092', '[::1]:9093'], topic: events, acks: '1', \
                 compression: gzip, linger: 0ms, timeout: 5s, client_id: me, \
                 properties: {security.protocol: plaintext, message.max.bytes: '2000000'}}"
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            problems("brokers: []"),
            vec!["sinks.k.brokers: must not be empty"]
        );
        assert_eq!(
            problems("brokers: ['kafka', 'k:x', 'k:1,k:2']"),
            vec![
                "sinks.k.brokers[0]: must be host:port",
                "sinks.k.brokers[1]: must be host:port",
                "sinks.k.brokers[2]: must be host:port",
            ]
        );
        let p = problems("{brokers: ['k:1'], topic: '{db}.{table}'}");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("sinks.k.topic: ") && p[0].contains("{db}"),
            "{p:?}"
        );
        let p = problems("{brokers: ['k:1'], topic: 'web/{table}'}");
        assert!(p.len() == 1 && p[0].starts_with("sinks.k.topic: "), "{p:?}");
        assert_eq!(
            problems("{brokers: ['k:1'], topic: ''}"),
            vec!["sinks.k.topic: must not be empty"]
        );
        assert_eq!(
            problems("{brokers: ['k:1'], acks: 'leader'}"),
            vec!["sinks.k.acks: must be all, -1, 0 or 1"]
        );
        for acks in ["all", "-1", "0", "1"] {
            assert_eq!(
                problems(&format!("{{brokers: ['k:1'], acks: '{acks}'}}")),
                Vec::<String>::new(),
                "acks {acks}"
            );
        }
        assert_eq!(
            problems("{brokers: ['k:1'], compression: brotli}"),
            vec!["sinks.k.compression: must be none, gzip, snappy, lz4 or zstd"]
        );
        for codec in ["none", "gzip", "snappy", "lz4"] {
            assert_eq!(
                problems(&format!("{{brokers: ['k:1'], compression: {codec}}}")),
                Vec::<String>::new(),
                "compression {codec}"
            );
        }
        // zstd: accepted exactly when this librdkafka build has it.
        let zstd = problems("{brokers: ['k:1'], compression: zstd}");
        if codec_supported("zstd") {
            assert_eq!(zstd, Vec::<String>::new());
        } else {
            assert_eq!(zstd.len(), 1, "{zstd:?}");
            assert!(
                zstd[0].starts_with("sinks.k.compression: zstd is not supported"),
                "{zstd:?}"
            );
        }
        assert_eq!(
            problems("{brokers: ['k:1'], timeout: 0s}"),
            vec!["sinks.k.timeout: must be at least 1ms"]
        );
        assert_eq!(
            problems("{brokers: ['k:1'], timeout: 1s, linger: 2s}"),
            vec!["sinks.k.timeout: must be more than linger"]
        );
        assert_eq!(
            problems("{brokers: ['k:1'], linger: 901s, timeout: 1000s}"),
            vec!["sinks.k.linger: must be at most 900s"]
        );
        // librdkafka checks the passed-through properties, each under its own name.
        let p = problems(
            "{brokers: ['k:1'], properties: {no.such.property: x, security.protocol: carrier_pigeon, \
             linger.ms: '1'}}",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("sinks.k.properties.no.such.property: "),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("sinks.k.properties.security.protocol: "),
            "{p:?}"
        );
        // Reported together with the other problems.
        let p = problems("{brokers: [], properties: {no.such.property: x}}");
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0], "sinks.k.brokers: must not be empty");
        assert!(
            p[1].starts_with("sinks.k.properties.no.such.property: "),
            "{p:?}"
        );
    }

    #[test]
    fn the_build_has_lz4_snappy_and_gzip() {
        // The default codec must work; and builtin.features must be readable for the check.
        assert!(codec_supported("lz4"));
        assert!(codec_supported("snappy"));
        assert!(codec_supported("gzip"));
        assert!(!codec_supported("brotli"));
    }

    #[test]
    fn producer_configuration() {
        let cfg = config(
            "{brokers: ['a:1', 'b:2'], acks: all, linger: 250us, timeout: 7s, \
             properties: {linger.ms: '9', security.protocol: ssl}}",
        );
        let c = client_config(&cfg, true);
        assert_eq!(c.get("bootstrap.servers"), Some("a:1,b:2"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("client.id"), Some("postback-proxy"));
        assert_eq!(c.get("message.timeout.ms"), Some("7000"));
        // properties come last and win.
        assert_eq!(c.get("linger.ms"), Some("9"));
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(client_config(&cfg, false).get("linger.ms"), Some("0.25"));
        let c = client_config(&config("{brokers: ['a:1'], acks: '1'}"), true);
        assert_eq!(c.get("enable.idempotence"), None);
        assert_eq!(c.get("linger.ms"), Some("5"));
        assert_eq!(c.get("message.timeout.ms"), Some("30000"));
    }

    #[test]
    fn open_does_not_need_the_brokers() {
        // Nothing listens on port 1: librdkafka connects lazily.
        let sink = KafkaSink::open("k", &config("brokers: ['127.0.0.1:1']")).unwrap();
        assert_eq!(sink.name, "k");
    }

    /// A mock cluster of one broker, with `topic` created.
    fn cluster(topics: &[&str]) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let mock = MockCluster::new(1).expect("mock cluster");
        for t in topics {
            mock.create_topic(t, 2, 1).expect("create topic");
        }
        mock
    }

    fn sink_for(bootstrap: &str, extra: &str) -> KafkaSink {
        let yaml = format!("{{brokers: ['{bootstrap}'], linger: 1ms, {extra}}}");
        let cfg = config(&yaml);
        assert_eq!(KafkaSink::validate(&cfg, "k"), Vec::new());
        KafkaSink::open("k", &cfg).unwrap()
    }

    /// Reads every message of `topic` from the beginning until `want` arrived or 20 s passed.
    fn read_topic(bootstrap: &str, topic: &str, want: usize) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "kafka-sink-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let until = StdInstant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < want && StdInstant::now() < until {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(m.detach()),
                Some(Err(e)) => panic!("consumer error: {e}"),
                None => {}
            }
        }
        // A little more, so that extra messages would show.
        let until = StdInstant::now() + Duration::from_millis(300);
        while StdInstant::now() < until {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.detach());
            }
        }
        out
    }

    fn header(m: &OwnedMessage, name: &str) -> Option<String> {
        let headers = m.headers()?;
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn value_n(m: &OwnedMessage) -> String {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        v["n"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn writes_key_value_and_headers() {
        let mock = cluster(&["web.pageviews", "web.clicks"]);
        let bootstrap = mock.bootstrap_servers();
        let sink = sink_for(&bootstrap, "");
        let batch = vec![
            record("pageviews", 0, Some("gid-0")),
            record("clicks", 1, Some("gid-1")),
            record("pageviews", 2, None),
        ];
        assert_eq!(
            sink.write_batch(&Batch::new(&batch, String::new()))
                .await
                .unwrap(),
            Vec::new()
        );
        sink.close().await.unwrap();

        let msgs = read_topic(&bootstrap, "web.pageviews", 2);
        assert_eq!(msgs.len(), 2, "web.pageviews");
        let mut by_n: Vec<_> = msgs.iter().map(|m| (value_n(m), m)).collect();
        by_n.sort_by(|a, b| a.0.cmp(&b.0));
        let (_, m0) = by_n[0];
        assert_eq!(m0.key(), Some(&b"gid-0"[..]));
        assert_eq!(m0.payload(), Some(&batch[0].body_json()[..]));
        assert_eq!(
            m0.payload_view::<str>().unwrap().unwrap(),
            r#"{"time":1764245000,"n":"0","td_global_id":"gid-0"}"#
        );
        assert_eq!(header(m0, "database").as_deref(), Some("web"));
        assert_eq!(header(m0, "table").as_deref(), Some("pageviews"));
        let (_, m2) = by_n[1];
        assert_eq!(m2.key(), None, "no global id: no key");
        assert_eq!(m2.payload(), Some(&batch[2].body_json()[..]));

        let clicks = read_topic(&bootstrap, "web.clicks", 1);
        assert_eq!(clicks.len(), 1);
        assert_eq!(clicks[0].key(), Some(&b"gid-1"[..]));
        assert_eq!(header(&clicks[0], "table").as_deref(), Some("clicks"));
        assert_eq!(
            sink.write_batch(&Batch::new(&[], String::new()))
                .await
                .unwrap(),
            Vec::new()
        );
    }

    #[tokio::test]
    async fn a_message_too_large_locally_is_rejected_alone() {
        let mock = cluster(&["web.pageviews"]);
        let bootstrap = mock.bootstrap_servers();
        let sink = sink_for(&bootstrap, "properties: {message.max.bytes: '2000'}");
        let mut big = record("pageviews", 1, Some("gid-1"));
        big.body.columns.insert("blob".into(), "x".repeat(5000));
        let batch = vec![
            record("pageviews", 0, Some("gid-0")),
            big,
            record("pageviews", 2, Some("gid-2")),
        ];
        let rejections = sink
            .write_batch(&Batch::new(&batch, String::new()))
            .await
            .unwrap();
        assert_eq!(rejections.len(), 1, "{rejections:?}");
        assert_eq!(rejections[0].index, 1);
        assert!(
            rejections[0].reason.contains("web.pageviews")
                && rejections[0].reason.contains("Message size too large")
                && rejections[0].reason.contains("bytes"),
            "{rejections:?}"
        );
        let mut ns: Vec<_> = read_topic(&bootstrap, "web.pageviews", 2)
            .iter()
            .map(value_n)
            .collect();
        ns.sort();
        assert_eq!(ns, ["0", "2"]);
    }

    #[tokio::test]
    async fn a_topic_name_too_long_is_rejected() {
        let mock = cluster(&["web.pageviews"]);
        let bootstrap = mock.bootstrap_servers();
        let sink = sink_for(&bootstrap, "");
        let batch = vec![
            record(&"t".repeat(250), 0, None),
            record("pageviews", 1, None),
        ];
        let rejections = sink
            .write_batch(&Batch::new(&batch, String::new()))
            .await
            .unwrap();
        assert_eq!(rejections.len(), 1, "{rejections:?}");
        assert_eq!(rejections[0].index, 0);
        assert!(rejections[0].reason.contains("249"), "{rejections:?}");
        assert_eq!(read_topic(&bootstrap, "web.pageviews", 1).len(), 1);
    }

    #[tokio::test]
    async fn a_size_refusal_of_several_messages_is_resolved_one_by_one() {
        let mock = cluster(&["web.pageviews"]);
        let bootstrap = mock.bootstrap_servers();
        let sink = sink_for(&bootstrap, "");
        // The broker refuses the first produce request (the whole batch) as too large; sent
        // again one by one, every message goes through.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let batch: Vec<_> = (0..3)
            .map(|n| record("pageviews", n, Some("same-gid")))
            .collect();
        assert_eq!(
            sink.write_batch(&Batch::new(&batch, String::new()))
                .await
                .unwrap(),
            Vec::new()
        );
        let mut ns: Vec<_> = read_topic(&bootstrap, "web.pageviews", 3)
            .iter()
            .map(value_n)
            .collect();
        ns.sort();
        assert_eq!(ns, ["0", "1", "2"]);

        // A message the broker refuses alone is rejected for good, with the reason.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let rejections = sink
            .write_batch(&Batch::new(&[record("pageviews", 9, None)], String::new()))
            .await
            .unwrap();
        assert_eq!(rejections.len(), 1, "{rejections:?}");
        assert_eq!(rejections[0].index, 0);
        assert!(
            rejections[0]
                .reason
                .to_lowercase()
                .contains("message size too large"),
            "{rejections:?}"
        );
        // And the producer still works afterwards.
        assert_eq!(
            sink.write_batch(&Batch::new(&[record("pageviews", 10, None)], String::new()))
                .await
                .unwrap(),
            Vec::new()
        );
    }

    #[tokio::test]
    async fn brokers_down_fail_the_batch_and_it_goes_through_later() {
        let mock = cluster(&["web.pageviews"]);
        let bootstrap = mock.bootstrap_servers();
        let sink = sink_for(&bootstrap, "timeout: 1500ms");
        mock.broker_down(-1).unwrap();
        let batch: Vec<_> = (0..3).map(|n| record("pageviews", n, None)).collect();
        let err = sink
            .write_batch(&Batch::new(&batch, String::new()))
            .await
            .unwrap_err();
        assert!(err.0.contains("web.pageviews"), "{err}");
        mock.broker_up(-1).unwrap();
        // The caller retries: within a bounded number of tries the batch is delivered.
        let mut delivered = false;
        for _ in 0..10 {
            if let Ok(r) = sink.write_batch(&Batch::new(&batch, String::new())).await {
                assert_eq!(r, Vec::new());
                delivered = true;
                break;
            }
        }
        assert!(delivered, "not delivered after the broker came back");
        let mut ns: Vec<_> = read_topic(&bootstrap, "web.pageviews", 3)
            .iter()
            .map(value_n)
            .collect();
        ns.sort();
        ns.dedup();
        assert_eq!(ns, ["0", "1", "2"]);
    }

    #[tokio::test]
    async fn a_topic_that_does_not_exist_fails_the_batch() {
        let mock = cluster(&["web.pageviews"]);
        let bootstrap = mock.bootstrap_servers();
        mock.topic_error(
            "web.missing",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
        let sink = sink_for(&bootstrap, "timeout: 2s");
        let batch = vec![record("pageviews", 0, None), record("missing", 1, None)];
        let err = sink
            .write_batch(&Batch::new(&batch, String::new()))
            .await
            .unwrap_err();
        assert!(err.0.contains("web.missing"), "{err}");
        assert!(err.0.contains("does not exist"), "{err}");
    }
}
