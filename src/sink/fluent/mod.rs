//! `type: fluent`: the Fluentd forward protocol (v1) over TCP, for td-agent, Fluentd and Fluent Bit.
//!
//! A batch is grouped by tag (the template with `{database}` and `{table}` replaced; records keep
//! their order within a tag) and each group goes out as one Forward-mode message:
//!
//! ```text
//! [tag, [[time, {column: value, ...}], ...], {"chunk": "<id>", "size": <entries>}]
//! ```
//!
//! `time` is the record's `time` (integer UNIX seconds, the event time Fluentd keeps); the map holds
//! every other column as a string. With `require_ack` each message carries a fresh `chunk` id and
//! the sink waits for the server's `{"ack": "<id>"}` before the next one; a missing or different
//! ack fails the batch. Without it the option is `{"size": n}` and a message counts as delivered
//! once written to the socket.
//!
//! One connection is kept between batches. It is opened lazily (so the proxy starts while Fluentd is
//! down), and dropped on any error; the next batch connects again. Connect, write and the wait for
//! each ack are each bounded by `timeout`. A failed batch is retried whole by the delivery layer,
//! so a batch whose first tags were acknowledged before a later one failed is sent again in full:
//! at least once.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Cursor};
use std::time::Duration;

use async_trait::async_trait;
use log::{debug, info};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::timeout;

mod config;

pub use config::FluentSinkConfig;

use super::{Batch, LogSink, PeerDown, Rejection, SinkError};
use crate::config::Problem;
use crate::record::Record;
use crate::template::Template;
use crate::units::check_host_port;

/// The most a server may send as one ack before we give up on it.
const MAX_ACK_BYTES: usize = 64 * 1024;

/// Writes batches to one Fluentd forward input.
pub struct FluentSink {
    name: String,
    address: String,
    tag: Template,
    require_ack: bool,
    timeout: Duration,
    conn: Mutex<Option<TcpStream>>,
    down: PeerDown,
}

/// The batch grouped by rendered tag: tags in order of first appearance, records in batch order
/// within each tag.
fn group_by_tag<'a>(template: &Template, batch: &'a [Record]) -> Vec<(String, Vec<&'a Record>)> {
    let mut groups: Vec<(String, Vec<&Record>)> = Vec::new();
    let mut by_table: HashMap<(&str, &str), usize> = HashMap::new();
    let mut by_tag: HashMap<String, usize> = HashMap::new();
    for record in batch {
        let key = (record.database.as_str(), record.table.as_str());
        let index = match by_table.get(&key) {
            Some(&i) => i,
            None => {
                let tag = template.render(key.0, key.1);
                let i = *by_tag.entry(tag.clone()).or_insert_with(|| {
                    groups.push((tag, Vec::new()));
                    groups.len() - 1
                });
                by_table.insert(key, i);
                i
            }
        };
        groups[index].1.push(record);
    }
    groups
}

/// The option map of a Forward-mode message.
#[derive(Serialize)]
struct Options<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk: Option<&'a str>,
    size: usize,
}

/// One Forward-mode message: `[tag, [[time, record], ...], option]`.
fn encode_message(tag: &str, records: &[&Record], chunk: Option<&str>) -> Vec<u8> {
    let entries: Vec<(i64, &BTreeMap<String, String>)> = records
        .iter()
        .map(|r| (r.body.time, &r.body.columns))
        .collect();
    let options = Options {
        chunk,
        size: entries.len(),
    };
    // Strings, integers, arrays and maps into a Vec: cannot fail.
    rmp_serde::to_vec_named(&(tag, entries, options)).expect("forward message encodes")
}

/// A fresh chunk id: 32 hex digits.
fn new_chunk_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The server's answer to a message with a `chunk` option.
#[derive(Deserialize)]
struct AckResponse {
    ack: String,
}

/// Decodes an ack from `buf`: `Ok(None)` while it is incomplete.
fn decode_ack(buf: &[u8]) -> Result<Option<String>, String> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(buf));
    match AckResponse::deserialize(&mut de) {
        Ok(response) => {
            if de.position() as usize != buf.len() {
                return Err("unexpected data after the ack".into());
            }
            Ok(Some(response.ack))
        }
        Err(
            rmp_serde::decode::Error::InvalidMarkerRead(e)
            | rmp_serde::decode::Error::InvalidDataRead(e),
        ) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(format!("the answer is not an ack map: {e}")),
    }
}

