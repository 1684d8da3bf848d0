//! Hostile input through the real binary: oversized and malformed requests, header floods,
//! slow clients and HTTP request smuggling, on postback routes and on the passthrough path.
//!
//! Each hostile request must get a clear answer (a 4xx, or the documented result) or a closed
//! connection, never a hang, a 5xx from a postback route or a panic; a refused request leaves no
//! record; and after every one of them the proxy still serves an ordinary pixel. Every wait is
//! bounded and nothing asserts on timing.
//!
//! Pingora 0.9's own limits, which apply before the proxy's code sees a request: at most 256
//! header fields (`MAX_HEADERS`) and about 1 MiB of request head (`MAX_HEADER_SIZE`, 1,048,575
//! bytes; past either the connection gets a 400 or is closed); a request with both
//! `Content-Length` and `Transfer-Encoding` is framed by `Transfer-Encoding` alone and its
//! connection is not kept alive; differing or invalid `Content-Length`s, a final transfer coding
//! other than `chunked`, and `Transfer-Encoding` in HTTP/1.0 are refused; bytes a client sends
//! after a request's end are never read as a next request (no pipelining: the connection closes).
//! Reading a request head on a new connection waits up to 60 s for each read, with no deadline
//! for the whole head (see `slow_clients_do_not_starve_others`); once a request has been served,
//! Pingora marks the HTTP/1.1 connection's keep-alive as infinite and waits for the next head
//! with no timeout at all, unless the proxy bounds it (see
//! `idle_and_half_sent_keep_alive_connections_are_closed`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const EV: &str = "/postback/v3/event";

fn key_q() -> String {
    format!("td_write_key={KEY}")
}

// ---------------------------------------------------------------------------------------------
// A tolerant raw client: sends bytes that may be refused half-way, and reads whatever comes back
// until the proxy closes the connection or stays silent.

/// One response parsed off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// What came back on one connection.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    /// The proxy closed (or reset) the connection.
    closed: bool,
    /// Bytes after the last whole response.
    rest: Vec<u8>,
}

impl Exchange {
    /// `200, 400 then closed`: for the test's log (`--nocapture`).
    fn summary(&self) -> String {
        let statuses: Vec<String> = self.answers.iter().map(|a| a.status.to_string()).collect();
        format!(
            "answers [{}], {}",
            statuses.join(", "),
            if self.closed { "closed" } else { "left open" }
        )
    }

    /// Exactly one answer, a 4xx, or no answer and a closed connection: a clear refusal.
    fn assert_refused(&self, what: &str) {
        match self.answers.as_slice() {
            [] => assert!(self.closed, "{what}: no answer and the connection is open"),
            [a] => assert!(
                (400..500).contains(&a.status),
                "{what}: answered {} {:?}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ),
            more => panic!("{what}: {} answers on one connection: {more:?}", more.len()),
        }
    }

    /// At most one answer, and then either a 4xx or a closed connection (a request framed
    /// one way may be answered, but nothing after it on the connection is read).
    fn assert_refused_or_closed(&self, what: &str) {
        assert!(
            self.answers.len() <= 1,
            "{what}: {} answers on one connection: {:?}",
            self.answers.len(),
            self.answers
        );
        let refused = self
            .answers
            .first()
            .is_some_and(|a| (400..500).contains(&a.status));
        assert!(
            refused || self.closed,
            "{what}: neither a 4xx nor a closed connection: {:?} (rest {:?})",
            self.answers,
            String::from_utf8_lossy(&self.rest)
        );
        if let Some(a) = self.answers.first() {
            assert!(a.status < 500, "{what}: answered {}", a.status);
        }
    }
}

/// Connects to `addr`, writes `bytes` (a write the proxy refuses half-way is fine), then reads
/// until the proxy closes the connection or sends nothing for `idle` (15 s at most in all).
fn exchange(addr: SocketAddr, bytes: &[u8], idle: Duration) -> Exchange {
    let mut stream = TcpStream::connect(addr).expect("connect to the proxy");
    stream.set_nodelay(true).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A refused request may be closed before it is all written: keep whatever came back.
    let _ = stream.write_all(bytes);
    read_answers(&mut stream, idle)
}

fn read_answers(stream: &mut TcpStream, idle: Duration) -> Exchange {
    let mut buf = Vec::new();
    let closed = read_until_quiet(stream, idle, &mut buf);
    let (answers, rest) = parse_answers(&buf);
    Exchange {
        answers,
        closed,
        rest,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits `buf` into whole responses (Content-Length or chunked bodies).
fn parse_answers(mut buf: &[u8]) -> (Vec<Answer>, Vec<u8>) {
    let mut answers = Vec::new();
    while let Some(end) = find(buf, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let Some(status) = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|s| s.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut at = end + 4;
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let body = if status == 204 || status == 304 || status < 200 {
            Vec::new()
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let Some(eol) = find(&buf[at..], b"\r\n") else {
                    return (answers, buf.to_vec());
                };
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&buf[at..at + eol]).trim(), 16)
                        .unwrap_or(0);
                at += eol + 2;
                if size == 0 {
                    at += 2;
                    break;
                }
                if buf.len() < at + size + 2 {
                    return (answers, buf.to_vec());
                }
                body.extend_from_slice(&buf[at..at + size]);
                at += size + 2;
            }
            body
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            if buf.len() < at + len {
                break;
            }
            let body = buf[at..at + len].to_vec();
            at += len;
            body
        } else {
            let body = buf[at..].to_vec();
            at = buf.len();
            body
        };
        answers.push(Answer {
            status,
            headers,
            body,
        });
        buf = &buf[at.min(buf.len())..];
    }
    (answers, buf.to_vec())
}

