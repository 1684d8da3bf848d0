//! SPEC section 7 through the real binary and a real origin: cookie extension on proxied HTML
//! pages, td-js-sdk's server cookie endpoint (`/get_cookie_id`), the woothee user-agent columns of
//! `enrich: [user_agent]`, and compressed postback bodies.

mod common;

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use common::server::Server;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response};
use serde_json::Value;

/// The page the origin serves.
const PAGE: &str = "<!doctype html><html><head><title>t</title></head><body>hello</body></html>\n";

/// An origin for pages: `/page?status=N&ct=TYPE&cc=CACHE-CONTROL&sc=SET-COOKIE` answers with
/// that status (200), `Content-Type` (`text/html; charset=utf-8`), `Cache-Control` (none) and
/// `Set-Cookie`s (any number), the body [`PAGE`] (none for a 304) and `x-origin: yes`.
fn page_origin() -> Server {
    Server::bind(
        "pages",
        0,
        |req: Request<hyper::body::Incoming>| async move {
            let query = req.uri().query().unwrap_or("").to_owned();
            let mut resp = Response::builder().header("x-origin", "yes");
            let mut status = 200u16;
            let mut content_type = "text/html; charset=utf-8".to_string();
            for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
                match &*name {
                    "status" => status = value.parse().unwrap(),
                    "ct" => content_type = value.into_owned(),
                    "cc" => resp = resp.header("cache-control", &*value),
                    "sc" => resp = resp.header("set-cookie", &*value),
                    _ => {}
                }
            }
            let body = if status == 304 { "" } else { PAGE };
            let resp = resp
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            Ok::<_, Infallible>(resp)
        },
    )
}