/// `true` when an idle connection still looks usable: nothing to read, no end of stream.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl FluentSink {
    /// Opens the sink `name` (a validated configuration). Does not connect: the first batch does.
    pub fn open(name: &str, cfg: &FluentSinkConfig) -> Result<FluentSink, Problem> {
        check_host_port(&cfg.address).map_err(|e| {
            Problem::new(
                format!("sinks.{name}.address"),
                format!("`{}` {e}", cfg.address),
            )
        })?;
        let tag = config::parse_tag(&cfg.tag)
            .map_err(|e| Problem::new(format!("sinks.{name}.tag"), e))?;
        Ok(FluentSink {
            name: name.to_owned(),
            address: cfg.address.clone(),
            tag,
            require_ack: cfg.require_ack,
            timeout: cfg.timeout.0,
            conn: Mutex::new(None),
            down: PeerDown::default(),
        })
    }

    async fn connect(&self) -> Result<TcpStream, SinkError> {
        let connected = timeout(self.timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| {
                SinkError::unreachable(
                    &self.address,
                    format!("connecting timed out after {:?}", self.timeout),
                )
            })
            .and_then(|r| r.map_err(|e| SinkError::unreachable(&self.address, e)));
        let stream = self.down.track(connected)?;
        // Messages are written whole; do not let Nagle hold back their tails.
        let _ = stream.set_nodelay(true);
        info!("sink {}: connected to {}", self.name, self.address);
        Ok(stream)
    }

    /// Sends one message and, with `chunk`, waits for its ack.
    async fn send(
        &self,
        stream: &mut TcpStream,
        message: &[u8],
        chunk: Option<&str>,
    ) -> Result<(), SinkError> {
        timeout(self.timeout, stream.write_all(message))
            .await
            .map_err(|_| SinkError::Timeout(format!("writing to {} timed out", self.address)))?
            .map_err(|e| SinkError::io(format!("writing to {} failed", self.address), e))?;
        let Some(chunk) = chunk else {
            return Ok(());
        };
        let ack = timeout(self.timeout, read_ack(stream))
            .await
            .map_err(|_| {
                SinkError::Timeout(format!(
                    "{} did not acknowledge chunk {chunk} within {:?}",
                    self.address, self.timeout
                ))
            })?
            .map_err(|e| {
                SinkError::other(format!("waiting for the ack from {}: {e}", self.address))
            })?;
        if ack != chunk {
            return Err(SinkError::other(format!(
                "{} acknowledged chunk {ack:?}, expected {chunk}",
                self.address
            )));
        }
        Ok(())
    }
}

/// Reads one ack map from `stream`.
async fn read_ack(stream: &mut TcpStream) -> Result<String, String> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(ack) = decode_ack(&buf)? {
            return Ok(ack);
        }
        if buf.len() > MAX_ACK_BYTES {
            return Err(format!("the answer is over {MAX_ACK_BYTES} bytes"));
        }
    }
}

