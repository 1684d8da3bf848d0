//! `type: td`: Treasure Data's bulk import API, as Treasure Data's own clients use it.
//!
//! Each batch is grouped by database and table (the templates rendered; records keep their
//! order), and each group goes out as one
//! `PUT {endpoint}/v3/table/import_with_id/{db}/{table}/{unique_id}/msgpack.gz` with
//! `Authorization: TD1 <key>`: the body is the gzip of the records as consecutive msgpack maps
//! (`time` an integer, every other column a string).
//!
//! Exactly once: Treasure Data ignores an import whose `unique_id` it has seen, and the id is
//! derived from the batch's own id ([`Batch::id`]) and the group, so a batch sent again (a retry,
//! or after a crash with the disk buffer, which rebuilds the same batch with the same id) is
//! imported once. With `buffer: memory` the batch id lives only as long as the process: at least
//! once across a restart.
//!
//! Answers: 2xx delivered; 404 with `auto_create_table` creates the table (and its database if
//! needed) and imports again; 413 splits the group in halves, each with its own derived id; 401
//! and 403 fail the batch and report the sink down ("the API key was refused"; the key is never
//! logged); 408, 429, 5xx and connection errors fail the batch (retried); any other 4xx refuses
//! the group's records for good, to `rejected.jsonl` with the reason.

mod config;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use http::StatusCode;
use log::{info, warn};
use sha2::{Digest, Sha256};

pub use config::TdSinkConfig;

use super::http::{excerpt, gzip, http_client, request_error};
use super::{Batch, LogSink, PeerDown, Rejection, SinkError};
use crate::config::Problem;
use crate::record::Record;
use crate::template::Template;

/// Imports batches into Treasure Data.
pub struct TdSink {
    name: String,
    client: reqwest::Client,
    endpoint: String,
    /// `TD1 <key>`.
    authorization: http::HeaderValue,
    database: Template,
    table: Template,
    auto_create_table: bool,
    down: PeerDown,
    warned_no_id: AtomicBool,
}

/// What became of one import request.
enum Import {
    Done,
    /// 413: the body is too large.
    TooLarge(String),
    /// Refused for good (a 4xx other than those retried): the reason.
    Refused(String),
}

/// The batch grouped by rendered database and table: groups in order of first appearance, the
/// indices of their records in batch order.
fn group(
    database: &Template,
    table: &Template,
    batch: &[Record],
) -> Vec<((String, String), Vec<usize>)> {
    let mut groups: Vec<((String, String), Vec<usize>)> = Vec::new();
    let mut by_name: HashMap<(String, String), usize> = HashMap::new();
    for (index, record) in batch.iter().enumerate() {
        let key = (
            database.render(&record.database, &record.table),
            table.render(&record.database, &record.table),
        );
        let at = *by_name.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(index);
    }
    groups
}