// ---------------------------------------------------------------------------------------------
// Checks run after every hostile request.

/// An ordinary pixel on a fresh connection: 200 and the GIF; and no panic so far.
async fn assert_serves_pixel(proxy: &Proxy, after: &str) {
    let r = get(
        &proxy.url(&format!("{EV}/web/alive?td_format=pixel&{}", key_q())),
        &[],
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "after {after}: the pixel was refused: {:?}",
        r.text()
    );
    assert_eq!(r.body, PIXEL_GIF, "after {after}: not the GIF");
    assert_no_panic(proxy, after);
}

fn assert_no_panic(proxy: &Proxy, after: &str) {
    let stderr = proxy.stderr();
    assert!(
        !stderr.contains("panicked"),
        "after {after}: the proxy panicked:\n{stderr}"
    );
}

/// The records before a fresh marker, without the `alive` pixels.
async fn records(proxy: &Proxy) -> Vec<Value> {
    proxy
        .records_until_marker()
        .await
        .into_iter()
        .filter(|r| r["table"] != "alive")
        .collect()
}

/// The JSON error answer of a postback: `status`, `{"error": code, ...}`.
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {:?}", r.text());
    assert_eq!(r.json()["error"], code, "body: {:?}", r.text());
}

/// Settings with room for large requests.
fn roomy(origin: &Origin) -> Settings {
    let mut s = Settings::new(origin.peer());
    s.max_url_bytes = "1MiB".into();
    s.max_body_bytes = "1MiB".into();
    s
}

// ---------------------------------------------------------------------------------------------
// Many parameters, empty parameters, deep JSON.

/// A GET of `target` on its own connection (URLs past `http::Uri`'s 64 KiB, which reqwest
/// cannot send): the one answer.
fn raw_get(proxy: &Proxy, target: &str) -> Answer {
    let ex = exchange(
        proxy.addr(),
        &raw_request("GET", target, &[], b""),
        Duration::from_secs(2),
    );
    let mut answers = ex.answers;
    assert_eq!(answers.len(), 1, "GET {:.80}...: no single answer", target);
    answers.remove(0)
}

