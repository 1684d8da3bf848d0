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

mod config;
mod context;
mod topic;

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use log::{error, warn};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

pub use config::{Acks, Compression, KafkaSinkConfig};

use self::config::client_config;
use self::context::{BrokerWatch, SinkContext};
use super::{Batch, LogSink, Rejection, SinkError};
use crate::config::Problem;
use crate::record::Record;
use crate::sync::lock;
use crate::template::Template;

/// How much longer than `timeout` a batch may wait for its delivery reports (librdkafka reports
/// every message within `message.timeout.ms`; this only guards against a report that never comes).
const REPORT_SLACK: Duration = Duration::from_secs(5);
/// How long the check whether a topic exists waits for the brokers' answer.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `close()` waits for the producer to flush.
const MAX_CLOSE_FLUSH: Duration = Duration::from_secs(10);

type Kafka = FutureProducer<SinkContext>;

/// Produces records to Kafka.
pub struct KafkaSink {
    name: String,
    topic: Template,
    config: ClientConfig,
    timeout: Duration,
    producer: Mutex<Producing>,
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
    /// Opens the sink `name` (a validated configuration). Connects lazily: brokers that are
    /// down now are no reason to fail.
    pub fn open(name: &str, cfg: &KafkaSinkConfig) -> Result<KafkaSink, Problem> {
        let field = format!("sinks.{name}");
        let topic =
            topic::parse(&cfg.topic).map_err(|e| Problem::new(format!("{field}.topic"), e))?;
        let config = client_config(cfg, true);
        let producer = create_producer(name, &config).map_err(|e| open_problem(&field, e))?;
        Ok(KafkaSink {
            name: name.to_string(),
            topic,
            config,
            timeout: cfg.timeout.0,
            producer: Mutex::new(producer),
        })
    }