#[async_trait]
impl LogSink for FluentSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|s| !still_open(s)) {
            debug!(
                "sink {}: the connection to {} was closed; reconnecting",
                self.name, self.address
            );
            *conn = None;
        }
        let stream = match conn.as_mut() {
            Some(stream) => stream,
            None => conn.insert(self.connect().await?),
        };
        for (tag, records) in group_by_tag(&self.tag, batch) {
            let chunk = self.require_ack.then(new_chunk_id);
            let message = encode_message(&tag, &records, chunk.as_deref());
            if let Err(e) = self.send(stream, &message, chunk.as_deref()).await {
                // The stream may be mid-message or hold a late ack: never reuse it.
                *conn = None;
                return Err(e);
            }
        }
        Ok(Vec::new())
    }

    async fn close(&self) -> Result<(), SinkError> {
        if let Some(mut stream) = self.conn.lock().await.take() {
            let _ = timeout(self.timeout, stream.shutdown()).await;
        }
        Ok(())
    }

    fn peer_down(&self) -> Option<String> {
        self.down.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::test_support::{test_record as record, write};
    use crate::sink::SinkKind;
    use crate::units::HumanDuration;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

    fn config(address: &str) -> FluentSinkConfig {
        FluentSinkConfig {
            address: address.into(),
            tag: "td.{database}.{table}".into(),
            require_ack: true,
            timeout: HumanDuration::secs(5),
        }
    }

    /// A decoded msgpack value, enough for the message structure.
    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(untagged)]
    enum V {
        Int(i64),
        Str(String),
        Array(Vec<V>),
        Map(BTreeMap<String, V>),
    }

    fn s(text: &str) -> V {
        V::Str(text.into())
    }

    fn map(pairs: &[(&str, V)]) -> V {
        V::Map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), clone(v)))
                .collect(),
        )
    }

    fn clone(v: &V) -> V {
        match v {
            V::Int(i) => V::Int(*i),
            V::Str(t) => V::Str(t.clone()),
            V::Array(a) => V::Array(a.iter().map(clone).collect()),
            V::Map(m) => V::Map(m.iter().map(|(k, v)| (k.clone(), clone(v))).collect()),
        }
    }

    fn tag(template: &str) -> Template {
        config::parse_tag(template).unwrap()
    }

    #[test]
    fn tags_are_rendered_in_one_pass() {
        assert_eq!(
            tag("td.{database}.{table}").render("web", "pageviews"),
            "td.web.pageviews"
        );
        assert_eq!(tag("fixed").render("web", "pv"), "fixed");
        assert_eq!(tag("{table}-{table}").render("d", "t"), "t-t");
        // An unknown placeholder is refused when the configuration is checked.
        assert!(config::parse_tag("{x}.{table}")
            .unwrap_err()
            .contains("{x}"));
        // A name that looks like a placeholder is not expanded again.
        assert_eq!(
            tag("{database}.{table}").render("{table}", "t"),
            "{table}.t"
        );
    }

    #[test]
    fn config_checks_name_the_field() {
        let ok = config("127.0.0.1:24224");
        assert!(ok.validate("sinks.f").is_empty());
        for good in ["fluentd:24224", "[::1]:24224", "localhost:1"] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:",
            ":24224",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "127.0.0.1:+1",
            "::1:24224",
            "[nothost]:1",
            "tcp://h:1",
        ] {
            let p = config(bad).validate("sinks.f");
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(p[0].field, "sinks.f.address");
            assert!(FluentSink::open("f", &config(bad)).is_err(), "{bad}");
        }
        let mut c = config("127.0.0.1:24224");
        for bad in ["", "td {table}", "td.{db}", "td.{table", "td.}x"] {
            c.tag = bad.into();
            let p = c.validate("sinks.f");
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(p[0].field, "sinks.f.tag");
        }
        c.tag = "app.{table}".into();
        c.timeout = HumanDuration::secs(0);
        let p = c.validate("sinks.f");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "sinks.f.timeout");
    }

    #[test]
    fn batches_are_grouped_by_rendered_tag_in_order() {
        let batch = vec![
            record("web", "pv", 1, &[("n", "1")]),
            record("web", "click", 2, &[("n", "2")]),
            record("web", "pv", 3, &[("n", "3")]),
            record("ads", "pv", 4, &[("n", "4")]),
            record("web", "click", 5, &[("n", "5")]),
        ];
        // The tags and each tag's record times.
        fn shape<'a>(groups: &'a [(String, Vec<&Record>)]) -> Vec<(&'a str, Vec<i64>)> {
            let times = |rs: &[&Record]| rs.iter().map(|r| r.body.time).collect();
            groups
                .iter()
                .map(|(t, rs)| (t.as_str(), times(rs)))
                .collect()
        }
        let groups = group_by_tag(&tag("td.{database}.{table}"), &batch);
        assert_eq!(
            shape(&groups),
            vec![
                ("td.web.pv", vec![1, 3]),
                ("td.web.click", vec![2, 5]),
                ("td.ads.pv", vec![4]),
            ]
        );
        // Different tables rendering the same tag share one message.
        let groups = group_by_tag(&tag("app.{table}"), &batch);
        assert_eq!(
            shape(&groups),
            vec![("app.pv", vec![1, 3, 4]), ("app.click", vec![2, 5])]
        );
        assert!(group_by_tag(&tag("x"), &[]).is_empty());
    }

    #[test]
    fn messages_are_forward_mode_arrays() {
        let a = record(
            "web",
            "pv",
            1764245000,
            &[("page", "/home"), ("q\"uote", "line\nbreak\u{0}</script>")],
        );
        let b = record("web", "pv", 1764245001, &[]);
        let bytes = encode_message("td.web.pv", &[&a, &b], Some("abc123"));
        let decoded: V = rmp_serde::from_slice(&bytes).unwrap();
        let expected = V::Array(vec![
            s("td.web.pv"),
            V::Array(vec![
                V::Array(vec![
                    V::Int(1764245000),
                    map(&[
                        ("page", s("/home")),
                        ("q\"uote", s("line\nbreak\u{0}</script>")),
                    ]),
                ]),
                V::Array(vec![V::Int(1764245001), map(&[])]),
            ]),
            map(&[("chunk", s("abc123")), ("size", V::Int(2))]),
        ]);
        assert_eq!(decoded, expected);
        // The first bytes: a fixarray of 3, then the tag as a fixstr.
        assert_eq!(bytes[0], 0x93);
        assert_eq!(bytes[1], 0xa0 | 9);

        let bytes = encode_message("t", &[&b], None);
        let decoded: V = rmp_serde::from_slice(&bytes).unwrap();
        let V::Array(parts) = decoded else {
            panic!("not an array")
        };
        assert_eq!(parts[2], map(&[("size", V::Int(1))]));
    }

    #[test]
    fn acks_are_decoded_when_complete() {
        #[derive(Serialize)]
        struct Ack<'a> {
            ack: &'a str,
        }
        let full = rmp_serde::to_vec_named(&Ack { ack: "abc" }).unwrap();
        for cut in 0..full.len() {
            assert_eq!(decode_ack(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(decode_ack(&full), Ok(Some("abc".into())));
        let mut extra = full.clone();
        extra.push(0xc0);
        assert!(decode_ack(&extra).is_err());
        assert!(decode_ack(&rmp_serde::to_vec(&"abc").unwrap()).is_err());
        let other = rmp_serde::to_vec_named(&BTreeMap::from([("nack", "abc")])).unwrap();
        assert!(decode_ack(&other).is_err());
    }

    /// Reads one whole message from `stream` (a Forward-mode array) and returns it with its chunk.
    async fn read_message(stream: &mut TcpStream) -> Option<(V, Option<String>)> {
        let mut buf = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            let n = stream.read(&mut piece).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&piece[..n]);
            let mut de = rmp_serde::Deserializer::new(Cursor::new(&buf[..]));
            if let Ok(v) = V::deserialize(&mut de) {
                assert_eq!(de.position() as usize, buf.len(), "one message at a time");
                let chunk = match &v {
                    V::Array(parts) => match parts.get(2) {
                        Some(V::Map(m)) => match m.get("chunk") {
                            Some(V::Str(c)) => Some(c.clone()),
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                };
                return Some((v, chunk));
            }
        }
    }

    async fn send_ack(stream: &mut TcpStream, ack: &str) {
        let bytes = rmp_serde::to_vec_named(&BTreeMap::from([("ack", ack)])).unwrap();
        stream.write_all(&bytes).await.unwrap();
    }

    /// A loopback listener that hands its first `connections` connections, one at a time, to
    /// `serve`, with a sender for the messages it wants the test to see; returns its address, the
    /// task and the receiving end.
    async fn server<F, Fut>(
        connections: usize,
        mut serve: F,
    ) -> (String, tokio::task::JoinHandle<()>, UnboundedReceiver<V>)
    where
        F: FnMut(usize, TcpStream, UnboundedSender<V>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            for i in 0..connections {
                let (stream, _) = listener.accept().await.unwrap();
                serve(i, stream, seen_tx.clone()).await;
            }
        });
        (address, task, seen_rx)
    }

    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("the test took over 20 s")
    }

    #[tokio::test]
    async fn acked_batches_share_one_connection() {
        let (address, task, mut seen_rx) = server(1, |_, mut stream, seen| async move {
            while let Some((message, chunk)) = read_message(&mut stream).await {
                send_ack(&mut stream, chunk.as_deref().unwrap()).await;
                seen.send(message).unwrap();
            }
        })
        .await;
        let sink = FluentSink::open("f", &config(&address)).unwrap();
        bounded(async {
            let batch = vec![
                record("web", "pv", 10, &[("n", "1")]),
                record("ads", "x", 11, &[("n", "2")]),
                record("web", "pv", 12, &[("n", "3")]),
            ];
            assert_eq!(write(&sink, &batch).await.unwrap(), vec![]);
            assert_eq!(
                write(&sink, &batch[1..2]).await.unwrap(),
                vec![],
                "the second batch goes over the same connection"
            );
            assert_eq!(sink.peer_down(), None);
            sink.close().await.unwrap();
            task.await.unwrap();
            let mut tags = Vec::new();
            while let Ok(V::Array(parts)) = seen_rx.try_recv() {
                let V::Str(tag) = &parts[0] else { panic!() };
                let V::Array(entries) = &parts[1] else {
                    panic!()
                };
                tags.push((tag.clone(), entries.len()));
            }
            assert_eq!(
                tags,
                vec![
                    ("td.web.pv".to_string(), 2),
                    ("td.ads.x".to_string(), 1),
                    ("td.ads.x".to_string(), 1)
                ]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn wrong_missing_or_refused_acks_fail_the_batch_and_reconnect() {
        let (address, task, _) = server(3, |i, mut stream, _| async move {
            match i {
                // A wrong ack.
                0 => {
                    read_message(&mut stream).await.unwrap();
                    send_ack(&mut stream, "not-the-chunk").await;
                    // Keep it open: the sink must drop it on its own.
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                }
                // Closed without an ack.
                1 => {
                    read_message(&mut stream).await.unwrap();
                }
                // A good one.
                _ => {
                    let (_, chunk) = read_message(&mut stream).await.unwrap();
                    send_ack(&mut stream, &chunk.unwrap()).await;
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                }
            }
        })
        .await;
        let sink = FluentSink::open("f", &config(&address)).unwrap();
        let batch = vec![record("web", "pv", 10, &[("n", "1")])];
        bounded(async {
            let e = write(&sink, &batch).await.unwrap_err();
            assert!(e.to_string().contains("not-the-chunk"), "{e}");
            let e = write(&sink, &batch).await.unwrap_err();
            assert!(e.to_string().contains("closed"), "{e}");
            write(&sink, &batch).await.unwrap();
            sink.close().await.unwrap();
            task.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (address, task, _) = server(1, |_, mut stream, _| async move {
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        })
        .await;
        let mut cfg = config(&address);
        cfg.timeout = HumanDuration::millis(200);
        let sink = FluentSink::open("f", &cfg).unwrap();
        bounded(async {
            let e = write(&sink, &[record("web", "pv", 1, &[])])
                .await
                .unwrap_err();
            assert!(e.to_string().contains("did not acknowledge"), "{e}");
            // The connection was dropped: the server sees its end.
            task.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn without_ack_nothing_is_awaited_and_a_closed_connection_is_replaced() {
        let (address, task, mut seen_rx) = server(2, |_, mut stream, seen| async move {
            // One message per connection, then close.
            let (message, chunk) = read_message(&mut stream).await.unwrap();
            assert_eq!(chunk, None);
            seen.send(message).unwrap();
        })
        .await;
        let mut cfg = config(&address);
        cfg.require_ack = false;
        let sink = FluentSink::open("f", &cfg).unwrap();
        bounded(async {
            write(&sink, &[record("web", "pv", 1, &[])]).await.unwrap();
            let first = seen_rx.recv().await.unwrap();
            // Wait until the server's close is visible to the sink's socket.
            loop {
                let closed = {
                    let conn = sink.conn.lock().await;
                    !still_open(conn.as_ref().unwrap())
                };
                if closed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            write(&sink, &[record("web", "pv", 2, &[])]).await.unwrap();
            let second = seen_rx.recv().await.unwrap();
            task.await.unwrap();
            let V::Array(first) = first else { panic!() };
            let V::Array(second) = second else { panic!() };
            assert_eq!(first[2], map(&[("size", V::Int(1))]));
            assert_eq!(
                second[1],
                V::Array(vec![V::Array(vec![V::Int(2), map(&[])])])
            );
        })
        .await;
    }

    #[tokio::test]
    async fn open_does_not_connect_and_a_down_server_is_an_error() {
        // A port with nothing listening.
        let address = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let sink = FluentSink::open("f", &config(&address)).unwrap();
        let e = bounded(write(&sink, &[record("web", "pv", 1, &[])]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
        // A connect failure is the peer unreachable: the lane marks the sink down.
        assert!(e.is_unreachable(), "{e}");
        assert!(
            sink.peer_down().is_some_and(|d| d.contains(&address)),
            "{:?}",
            sink.peer_down()
        );
        assert_eq!(bounded(write(&sink, &[])).await.unwrap(), vec![]);
    }
}
