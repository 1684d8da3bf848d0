//! SPEC sections 3 and 4 through the real binary: every kind of postback request, the answer a
//! client sees, and the exact record that lands in the file sink. Refused requests must leave
//! no record: each test ends by sending a marker postback and checking that the sink holds
//! exactly the expected records before it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const EV: &str = "/postback/v3/event";

/// Checks the headers every accepted or refused postback answer carries.
fn assert_no_cache(r: &Resp) {
    assert_eq!(
        r.header("cache-control").as_deref(),
        Some(NO_CACHE),
        "Cache-Control of a postback answer ({} {:?})",
        r.status,
        r.text()
    );
}

/// A 200 with the 43-byte GIF.
fn assert_pixel(r: &Resp) {
    assert_eq!(r.status, 200, "body: {:?}", r.text());
    assert_eq!(r.header("content-type").as_deref(), Some("image/gif"));
    assert_eq!(r.header("content-length").as_deref(), Some("43"));
    assert_eq!(r.body, PIXEL_GIF, "the answer is not the 43-byte GIF");
    assert_no_cache(r);
}

/// A 200 with `{}`.
fn assert_json_ok(r: &Resp) {
    assert_eq!(r.status, 200, "body: {:?}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("content-length").as_deref(), Some("2"));
    assert_eq!(r.body, b"{}");
    assert_no_cache(r);
}

/// A JSON error answer with `status` and `{"error": code, "message": "..."}`.
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {:?}", r.text());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "Content-Type of a {status} answer: {ct:?}"
    );
    assert_no_cache(r);
    let body = r.json();
    assert_eq!(body["error"], code, "error body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "the error body has no message: {body}"
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string()),
        "Content-Length of the error answer"
    );
}

/// The value of the global-id cookie in a `Set-Cookie` answer, checking its attributes.
fn new_cookie(r: &Resp) -> String {
    let all = r.header_all("set-cookie");
    assert_eq!(all.len(), 1, "exactly one Set-Cookie expected: {all:?}");
    let sc = &all[0];
    let (pair, attrs) = sc.split_once(';').expect("Set-Cookie has attributes");
    let id = pair
        .strip_prefix("_td_global=")
        .unwrap_or_else(|| panic!("Set-Cookie is not the _td_global cookie: {sc}"));
    let attrs: Vec<&str> = attrs.split(';').map(str::trim).collect();
    for want in ["Max-Age=63072000", "Path=/", "SameSite=Lax", "HttpOnly"] {
        assert!(attrs.contains(&want), "Set-Cookie lacks {want}: {sc}");
    }
    assert!(
        !attrs.iter().any(|a| a.eq_ignore_ascii_case("Secure")),
        "Secure on a plain-HTTP request with secure: auto: {sc}"
    );
    assert_uuid_v4(id);
    id.to_string()
}

fn assert_uuid_v4(id: &str) {
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "not a UUID: {id}"
    );
    assert!(
        id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()),
        "not a UUID: {id}"
    );
    assert!(parts[2].starts_with('4'), "not a version 4 UUID: {id}");
}

/// The record's `time`, checked to be an integer between `lo` and `hi`.
fn time_of(rec: &Value, lo: i64, hi: i64) -> i64 {
    let t = rec["record"]["time"]
        .as_i64()
        .unwrap_or_else(|| panic!("record.time is not an integer: {rec}"));
    assert!(
        (lo..=hi).contains(&t),
        "record.time {t} is not the receive time (between {lo} and {hi}): {rec}"
    );
    t
}

/// `{"database", "table", "record": {"time": time, columns...}}`.
fn record(database: &str, table: &str, time: i64, columns: &[(&str, &str)]) -> Value {
    let mut rec = serde_json::Map::new();
    rec.insert("time".into(), json!(time));
    for (k, v) in columns {
        rec.insert((*k).into(), json!(v));
    }
    json!({"database": database, "table": table, "record": rec})
}

/// The only record before the marker is one of `web.{table}` with `columns`, received since
/// `before`.
async fn assert_one_record(proxy: &Proxy, before: i64, table: &str, columns: &[(&str, &str)]) {
    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let t = time_of(&records[0], before, now());
    assert_eq!(records[0], record("web", table, t, columns));
}

/// `records` are two records of `web.clicks`, `c=1` then `c=2`, received since `before`.
fn assert_two_clicks(records: &[Value], before: i64) {
    assert_eq!(records.len(), 2, "{records:#?}");
    let t0 = time_of(&records[0], before, now());
    let t1 = time_of(&records[1], before, now());
    assert_eq!(records[0], record("web", "clicks", t0, &[("c", "1")]));
    assert_eq!(records[1], record("web", "clicks", t1, &[("c", "2")]));
}