#[tokio::test]
async fn ten_thousand_parameters_are_refused_by_the_url_or_the_column_limit() {
    let origin = Origin::start();
    // 10,000 distinct parameters (names of 3 characters, empty values): 40 KB of query, under
    // the 64 KiB that Pingora takes in a request target.
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let name = |i: usize| -> String {
        [i / 3844, i / 62 % 62, i % 62]
            .iter()
            .map(|&d| ALPHABET[d] as char)
            .collect()
    };
    let params: String = (0..10_000).map(|i| format!("&{}", name(i))).collect();
    assert!(params.len() < 65_000);
    let target = format!("{EV}/web/many?{}{params}", key_q());

    // The harness: max_url_bytes 4KiB, so the URL limit comes first.
    let proxy = Proxy::start(origin.peer());
    let a = raw_get(&proxy, &target);
    assert_eq!(a.status, 414, "{:?}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"], "uri_too_long");
    assert_serves_pixel(&proxy, "10,000 query parameters").await;
    assert_eq!(records(&proxy).await, Vec::<Value>::new());

    // A URL limit with room for them: max_columns (20) refuses them.
    let proxy = Proxy::start_with(roomy(&origin));
    let a = raw_get(&proxy, &target);
    assert_eq!(a.status, 413, "{:?}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"], "payload_too_large");
    // The same in a form body, and as a JSON object.
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/many?{}", key_q())))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(params.clone()),
    )
    .await;
    assert_error(&r, 413, "payload_too_large");
    let object: serde_json::Map<String, Value> = (0..10_000)
        .map(|i| (format!("p{i:05}"), Value::from("v")))
        .collect();
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/many")))
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(Value::Object(object).to_string()),
    )
    .await;
    assert_error(&r, 413, "payload_too_large");
    // A request target over 64 KiB (10,000 parameters of 9 bytes) is refused by Pingora
    // itself (`http::Uri` takes at most 65,534 bytes): a bare 400, not our JSON 414; the proxy
    // goes on serving.
    let long: String = (0..10_000).map(|i| format!("&p{i:05}=v")).collect();
    let ex = exchange(
        proxy.addr(),
        &raw_request("GET", &format!("{EV}/web/long?{}{long}", key_q()), &[], b""),
        Duration::from_secs(2),
    );
    ex.assert_refused("a 90 KB request target");
    assert_serves_pixel(&proxy, "a 90 KB request target").await;
    // 10,000 times the same name is one column.
    let same: String = (0..10_000).map(|i| format!("&p={}", i % 10)).collect();
    let a = raw_get(&proxy, &format!("{EV}/web/same?{}{same}", key_q()));
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    assert_serves_pixel(&proxy, "10,000 parameters with a URL limit of 1 MiB").await;
    let recs = records(&proxy).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["table"], "same");
    assert_eq!(recs[0]["record"]["p"], "9");
}

#[tokio::test]
async fn a_megabyte_of_ampersands_is_a_record_without_columns_or_413() {
    let (_origin, proxy) = origin_and_proxy(|s| {
        // The default body limit: 1,048,064 bytes (512 bytes short of 1 MiB).
        s.max_body_bytes = "1048064".into();
    });
    let post = |n: usize| {
        client()
            .post(proxy.url(&format!("{EV}/web/amp?{}", key_q())))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(vec![b'&'; n])
    };
    // 1,000,000 bytes: under the limit; every piece is empty, so no column.
    let r = send(post(1_000_000)).await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(r.body, b"{}");
    // 1 MiB: over the limit.
    let r = send(post(1 << 20)).await;
    assert_error(&r, 413, "payload_too_large");
    assert_serves_pixel(&proxy, "1 MB of `&`").await;
    let recs = records(&proxy).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let record = recs[0]["record"].as_object().unwrap();
    assert_eq!(
        record.keys().collect::<Vec<_>>(),
        ["time"],
        "a body of `&` only made columns: {record:?}"
    );
}

#[tokio::test]
async fn deeply_nested_json_is_400() {
    let origin = Origin::start();
    let proxy = Proxy::start_with(roomy(&origin));
    let deep_open = "[".repeat(100_000);
    let deep_balanced = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, String)> = vec![
        ("application/json", deep_open.clone()),
        ("application/json", deep_balanced.clone()),
        ("application/json", format!("{{\"a\":{deep_balanced}}}")),
        (
            "application/json",
            format!("{{\"a\":{}", "{\"a\":".repeat(50_000)),
        ),
        (
            "application/vnd.treasuredata.v1+json",
            format!("{{\"events\":[{{\"a\":{deep_balanced}}}]}}"),
        ),
        (
            "application/vnd.treasuredata.v1.js+json",
            format!("{{\"events\":{deep_open}"),
        ),
    ];
    for (i, (ct, body)) in cases.into_iter().enumerate() {
        let r = send(
            client()
                .post(proxy.url(&format!("{EV}/web/deep")))
                .header("content-type", ct)
                .header("x-td-write-key", KEY)
                .body(body),
        )
        .await;
        assert_error(&r, 400, "bad_request");
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.len() < 300, "case {i}: a long message: {message}");
        assert_serves_pixel(&proxy, &format!("deep JSON case {i} ({ct})")).await;
    }
    // Nesting serde_json accepts is kept as its JSON text.
    let nested = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/shallow")))
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(format!("{{\"a\":{nested}}}")),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let recs = records(&proxy).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["table"], "shallow");
    assert_eq!(recs[0]["record"]["a"], nested.as_str());
}