/// The `unique_id` of the part `part` (`""` for a whole group, then `0`/`1` for each halving)
/// of the group `database`.`table` of the batch `batch_id`: 32 hex digits, the same every time.
fn unique_id(batch_id: &str, database: &str, table: &str, part: &str) -> String {
    let mut h = Sha256::new();
    for piece in [batch_id, database, table, part] {
        h.update((piece.len() as u64).to_be_bytes());
        h.update(piece.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The records `indices` of `batch` as consecutive msgpack maps, gzipped.
fn body(batch: &[Record], indices: &[usize]) -> Result<Vec<u8>, SinkError> {
    let mut raw = Vec::with_capacity(indices.len() * 256);
    for &i in indices {
        // A map of `time` and string columns into a Vec: cannot fail.
        rmp_serde::encode::write_named(&mut raw, &batch[i].body).expect("record encodes");
    }
    gzip(&raw)
}

impl TdSink {
    /// Opens the sink `name` (a validated configuration): reads the key; connects nowhere.
    pub fn open(name: &str, cfg: &TdSinkConfig) -> Result<TdSink, Problem> {
        let field = format!("sinks.{name}");
        let key = cfg.key(&field)?;
        let mut authorization =
            http::HeaderValue::try_from(format!("TD1 {key}")).map_err(|_| {
                Problem::new(
                    format!("{field}.api_key"),
                    "the key is not valid in a header",
                )
            })?;
        authorization.set_sensitive(true);
        let template = |sub: &str, t: &str| {
            config::parse_name(t).map_err(|e| Problem::new(format!("{field}.{sub}"), e))
        };
        Ok(TdSink {
            name: name.to_string(),
            client: http_client(cfg.timeout.0).map_err(|e| Problem::new(field.clone(), e))?,
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
            authorization,
            database: template("database", &cfg.database)?,
            table: template("table", &cfg.table)?,
            auto_create_table: cfg.auto_create_table,
            down: PeerDown::default(),
            warned_no_id: AtomicBool::new(false),
        })
    }

    /// Sends one request; a connection error is `Unreachable` (and the sink down), an answer
    /// clears what was known against the peer unless it refuses the key.
    async fn send(
        &self,
        method: http::Method,
        url: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String), SinkError> {
        let what = format!("{method} {url}");
        let parsed = reqwest::Url::parse(url).map_err(|e| SinkError::caused(what.clone(), e))?;
        let sent = self
            .client
            .request(method, parsed.clone())
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| request_error(what, &parsed, e));
        let response = self.down.track(sent)?;
        let status = response.status();
        let detail = if status.is_success() {
            String::new()
        } else {
            excerpt(response).await
        };
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            self.down.set(format!(
                "the API key was refused (HTTP {})",
                status.as_u16()
            ));
            return Err(SinkError::Refused {
                peer: self.endpoint.clone(),
                status: status.as_u16(),
                detail: "the API key was refused".into(),
            });
        }
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            return Err(SinkError::Refused {
                peer: url.to_string(),
                status: status.as_u16(),
                detail,
            });
        }
        Ok((status, detail))
    }

    /// Creates `database`.`table` (and the database when the API does not know it either).
    async fn create_table(&self, database: &str, table: &str) -> Result<(), SinkError> {
        let url = format!("{}/v3/table/create/{database}/{table}/log", self.endpoint);
        let (status, detail) = self.send(http::Method::POST, &url, Vec::new()).await?;
        let status = if status == StatusCode::NOT_FOUND {
            let db_url = format!("{}/v3/database/create/{database}", self.endpoint);
            self.send(http::Method::POST, &db_url, Vec::new()).await?;
            self.send(http::Method::POST, &url, Vec::new()).await?.0
        } else {
            status
        };
        // 409: it exists now (created by someone else meanwhile): as good.
        if status.is_success() || status == StatusCode::CONFLICT {
            info!("sink {}: created the table {database}.{table}", self.name);
            return Ok(());
        }
        Err(SinkError::Refused {
            peer: url,
            status: status.as_u16(),
            detail,
        })
    }

    /// Imports one body under `id`, creating the table when needed.
    async fn import(
        &self,
        database: &str,
        table: &str,
        id: &str,
        body: Vec<u8>,
    ) -> Result<Import, SinkError> {
        let url = format!(
            "{}/v3/table/import_with_id/{database}/{table}/{id}/msgpack.gz",
            self.endpoint
        );
        let mut created = false;
        loop {
            let (status, detail) = self.send(http::Method::PUT, &url, body.clone()).await?;
            if status.is_success() {
                return Ok(Import::Done);
            }
            if status == StatusCode::NOT_FOUND && self.auto_create_table && !created {
                self.create_table(database, table).await?;
                created = true;
                continue;
            }
            let reason = format!(
                "Treasure Data answered {status} to the import into {database}.{table}: {detail}"
            );
            return Ok(if status == StatusCode::PAYLOAD_TOO_LARGE {
                Import::TooLarge(reason)
            } else {
                Import::Refused(reason)
            });
        }
    }

    /// The batch's id, or a fresh one (at least once) when the delivery side gives none.
    fn batch_id(&self, batch: &Batch<'_>) -> String {
        if !batch.id().is_empty() {
            return batch.id().to_string();
        }
        if !self.warned_no_id.swap(true, Ordering::Relaxed) {
            warn!(
                "sink {}: batches come without an id: each try gets a fresh one, so a retry \
                 may import a batch twice (at least once)",
                self.name
            );
        }
        uuid::Uuid::new_v4().simple().to_string()
    }
}