/// Every column of every record is a string (SPEC 4), and `time` is an integer.
fn assert_shape(records: &[Value]) {
    for r in records {
        let obj = r.as_object().expect("a record is a JSON object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["database", "record", "table"], "record keys: {r}");
        let cols = r["record"].as_object().expect("record.record is an object");
        for (k, v) in cols {
            if k == "time" {
                assert!(v.is_i64(), "time is not an integer: {r}");
            } else {
                assert!(v.is_string(), "column {k} is not a string: {r}");
            }
        }
    }
}

fn key_q() -> String {
    format!("td_write_key={KEY}")
}

// ---------------------------------------------------------------------------------------------
// GET / HEAD
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn get_pixel_records_query_columns_placeholders_and_sets_the_cookie() {
    let (_origin, proxy) = harness();
    let before = now();
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/pageviews?td_format=pixel&{}&page=%2Fhome&q=a+b%2Bc&e=%E2%82%AC\
             &quote=%22x%22%0A&td_ip=td_ip&td_ua=td_ua&td_global_id=td_global_id",
            key_q()
        )),
        &[("user-agent", "Mozilla/5.0 (X11; e2e)")],
    )
    .await;
    let after = now();
    assert_pixel(&r);
    let id = new_cookie(&r);

    let records = proxy.records_until_marker().await;
    assert_shape(&records);
    assert_eq!(records.len(), 1, "{records:#?}");
    let t = time_of(&records[0], before, after);
    assert_eq!(
        records[0],
        record(
            "web",
            "pageviews",
            t,
            &[
                ("page", "/home"),
                ("q", "a b+c"),
                ("e", "€"),
                ("quote", "\"x\"\n"),
                ("td_ip", "127.0.0.1"),
                ("td_ua", "Mozilla/5.0 (X11; e2e)"),
                ("td_global_id", &id),
            ]
        )
    );
    // Nothing from the request is written unescaped: the raw line holds the escaped quote.
    let raw = std::fs::read_to_string(&proxy.events).unwrap();
    assert!(raw.contains(r#""quote":"\"x\"\n""#), "raw line: {raw}");
}

#[tokio::test]
async fn get_defaults_to_json_and_uses_the_existing_cookie() {
    let (_origin, proxy) = harness();
    let before = now();
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/events?{}&a=1&td_global_id=td_global_id",
            key_q()
        )),
        &[("cookie", "other=x; _td_global=visitor-42; z=1")],
    )
    .await;
    let after = now();
    assert_json_ok(&r);
    assert!(
        r.header_all("set-cookie").is_empty(),
        "a visitor with a cookie gets no new one: {:?}",
        r.header_all("set-cookie")
    );
    // td_format=json explicitly gives the same answer.
    let r2 = get(
        &proxy.url(&format!("{EV}/web/events?{}&td_format=json&b=2", key_q())),
        &[("cookie", "_td_global=visitor-42")],
    )
    .await;
    assert_json_ok(&r2);

    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 2, "{records:#?}");
    let t0 = time_of(&records[0], before, after);
    assert_eq!(
        records[0],
        record(
            "web",
            "events",
            t0,
            &[("a", "1"), ("td_global_id", "visitor-42")]
        )
    );
    let t1 = time_of(&records[1], before, now());
    assert_eq!(records[1], record("web", "events", t1, &[("b", "2")]));
}

#[tokio::test]
async fn head_answers_headers_without_a_body_and_records() {
    let (_origin, proxy) = harness();
    let r =
        send(client().head(proxy.url(&format!("{EV}/web/heads?{}&td_format=pixel&h=1", key_q()))))
            .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").as_deref(), Some("43"));
    assert_eq!(r.header("content-type").as_deref(), Some("image/gif"));
    assert_no_cache(&r);
    assert!(r.body.is_empty());

    // On the wire: no body bytes follow the head; the next answer on the connection parses.
    let mut conn = RawConn::connect(proxy.addr());
    conn.send(&request(
        "HEAD",
        &format!("{EV}/web/heads?{}&h=2", key_q()),
        &[],
        b"",
    ));
    let head = conn.read_response(true);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("2"));
    conn.send(&request(
        "GET",
        &format!("{EV}/web/heads?{}&h=3", key_q()),
        &[],
        b"",
    ));
    let next = conn.read_response(false);
    assert_eq!(next.status, 200);
    assert_eq!(next.body, b"{}");

    let records = proxy.records_until_marker().await;
    let hs: Vec<&Value> = records.iter().map(|r| &r["record"]["h"]).collect();
    assert_eq!(hs, ["1", "2", "3"], "{records:#?}");
}