// ---------------------------------------------------------------------------------------------
// Bad bytes.

/// Queries whose parameter names are not UTF-8 once decoded: a lone continuation byte, a bad
/// second byte, a stray byte inside a name, a surrogate, a five-byte form.
const NOT_UTF8_NAMES: [&str; 5] = [
    "%FF=1",
    "%C3%28=x",
    "a%80b=1",
    "%ED%A0%80=surrogate",
    "ok=1&%F8%88%80%80%80=1",
];

#[tokio::test]
async fn invalid_utf8_in_names_is_400() {
    let (_origin, proxy) = harness();
    for q in NOT_UTF8_NAMES {
        let r = get(&proxy.url(&format!("{EV}/web/utf8?{}&{q}", key_q())), &[]).await;
        assert_error(&r, 400, "bad_request");
        assert!(!r.text().contains(KEY), "the key was echoed: {}", r.text());
    }
    // In a form body.
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/utf8?{}", key_q())))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("%FE%FF=1"),
    )
    .await;
    assert_error(&r, 400, "bad_request");
    // Raw bytes that are not UTF-8 in a JSON key.
    let mut body = b"{\"a\xff\xfe\":\"v\"}".to_vec();
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/utf8")))
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(body.clone()),
    )
    .await;
    assert_error(&r, 400, "bad_request");
    // Raw bytes that are not UTF-8 in the request target itself: 400 (from us or from
    // Pingora's request-line check), or a closed connection.
    body.clear();
    let mut target = format!("{EV}/web/utf8?{}&", key_q()).into_bytes();
    target.extend_from_slice(b"\xff\xfe=1");
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(&target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let ex = exchange(proxy.addr(), &req, Duration::from_secs(2));
    ex.assert_refused("raw 0xFF in the request target");
    assert_serves_pixel(&proxy, "invalid UTF-8").await;
    assert_eq!(records(&proxy).await, Vec::<Value>::new());
}

