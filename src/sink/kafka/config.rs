//! `type: kafka`: its configuration, the checks on it, and the librdkafka settings made from it.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use serde::{Deserialize, Deserializer};

use super::topic::{self, MAX_TOPIC_LEN};
use super::KafkaSink;
use crate::config::Problem;
use crate::sink::{LogSink, SinkKind};
use crate::units::{check_host_port, number_or_word, HumanDuration};

/// librdkafka's limit on `linger.ms`.
const MAX_LINGER: Duration = Duration::from_secs(900);
/// How often librdkafka reports its statistics (each broker's state), for
/// [`crate::sink::LogSink::peer_down`].
pub(super) const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// `type: kafka`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic template: `{database}` and `{table}` are replaced; a fixed name is fine.
    #[serde(default = "default_kafka_topic")]
    pub topic: String,
    /// `all` (default, also written `-1`), `1` or `0`.
    #[serde(default)]
    pub acks: Acks,
    /// `lz4` (default), `none`, `gzip`, `snappy`, `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// How long the producer waits to fill a batch.
    #[serde(default = "default_kafka_linger")]
    pub linger: HumanDuration,
    #[serde(default = "default_kafka_client_id")]
    pub client_id: String,
    /// How long a batch may wait for its acknowledgements before it is retried.
    #[serde(default = "default_kafka_timeout")]
    pub timeout: HumanDuration,
    /// Further librdkafka properties, passed through (`security.protocol`, `sasl.*`, `ssl.*`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_kafka_topic() -> String {
    "{database}.{table}".into()
}
fn default_kafka_linger() -> HumanDuration {
    HumanDuration::millis(5)
}
fn default_kafka_client_id() -> String {
    "postback-proxy".into()
}
fn default_kafka_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}

/// `acks`: how many replicas acknowledge a message before it counts as delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Acks {
    /// Every in-sync replica (`all` or `-1`); the producer is idempotent.
    #[default]
    All,
    /// The partition leader (`1`).
    Leader,
    /// Nobody (`0`): delivered once sent.
    None,
}

impl Acks {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }

    fn from_word(word: &str) -> Option<Acks> {
        match word {
            "all" | "-1" => Some(Acks::All),
            "1" => Some(Acks::Leader),
            "0" => Some(Acks::None),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Acks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_word(d, "all, -1, 0 or 1", |v| {
            Acks::from_word(v).ok_or_else(|| format!("acks must be all, -1, 0 or 1, not `{v}`"))
        })
    }
}