#[tokio::test]
async fn fixed_database_route_with_pixel_default() {
    let (origin, proxy) = harness();
    let before = now();
    let r = get(&proxy.url(&format!("/px/clicks.gif?{}&c=1", key_q())), &[]).await;
    assert_pixel(&r);
    let r = get(
        &proxy.url(&format!("/px/clicks.gif?{}&c=2&td_format=json", key_q())),
        &[],
    )
    .await;
    assert_json_ok(&r);
    let r = get(&proxy.url(&format!("/px/bad-name.gif?{}", key_q())), &[]).await;
    assert_error(&r, 400, "bad_request");
    // Not the route's shape: the origin answers.
    let r = get(&proxy.url(&format!("/px/clicks.png?{}", key_q())), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-origin").as_deref(), Some("yes"));
    origin.request_to(&format!("/px/clicks.png?{}", key_q()));

    assert_two_clicks(&proxy.records_until_marker().await, before);
}

// ---------------------------------------------------------------------------------------------
// POST
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn post_json_object_keeps_nested_values_as_json_text() {
    let (_origin, proxy) = harness();
    let before = now();
    let body = r#"{"page":"/a","n":3,"f":1.5,"ok":true,"nested":{"x":[1,"y"]},"list":[1,2],"s":"he said \"hi\"\n","we\"ird\u0001":"\u0000<\/script>","td_write_key":"body-key-never-a-column"}"#;
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/json_events")))
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(body),
    )
    .await;
    assert_json_ok(&r);
    let id = new_cookie(&r);
    assert!(!id.is_empty());

    let records = proxy.records_until_marker().await;
    assert_shape(&records);
    assert_eq!(records.len(), 1, "{records:#?}");
    // Control characters and quotes are escaped in the line itself.
    let raw = std::fs::read_to_string(&proxy.events).unwrap();
    assert!(
        raw.contains(r#""we\"ird\u0001":"\u0000</script>""#),
        "raw line: {raw}"
    );
    assert!(!raw.contains("body-key-never-a-column"), "raw line: {raw}");
    let t = time_of(&records[0], before, now());
    assert_eq!(
        records[0],
        record(
            "web",
            "json_events",
            t,
            &[
                ("page", "/a"),
                ("n", "3"),
                ("f", "1.5"),
                ("ok", "true"),
                ("nested", r#"{"x":[1,"y"]}"#),
                ("list", "[1,2]"),
                ("s", "he said \"hi\"\n"),
                ("we\"ird\u{1}", "\u{0}</script>"),
            ]
        )
    );
}

#[tokio::test]
async fn post_body_that_is_not_a_json_object_is_400_and_records_nothing() {
    let (_origin, proxy) = harness();
    for body in ["[1]", "\"s\"", "{", "12", "null", ""] {
        let r = send(
            client()
                .post(proxy.url(&format!("{EV}/web/bad_json")))
                .header("content-type", "application/json")
                .header("x-td-write-key", KEY)
                .body(body),
        )
        .await;
        assert_error(&r, 400, "bad_request");
    }
    for body in [r#"{"events":[1]}"#, r#"{"e":[]}"#, "[]"] {
        let r = send(
            client()
                .post(proxy.url("/td/web/bad_batch"))
                .header("content-type", "application/vnd.treasuredata.v1+json")
                .header("authorization", format!("TD1 {KEY}"))
                .body(body),
        )
        .await;
        assert_error(&r, 400, "bad_request");
    }
    // A body of another type is refused too (415), and records nothing.
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/bad_json")))
            .header("content-type", "text/xml")
            .header("x-td-write-key", KEY)
            .body("<a>1</a>"),
    )
    .await;
    assert_error(&r, 415, "unsupported_media_type");
    proxy
        .assert_no_records_before_marker("refused requests")
        .await;
}

#[tokio::test]
async fn post_json_takes_the_key_from_the_query_when_no_header_gives_one() {
    let (_origin, proxy) = harness();
    let url = proxy.url(&format!("{EV}/web/json_q?{}", key_q()));
    let post = |body: &'static str| {
        client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
    };
    assert_json_ok(&send(post(r#"{"n":"1"}"#)).await);
    // The header wins over the query: a wrong header key is refused.
    let r = send(post(r#"{"n":"2"}"#).header("x-td-write-key", "wrong")).await;
    assert_error(&r, 403, "forbidden");
    let records = proxy.records_until_marker().await;
    let ns: Vec<&Value> = records.iter().map(|r| &r["record"]["n"]).collect();
    assert_eq!(ns, ["1"], "{records:#?}");
}

#[tokio::test]
async fn post_form_is_read_as_a_query_string() {
    let (_origin, proxy) = harness();
    let before = now();
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/forms")))
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=UTF-8",
            )
            .body(format!(
                "td_write_key={KEY}&page=%2Fb+c&td_format=pixel&td_ip=td_ip&n=%E2%82%AC"
            )),
    )
    .await;
    assert_pixel(&r);
    assert_one_record(
        &proxy,
        before,
        "forms",
        &[("page", "/b c"), ("td_ip", "127.0.0.1"), ("n", "€")],
    )
    .await;
}

#[tokio::test]
async fn post_td_js_sdk_batch_gives_one_record_per_event() {
    let (_origin, proxy) = harness();
    let before = now();
    let earlier = before - 3600;
    let body = format!(
        r#"{{"events":[{{"a":"1","td_record_time":{earlier}}},{{"b":"2","time":7}},{{"c":{{"d":true}},"n":5}}]}}"#
    );
    let r = send(
        client()
            .post(proxy.url("/td/web/sdk_events?time=99"))
            .header("content-type", "application/vnd.treasuredata.v1+json")
            .header("authorization", format!("TD1 {KEY}"))
            .body(body),
    )
    .await;
    assert_json_ok(&r);
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/ads_summer/sdk_js")))
            .header(
                "content-type",
                "application/vnd.treasuredata.v1.js+json; charset=utf-8",
            )
            .header("x-td-write-key", KEY)
            .body(r#"{"events":[{"x":"y"}]}"#),
    )
    .await;
    assert_json_ok(&r);

    let records = proxy.records_until_marker().await;
    assert_shape(&records);
    assert_eq!(records.len(), 4, "{records:#?}");
    assert_eq!(
        records[0],
        record("web", "sdk_events", earlier, &[("a", "1")])
    );
    let t1 = time_of(&records[1], before, now());
    assert_eq!(records[1], record("web", "sdk_events", t1, &[("b", "2")]));
    let t2 = time_of(&records[2], before, now());
    assert_eq!(
        records[2],
        record(
            "web",
            "sdk_events",
            t2,
            &[("c", r#"{"d":true}"#), ("n", "5")]
        )
    );
    let t3 = time_of(&records[3], before, now());
    assert_eq!(
        records[3],
        record("ads_summer", "sdk_js", t3, &[("x", "y")])
    );
}

// ---------------------------------------------------------------------------------------------
// OPTIONS, CORS, other methods
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn options_preflight_for_allowed_and_refused_origins() {
    let (_origin, proxy) = harness();
    let url = proxy.url(&format!("{EV}/web/cors"));
    let r = send(
        client()
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", "https://www.example.com")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, x-td-write-key",
            ),
    )
    .await;
    assert_eq!(r.status, 204, "body: {:?}", r.text());
    assert!(r.body.is_empty());
    assert_no_cache(&r);
    assert_cors_allowed(&r);
    let methods = r.header("access-control-allow-methods").unwrap_or_default();
    assert!(methods.contains("POST"), "Allow-Methods: {methods:?}");
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in ["content-type", "x-td-write-key"] {
        assert!(allowed.contains(h), "Allow-Headers lacks {h}: {allowed:?}");
    }

    let r = send(
        client()
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", "https://evil.example.net")
            .header("access-control-request-method", "POST"),
    )
    .await;
    assert_error(&r, 403, "forbidden");
    assert!(r.header("access-control-allow-origin").is_none());

    // The CORS headers also come with the POST itself, for an allowed origin only.
    let post = |origin_hdr: &'static str| {
        client()
            .post(&url)
            .header("origin", origin_hdr)
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(r#"{"from":"browser"}"#)
    };
    let r = send(post("https://www.example.com")).await;
    assert_json_ok(&r);
    assert_cors_allowed(&r);
    let r = send(post("https://evil.example.net")).await;
    assert_json_ok(&r);
    assert!(r.header("access-control-allow-origin").is_none());

    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 2, "preflights must not record: {records:#?}");
    assert!(records.iter().all(|r| r["record"]["from"] == "browser"));
}

#[tokio::test]
async fn other_methods_are_405_with_allow() {
    let (origin, proxy) = harness();
    let url = proxy.url(&format!("{EV}/web/methods?{}&m=1", key_q()));
    for method in ["PUT", "DELETE", "PATCH"] {
        let r = send(
            client()
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                    &url,
                )
                .body("a=1"),
        )
        .await;
        assert_eq!(r.status, 405, "{method}: {:?}", r.text());
        assert_no_cache(&r);
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method}: no Allow"));
        let allow: Vec<&str> = allow.split(',').map(str::trim).collect();
        for m in ["GET", "HEAD", "POST", "OPTIONS"] {
            assert!(allow.contains(&m), "{method}: Allow lacks {m}: {allow:?}");
        }
        assert!(
            !allow.contains(&method),
            "{method}: Allow lists it: {allow:?}"
        );
    }
    assert!(origin.requests().is_empty(), "405s went upstream");
    proxy
        .assert_no_records_before_marker("refused requests")
        .await;
}

// ---------------------------------------------------------------------------------------------
// Names, routing, encoding, format
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_database_or_table_names_are_400() {
    let (origin, proxy) = harness();
    let long = "t".repeat(256);
    for path in [
        format!("{EV}/web-site/t"),
        format!("{EV}/web/t.x"),
        format!("{EV}/web/t%20x"),
        format!("{EV}/web/%C3%A9"),
        format!("{EV}/web/"),
        format!("{EV}//t"),
        format!("{EV}/web/{long}"),
    ] {
        let r = get(&proxy.url(&format!("{path}?{}&x=1", key_q())), &[]).await;
        assert_error(&r, 400, "bad_request");
    }
    // 255 bytes is still a name.
    let ok = "T_9".repeat(85);
    assert_eq!(ok.len(), 255);
    let r = get(&proxy.url(&format!("{EV}/web/{ok}?{}&x=2", key_q())), &[]).await;
    assert_json_ok(&r);
    assert!(origin.requests().is_empty(), "bad names went upstream");
    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["table"], ok.as_str());
    assert_eq!(records[0]["record"]["x"], "2");
}

