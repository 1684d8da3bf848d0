//! `Postback::handle` with arbitrary queries, headers and bodies: form, JSON and td-js-sdk
//! (`application/vnd.treasuredata.v1+json`) batches.
//!
//! Invariants: never panics; an accepted request gives 200 or 302, only records for the target,
//! each with at most `max_columns` string columns, none of them a special parameter or `time`,
//! `time` inside the record-time window, and JSON that reads back to the same record; every
//! header of the answer is a valid header value; a refusal is a 4xx whose message and JSON body
//! never contain the write key; a database the key may not write is never accepted.
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode;
use postback_proxy::http::client_ip::{ClientIpConfig, ClientIpPolicy};
use postback_proxy::postback::auth::{KeyStore, WriteKeyConfig};
use postback_proxy::postback::config::PostbackConfig;
use postback_proxy::postback::fields::Fields;
use postback_proxy::postback::reply::Reply;
use postback_proxy::postback::route::{valid_name, Format};
use postback_proxy::postback::{Postback, PostbackRequest, Target};
use postback_proxy::record::Record;

const KEY: &str = "fuzz/S3cr3tWr1teKey0123456789";
const MAX_COLUMNS: usize = 8;
const NOW: i64 = 1_764_245_000;
const PAST: i64 = 7 * 86400;
const FUTURE: i64 = 3 * 86400;
const SPECIAL: [&str; 6] = [
    "",
    "time",
    "td_format",
    "td_write_key",
    "td_record_time",
    "td_redirect",
];

fn postbacks() -> &'static [Postback; 2] {
    static P: OnceLock<[Postback; 2]> = OnceLock::new();
    P.get_or_init(|| {
        let build = |privacy: &str| {
            let cfg: PostbackConfig = serde_saphyr::from_str(&format!(
                "max_columns: {MAX_COLUMNS}\n\
                 redirect: {{allowed_hosts: [example.com, '*.example.org']}}\n\
                 cors: {{allowed_origins: ['https://www.example.com']}}\n\
                 {privacy}"
            ))
            .expect("postback YAML");
            let keys: Vec<WriteKeyConfig> =
                serde_saphyr::from_str(&format!("- {{key: '{KEY}', databases: [web, 'ads_*']}}"))
                    .expect("keys YAML");
            let client_ip: ClientIpConfig =
                serde_saphyr::from_str("trusted_proxies: ['127.0.0.1/32', '10.0.0.0/8']")
                    .expect("client_ip YAML");
            let client_ip = ClientIpPolicy::from_config(&client_ip).expect("client_ip");
            let keys = KeyStore::from_config(&keys).expect("keys");
            Postback::from_config(&cfg, keys, client_ip, u64::MAX).expect("postback")
        };
        [
            build(""),
            build("privacy: {honor_dnt: true, opted_out: drop, consent_cookie: ok, bots: drop, anonymize_ip: true}"),
        ]
    })
}

/// The input, one item per line, up to a line starting `B:` after which everything (newlines
/// included) is the body:
///
/// * `M:` the method (`GET`, `HEAD`, `POST`; default `POST`)
/// * `D:` the database (a valid name; default `web`; the key may write `web` and `ads_*`)
/// * `F:` `pixel` for a route whose default format is the GIF
/// * `Q:` the query string (the last one wins)
/// * `H:name: value` a header (raw bytes; kept when valid, repeated names appended)
/// * `K:` where to put the configured write key: `query`, `header`, `auth`, `form`
/// * `P:` the TCP peer address (none without it)
/// * `S:` use the strict privacy rules (DNT honoured, opted out dropped, consent needed, bots dropped)
/// * `T:` the request came over TLS
struct Input {
    strict: bool,
    method: Method,
    database: String,
    pixel_default: bool,
    query: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
    peer: Option<std::net::IpAddr>,
    tls: bool,
}

fn parse(data: &[u8]) -> Option<Input> {
    let mut input = Input {
        strict: false,
        method: Method::POST,
        database: "web".into(),
        pixel_default: false,
        query: None,
        headers: HeaderMap::new(),
        body: Vec::new(),
        peer: None,
        tls: false,
    };
    let mut rest = data;
    let mut key_in_query = false;
    let mut key_in_form = false;
    while !rest.is_empty() {
        if let Some(body) = rest.strip_prefix(b"B:") {
            input.body = body.to_vec();
            break;
        }
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        let (tag, value) = (
            line.get(..2).unwrap_or_default(),
            line.get(2..).unwrap_or_default(),
        );
        let text = || std::str::from_utf8(value).ok();
        match tag {
            b"M:" => input.method = Method::from_bytes(value).ok()?,
            b"D:" => input.database = text().filter(|d| valid_name(d))?.to_owned(),
            b"F:" => input.pixel_default = value == b"pixel",
            b"Q:" => input.query = Some(text()?.to_owned()),
            b"H:" => {
                let colon = value.iter().position(|&b| b == b':')?;
                let name = HeaderName::from_bytes(&value[..colon]).ok()?;
                let v = HeaderValue::from_bytes(value[colon + 1..].trim_ascii()).ok()?;
                input.headers.append(name, v);
            }
            b"K:" => match value {
                b"query" => key_in_query = true,
                b"form" => key_in_form = true,
                b"header" => {
                    input
                        .headers
                        .insert("x-td-write-key", HeaderValue::from_static(KEY));
                }
                b"auth" => {
                    input.headers.insert(
                        "authorization",
                        HeaderValue::from_str(&format!("TD1 {KEY}")).unwrap(),
                    );
                }
                _ => {}
            },
            b"P:" => input.peer = Some(text()?.trim().parse().ok()?),
            b"S:" => input.strict = true,
            b"T:" => input.tls = true,
            _ => {}
        }
    }
    if key_in_query {
        let q = input.query.get_or_insert_with(String::new);
        q.push_str(&format!("&td_write_key={KEY}"));
    }
    if key_in_form {
        input
            .body
            .extend_from_slice(format!("&td_write_key={KEY}").as_bytes());
    }
    if !matches!(input.method, Method::GET | Method::HEAD | Method::POST) {
        return None;
    }
    if input.method != Method::POST {
        input.body.clear();
    }
    Some(input)
}