    fn producer(&self) -> Producing {
        lock(&self.producer).clone()
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

    /// After a failure: a producer in a fatal state (idempotence broken) is replaced, and so is
    /// one whose messages time out while a broker is reachable. The latter is a broker that came
    /// back without its data (a rebuilt cluster, tansu with memory storage): the idempotent
    /// producer keeps its producer id and sequence numbers, which the new broker does not know,
    /// and librdkafka would retry them for ever. A fresh producer asks for a new id.
    fn recover(&self, producing: &Producing, timed_out: bool) {
        if let Some((code, reason)) = producing.producer.client().fatal_error() {
            error!(
                "sink {}: the Kafka producer hit a fatal error ({code:?}: {reason}); starting a new one",
                self.name
            );
        } else if timed_out && producing.brokers.peer_down().is_none() {
            warn!(
                "sink {}: messages timed out while a Kafka broker is reachable; starting a new \
                 producer (a broker that lost its state does not know the old one)",
                self.name
            );
        } else {
            return;
        }
        match create_producer(&self.name, &self.config) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *lock(&self.producer), fresh);
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

/// A producer, and the watch on its brokers.
#[derive(Clone)]
struct Producing {
    producer: Kafka,
    brokers: BrokerWatch,
}

fn create_producer(name: &str, config: &ClientConfig) -> Result<Producing, KafkaError> {
    let context = SinkContext::new(name);
    let brokers = context.watch();
    let producer = config.create_with_context(context)?;
    Ok(Producing { producer, brokers })
}

/// A producer that cannot be created, as a problem with the field at fault: a property
/// librdkafka refuses names that property (ours by their YAML name), anything else the sink.
fn open_problem(field: &str, e: KafkaError) -> Problem {
    let key = match &e {
        KafkaError::ClientConfig(_, _, key, _) => Some(key.clone()),
        _ => None,
    };
    let at = match key.as_deref() {
        Some("bootstrap.servers") => format!("{field}.brokers"),
        Some("client.id") => format!("{field}.client_id"),
        Some("acks") => format!("{field}.acks"),
        Some("compression.type") => format!("{field}.compression"),
        Some("linger.ms") => format!("{field}.linger"),
        Some("message.timeout.ms") => format!("{field}.timeout"),
        Some(other) => format!("{field}.properties.{other}"),
        None => field.to_string(),
    };
    let message = match e {
        e @ KafkaError::ClientConfig(..) => config::property_message(e),
        e => format!("cannot create the Kafka producer: {e}"),
    };
    Problem::new(at, message)
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
        let producing = self.producer();
        let producer = &producing.producer;
        let deadline = Instant::now() + self.timeout + REPORT_SLACK;
        let mut tally = Tally::default();

        // Send everything, then wait for every delivery report.
        let mut pending = Vec::with_capacity(batch.len());
        for (index, record) in batch.iter().enumerate() {
            let topic = self.topic.render(&record.database, &record.table);
            if let Some(reason) = topic::name_problem(&topic) {
                tally.rejections.push(Rejection { index, reason });
                continue;
            }
            let value = record.body_json();
            match self
                .enqueue(producer, &topic, record, &value, deadline)
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
                        .enqueue(producer, &topic, record, &value, deadline)
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
            for topic in missing_topics(producer, topics).await {
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
            let timed_out = !tally.timed_out_topics.is_empty() && tally.missing_topics.is_empty();
            let down = producing.brokers.peer_down();
            self.recover(&producing, timed_out);
            return Err(match down {
                Some(down) => SinkError::unreachable(
                    self.config
                        .get("bootstrap.servers")
                        .unwrap_or("the Kafka brokers"),
                    format!("{down}; {reason}"),
                ),
                None if timed_out => SinkError::Timeout(reason),
                None => SinkError::other(reason),
            });
        }
        if !tally.rejections.is_empty() {
            tally.rejections.sort_by_key(|r| r.index);
        }
        Ok(tally.rejections)
    }

    async fn close(&self) -> Result<(), SinkError> {
        let producer = self.producer().producer;
        let wait = self.timeout.min(MAX_CLOSE_FLUSH);
        let flushed = tokio::task::spawn_blocking(move || producer.flush(wait))
            .await
            .map_err(|e| SinkError::caused("flushing the Kafka producer failed", e))?;
        flushed.map_err(|e| {
            SinkError::caused(
                format!(
                    "{} Kafka messages not acknowledged at close",
                    self.producer().producer.in_flight_count()
                ),
                e,
            )
        })
    }

    fn peer_down(&self) -> Option<String> {
        lock(&self.producer).brokers.peer_down()
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

    use super::config::tests::config;
    use super::*;
    use crate::record::RecordBody;
    use crate::sink::test_support::write;
    use crate::sink::SinkKind;

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
        assert_eq!(cfg.validate("k"), Vec::new());
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
        assert_eq!(write(&sink, &batch).await.unwrap(), Vec::new());
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
        assert_eq!(write(&sink, &[]).await.unwrap(), Vec::new());
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
        let rejections = write(&sink, &batch).await.unwrap();
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
        let rejections = write(&sink, &batch).await.unwrap();
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
        assert_eq!(write(&sink, &batch).await.unwrap(), Vec::new());
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
        let rejections = write(&sink, &[record("pageviews", 9, None)]).await.unwrap();
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
            write(&sink, &[record("pageviews", 10, None)])
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
        // Connected first, so that the broker going down is seen as it happens.
        write(&sink, &[record("pageviews", 0, None)]).await.unwrap();
        assert_eq!(sink.peer_down(), None);
        mock.broker_down(-1).unwrap();
        let batch: Vec<_> = (0..3).map(|n| record("pageviews", n, None)).collect();
        let err = write(&sink, &batch).await.unwrap_err();
        assert!(err.to_string().contains("web.pageviews"), "{err}");
        // librdkafka's AllBrokersDown event: the sink knows, and the error says so.
        let down = sink
            .peer_down()
            .expect("the sink knows its brokers are down");
        assert!(down.contains("every Kafka broker is unreachable"), "{down}");
        assert!(err.is_unreachable(), "{err}");
        mock.broker_up(-1).unwrap();
        // The caller retries: within a bounded number of tries the batch is delivered.
        let mut delivered = false;
        for _ in 0..10 {
            if let Ok(r) = write(&sink, &batch).await {
                assert_eq!(r, Vec::new());
                delivered = true;
                break;
            }
        }
        assert!(delivered, "not delivered after the broker came back");
        // The broker statistics show it up again within a few seconds.
        let until = StdInstant::now() + Duration::from_secs(10);
        while sink.peer_down().is_some() && StdInstant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(sink.peer_down(), None);
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
        let err = write(&sink, &batch).await.unwrap_err();
        assert!(err.to_string().contains("web.missing"), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