#[tokio::test]
async fn paths_with_other_segment_counts_go_upstream() {
    let (origin, proxy) = harness();
    for path in [
        format!("{EV}/a?{}&x=1", key_q()),
        format!("{EV}/web/t/extra?{}", key_q()),
        EV.to_string(),
        "/postback/v3/events/web/t".to_string(),
    ] {
        let r = get(&proxy.url(&path), &[]).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.text());
        assert_eq!(r.header("x-origin").as_deref(), Some("yes"), "{path}");
        assert_eq!(r.json()["uri"], path.as_str());
        origin.request_to(&path);
    }
    proxy
        .assert_no_records_before_marker("refused requests")
        .await;
}

#[tokio::test]
async fn bad_td_format_and_bad_encoding_are_400() {
    let (_origin, proxy) = harness();
    for query in [
        format!("{}&td_format=png", key_q()),
        format!("{}&td_format=PIXEL", key_q()),
        format!("{}&td_format=", key_q()),
        format!("{}&a=%FF", key_q()),
        format!("{}&%FF=1", key_q()),
        format!("{}&a=%C3%28", key_q()),
        format!("{}&a=1&td_redirect=%FF", key_q()),
    ] {
        let r = get(&proxy.url(&format!("{EV}/web/enc?{query}")), &[]).await;
        assert_error(&r, 400, "bad_request");
        assert!(
            !r.text().contains(KEY),
            "the answer echoes the key: {}",
            r.text()
        );
    }
    // A key that is not UTF-8 is refused without being echoed.
    let r = get(
        &proxy.url(&format!("{EV}/web/enc?td_write_key=%FFsecret-value-1")),
        &[],
    )
    .await;
    assert_error(&r, 400, "bad_request");
    assert!(!r.text().contains("secret-value-1"), "{}", r.text());
    // The same in a form body.
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/enc")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("td_write_key={KEY}&a=%FF")),
    )
    .await;
    assert_error(&r, 400, "bad_request");
    proxy
        .assert_no_records_before_marker("refused requests")
        .await;
}

// ---------------------------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------------------------

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[tokio::test]
async fn redirect_to_an_allowed_host_substitutes_the_global_id() {
    let (_origin, proxy) = harness();
    let before = now();
    let target = "https://example.com/land?uid=td_global_id&x=1";
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/clicks?{}&c=1&td_redirect={}",
            key_q(),
            enc(target)
        )),
        &[("cookie", "_td_global=abc-1")],
    )
    .await;
    assert_eq!(r.status, 302, "body: {:?}", r.text());
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://example.com/land?uid=abc-1&x=1")
    );
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length").as_deref(), Some("0"));
    assert_no_cache(&r);
    assert!(r.header_all("set-cookie").is_empty());

    // A new visitor: the new cookie's id goes into the target; subdomains match `*.example.com`.
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/clicks?{}&c=2&td_redirect={}",
            key_q(),
            enc("https://shop.example.com/p?gid=td_global_id")
        )),
        &[],
    )
    .await;
    assert_eq!(r.status, 302, "body: {:?}", r.text());
    let id = new_cookie(&r);
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.example.com/p?gid={id}"))
    );

    assert_two_clicks(&proxy.records_until_marker().await, before);
}

#[tokio::test]
async fn redirect_to_other_targets_is_400_and_records_nothing() {
    let (_origin, proxy) = harness();
    for target in [
        "https://evil.com/",
        "https://example.com.evil.com/",
        "https://notexample.com/",
        "javascript:alert(1)",
        "//evil.com/x",
        "/relative/path",
        "https://user@example.com/",
        "https://user:pw@example.com/",
        "ftp://example.com/",
        "https:/evil.com/",
        "https://evil.com\\@example.com/",
        "data:text/html,hi",
    ] {
        let r = get(
            &proxy.url(&format!(
                "{EV}/web/clicks?{}&c=1&td_redirect={}",
                key_q(),
                enc(target)
            )),
            &[],
        )
        .await;
        assert_error(&r, 400, "bad_request");
        assert!(r.header("location").is_none(), "{target}: Location given");
    }
    proxy
        .assert_no_records_before_marker("refused redirects")
        .await;
}