#[async_trait]
impl LogSink for TdSink {
    // The import's unique_id comes from the batch id: it must survive a restart.
    fn needs_stable_batch_ids(&self) -> bool {
        true
    }

    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        let batch_id = self.batch_id(batch);
        let mut rejections = Vec::new();
        for ((database, table), indices) in group(&self.database, &self.table, batch) {
            // Parts still to send: (part path, indices), the first half first.
            let mut work = vec![(String::new(), indices)];
            while let Some((part, indices)) = work.pop() {
                let id = unique_id(&batch_id, &database, &table, &part);
                let data = body(batch, &indices)?;
                match self.import(&database, &table, &id, data).await? {
                    Import::Done => {}
                    Import::TooLarge(_) if indices.len() > 1 => {
                        let (first, second) = indices.split_at(indices.len() / 2);
                        work.push((format!("{part}1"), second.to_vec()));
                        work.push((format!("{part}0"), first.to_vec()));
                    }
                    Import::TooLarge(reason) | Import::Refused(reason) => {
                        rejections.extend(indices.into_iter().map(|index| Rejection {
                            index,
                            reason: reason.clone(),
                        }));
                    }
                }
            }
        }
        rejections.sort_by_key(|r| r.index);
        Ok(rejections)
    }

    fn peer_down(&self) -> Option<String> {
        self.down.get()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde::Deserialize;

    use super::*;
    use crate::sink::test_support::test_record;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = unique_id("b1", "web", "pv", "");
        assert_eq!(a, unique_id("b1", "web", "pv", ""));
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        for other in [
            unique_id("b2", "web", "pv", ""),
            unique_id("b1", "web", "clicks", ""),
            unique_id("b1", "web", "pv", "0"),
            unique_id("b1", "webp", "v", ""),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn groups_by_rendered_names_in_order() {
        let batch = vec![
            test_record("web", "pv", 1, &[]),
            test_record("ads", "pv", 2, &[]),
            test_record("web", "pv", 3, &[]),
        ];
        let names = |d: &str, t: &str| {
            group(
                &Template::parse(d).unwrap(),
                &Template::parse(t).unwrap(),
                &batch,
            )
        };
        let g = names("{database}", "{table}");
        assert_eq!(
            g,
            vec![
                (("web".into(), "pv".into()), vec![0, 2]),
                (("ads".into(), "pv".into()), vec![1])
            ]
        );
        let g = names("all_events", "{database}_{table}");
        assert_eq!(g[0].0, ("all_events".to_string(), "web_pv".to_string()));
    }

    #[test]
    fn the_body_is_gzipped_msgpack_maps() {
        let batch = vec![
            test_record("web", "pv", 1764245000, &[("page", "/home"), ("n", "7")]),
            test_record("web", "pv", 1764245001, &[]),
        ];
        let gz = body(&batch, &[0, 1]).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
        let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(&raw[..]));
        let first =
            std::collections::BTreeMap::<String, rmpv_like::V>::deserialize(&mut de).unwrap();
        assert_eq!(first["time"], rmpv_like::V::Int(1764245000));
        assert_eq!(first["page"], rmpv_like::V::Str("/home".into()));
        assert_eq!(first["n"], rmpv_like::V::Str("7".into()));
        let second =
            std::collections::BTreeMap::<String, rmpv_like::V>::deserialize(&mut de).unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(de.position() as usize, raw.len());
    }

    /// A stand-in import API answering each import with `answer(records in the body)`; returns
    /// its URL and the (path, record count) of every import.
    async fn stand_in(answer: fn(usize) -> u16) -> (String, Arc<Mutex<Vec<(String, usize)>>>) {
        use http_body_util::BodyExt;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut raw = Vec::new();
                            std::io::Read::read_to_end(
                                &mut flate2::read::GzDecoder::new(&body[..]),
                                &mut raw,
                            )
                            .unwrap();
                            let mut de =
                                rmp_serde::Deserializer::new(std::io::Cursor::new(&raw[..]));
                            let mut n = 0;
                            while (de.position() as usize) < raw.len() {
                                crate::record::RecordBody::deserialize(&mut de).unwrap();
                                n += 1;
                            }
                            log.lock().unwrap().push((path, n));
                            let status = answer(n);
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
                                    .unwrap(),
                            )
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (url, seen)
    }

    fn sink(url: &str) -> TdSink {
        let cfg: TdSinkConfig = serde_saphyr::from_str(&format!(
            "{{endpoint: '{url}', api_key: k, auto_create_table: false}}"
        ))
        .unwrap();
        TdSink::open("td", &cfg).unwrap()
    }

    fn batch(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| test_record("web", "pv", 1, &[("n", &i.to_string())]))
            .collect()
    }

    #[tokio::test]
    async fn too_large_groups_are_halved_with_derived_ids() {
        // More than 2 records in one request: 413.
        let (url, seen) = stand_in(|n| if n > 2 { 413 } else { 200 }).await;
        let sink = sink(&url);
        let records = batch(5);
        let rejected = sink
            .write_batch(&Batch::new(&records, "b".into()))
            .await
            .unwrap();
        assert_eq!(rejected, Vec::new());
        let seen = seen.lock().unwrap().clone();
        let id = |part: &str| {
            format!(
                "/v3/table/import_with_id/web/pv/{}/msgpack.gz",
                unique_id("b", "web", "pv", part)
            )
        };
        // 5 -> 2 + 3; 3 -> 1 + 2.
        assert_eq!(
            seen,
            vec![
                (id(""), 5),
                (id("0"), 2),
                (id("1"), 3),
                (id("10"), 1),
                (id("11"), 2)
            ]
        );
    }

    #[tokio::test]
    async fn a_single_record_too_large_and_other_refusals_are_rejected() {
        let (url, _) = stand_in(|_| 413).await;
        let records = batch(2);
        let rejected = sink(&url)
            .write_batch(&Batch::new(&records, "b".into()))
            .await
            .unwrap();
        assert_eq!(rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1]);
        assert!(rejected[0].reason.contains("413"), "{rejected:?}");
        // Without auto_create_table a missing table is a refusal too.
        let (url, _) = stand_in(|_| 404).await;
        let rejected = sink(&url)
            .write_batch(&Batch::new(&records, "b".into()))
            .await
            .unwrap();
        assert_eq!(rejected.len(), 2);
        assert!(rejected[0].reason.contains("404"), "{rejected:?}");
        // 401: an error, and the sink says why it is down.
        let (url, _) = stand_in(|_| 401).await;
        let sink = sink(&url);
        let e = sink
            .write_batch(&Batch::new(&records, "b".into()))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(401));
        assert_eq!(
            sink.peer_down().as_deref(),
            Some("the API key was refused (HTTP 401)")
        );
        // Nothing listening: unreachable, and down.
        let sink = self::sink("http://127.0.0.1:1");
        let e = sink
            .write_batch(&Batch::new(&records, "b".into()))
            .await
            .unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(sink.peer_down().is_some());
    }

    /// Integers and strings, told apart.
    mod rmpv_like {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        #[serde(untagged)]
        pub enum V {
            Int(i64),
            Str(String),
        }
    }
}