/// `compression`: the codec of produced batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    /// The librdkafka value (also its name in `builtin.features`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Whether this librdkafka build has the compression codec `name` (`builtin.features`).
pub(super) fn codec_supported(name: &str) -> bool {
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
pub(super) fn client_config(cfg: &KafkaSinkConfig, with_properties: bool) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.join(","))
        .set("client.id", &cfg.client_id)
        .set("acks", cfg.acks.as_str())
        .set("compression.type", cfg.compression.as_str())
        .set("linger.ms", millis_f64(cfg.linger.0))
        .set(
            "message.timeout.ms",
            cfg.timeout
                .0
                .as_millis()
                .clamp(1, i32::MAX as u128)
                .to_string(),
        )
        // Each broker's state once a second: how the sink knows a broker is back.
        .set(
            "statistics.interval.ms",
            STATS_INTERVAL.as_millis().to_string(),
        );
    // Idempotence keeps librdkafka's own retries from duplicating or reordering messages. Its
    // producer id and sequence numbers live on the brokers, though: a broker that comes back
    // without its data refuses them for ever, which the sink mends by starting a new producer
    // (see `KafkaSink::recover`).
    if cfg.acks == Acks::All {
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

impl SinkKind for KafkaSinkConfig {
    fn validate(&self, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem =
            |f: &str, m: String| problems.push(Problem::new(format!("{field}.{f}"), m));
        if self.brokers.is_empty() {
            problem("brokers", "must not be empty".into());
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            if let Err(e) = check_host_port(broker) {
                problem(&format!("brokers[{i}]"), e.into());
            }
        }
        match topic::parse(&self.topic) {
            Err(e) => problem("topic", e),
            Ok(t) => {
                // Database and table names are letters, digits and '_': check the rest.
                if let Some(p) = topic::name_problem(&t.render("d", "t")) {
                    problem("topic", p);
                } else if t.literal_len() >= MAX_TOPIC_LEN {
                    problem(
                        "topic",
                        format!("is longer than Kafka's {MAX_TOPIC_LEN} characters"),
                    );
                }
            }
        }
        if !codec_supported(self.compression.as_str()) {
            problem(
                "compression",
                format!(
                    "{} is not supported by this build (librdkafka was built without it); \
                     use lz4, snappy, gzip or none",
                    self.compression.as_str()
                ),
            );
        }
        if self.linger.0 > MAX_LINGER {
            problem("linger", "must be at most 900s".into());
        }
        if self.timeout.0 < Duration::from_millis(1) {
            problem("timeout", "must be at least 1ms".into());
        } else if self.timeout.0 <= self.linger.0 {
            problem("timeout", "must be more than linger".into());
        }
        if self.timeout.0.as_millis() > i32::MAX as u128 {
            problem("timeout", "must be at most 24d".into());
        }
        // librdkafka checks each passed-through property name and value (connecting nowhere).
        for (k, v) in &self.properties {
            if let Err(e) = ClientConfig::new().set(k, v).create_native_config() {
                problems.push(Problem::new(
                    format!("{field}.properties.{k}"),
                    property_message(e),
                ));
            }
        }
        if problems.is_empty() {
            // And our settings with them (nothing above should let this fail).
            if let Err(e) = client_config(self, true).create_native_config() {
                problems.push(Problem::new(field.to_string(), property_message(e)));
            }
        }
        problems
    }

    fn open(&self, name: &str, _field: &str) -> Result<Box<dyn LogSink>, Problem> {
        Ok(Box::new(KafkaSink::open(name, self)?))
    }
}

/// librdkafka's own words for a property it refuses.
pub(super) fn property_message(e: KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, msg, _, _) => msg,
        other => other.to_string(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::sink::kafka) fn config(yaml: &str) -> KafkaSinkConfig {
        serde_saphyr::from_str(yaml).expect("kafka sink YAML")
    }

    fn problems(yaml: &str) -> Vec<String> {
        config(yaml)
            .validate("sinks.k")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// The parse error of `yaml`, which must not parse.
    fn parse_error(yaml: &str) -> String {
        serde_saphyr::from_str::<KafkaSinkConfig>(yaml)
            .unwrap_err()
            .to_string()
    }

    /// The one wording of a bad `host:port`.
    const HOST_PORT: &str = "must be host:port with a port from 1 to 65535 (IPv6 in brackets)";

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
                format!("sinks.k.brokers[0]: {HOST_PORT}"),
                format!("sinks.k.brokers[1]: {HOST_PORT}"),
                format!("sinks.k.brokers[2]: {HOST_PORT}"),
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
        // A word outside the set is refused when the file is parsed, with its line.
        let err = parse_error("brokers: ['k:1']\nacks: leader\n");
        assert!(err.contains("must be all, -1, 0 or 1"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        for acks in ["all", "-1", "0", "1"] {
            assert_eq!(
                problems(&format!("{{brokers: ['k:1'], acks: '{acks}'}}")),
                Vec::<String>::new(),
                "acks {acks}"
            );
        }
        // YAML reads an unquoted 1 or -1 as a number: the same values.
        for (acks, want) in [("1", Acks::Leader), ("0", Acks::None), ("-1", Acks::All)] {
            let cfg = config(&format!("{{brokers: ['k:1'], acks: {acks}}}"));
            assert_eq!(cfg.acks, want, "acks {acks}");
        }
        assert!(parse_error("{brokers: ['k:1'], acks: 2}").contains("all, -1, 0 or 1"));
        let err = parse_error("brokers: ['k:1']\ncompression: brotli\n");
        assert!(
            err.contains("brotli") && err.contains("lz4") && err.contains("line 2"),
            "{err}"
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
    fn ports_follow_the_one_host_port_rule() {
        assert_eq!(
            problems("brokers: ['k:0']"),
            vec![format!("sinks.k.brokers[0]: {HOST_PORT}")]
        );
        assert_eq!(problems("brokers: ['k:65535']"), Vec::<String>::new());
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
        assert_eq!(c.get("statistics.interval.ms"), Some("1000"));
    }
}