// ---------------------------------------------------------------------------------------------
// Write keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_unknown_or_unauthorized_keys_are_403_and_never_echoed() {
    let (_origin, proxy) = harness();
    let wrong = "1/0123456789abcdef0123456789WRONGKEY";
    // (path, headers, a secret the answer must not echo)
    type Case<'a> = (String, Vec<(&'a str, String)>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (format!("{EV}/web/auth?a=1"), vec![], None),
        (format!("{EV}/web/auth?a=1&td_write_key="), vec![], None),
        (
            format!("{EV}/web/auth?a=1&td_write_key={wrong}"),
            vec![],
            Some(wrong),
        ),
        (
            format!("{EV}/web/auth?a=1"),
            vec![("x-td-write-key", wrong.to_string())],
            Some(wrong),
        ),
        (
            format!("{EV}/web/auth?a=1"),
            vec![("authorization", format!("TD1 {wrong}"))],
            Some(wrong),
        ),
        // Not the TD1 scheme: no key at all.
        (
            format!("{EV}/web/auth?a=1"),
            vec![("authorization", format!("Bearer {KEY}"))],
            Some(KEY),
        ),
        // A valid key, but not for this database.
        (
            format!("{EV}/web/auth?a=1&td_write_key={OTHER_KEY}"),
            vec![],
            Some(OTHER_KEY),
        ),
        (format!("{EV}/adsx/auth?a=1&{}", key_q()), vec![], Some(KEY)),
        (
            format!("{EV}/hashed/auth?a=1&{}", key_q()),
            vec![],
            Some(KEY),
        ),
        // The header wins over the query: a wrong header key with a right query key is refused.
        (
            format!("{EV}/web/auth?a=1&{}", key_q()),
            vec![("x-td-write-key", wrong.to_string())],
            Some(wrong),
        ),
    ];
    for (path, headers, secret) in &cases {
        let mut req = client().get(proxy.url(path));
        for (n, v) in headers {
            req = req.header(*n, v);
        }
        let r = send(req).await;
        assert_error(&r, 403, "forbidden");
        if let Some(secret) = secret {
            assert!(
                !r.text().contains(secret),
                "the answer echoes the key: {}",
                r.text()
            );
            for (n, v) in r.headers.iter() {
                assert!(
                    !v.to_str().unwrap_or("").contains(secret),
                    "header {n} echoes the key"
                );
            }
        }
    }
    proxy
        .assert_no_records_before_marker("refused requests")
        .await;
}

#[tokio::test]
async fn keys_in_headers_globbed_databases_and_hashed_keys_are_accepted() {
    let (_origin, proxy) = harness();
    let wrong = "not-a-key";
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        (
            format!("{EV}/web/auth?n=1"),
            vec![("x-td-write-key", KEY.into())],
        ),
        (
            format!("{EV}/web/auth?n=2"),
            vec![("authorization", format!("TD1 {KEY}"))],
        ),
        // The header wins over a wrong query key.
        (
            format!("{EV}/web/auth?n=3&td_write_key={wrong}"),
            vec![("x-td-write-key", KEY.into())],
        ),
        (
            format!("{EV}/web/auth?n=4&td_write_key={wrong}"),
            vec![("authorization", format!("TD1 {KEY}"))],
        ),
        (format!("{EV}/ads_summer/auth?n=5&{}", key_q()), vec![]),
        (
            format!("{EV}/hashed/auth?n=6&td_write_key={}", enc(HASHED_KEY)),
            vec![],
        ),
        (
            format!("{EV}/other/auth?n=7&td_write_key={}", enc(OTHER_KEY)),
            vec![],
        ),
    ];
    for (path, headers) in &cases {
        let mut req = client().get(proxy.url(path));
        for (n, v) in headers {
            req = req.header(*n, v);
        }
        let r = send(req).await;
        assert_json_ok(&r);
    }
    let records = proxy.records_until_marker().await;
    let got: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["database"].as_str().unwrap().to_string(),
                r["record"]["n"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("web", "1"),
        ("web", "2"),
        ("web", "3"),
        ("web", "4"),
        ("ads_summer", "5"),
        ("hashed", "6"),
        ("other", "7"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
    for r in &records {
        let cols = r["record"].as_object().unwrap();
        assert!(
            !cols.contains_key("td_write_key"),
            "the write key became a column: {r}"
        );
        assert_eq!(cols.len(), 2, "only time and n: {r}");
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters: time, repeats, empty names, placeholders, client address
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn td_record_time_inside_and_outside_the_window() {
    let (_origin, proxy) = harness();
    let base = now();
    let day = 86_400;
    let cases: Vec<(String, Option<i64>)> = vec![
        ((base - 3600).to_string(), Some(base - 3600)),
        ((base - 6 * day).to_string(), Some(base - 6 * day)),
        ((base + 2 * day).to_string(), Some(base + 2 * day)),
        ((base - 8 * day).to_string(), None),
        ((base + 4 * day).to_string(), None),
        ("soon".to_string(), None),
        ("1.5".to_string(), None),
        ("".to_string(), None),
    ];
    for (i, (t, _)) in cases.iter().enumerate() {
        let r = get(
            &proxy.url(&format!(
                "{EV}/web/times?{}&i={i}&td_record_time={t}",
                key_q()
            )),
            &[],
        )
        .await;
        assert_json_ok(&r);
    }
    let after = now();
    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), cases.len(), "{records:#?}");
    for (i, ((raw, want), rec)) in cases.iter().zip(&records).enumerate() {
        let t = match want {
            Some(t) => {
                assert_eq!(rec["record"]["time"], *t, "td_record_time={raw}: {rec}");
                *t
            }
            None => time_of(rec, base, after),
        };
        assert_eq!(
            *rec,
            record("web", "times", t, &[("i", &i.to_string())]),
            "td_record_time={raw} must not be a column"
        );
    }
}

#[tokio::test]
async fn time_param_repeats_empty_names_and_plain_placeholder_values() {
    let (_origin, proxy) = harness();
    let before = now();
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/params?{}&time=5&a=1&a=2&=skipped&&b=x%3Dy\
             &td_ip=1.2.3.4&td_ua=custom-ua&td_global_id=gid-literal",
            key_q()
        )),
        &[
            ("user-agent", "real-agent"),
            ("cookie", "_td_global=real-id"),
        ],
    )
    .await;
    assert_json_ok(&r);
    assert_one_record(
        &proxy,
        before,
        "params",
        &[
            ("a", "2"),
            ("b", "x=y"),
            ("td_ip", "1.2.3.4"),
            ("td_ua", "custom-ua"),
            ("td_global_id", "gid-literal"),
        ],
    )
    .await;
}