#[tokio::test]
async fn nul_bytes_in_values_are_kept_and_escaped() {
    let (_origin, proxy) = harness();
    let r = get(
        &proxy.url(&format!("{EV}/web/nul?{}&a=%00&b=x%00y&%00n=z", key_q())),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/nul")))
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(r#"{"c":"\u0000","d":"1\u00002"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let recs = records(&proxy).await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_eq!(recs[0]["record"]["a"], "\u{0}");
    assert_eq!(recs[0]["record"]["b"], "x\u{0}y");
    assert_eq!(recs[0]["record"]["\u{0}n"], "z");
    assert_eq!(recs[1]["record"]["c"], "\u{0}");
    assert_eq!(recs[1]["record"]["d"], "1\u{0}2");
    // In the file, escaped: one line per record, no raw NUL.
    let text = std::fs::read(&proxy.events).unwrap();
    assert!(!text.contains(&0u8), "a raw NUL byte reached the sink");
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains(r#""a":"\u0000""#), "{text}");
    assert!(text.contains(r#""b":"x\u0000y""#), "{text}");
    assert!(text.contains(r#""\u0000n":"z""#), "{text}");
}

#[tokio::test]
async fn an_overlong_cookie_gets_a_fresh_global_id() {
    let (_origin, proxy) = harness();
    let url = proxy.url(&format!(
        "{EV}/web/cookie?{}&td_global_id=td_global_id",
        key_q()
    ));
    let long = "a".repeat(16 * 1024);
    let cases = [
        format!("_td_global={long}"),
        format!("x=1; _td_global={long}; y=2"),
        format!("_td_global={}", "b".repeat(65)),
        "_td_global=\"bad value\"".to_string(),
        "_td_global=%00".to_string(),
    ];
    let mut issued = Vec::new();
    for (i, cookie) in cases.iter().enumerate() {
        let r = get(&url, &[("cookie", cookie.as_str())]).await;
        assert_eq!(r.status, 200, "case {i}: {:?}", r.text());
        let set = r.header_all("set-cookie");
        assert_eq!(set.len(), 1, "case {i}: a fresh id must be issued: {set:?}");
        let id = set[0]
            .strip_prefix("_td_global=")
            .and_then(|s| s.split(';').next())
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 36, "case {i}: not a UUID: {id}");
        issued.push(id);
    }
    // The longest valid id (64 characters) is kept.
    let kept = "c".repeat(64);
    let r = get(&url, &[("cookie", &format!("_td_global={kept}"))]).await;
    assert_eq!(r.status, 200);
    assert!(r.header_all("set-cookie").is_empty());
    assert_serves_pixel(&proxy, "overlong cookies").await;
    let recs = records(&proxy).await;
    assert_eq!(recs.len(), cases.len() + 1, "{recs:#?}");
    for (rec, id) in recs.iter().zip(&issued) {
        assert_eq!(rec["record"]["td_global_id"], id.as_str());
    }
    assert_eq!(recs[cases.len()]["record"]["td_global_id"], kept.as_str());
}

// ---------------------------------------------------------------------------------------------
// Header floods.

fn flood(count: usize, value_len: usize) -> Vec<String> {
    let value = "v".repeat(value_len);
    (0..count)
        .map(|i| format!("X-Flood-{i}: {value}"))
        .collect()
}

#[tokio::test]
async fn header_floods_are_refused_or_closed() {
    let (origin, proxy) = harness();
    let pixel = format!("{EV}/web/flood?td_format=pixel&{}", key_q());

    // More header fields than Pingora parses (256): refused before any of our code runs.
    for (count, len) in [(300, 8), (1_000, 8), (10_000, 1)] {
        for target in [pixel.as_str(), "/app/flood"] {
            let headers = flood(count, len);
            let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
            let ex = exchange(
                proxy.addr(),
                &raw_request("GET", target, &refs, b""),
                Duration::from_secs(2),
            );
            eprintln!("{count} headers to {target}: {}", ex.summary());
            ex.assert_refused(&format!("{count} headers to {target}"));
            assert_serves_pixel(&proxy, &format!("{count} headers to {target}")).await;
        }
    }
    // A head over Pingora's 1 MiB: refused.
    for target in [pixel.as_str(), "/app/flood"] {
        let headers = flood(120, 10 * 1024);
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let ex = exchange(
            proxy.addr(),
            &raw_request("GET", target, &refs, b""),
            Duration::from_secs(2),
        );
        eprintln!("1.2 MB of headers to {target}: {}", ex.summary());
        ex.assert_refused(&format!("1.2 MB of headers to {target}"));
        assert_serves_pixel(&proxy, "1.2 MB of headers").await;
    }
    // 200 KB of headers in 100 fields is within Pingora's limits: a postback is answered as
    // usual. The passthrough path forwards it; the origin (hyper, 100 fields at most) refuses
    // it, which the proxy reports as a 502 — never a hang.
    let headers = flood(100, 2 * 1024);
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let ex = exchange(
        proxy.addr(),
        &raw_request("GET", &pixel, &refs, b""),
        Duration::from_secs(2),
    );
    assert_eq!(ex.answers.len(), 1, "{ex:?}");
    assert_eq!(ex.answers[0].status, 200, "{ex:?}");
    assert_eq!(ex.answers[0].body, PIXEL_GIF);
    let ex = exchange(
        proxy.addr(),
        &raw_request("GET", "/app/flood-200k", &refs, b""),
        Duration::from_secs(2),
    );
    eprintln!("200 KB of headers upstream: {}", ex.summary());
    assert_eq!(ex.answers.len(), 1, "200 KB of headers upstream: {ex:?}");
    assert!(
        matches!(ex.answers[0].status, 200 | 400 | 431 | 502),
        "200 KB of headers upstream: {}",
        ex.answers[0].status
    );
    assert_serves_pixel(&proxy, "200 KB of headers").await;

    // One postback record (the 200 KB one); the origin never saw a flood it was not sent.
    let recs = records(&proxy).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["table"], "flood");
    let seen: Vec<String> = origin.requests().into_iter().map(|r| r.uri).collect();
    assert!(
        seen.iter().all(|u| u == "/app/flood-200k"),
        "refused floods reached the origin: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Slow clients.

/// Slowloris: connections that send their request head a byte at a time. Pingora waits up to
/// 60 s for each read of a new connection's head and sets no deadline for the head as a whole,
/// so such a client is not cut off; what matters is that it costs one idle task each, and other
/// clients are served meanwhile.
#[tokio::test]
async fn slow_clients_do_not_starve_others() {
    let (_origin, proxy) = harness();
    let addr = proxy.addr();
    const SLOW: usize = 24;
    let slow: Vec<std::thread::JoinHandle<Exchange>> = (0..SLOW)
        .map(|i| {
            std::thread::spawn(move || {
                let req = if i % 3 == 2 {
                    // A passthrough request.
                    raw_request("GET", &format!("/app/slow/{i}"), &[], b"")
                } else {
                    raw_request(
                        "GET",
                        &format!("{EV}/web/slow?td_format=pixel&td_write_key={KEY}&i={i}"),
                        &["User-Agent: slowloris"],
                        b"",
                    )
                };
                let mut stream = TcpStream::connect(addr).expect("connect");
                stream.set_nodelay(true).unwrap();
                // About 4 s per request: a byte every 30 ms, 130-odd bytes.
                for b in &req {
                    if stream.write_all(std::slice::from_ref(b)).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(30));
                }
                read_answers(&mut stream, Duration::from_secs(5))
            })
        })
        .collect();
    // Also: a body that never finishes, and a connection that sends nothing at all.
    let mut stalled_body = TcpStream::connect(addr).unwrap();
    stalled_body
        .write_all(&raw_request(
            "POST",
            &format!("{EV}/web/stalled?{}", key_q()),
            &[
                "Content-Type: application/x-www-form-urlencoded",
                "Content-Length: 1000",
            ],
            b"a=1&b=",
        ))
        .unwrap();
    let silent = TcpStream::connect(addr).unwrap();

    // Meanwhile, ordinary clients are served.
    let started = Instant::now();
    let mut served = 0;
    while served < 20 || (started.elapsed() < Duration::from_secs(3) && served < 200) {
        assert_serves_pixel(&proxy, &format!("{served} pixels during the slow clients")).await;
        served += 1;
    }
    let r = get(&proxy.url("/app/during-slowloris"), &[]).await;
    assert_eq!(r.status, 200, "passthrough during the slow clients");

    // The slow ones are answered too, in the end (nothing cut them off early).
    for (i, handle) in slow.into_iter().enumerate() {
        let ex = handle.join().expect("slow client thread");
        assert_eq!(ex.answers.len(), 1, "slow client {i}: {ex:?}");
        assert_eq!(ex.answers[0].status, 200, "slow client {i}: {ex:?}");
    }
    drop(stalled_body);
    drop(silent);
    assert_serves_pixel(&proxy, "the slow clients left").await;
    let recs = records(&proxy).await;
    let slow_records = recs.iter().filter(|r| r["table"] == "slow").count();
    assert_eq!(slow_records, (0..SLOW).filter(|i| i % 3 != 2).count());
    assert!(
        recs.iter().all(|r| r["table"] != "stalled"),
        "a body that never finished made a record: {recs:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Request smuggling.

/// A request smuggled behind `front`: a postback to table `smuggled`, or a passthrough request
/// to `/smuggled`.
fn smuggled(postback: bool) -> String {
    if postback {
        format!(
            "GET {EV}/web/smuggled?td_write_key={KEY}&td_format=pixel HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
    } else {
        "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_string()
    }
}

/// Sends every smuggling case to `front(i)` on its own connection and checks the answer; then
/// returns the number of cases.
async fn smuggle_all(proxy: &Proxy, postback: bool, front: impl Fn(usize) -> String) -> usize {
    let s = smuggled(postback);
    let cases = smuggling_cases(&s);
    for (i, (name, headers, body)) in cases.iter().enumerate() {
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let mut req = raw_request("POST", &front(i), &refs, body);
        if *name == "Transfer-Encoding in HTTP/1.0" {
            let at = find(&req, b"HTTP/1.1").unwrap();
            req[at..at + 8].copy_from_slice(b"HTTP/1.0");
        }
        let what = format!("case {i} ({name}: {headers:?}) to {}", front(i));
        let ex = exchange(proxy.addr(), &req, Duration::from_secs(2));
        eprintln!("{what}: {}", ex.summary());
        ex.assert_refused_or_closed(&what);
        assert_serves_pixel(proxy, &what).await;
    }
    cases.len()
}

#[tokio::test]
async fn request_smuggling_on_a_postback_route() {
    let (origin, proxy) = harness();
    let n = smuggle_all(&proxy, true, |i| {
        format!("{EV}/web/front_{i}?{}&td_format=pixel&front={i}", key_q())
    })
    .await;
    // (Content-Type is absent: a postback with a body and no type is refused with 415, so
    // only a request framed with an empty body could have made a record.)
    let recs = records(&proxy).await;
    assert!(
        recs.iter().all(|r| r["table"] != "smuggled"),
        "a smuggled postback made a record: {recs:#?}"
    );
    for i in 0..n {
        let fronts = recs
            .iter()
            .filter(|r| r["table"] == format!("front_{i}").as_str())
            .count();
        assert!(fronts <= 1, "case {i}: {fronts} records: {recs:#?}");
    }
    assert!(
        origin.requests().is_empty(),
        "postbacks reached the origin: {:#?}",
        origin.requests()
    );
}

#[tokio::test]
async fn request_smuggling_on_the_passthrough_path() {
    let (origin, proxy) = harness();
    let n = smuggle_all(&proxy, false, |i| format!("/app/front/{i}")).await;
    let seen = origin.requests();
    assert!(
        seen.iter().all(|r| !r.uri.contains("smuggled")),
        "a smuggled request reached the origin: {seen:#?}"
    );
    for i in 0..n {
        let uri = format!("/app/front/{i}");
        let fronts: Vec<_> = seen.iter().filter(|r| r.uri == uri).collect();
        assert!(fronts.len() <= 1, "case {i}: {fronts:#?}");
        // What the origin got, it got with one unambiguous framing, and the smuggled request
        // (if it went at all) only as body bytes.
        for r in fronts {
            let cl = r.header_all("content-length");
            let te = r.header_all("transfer-encoding");
            assert!(
                cl.is_empty() || te.is_empty(),
                "case {i}: the origin got both Content-Length and Transfer-Encoding: {r:#?}"
            );
            assert!(cl.len() <= 1, "case {i}: {r:#?}");
        }
    }
    let recs = records(&proxy).await;
    assert_eq!(recs, Vec::<Value>::new());
}

/// Bytes after a whole request on the same connection are not read as a second request by a
/// postback route either way: a refused postback with a body it did not read must not let the
/// unread body be parsed as a request.
#[tokio::test]
async fn an_unread_body_is_never_parsed_as_a_request() {
    let (_origin, proxy) = harness();
    let s = smuggled(true);
    // Refused before the body is read (no key; bad name; method not allowed; 413 declared).
    let fronts = [
        format!("{EV}/web/unread_a?td_format=pixel"),
        format!("{EV}/we-b/unread_b?{}", key_q()),
        format!("{EV}/web/unread_c?{}&td_format=png", key_q()),
    ];
    for front in &fronts {
        let req = raw_request(
            "POST",
            front,
            &[
                "Content-Type: application/x-www-form-urlencoded",
                &format!("Content-Length: {}", s.len()),
            ],
            s.as_bytes(),
        );
        let ex = exchange(proxy.addr(), &req, Duration::from_secs(2));
        assert_eq!(ex.answers.len(), 1, "{front}: {ex:?}");
        assert!((400..500).contains(&ex.answers[0].status), "{ex:?}");
        assert_eq!(ex.answers[0].header("cache-control"), Some(NO_CACHE));
        assert!(ex.answers[0].json()["error"].is_string());
    }
    for method in ["PUT", "DELETE"] {
        let req = raw_request(
            method,
            &format!("{EV}/web/unread_m?{}", key_q()),
            &[&format!("Content-Length: {}", s.len())],
            s.as_bytes(),
        );
        let ex = exchange(proxy.addr(), &req, Duration::from_secs(2));
        assert_eq!(ex.answers.len(), 1, "{method}: {ex:?}");
        assert_eq!(ex.answers[0].status, 405, "{ex:?}");
    }
    // Declared over the limit and then sent anyway.
    let mut big = vec![b'a'; 70 * 1024];
    big.extend_from_slice(s.as_bytes());
    let req = raw_request(
        "POST",
        &format!("{EV}/web/unread_big?{}", key_q()),
        &[
            "Content-Type: application/x-www-form-urlencoded",
            &format!("Content-Length: {}", big.len()),
        ],
        &big,
    );
    let ex = exchange(proxy.addr(), &req, Duration::from_secs(2));
    assert_eq!(ex.answers.len(), 1, "{ex:?}");
    assert_eq!(ex.answers[0].status, 413);
    assert_serves_pixel(&proxy, "unread bodies").await;
    let recs = records(&proxy).await;
    assert_eq!(recs, Vec::<Value>::new());
}

/// A chunked body the proxy cannot parse leaves the connection at an unknown place in the
/// byte stream: after refusing it, the connection must be closed (RFC 9112, section 6.3), so
/// that nothing after the broken chunk is ever read as a request. Behind a load balancer that
/// shares connections between visitors, the bytes that follow belong to somebody else.
#[tokio::test]
async fn a_malformed_chunked_body_closes_the_connection() {
    let (_origin, proxy) = harness();
    let next = format!(
        "GET {EV}/web/after_bad_chunk?{}&td_format=pixel HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        key_q()
    );
    let bodies: [&[u8]; 4] = [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"1x\r\nA\r\n0\r\n\r\n",
        b"10000000000000001\r\nA\r\n0\r\n\r\n",
        b"3\r\nabcdef\r\n0\r\n\r\n",
    ];
    for (i, body) in bodies.iter().enumerate() {
        for target in [
            format!("{EV}/web/bad_chunk?{}&i={i}", key_q()),
            format!("/app/bad_chunk/{i}"),
        ] {
            let what = format!("body {:?} to {target}", String::from_utf8_lossy(body));
            let mut stream = TcpStream::connect(proxy.addr()).unwrap();
            stream.set_nodelay(true).unwrap();
            stream
                .write_all(&raw_request(
                    "POST",
                    &target,
                    &[
                        "Content-Type: application/x-www-form-urlencoded",
                        "Transfer-Encoding: chunked",
                    ],
                    body,
                ))
                .unwrap();
            // The refusal, then (in a separate write, as a load balancer would send the next
            // visitor's request) another request on the same connection.
            let first = read_answers(&mut stream, Duration::from_secs(2));
            assert_eq!(first.answers.len(), 1, "{what}: {first:?}");
            assert!(
                (400..500).contains(&first.answers[0].status),
                "{what}: {}",
                first.summary()
            );
            let refusal_connection = first.answers[0].header("connection").map(str::to_owned);
            let _ = stream.write_all(next.as_bytes());
            let after = if first.closed {
                first
            } else {
                read_answers(&mut stream, Duration::from_secs(2))
            };
            assert!(
                after.closed && after.answers.iter().all(|a| a.status != 200),
                "{what}: the refusal said `Connection: {}` and the connection stayed open; \
                 the request sent next on it got {}",
                refusal_connection.as_deref().unwrap_or("(none)"),
                after.summary(),
            );
        }
    }
    assert_serves_pixel(&proxy, "malformed chunked bodies").await;
    let recs = records(&proxy).await;
    assert!(
        recs.iter().all(|r| r["table"] != "after_bad_chunk"),
        "a request sent after a broken chunked body was served: {recs:#?}"
    );
}

/// Connections cannot be held for ever. Pingora waits 60 s for each read of a new
/// connection's first request; after a request on a keep-alive connection the proxy must not
/// wait without limit for the next one either (an idle connection, or one that sends half a
/// request head and stops), or a client can hold every file descriptor the process has.
/// Bounded at 100 s; nothing is measured but whether the proxy closed the connection by then.
#[tokio::test]
async fn idle_and_half_sent_keep_alive_connections_are_closed() {
    let (_origin, proxy) = harness();
    let addr = proxy.addr();
    let first = format!(
        "GET {EV}/web/idle?{}&td_format=pixel HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        key_q()
    );
    let check = |what: &'static str, then: &'static [u8]| {
        let first = first.clone();
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(first.as_bytes()).unwrap();
            // The answer to the first request.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(stream.read(&mut byte).unwrap(), 1, "{what}: no answer");
                head.push(byte[0]);
            }
            let mut gif = [0u8; 43];
            stream.read_exact(&mut gif).unwrap();
            stream.write_all(then).unwrap();
            // Then nothing: wait up to 100 s for the proxy to close the connection.
            stream
                .set_read_timeout(Some(Duration::from_secs(100)))
                .unwrap();
            match stream.read(&mut byte) {
                Ok(0) => Ok(()),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
                Ok(_) => Err(format!("{what}: the proxy sent more bytes")),
                Err(e) => Err(format!(
                    "{what}: still open after 100 s ({e}); Pingora's keep-alive wait is \
                     infinite after the first request"
                )),
            }
        })
    };
    let idle = check("an idle keep-alive connection", b"");
    let half = check(
        "half a second request head",
        b"GET /postback/v3/event/web/idle2 HTTP/1.1\r\nHost: 127",
    );
    let results = [idle.join().unwrap(), half.join().unwrap()];
    assert_serves_pixel(&proxy, "idle connections").await;
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