/// Every parameter name in `raw`, decoded as leniently as possible (a message about a name
/// that is not UTF-8 may still quote the rest of it).
fn names(raw: &[u8]) -> impl Iterator<Item = String> + '_ {
    raw.split(|&b| b == b'&').map(|piece| {
        let name = piece.split(|&b| b == b'=').next().unwrap_or_default();
        let spaced: Vec<u8> = name
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let decoded: Vec<u8> = percent_decode(&spaced).collect();
        String::from_utf8_lossy(&decoded).into_owned()
    })
}

fn contains(hay: &str, needle: &str) -> bool {
    hay.contains(needle)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = parse(data) else {
        return;
    };
    let p = &postbacks()[input.strict as usize];
    let database = input.database.as_str();
    let query = input.query.clone().unwrap_or_default();
    let body = &input.body;
    let target = Target {
        database,
        table: "events",
        default_format: if input.pixel_default {
            Format::Pixel
        } else {
            Format::Json
        },
        privacy: None,
        enrich: &[],
    };
    let req = PostbackRequest {
        method: &input.method,
        query: input.query.as_deref(),
        url_len: input.query.as_deref().map_or(0, str::len),
        headers: Fields::Map(&input.headers),
        body,
        peer: input.peer,
        tls: input.tls,
        now: NOW,
    };
    let may_write = database == "web" || database.starts_with("ads_");

    match p.handle(target, &req) {
        Ok(outcome) => {
            assert!(may_write, "database {database} accepted");
            assert!(
                matches!(outcome.reply.status, 200 | 302),
                "{}",
                outcome.reply.status
            );
            for (name, value) in outcome.reply.headers.iter() {
                assert!(
                    HeaderValue::from_str(value).is_ok(),
                    "answer header {name}: {value:?}"
                );
            }
            for record in &outcome.records {
                assert_eq!(record.database, database);
                assert_eq!(record.table, "events");
                let names: Vec<&str> = record.columns().iter().map(|(k, _)| &**k).collect();
                assert!(
                    record.len() <= MAX_COLUMNS,
                    "{} columns, more than max_columns {MAX_COLUMNS}: {names:?}",
                    record.len(),
                );
                assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
                for name in &names {
                    assert!(!SPECIAL.contains(name), "column {name:?}");
                }
                let t = record.time;
                assert!((NOW - PAST..=NOW + FUTURE).contains(&t), "time {t}");
                let json = serde_json::to_vec(&record.to_record()).unwrap();
                let mut written = Vec::new();
                record.write_json(&mut written);
                assert_eq!(written, json, "the frame's JSON and serde's differ");
                let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
                let obj = value["record"].as_object().expect("record object");
                assert_eq!(obj.len(), record.len() + 1, "duplicate keys");
                assert!(obj["time"].is_i64());
                assert!(obj.iter().all(|(k, v)| k == "time" || v.is_string()));
                let back: Record = serde_json::from_slice(&json).expect("reads back");
                assert_eq!(back, record.to_record());
                assert_eq!(serde_json::to_vec(&back).unwrap(), json);
            }
        }
        Err(refusal) => {
            let status = refusal.kind.status();
            assert!((400..500).contains(&status), "refused with {status}");
            // A key the client wrote as a parameter *name* may come back in a message about
            // that name; a key given as a key never does.
            let names_hold_key = names(query.as_bytes())
                .chain(names(body))
                .any(|n| contains(&n, KEY));
            if !names_hold_key {
                assert!(!contains(&refusal.message, KEY), "{:?}", refusal.message);
                let reply = Reply::refused(&refusal);
                let text = String::from_utf8_lossy(&reply.body);
                assert!(!contains(&text, KEY), "{text}");
            }
            let reply = Reply::refused(&refusal);
            let v: serde_json::Value =
                serde_json::from_slice(&reply.body).expect("a refusal is JSON");
            assert!(v["error"].is_string() && v["message"].is_string());
        }
    }
});