#[tokio::test]
async fn td_ip_is_the_rightmost_untrusted_forwarded_address_from_a_trusted_peer() {
    let (_origin, proxy) = harness();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "127.0.0.1"),
        (vec!["198.51.100.1, 203.0.113.7"], "203.0.113.7"),
        (vec!["203.0.113.9, 127.0.0.1"], "203.0.113.9"),
        (vec!["198.51.100.1", "203.0.113.8"], "203.0.113.8"),
    ];
    for (i, (xff, _)) in cases.iter().enumerate() {
        let mut req =
            client().get(proxy.url(&format!("{EV}/web/ips?{}&i={i}&td_ip=td_ip", key_q())));
        for v in xff {
            req = req.header("x-forwarded-for", *v);
        }
        assert_json_ok(&send(req).await);
    }
    let records = proxy.records_until_marker().await;
    let got: Vec<&Value> = records.iter().map(|r| &r["record"]["td_ip"]).collect();
    let want: Vec<&str> = cases.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(got, want, "{records:#?}");
}

#[tokio::test]
async fn x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let (_origin, proxy) = origin_and_proxy(|s| {
        s.trusted_proxies = vec!["10.0.0.0/8".into()];
    });
    let r = get(
        &proxy.url(&format!("{EV}/web/ips?{}&td_ip=td_ip", key_q())),
        &[("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    assert_json_ok(&r);
    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["record"]["td_ip"], "127.0.0.1");
}

#[tokio::test]
async fn anonymize_zeroes_the_last_octet() {
    let (_origin, proxy) = origin_and_proxy(|s| {
        s.anonymize = true;
    });
    for (i, xff) in ["203.0.113.77", ""].iter().enumerate() {
        let mut req =
            client().get(proxy.url(&format!("{EV}/web/anon?{}&i={i}&td_ip=td_ip", key_q())));
        if !xff.is_empty() {
            req = req.header("x-forwarded-for", *xff);
        }
        assert_json_ok(&send(req).await);
    }
    let records = proxy.records_until_marker().await;
    let ips: Vec<&Value> = records.iter().map(|r| &r["record"]["td_ip"]).collect();
    assert_eq!(ips, ["203.0.113.0", "127.0.0.0"], "{records:#?}");
}

#[tokio::test]
async fn global_id_cookie_and_time_window_settings() {
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.postback_extra = vec![
        "global_id: { cookie: vid, max_age: 1d, domain: .example.com, same_site: Strict }".into(),
        "record_time_window: { past: 1h, future: 1m }".into(),
    ];
    let proxy = Proxy::start_with(settings);
    let base = now();
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/gid?{}&n=1&td_global_id=td_global_id&td_record_time={}",
            key_q(),
            base - 2 * 3600
        )),
        &[("cookie", "_td_global=not-this-one")],
    )
    .await;
    assert_json_ok(&r);
    let sc = r.header_all("set-cookie");
    assert_eq!(sc.len(), 1, "{sc:?}");
    let (pair, attrs) = sc[0].split_once(';').unwrap();
    let id = pair
        .strip_prefix("vid=")
        .expect("the cookie is named `vid`");
    assert_uuid_v4(id);
    assert_eq!(
        attrs.trim(),
        "Max-Age=86400; Path=/; Domain=.example.com; SameSite=Strict; HttpOnly"
    );
    let r = get(
        &proxy.url(&format!(
            "{EV}/web/gid?{}&n=2&td_global_id=td_global_id&td_record_time={}",
            key_q(),
            base - 1800
        )),
        &[("cookie", "vid=known-visitor")],
    )
    .await;
    assert_json_ok(&r);
    assert!(r.header_all("set-cookie").is_empty());

    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 2, "{records:#?}");
    // Two hours back is outside `past: 1h`: the receive time is used.
    let t0 = time_of(&records[0], base, now());
    assert_eq!(
        records[0],
        record("web", "gid", t0, &[("n", "1"), ("td_global_id", id)])
    );
    assert_eq!(
        records[1],
        record(
            "web",
            "gid",
            base - 1800,
            &[("n", "2"), ("td_global_id", "known-visitor")]
        )
    );
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn url_over_max_url_bytes_is_414() {
    let (origin, proxy) = harness(); // max_url_bytes: 4KiB
    let prefix = format!("{EV}/web/long?{}&n=1&pad=", key_q());
    let exact = format!("{prefix}{}", "x".repeat(4096 - prefix.len()));
    assert_eq!(exact.len(), 4096);
    let r = get(&proxy.url(&exact), &[]).await;
    assert_json_ok(&r);
    let over = format!("{EV}/web/long?{}&n=2&pad={}", key_q(), "x".repeat(4096));
    let r = get(&proxy.url(&over), &[]).await;
    assert_error(&r, 414, "uri_too_long");
    assert!(origin.requests().is_empty());
    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["record"]["n"], "1");
}