/// The value of the counter line `name{labels}` in `metrics`, 0 when absent.
fn counter(metrics: &str, line: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The proxy in front of the page origin with `identity` as its `identity:` lines.
fn proxy_for_pages(origin: &Server, identity: &[&str]) -> Proxy {
    let mut settings = Settings::new(origin.addr.to_string());
    settings.identity = identity.iter().map(|s| s.to_string()).collect();
    Proxy::start_with(settings)
}

#[tokio::test]
async fn page_responses_re_issue_the_visitors_id_cookies_only_where_they_should() {
    let origin = page_origin();
    let proxy = proxy_for_pages(
        &origin,
        &[
            "extend_cookies:",
            "  - { name: _td }",
            "  - { name: _td_global, max_age: 30d, domain: .example.com, http_only: true }",
        ],
    );
    let page = |query: &str, headers: &[(&str, &str)]| {
        let url = proxy.url(&format!("/page?{query}"));
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        async move {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            get(&url, &h).await
        }
    };
    let both = (
        "cookie",
        "sid=1; _td=5f0b1c2d-1111-4222-8333-944445555666; _td_global=g.1",
    );

    // Extended: the same value, two years (or as configured), Path=/, SameSite=Lax, HttpOnly
    // only where configured; the origin's answer otherwise as it was.
    let r = page("n=1", &[both]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), PAGE);
    assert_eq!(r.header("x-origin").as_deref(), Some("yes"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        r.header_all("set-cookie"),
        [
            "_td=5f0b1c2d-1111-4222-8333-944445555666; Max-Age=63072000; Path=/; SameSite=Lax",
            "_td_global=g.1; Max-Age=2592000; Path=/; Domain=example.com; SameSite=Lax; HttpOnly",
        ]
    );
    // Only the cookies the request carried.
    let r = page("n=2", &[("cookie", "_td=abc")]).await;
    assert_eq!(
        r.header_all("set-cookie"),
        ["_td=abc; Max-Age=63072000; Path=/; SameSite=Lax"]
    );
    let r = page("n=3", &[("cookie", "sid=1")]).await;
    assert!(r.header_all("set-cookie").is_empty());

    // The origin sets `_td` itself: its cookie alone comes back for `_td`.
    let r = page("n=4&sc=_td%3Dorigin%3B%20Path%3D%2F", &[both]).await;
    assert_eq!(
        r.header_all("set-cookie"),
        [
            "_td=origin; Path=/",
            "_td_global=g.1; Max-Age=2592000; Path=/; Domain=example.com; SameSite=Lax; HttpOnly",
        ]
    );

    // Never for an opted-out visitor (GPC), nor for a page a shared cache may store, nor for
    // anything but a 2xx HTML page, nor for a value that is no plausible id.
    let none: &[(&str, &[(&str, &str)])] = &[
        ("n=5", &[both, ("sec-gpc", "1")]),
        ("n=6&cc=public", &[both]),
        ("n=7&cc=public%2C%20max-age%3D60", &[both]),
        ("n=8&cc=s-maxage%3D60", &[both]),
        ("n=9&cc=max-age%3D600", &[both]),
        ("n=10&ct=application%2Fjson", &[both]),
        ("n=11&ct=text%2Fplain", &[both]),
        ("n=12&status=304", &[both]),
        ("n=13&status=404", &[both]),
        ("n=14&status=302", &[both]),
        ("n=15", &[("cookie", "_td=a b; _td_global=<script>")]),
        ("n=16", &[("cookie", &format!("_td={}", "a".repeat(129)))]),
    ];
    for (query, headers) in none {
        let r = page(query, headers).await;
        assert!(
            r.header_all("set-cookie").is_empty(),
            "{query}: {:?}",
            r.header_all("set-cookie")
        );
        let expected_status = query
            .split('&')
            .find_map(|p| p.strip_prefix("status="))
            .map_or(200, |s| s.parse().unwrap());
        assert_eq!(r.status, expected_status, "{query}");
        if expected_status == 304 {
            assert!(r.body.is_empty());
        } else {
            assert_eq!(r.text(), PAGE, "{query}: the body changed");
        }
    }
    // A private page may carry it.
    let r = page(
        "n=17&cc=private%2C%20max-age%3D600",
        &[("cookie", "_td=abc")],
    )
    .await;
    assert_eq!(r.header_all("set-cookie").len(), 1);

    let metrics = proxy.metrics().await;
    assert_eq!(
        counter(&metrics, "identity_cookies_extended_total{cookie=\"_td\"}"),
        3
    );
    assert_eq!(
        counter(
            &metrics,
            "identity_cookies_extended_total{cookie=\"_td_global\"}"
        ),
        2
    );
    proxy.assert_no_records_before_marker("pages").await;
}

#[tokio::test]
async fn cached_pages_carry_the_cookie_with_allow_cached() {
    let origin = page_origin();
    let proxy = proxy_for_pages(
        &origin,
        &["allow_cached: true", "extend_cookies: [{ name: _td }]"],
    );
    let r = get(&proxy.url("/page?cc=public"), &[("cookie", "_td=abc")]).await;
    assert_eq!(
        r.header_all("set-cookie"),
        ["_td=abc; Max-Age=63072000; Path=/; SameSite=Lax"]
    );
}

#[tokio::test]
async fn without_identity_nothing_is_added_and_get_cookie_id_goes_upstream() {
    let origin = page_origin();
    let proxy = proxy_for_pages(&origin, &[]);
    let r = get(&proxy.url("/page"), &[("cookie", "_td=abc")]).await;
    assert!(r.header_all("set-cookie").is_empty());
    let r = get(&proxy.url("/get_cookie_id?cookie_domain=x&r=1"), &[]).await;
    assert_eq!(r.header("x-origin").as_deref(), Some("yes"));
}

/// `GET /get_cookie_id` on the proxy with `host` as the `Host` header.
async fn get_cookie_id(proxy: &Proxy, query: &str, host: &str, cookie: Option<&str>) -> Resp {
    let mut headers = vec![("host", host)];
    if let Some(c) = cookie {
        headers.push(("cookie", c));
    }
    get(&proxy.url(&format!("/get_cookie_id?{query}")), &headers).await
}

#[tokio::test]
async fn get_cookie_id_issues_and_keeps_the_server_side_id() {
    let origin = page_origin();
    let proxy = proxy_for_pages(
        &origin,
        &["server_cookie: { enabled: true }", "domains: [example.com]"],
    );
    // A new visitor, asking for the site's parent domain: a new id, for that domain.
    let r = get_cookie_id(
        &proxy,
        "cookie_domain=example.com&r=1764245000123",
        "www.example.com",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(r.header("cache-control").unwrap().contains("no-store"));
    assert_eq!(r.header("x-origin"), None);
    let body = r.json();
    let id = body["td_ssc_id"].as_str().expect("td_ssc_id").to_string();
    assert_eq!(body.as_object().unwrap().len(), 1);
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(
        r.header("set-cookie").unwrap(),
        format!("_td_ssc_id={id}; Max-Age=63072000; Path=/; Domain=example.com; SameSite=Lax")
    );

    // The visitor comes back with it: the same id, its lifetime renewed.
    let cookie = format!("_td_ssc_id={id}");
    let r = get_cookie_id(
        &proxy,
        "cookie_domain=example.com&r=2",
        "www.example.com",
        Some(&cookie),
    )
    .await;
    assert_eq!(r.json()["td_ssc_id"], id.as_str());
    assert_eq!(
        r.header("set-cookie").unwrap(),
        format!("_td_ssc_id={id}; Max-Age=63072000; Path=/; Domain=example.com; SameSite=Lax")
    );

    // Domains not listed, or not the host's: host-only.
    for (query, host) in [
        ("cookie_domain=evil.net&r=3", "www.example.com"),
        ("cookie_domain=example.com&r=4", "www.example.org"),
        ("cookie_domain=example.com&r=5", "notexample.com"),
        ("cookie_domain=shop.example.com&r=6", "shop.example.com"),
        ("r=7", "www.example.com"),
    ] {
        let r = get_cookie_id(&proxy, query, host, None).await;
        let id = r.json()["td_ssc_id"].as_str().unwrap().to_string();
        assert_eq!(
            r.header("set-cookie").unwrap(),
            format!("_td_ssc_id={id}; Max-Age=63072000; Path=/; SameSite=Lax"),
            "{query} from {host}"
        );
    }
    // From a page on another subdomain (sscServer elsewhere): the CORS headers of
    // `postback.cors`, with credentials, so the browser hands the answer to td-js-sdk.
    let r = get(
        &proxy.url("/get_cookie_id?cookie_domain=example.com&r=10"),
        &[
            ("host", "ssc.example.com"),
            ("origin", "https://www.example.com"),
        ],
    )
    .await;
    common::assert_cors_allowed(&r);
    assert!(r
        .header("set-cookie")
        .unwrap()
        .contains("; Domain=example.com;"));
    // A value that is no plausible id is replaced.
    let r = get_cookie_id(&proxy, "r=8", "www.example.com", Some("_td_ssc_id=a%22b")).await;
    assert_ne!(r.json()["td_ssc_id"], "a%22b");

    // An opted-out visitor gets no id.
    let r = get(
        &proxy.url("/get_cookie_id?r=9"),
        &[("sec-gpc", "1"), ("cookie", &cookie)],
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));
    assert!(r.header_all("set-cookie").is_empty());

    let metrics = proxy.metrics().await;
    assert_eq!(
        counter(&metrics, "identity_server_ids_total{result=\"issued\"}"),
        8
    );
    assert_eq!(
        counter(&metrics, "identity_server_ids_total{result=\"kept\"}"),
        1
    );
    assert_eq!(
        counter(&metrics, "identity_server_ids_total{result=\"opted_out\"}"),
        1
    );
    proxy
        .assert_no_records_before_marker("/get_cookie_id")
        .await;
}

const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
const SAFARI_IOS: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
const FIREFOX: &str =
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const CURL: &str = "curl/8.5.0";

/// The columns of `record` that `enrich: [user_agent]` adds.
fn ua_columns(record: &Value) -> Vec<(String, String)> {
    let columns = record["record"].as_object().unwrap();
    [
        "td_browser",
        "td_browser_version",
        "td_os",
        "td_os_version",
        "td_device_category",
    ]
    .iter()
    .filter_map(|c| Some((c.to_string(), columns.get(*c)?.as_str()?.to_string())))
    .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test]
async fn enrich_user_agent_adds_woothees_columns() {
    let (_origin, proxy) = origin_and_proxy(|s| {
        s.routes_extra = vec![
            "- path: /ua/{database}/{table}".into(),
            "  enrich: [user_agent]".into(),
            "  sink: main".into(),
        ];
    });
    let cases: [(&str, &[(&str, &str)]); 5] = [
        (
            CHROME,
            &[
                ("td_browser", "Chrome"),
                ("td_browser_version", "120.0.0.0"),
                ("td_os", "Windows 10"),
                ("td_os_version", "NT 10.0"),
                ("td_device_category", "pc"),
            ],
        ),
        (
            SAFARI_IOS,
            &[
                ("td_browser", "Safari"),
                ("td_browser_version", "17.1"),
                ("td_os", "iPhone"),
                ("td_os_version", "17.1"),
                ("td_device_category", "smartphone"),
            ],
        ),
        (
            FIREFOX,
            &[
                ("td_browser", "Firefox"),
                ("td_browser_version", "121.0"),
                ("td_os", "Linux"),
                ("td_device_category", "pc"),
            ],
        ),
        (
            GOOGLEBOT,
            &[
                ("td_browser", "Googlebot"),
                ("td_device_category", "crawler"),
            ],
        ),
        (
            CURL,
            &[
                ("td_browser", "HTTP Library"),
                ("td_browser_version", "curl"),
                ("td_device_category", "misc"),
            ],
        ),
    ];
    for (i, (agent, _)) in cases.iter().enumerate() {
        let r = get(
            &proxy.url(&format!(
                "/ua/web/agents?td_write_key={KEY}&td_ua=td_ua&n={i}"
            )),
            &[("user-agent", agent)],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Unknown agents add nothing; neither does a record without an agent, nor a route without
    // `enrich`.
    get(
        &proxy.url(&format!(
            "/ua/web/agents?td_write_key={KEY}&td_ua=td_ua&n=unknown"
        )),
        &[("user-agent", "SomethingElse/1.0")],
    )
    .await;
    get(
        &proxy.url(&format!("/ua/web/agents?td_write_key={KEY}&n=no_ua")),
        &[("user-agent", CHROME)],
    )
    .await;
    get(
        &proxy.url(&format!(
            "/postback/v3/event/web/agents?td_write_key={KEY}&td_ua=td_ua&n=plain"
        )),
        &[("user-agent", CHROME)],
    )
    .await;
    // td-js-sdk's own column, `td_user_agent`, with its `;JSSDK/...` suffix.
    let sdk_agent = format!("{SAFARI_IOS};JSSDK/4.4.3");
    let body = serde_json::json!({"events": [{"n": "sdk", "td_user_agent": sdk_agent}]});
    let r = send(
        client()
            .post(proxy.url("/ua/web/agents?modified=1"))
            .header("content-type", "application/vnd.treasuredata.v1+json")
            .header("authorization", format!("TD1 {KEY}"))
            .body(body.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let records = proxy.records_until_marker().await;
    let by_n = |n: &str| {
        records
            .iter()
            .find(|r| r["record"]["n"] == n)
            .unwrap_or_else(|| panic!("no record n={n}: {records:#?}"))
            .clone()
    };
    for (i, (agent, expected)) in cases.iter().enumerate() {
        let record = by_n(&i.to_string());
        assert_eq!(record["record"]["td_ua"], *agent);
        assert_eq!(ua_columns(&record), pairs(expected), "{agent}");
    }
    assert_eq!(by_n("2")["record"]["td_bot"], serde_json::Value::Null);
    assert_eq!(by_n("3")["record"]["td_bot"], "user_agent");
    for n in ["unknown", "no_ua", "plain"] {
        assert!(ua_columns(&by_n(n)).is_empty(), "{n}: {:?}", by_n(n));
    }
    assert_eq!(ua_columns(&by_n("sdk")), pairs(cases[1].1));
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn post(proxy: &Proxy, content_type: &str, encoding: &str, body: Vec<u8>) -> Resp {
    send(
        client()
            .post(proxy.url("/postback/v3/event/web/compressed"))
            .header("content-type", content_type)
            .header("content-encoding", encoding)
            .header("x-td-write-key", KEY)
            .body(body),
    )
    .await
}

#[tokio::test]
async fn gzip_and_deflate_bodies_are_accepted_and_bombs_and_broken_streams_refused() {
    let (_origin, proxy) = harness(); // max_body_bytes: 64KiB
    let r = post(
        &proxy,
        "application/json",
        "gzip",
        gzip(br#"{"n":"gzip","page":"/g"}"#),
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));
    let r = post(
        &proxy,
        "application/x-www-form-urlencoded",
        "deflate",
        zlib(b"n=deflate&page=%2Fd"),
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));
    let sdk = serde_json::json!({"events": [{"n": "sdk1"}, {"n": "sdk2"}]}).to_string();
    let r = post(
        &proxy,
        "application/vnd.treasuredata.v1+json",
        "gzip",
        gzip(sdk.as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let records = proxy.records(4);
    let ns: Vec<&str> = records
        .iter()
        .filter(|r| r["table"] == "compressed")
        .map(|r| r["record"]["n"].as_str().unwrap())
        .collect();
    assert_eq!(ns, ["gzip", "deflate", "sdk1", "sdk2"]);
    assert_eq!(records[0]["record"]["page"], "/g");

    // A bomb: 64 MiB of one JSON string, under 64 KiB compressed (within max_body_bytes as
    // sent), a thousand times the limit once inflated.
    let mut json = b"{\"n\":\"".to_vec();
    json.extend(std::iter::repeat_n(b'a', 64 << 20));
    json.extend(b"\"}");
    let bomb = gzip(&json);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let started = std::time::Instant::now();
    let r = post(&proxy, "application/json", "gzip", bomb).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Just over the limit once inflated is too much as well.
    let over = format!("{{\"n\":\"{}\"}}", "b".repeat(64 << 10));
    assert_eq!(
        post(&proxy, "application/json", "gzip", gzip(over.as_bytes()))
            .await
            .status,
        413
    );

    // Broken streams: truncated, not gzip at all, corrupt.
    let good = gzip(br#"{"n":"broken","page":"/b"}"#);
    let mut corrupt = good.clone();
    let len = corrupt.len();
    corrupt[len - 5] ^= 0xff; // the length/CRC trailer
    for (what, body) in [
        ("truncated", good[..good.len() - 10].to_vec()),
        ("plain text", b"{\"n\":\"plain\"}".to_vec()),
        ("corrupt", corrupt),
    ] {
        let r = post(&proxy, "application/json", "gzip", body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request");
    }
    let r = post(&proxy, "application/json", "br", b"{}".to_vec()).await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.json()["error"], "unsupported_media_type");
    let records = proxy.records_until_marker().await;
    assert_eq!(
        records.len(),
        4,
        "refused bodies left records: {records:#?}"
    );
}

/// `postback-proxy -c FILE --check` on the harness configuration with `identity` as its
/// `identity:` lines and `routes_extra` added to its routes: (success, stdout + stderr).
fn check_identity(identity: &[&str], routes_extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::new("127.0.0.1:3000");
    settings.identity = identity.iter().map(|s| s.to_string()).collect();
    settings.routes_extra = routes_extra.iter().map(|s| s.to_string()).collect();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, settings.yaml(dir.path(), 18080, 19090)).unwrap();
    let (out, stdout, stderr) = common::proxy::check("-c", &path, dir.path());
    (out.status.success(), format!("{stdout}{stderr}"))
}

#[test]
fn check_names_bad_identity_and_enrich_values() {
    let (ok, text) = check_identity(
        &[
            "extend_cookies:",
            "  - { name: _td, domain: example.com, max_age: 365d, http_only: false }",
            "allow_cached: false",
            "server_cookie: { enabled: true, path: /get_cookie_id, cookie: _td_ssc_id, max_age: 730d }",
            "domains: [example.com]",
        ],
        &["- path: /ua/{database}/{table}", "  enrich: [user_agent]"],
    );
    assert!(ok, "{text}");
    assert!(text.contains("configuration OK"), "{text}");

    let (ok, text) = check_identity(
        &[
            "extend_cookies: [{ name: 'a b' }, { name: _td, domain: 'x;y', max_age: 0s }]",
            "server_cookie: { enabled: true, path: get_cookie_id }",
            "domains: ['not a domain']",
        ],
        &[],
    );
    assert!(!ok, "{text}");
    assert_contains_all(
        &text,
        &[
            "identity.domains[0]: must be a host name",
            "identity.extend_cookies[0].name: must be a cookie name",
            "identity.extend_cookies[1].domain: must be a host name",
            "identity.extend_cookies[1].max_age: must be at least 1s",
            "identity.server_cookie.path: must be a path",
        ],
        "--check",
    );

    // Unknown keys and unknown enrichers are parse errors that name the key and its line.
    for (identity, routes, needle) in [
        (&["allow_cache: true"][..], &[][..], "allow_cache"),
        (&["server_cookie: { enable: true }"], &[], "enable"),
        (
            &["extend_cookies: [{ name: _td, httponly: true }]"],
            &[],
            "httponly",
        ),
        (
            &[],
            &["- path: /ua/{database}/{table}", "  enrich: [useragent]"],
            "useragent",
        ),
    ] {
        let (ok, text) = check_identity(identity, routes);
        assert!(!ok, "{needle}: {text}");
        assert!(text.contains(needle), "{needle}: {text}");
        assert!(text.contains("line"), "{needle}: no line in {text}");
    }
}