#[tokio::test]
async fn body_over_max_body_bytes_is_413() {
    let (_origin, proxy) = harness(); // max_body_bytes: 64KiB
    let limit = 64 * 1024;
    // Exactly at the limit: accepted.
    let head = r#"{"n":"1","pad":""#;
    let body = format!("{head}{}\"}}", "x".repeat(limit - head.len() - 2));
    assert_eq!(body.len(), limit);
    let r = send(
        client()
            .post(proxy.url(&format!("{EV}/web/bodies")))
            .header("content-type", "application/json")
            .header("x-td-write-key", KEY)
            .body(body),
    )
    .await;
    assert_json_ok(&r);

    // Declared over the limit: refused before the body is sent.
    let mut conn = RawConn::connect(proxy.addr());
    conn.send(&request(
        "POST",
        &format!("{EV}/web/bodies"),
        &[
            "Content-Type: application/json",
            &format!("X-TD-Write-Key: {KEY}"),
            &format!("Content-Length: {}", limit + 1),
        ],
        b"",
    ));
    let r = conn.read_response(false);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some(NO_CACHE));
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["error"],
        "payload_too_large"
    );

    // Chunked, with no length given: refused once it passes the limit.
    let mut conn = RawConn::connect(proxy.addr());
    conn.send(&request(
        "POST",
        &format!("{EV}/web/bodies"),
        &[
            "Content-Type: application/json",
            &format!("X-TD-Write-Key: {KEY}"),
            "Transfer-Encoding: chunked",
        ],
        b"",
    ));
    let mut sent = 0;
    conn.send(b"9\r\n{\"n\":\"2\",\r\n");
    sent += 9;
    let chunk = vec![b' '; 8 * 1024];
    while sent <= limit {
        conn.send(format!("{:x}\r\n", chunk.len()).as_bytes());
        conn.send(&chunk);
        conn.send(b"\r\n");
        sent += chunk.len();
    }
    let r = conn.read_response(false);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some(NO_CACHE));

    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["record"]["n"], "1");
}

#[tokio::test]
async fn more_than_max_columns_is_413() {
    let (_origin, proxy) = harness(); // max_columns: 20
    let cols = |n: usize| -> String { (0..n).map(|i| format!("&c{i:02}=v")).collect() };
    let r = get(
        &proxy.url(&format!("{EV}/web/cols?{}{}", key_q(), cols(20))),
        &[],
    )
    .await;
    assert_json_ok(&r);
    let r = get(
        &proxy.url(&format!("{EV}/web/cols?{}{}", key_q(), cols(21))),
        &[],
    )
    .await;
    assert_error(&r, 413, "payload_too_large");
    // A repeated name is one column.
    let r = get(
        &proxy.url(&format!("{EV}/web/cols?{}{}&c00=again", key_q(), cols(20))),
        &[],
    )
    .await;
    assert_json_ok(&r);
    // In a batch, one event over the limit refuses the whole request.
    let wide: serde_json::Map<String, Value> =
        (0..21).map(|i| (format!("c{i:02}"), json!("v"))).collect();
    let body = json!({"events": [{"ok": "1"}, wide]}).to_string();
    let r = send(
        client()
            .post(proxy.url("/td/web/cols"))
            .header("content-type", "application/vnd.treasuredata.v1+json")
            .header("x-td-write-key", KEY)
            .body(body),
    )
    .await;
    assert_error(&r, 413, "payload_too_large");

    let records = proxy.records_until_marker().await;
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0]["record"].as_object().unwrap().len(), 21);
    assert_eq!(records[1]["record"]["c00"], "again");
}

// ---------------------------------------------------------------------------------------------
// A full delivery buffer
// ---------------------------------------------------------------------------------------------

/// `/dev/full` takes the file open but fails every write, so the writer retries its first batch
/// for ever and the queue (2 records) fills up.
fn stuck_sink_settings(origin: &Origin, when_full: &str) -> Settings {
    let mut s = Settings::new(origin.peer());
    s.sink_path = Some("/dev/full".into());
    s.queue_records = 2;
    s.batch_max_records = 1;
    s.when_full = when_full.into();
    s
}

#[tokio::test]
async fn full_queue_with_when_full_reject_is_503_with_retry_after() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full");
        return;
    }
    let origin = Origin::start();
    let proxy = Proxy::start_with(stuck_sink_settings(&origin, "reject"));
    let mut first_503 = None;
    for i in 0..50 {
        let r = get(
            &proxy.url(&format!("{EV}/web/full?{}&i={i}&td_format=pixel", key_q())),
            &[],
        )
        .await;
        match r.status {
            200 => assert_pixel(&r),
            503 => {
                first_503 = Some((i, r));
                break;
            }
            s => panic!("unexpected status {s}: {:?}", r.text()),
        }
    }
    let (i, r) = first_503.expect("no 503 although the sink takes nothing and the queue holds 2");
    assert!(i >= 2, "503 before the queue of 2 was full (request {i})");
    assert_error(&r, 503, "unavailable");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // Still full: the next one is refused too.
    let r = get(
        &proxy.url(&format!("{EV}/web/full?{}&i=again", key_q())),
        &[],
    )
    .await;
    assert_error(&r, 503, "unavailable");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // /readyz says so (SPEC 6).
    let r = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(r.status, 503, "/readyz with a full queue: {:?}", r.text());
    let r = get(&proxy.admin_url("/healthz"), &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn full_queue_with_when_full_drop_answers_as_usual_and_counts_drops() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full");
        return;
    }
    let origin = Origin::start();
    let proxy = Proxy::start_with(stuck_sink_settings(&origin, "drop"));
    for i in 0..20 {
        let r = get(
            &proxy.url(&format!("{EV}/web/full?{}&i={i}&td_format=pixel", key_q())),
            &[],
        )
        .await;
        assert_pixel(&r);
    }
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await.text();
    let dropped: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("postback_records_total{")
                && l.contains(r#"sink="main""#)
                && l.contains(r#"result="dropped""#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dropped counter in /metrics:\n{metrics}"));
    assert!(dropped >= 1.0, "dropped = {dropped}");
}

// ---------------------------------------------------------------------------------------------
// Keep-alive: early answers leave the connection usable
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn early_answers_keep_the_connection_alive() {
    let (origin, proxy) = harness();
    let k = key_q();
    let key_header = format!("X-TD-Write-Key: {KEY}");
    let many_cols: String = (0..21).map(|i| format!("&c{i}=v")).collect();
    let long = "x".repeat(5000);
    // (method, target, headers, body, expected status, HEAD?)
    type Step<'a> = (&'a str, String, Vec<&'a str>, Vec<u8>, u16, bool);
    let steps: Vec<Step> = vec![
        (
            "GET",
            format!("{EV}/web/ka?{k}&s=1&td_format=pixel"),
            vec![],
            vec![],
            200,
            false,
        ),
        (
            "GET",
            format!("{EV}/web-x/ka?{k}"),
            vec![],
            vec![],
            400,
            false,
        ),
        (
            "GET",
            format!("{EV}/web/ka?s=x"),
            vec![],
            vec![],
            403,
            false,
        ),
        (
            "PUT",
            format!("{EV}/web/ka?{k}"),
            vec!["Content-Type: text/plain"],
            b"abc".to_vec(),
            405,
            false,
        ),
        (
            "DELETE",
            format!("{EV}/web/ka?{k}"),
            vec![],
            vec![],
            405,
            false,
        ),
        (
            "GET",
            format!("{EV}/web/ka?{k}{many_cols}"),
            vec![],
            vec![],
            413,
            false,
        ),
        (
            "GET",
            format!("{EV}/web/ka?{k}&pad={long}"),
            vec![],
            vec![],
            414,
            false,
        ),
        (
            "POST",
            format!("{EV}/web/ka"),
            vec!["Content-Type: application/json"],
            br#"{"s":"no key"}"#.to_vec(),
            403,
            false,
        ),
        (
            "POST",
            format!("{EV}/web/ka"),
            vec!["Content-Type: application/json", &key_header],
            b"[1,2,3]".to_vec(),
            400,
            false,
        ),
        (
            "POST",
            format!("{EV}/web/ka?{k}&td_redirect=https%3A%2F%2Fevil.com%2F"),
            vec!["Content-Type: application/x-www-form-urlencoded"],
            b"s=bad-redirect".to_vec(),
            400,
            false,
        ),
        (
            "POST",
            format!("{EV}/web/ka"),
            vec!["Content-Type: application/x-www-form-urlencoded"],
            format!("{k}&s=2").into_bytes(),
            200,
            false,
        ),
        (
            "HEAD",
            format!("{EV}/web/ka?{k}&s=3&td_format=pixel"),
            vec![],
            vec![],
            200,
            true,
        ),
        (
            "OPTIONS",
            format!("{EV}/web/ka"),
            vec![
                "Origin: https://www.example.com",
                "Access-Control-Request-Method: POST",
            ],
            vec![],
            204,
            false,
        ),
        (
            "GET",
            "/plain/page?x=1".to_string(),
            vec![],
            vec![],
            200,
            false,
        ),
        (
            "GET",
            format!("{EV}/web/ka?{k}&s=4"),
            vec![],
            vec![],
            200,
            false,
        ),
    ];
    let mut conn = RawConn::connect(proxy.addr());
    for (i, (method, target, headers, body, status, head)) in steps.iter().enumerate() {
        conn.send(&request(method, target, headers, body));
        let r = conn.read_response(*head);
        assert_eq!(
            r.status,
            *status,
            "step {i}: {method} {target}: {:?}",
            r.text()
        );
        let conn_hdr = r.header("connection").unwrap_or("").to_ascii_lowercase();
        assert!(
            !conn_hdr.contains("close"),
            "step {i}: {method} {target} closes the connection"
        );
        if *status == 200 && !*head && target.contains("td_format=pixel") {
            assert_eq!(r.body, PIXEL_GIF);
        }
    }
    origin.request_to("/plain/page?x=1");
    let records = proxy.records_until_marker().await;
    let s: Vec<&Value> = records.iter().map(|r| &r["record"]["s"]).collect();
    assert_eq!(s, ["1", "2", "3", "4"], "{records:#?}");
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

async fn accepted_then_signal(signal: i32) {
    let (_origin, mut proxy) = origin_and_proxy(|s| {
        // Records wait in the queue for a batch: only the shutdown drain can write them.
        s.batch_max_wait = "60s".into();
        s.batch_max_records = 1000;
    });
    let n = 40;
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = proxy.url(&format!(
            "{EV}/web/shutdown?{}&i={i}&td_format=pixel",
            key_q()
        ));
        tasks.push(tokio::spawn(async move { get(&url, &[]).await }));
    }
    for t in tasks {
        assert_pixel(&t.await.unwrap());
    }
    // With a 60 s batch wait, the records are still queued here: the shutdown drain writes them.
    proxy.signal(signal);
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status after signal {signal}: {status}; stderr:\n{}",
        proxy.stderr()
    );
    let records = proxy.lines();
    let mut got: Vec<i64> = records
        .iter()
        .map(|r| r["record"]["i"].as_str().unwrap().parse().unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        (0..n).collect::<Vec<i64>>(),
        "every accepted record must be in the sink after signal {signal}"
    );
}

#[tokio::test]
async fn sigterm_exits_0_and_delivers_every_accepted_record() {
    accepted_then_signal(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_exits_0_and_delivers_every_accepted_record() {
    accepted_then_signal(libc::SIGINT).await;
}

#[tokio::test]
async fn disk_buffer_keeps_accepted_records_across_kill_9() {
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.buffer = "disk".into();
    // Records wait for a batch: when the process is killed none has reached the sink.
    settings.batch_max_wait = "60s".into();
    settings.batch_max_records = 1000;
    let mut proxy = Proxy::start_with(settings.clone());
    let n = 25;
    for i in 0..n {
        let r = get(
            &proxy.url(&format!("{EV}/web/crash?{}&i={i}&td_format=pixel", key_q())),
            &[],
        )
        .await;
        assert_pixel(&r);
    }
    proxy.signal(libc::SIGKILL);
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let dir = proxy.take_dir();

    // Started again on the same buffer and sink: every accepted record arrives (at least once).
    settings.batch_max_wait = "10ms".into();
    let proxy = Proxy::start_in(Some(dir), settings);
    let records = proxy.records_until_marker().await;
    let mut got: Vec<i64> = records
        .iter()
        .map(|r| r["record"]["i"].as_str().unwrap().parse().unwrap())
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(
        got,
        (0..n).collect::<Vec<i64>>(),
        "accepted records lost by kill -9 with buffer: disk; stderr:\n{}",
        proxy.stderr()
    );
}
