//! A real browser, as the people whose pages carry the pixel see it: headless Chromium (Debian's
//! `chromium`, driven by Playwright's `playwright-core` from `tests/browser/drive.mjs`) opens a
//! page that the test's own origin serves through the proxy, over TLS, so that the page, its
//! pixel, its beacon and Treasure Data's browser SDK (`td-js-sdk` from npm, self-hosted by the
//! origin, `host` = the proxy, `pathname: '/td/'`) are all one origin, as on a real site.
//!
//! The test then checks the records in the file sink: the browser's real User-Agent in `td_ua`,
//! the global-id cookie set once on the first load and sent back on the second, and the columns
//! the SDK sends (`td_url`, `td_title`, `td_client_id`, ...). A second test (`identity.mjs`,
//! `identity.html`) runs td-js-sdk with `useServerSideCookie: true` against the proxy's
//! `/get_cookie_id` and checks that a reload gets `_td` back as a server-set cookie.
//!
//! Needs, besides the Rust toolchain: `node` (18 or newer), Debian's `chromium`
//! (`apt-get install -y chromium`; `CHROMIUM=/path` to use another binary), the npm packages
//! (`npm ci --prefix tests/browser`) and `openssl` (a throw-away certificate for the proxy's
//! TLS listener). A missing one fails the test with a message saying how to install it.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::browser::{browser_dir, chromium_or_fail, spawn_node};
use common::proxy::{server_yaml, web_key_yaml, TestPki, TlsFiles};
use common::server::Server;
use common::{Proxy, Recorded};
use http_body_util::Full;
use hyper::{Request, Response};
use serde_json::Value;

/// The write key the page carries; allowed for the database `web` only.
const KEY: &str = "7/browser-test-write-key";
/// How long the browser run may take in all (launch, two page loads, shutdown).
const DRIVER_LIMIT: Duration = Duration::from_secs(120);

/// The site behind the proxy: a real HTTP/1.1 server serving the test page at `/landing.html`
/// and `/shop/item.html`, the identity page at `/identity.html`, the SDK at
/// `/vendor/td-js-sdk/td.min.js`, and 404 for anything else.
struct Site {
    served: Arc<Mutex<Vec<Recorded>>>,
    server: Server,
}

impl Site {
    fn start() -> Site {
        let dir = browser_dir();
        let page = std::fs::read_to_string(dir.join("page.html")).expect("read page.html");
        let identity =
            std::fs::read_to_string(dir.join("identity.html")).expect("read identity.html");
        let identity = Arc::new(identity.replace("{{write_key}}", KEY));
        let sdk = std::fs::read(dir.join("node_modules/td-js-sdk/dist/td.min.js"))
            .expect("read td.min.js");
        let (page, sdk) = (Arc::new(page), Bytes::from(sdk));
        let served = Arc::new(Mutex::new(Vec::new()));
        let log = served.clone();
        let server = Server::bind("site", 0, move |req| {
            let answer = Site::answer(&page, &identity, &sdk, &log, req);
            async move { Ok::<_, Infallible>(answer) }
        });
        Site { served, server }
    }

    fn answer(
        page: &str,
        identity: &str,
        sdk: &Bytes,
        log: &Mutex<Vec<Recorded>>,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Full<Bytes>> {
        log.lock().unwrap().push(Recorded::head(&req));
        let (status, content_type, body) = match req.uri().path() {
            path @ ("/landing.html" | "/shop/item.html") => (
                200,
                "text/html; charset=utf-8",
                Bytes::from(page.replace("{{write_key}}", KEY).replace("{{page}}", path)),
            ),
            "/identity.html" => (
                200,
                "text/html; charset=utf-8",
                Bytes::from(identity.to_owned()),
            ),
            "/vendor/td-js-sdk/td.min.js" => (200, "application/javascript", sdk.clone()),
            _ => (404, "text/plain", Bytes::from_static(b"not found\n")),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("cache-control", "no-store")
            .body(Full::new(body))
            .unwrap()
    }

    fn served(&self) -> Vec<Recorded> {
        self.served.lock().unwrap().clone()
    }
}

/// The proxy in front of `site`, with a TLS listener using `tls`, the two routes the page uses,
/// a write key for `web`, a file sink and a memory buffer. No CORS origins: the page, the pixel,
/// the beacon and the SDK are all the same origin.
fn start_proxy(site: &Site, tls: &TlsFiles) -> Proxy {
    start_proxy_with(site, tls, "")
}

/// [`start_proxy`] with `extra` (whole YAML sections) at the end of the configuration.
fn start_proxy_with(site: &Site, tls: &TlsFiles, extra: &str) -> Proxy {
    let extra = extra.to_owned();
    let origin = site.server.addr;
    let (cert, key) = (
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
    );
    Proxy::start_yaml(
        move |dir, port, _admin| {
            let (server, auth) = (server_yaml(dir), web_key_yaml(KEY));
            let dir = dir.display();
            format!(
                r#"{server}
listen:
  - address: 127.0.0.1:{port}
    tls: {{ cert: {cert:?}, key: {key:?} }}

upstream:
  peers: ["{origin}"]
  connect_timeout: 2s
  read_timeout: 20s

routes:
  - path: /postback/v3/event/{{database}}/{{table}}
    sink: main
  - path: /td/{{database}}/{{table}}
    sink: main

{auth}
postback:
  cors:
    allowed_origins: []

sinks:
  main: {{ type: file, path: "{dir}/events.jsonl" }}

delivery:
  buffer: memory
  batch: {{ max_wait: 10ms }}
{extra}
"#
            )
        },
        false,
        |dir| dir.join("events.jsonl"),
    )
}

/// Runs `node drive.mjs <url>` (in its own process group, killed whole on a timeout) and returns
/// what it printed on stdout, parsed.
fn drive(chromium: &Path, url: &str) -> Value {
    drive_script(chromium, "drive.mjs", url)
}

/// Runs `node SCRIPT <url>` as [`drive`] does.
fn drive_script(chromium: &Path, script: &str, url: &str) -> Value {
    let mut child = spawn_node(chromium, script, &[url], Stdio::null());
    let pump = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = pump(Box::new(child.stdout.take().unwrap()));
    let stderr = pump(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + DRIVER_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            // The driver and the browser it started: our own process group.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    match status {
        None => panic!("the browser run took over {DRIVER_LIMIT:?}; stderr:\n{stderr}"),
        Some(s) if !s.success() => panic!("drive.mjs failed ({s}); stderr:\n{stderr}"),
        Some(_) => {}
    }
    if !stderr.trim().is_empty() {
        eprintln!("drive.mjs stderr:\n{stderr}");
    }
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("drive.mjs printed no JSON ({e}); stdout:\n{stdout}\nstderr:\n{stderr}")
    })
}

/// One request of the browser's network log (see drive.mjs).
struct Sent<'a>(&'a Value);

impl Sent<'_> {
    fn path(&self) -> String {
        let url = self.url();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let path = rest.find('/').map_or("/", |i| &rest[i..]);
        path.split('?').next().unwrap().to_owned()
    }
    fn url(&self) -> &str {
        self.0["url"].as_str().unwrap()
    }
    fn load(&self) -> u64 {
        self.0["load"].as_u64().unwrap()
    }
    fn request_header(&self, name: &str) -> Option<&str> {
        self.0["requestHeaders"][name].as_str()
    }
    /// Every value of response header `name` (Set-Cookie can repeat).
    fn response_headers(&self, name: &str) -> Vec<&str> {
        self.0["responseHeaders"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|h| h["name"].as_str().unwrap().eq_ignore_ascii_case(name))
                    .map(|h| h["value"].as_str().unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn cookie(&self, name: &str) -> Option<String> {
        self.request_header("cookie")?.split(';').find_map(|c| {
            let (n, v) = c.trim().split_once('=')?;
            (n == name).then(|| v.to_owned())
        })
    }
}

/// The cookie `name` the browser held after a page load.
fn cookie<'a>(load: &'a Value, name: &str) -> &'a Value {
    load["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cookie {name} after {}: {load:#}", load["url"]))
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[test]
fn chromium_pixel_beacon_and_td_js_sdk_through_the_proxy() {
    let chromium = chromium_or_fail();
    let certs = tempfile::tempdir().unwrap();
    // The browser is told to accept any certificate: the CA is not the point here.
    let pki = TestPki::create(certs.path());
    let site = Site::start();
    let proxy = start_proxy(&site, &pki.server);
    let host = format!("127.0.0.1:{}", proxy.port);
    let first_url = format!("https://{host}/landing.html?load=1");
    let second_url = format!("https://{host}/shop/item.html?load=2");

    let started = common::now();
    let run = drive(&chromium, &first_url);
    let context = || format!("browser run: {run:#}\nproxy stderr:\n{}", proxy.stderr());
    let ua = run["userAgent"].as_str().unwrap().to_owned();
    assert!(ua.starts_with("Mozilla/5.0 "), "userAgent {ua:?}");
    let headless = ua.to_ascii_lowercase().contains("headlesschrome");

    // What the page itself saw: every send answered with success.
    let loads = run["loads"].as_array().unwrap();
    assert_eq!(loads.len(), 2);
    for (load, url) in loads.iter().zip([&first_url, &second_url]) {
        assert_eq!(load["url"], url.as_str());
        let state = &load["state"];
        assert_eq!(state["pixel"], "loaded", "{}", context());
        assert_eq!(state["beacon"], "queued", "{}", context());
        assert_eq!(state["pageviews"], "ok", "{}", context());
        assert_eq!(state["events"], "ok", "{}", context());
        assert_eq!(state["errors"], serde_json::json!([]), "{}", context());
    }

    // The global-id cookie: one value, held across both loads, as the proxy sets it.
    let gid_cookie = cookie(&loads[0], "_td_global");
    let gid = gid_cookie["value"].as_str().unwrap().to_owned();
    assert!(is_uuid(&gid), "global id {gid:?}");
    assert_eq!(gid_cookie["httpOnly"], true);
    assert_eq!(gid_cookie["secure"], true, "set over TLS: Secure");
    assert_eq!(gid_cookie["sameSite"], "Lax");
    assert_eq!(gid_cookie["path"], "/");
    assert_eq!(cookie(&loads[1], "_td_global")["value"], gid.as_str());
    // The SDK's own client id cookie (signed mode), also kept across loads.
    let client_id = cookie(&loads[0], "_td")["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(is_uuid(&client_id), "td_client_id {client_id:?}");
    assert_eq!(cookie(&loads[1], "_td")["value"], client_id.as_str());

    // The network log: every request to a postback route answered by the proxy with 200; only
    // the very first (the pixel of the first load, sent without the cookie) got a Set-Cookie;
    // everything after it carried the cookie.
    let requests: Vec<Sent> = run["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(Sent)
        .collect();
    let postbacks: Vec<&Sent> = requests
        .iter()
        .filter(|r| r.path().starts_with("/postback/") || r.path().starts_with("/td/"))
        .collect();
    let kinds: Vec<(u64, String)> = postbacks.iter().map(|r| (r.load(), r.path())).collect();
    let mut expected = Vec::new();
    for load in [1, 2] {
        for path in [
            "/postback/v3/event/web/pixels",
            "/postback/v3/event/web/beacons",
            "/td/web/pageviews",
            "/td/web/events",
        ] {
            expected.push((load, path.to_owned()));
        }
    }
    let mut sorted = kinds.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "the postback requests; {}", context());
    assert_eq!(
        kinds[0],
        (1, "/postback/v3/event/web/pixels".to_owned()),
        "the pixel goes first"
    );
    for (i, r) in postbacks.iter().enumerate() {
        let what = format!("{} {}", r.0["method"], r.url());
        assert_eq!(r.0["status"], 200, "{what}: {}", context());
        assert_eq!(
            r.request_header("user-agent"),
            Some(ua.as_str()),
            "{what}: the User-Agent header is navigator.userAgent"
        );
        let set_cookies: Vec<&str> = r
            .response_headers("set-cookie")
            .into_iter()
            .filter(|c| c.starts_with("_td_global="))
            .collect();
        if i == 0 {
            assert_eq!(r.cookie("_td_global"), None, "{what}: a new visitor");
            assert_eq!(set_cookies.len(), 1, "{what}: {set_cookies:?}");
            let set = set_cookies[0];
            assert!(set.starts_with(&format!("_td_global={gid}; ")), "{set}");
            for attribute in ["Path=/", "HttpOnly", "Secure", "SameSite=Lax", "Max-Age="] {
                assert!(set.contains(attribute), "{set} lacks {attribute}");
            }
        } else {
            assert_eq!(set_cookies, Vec::<&str>::new(), "{what}: set only once");
            assert_eq!(
                r.cookie("_td_global").as_deref(),
                Some(gid.as_str()),
                "{what}"
            );
        }
    }
    // The beacon: a form POST (URLSearchParams), the key in the body.
    for r in postbacks.iter().filter(|r| r.path().ends_with("/beacons")) {
        assert_eq!(r.0["method"], "POST");
        assert_eq!(
            r.request_header("content-type"),
            Some("application/x-www-form-urlencoded;charset=UTF-8")
        );
        assert!(r.0["postData"]
            .as_str()
            .unwrap()
            .contains("td_write_key=7%2Fbrowser-test-write-key"));
        assert_eq!(r.response_headers("content-type"), ["application/json"]);
    }
    // td-js-sdk: POST to https://{host}/td/{database}/{table}?modified=<ms>, authenticated with
    // `Authorization: TD1 KEY`, one event per request as {"events":[{...}]}. In signed mode with
    // td_global_id requested it uses the `.js+json` media type.
    let sdk_requests: Vec<&&Sent> = postbacks
        .iter()
        .filter(|r| r.path().starts_with("/td/"))
        .collect();
    for r in &sdk_requests {
        let what = r.url().to_owned();
        assert_eq!(r.0["method"], "POST", "{what}");
        let (base, query) = what.split_once('?').unwrap();
        assert_eq!(base, format!("https://{host}{}", r.path()));
        let modified = query
            .strip_prefix("modified=")
            .unwrap_or_else(|| panic!("{what}"));
        assert!(modified.bytes().all(|b| b.is_ascii_digit()), "{what}");
        assert_eq!(
            r.request_header("authorization"),
            Some(format!("TD1 {KEY}").as_str()),
            "{what}"
        );
        assert_eq!(
            r.request_header("content-type"),
            Some("application/vnd.treasuredata.v1.js+json"),
            "{what}"
        );
        let body: Value = serde_json::from_str(r.0["postData"].as_str().unwrap()).unwrap();
        let events = body["events"].as_array().expect("{\"events\": [...]}");
        assert_eq!(events.len(), 1, "{what}: {body}");
        assert_eq!(events[0]["td_global_id"], "td_global_id");
        assert_eq!(events[0]["td_client_id"], client_id.as_str());
    }

    // The origin served the pages and the SDK, and never saw a postback.
    let served = site.served();
    let uris: Vec<&str> = served.iter().map(|s| s.uri.as_str()).collect();
    for uri in [
        "/landing.html?load=1",
        "/shop/item.html?load=2",
        "/vendor/td-js-sdk/td.min.js",
    ] {
        assert!(
            uris.contains(&uri),
            "the origin never served {uri}: {uris:?}"
        );
    }
    assert!(
        !uris
            .iter()
            .any(|u| u.starts_with("/postback/") || u.starts_with("/td/")),
        "a postback reached the origin: {uris:?}"
    );
    let page_request = served
        .iter()
        .find(|s| s.uri == "/landing.html?load=1")
        .unwrap();
    assert_eq!(page_request.method, "GET");
    assert_eq!(page_request.header("user-agent"), Some(ua.as_str()));
    assert_eq!(page_request.header("x-forwarded-proto"), Some("https"));

    // The records: eight, two per table (one per page load), all in the database `web`.
    let records = proxy.records(8);
    assert_eq!(records.len(), 8, "{records:#?}");
    let mut by_table: BTreeMap<String, Vec<BTreeMap<String, Value>>> = BTreeMap::new();
    for r in &records {
        assert_eq!(r["database"], "web", "{r}");
        let fields: BTreeMap<String, Value> = r["record"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        by_table
            .entry(r["table"].as_str().unwrap().to_owned())
            .or_default()
            .push(fields);
    }
    assert_eq!(
        by_table.keys().collect::<Vec<_>>(),
        ["beacons", "events", "pageviews", "pixels"],
        "{records:#?}"
    );
    let finished = common::now();
    for (table, rows) in &by_table {
        assert_eq!(rows.len(), 2, "{table}: {rows:#?}");
        for row in rows {
            let what = format!("{table} record {row:#?}");
            let time = row["time"].as_i64().expect("time is an integer");
            assert!(
                (started..=finished).contains(&time),
                "{what}: the receive time"
            );
            // Filled in by the proxy from the request: the browser's own User-Agent header,
            // the TCP peer, the cookie.
            assert_eq!(row["td_ua"], ua.as_str(), "{what}");
            assert_eq!(row["td_ip"], "127.0.0.1", "{what}");
            assert_eq!(row["td_global_id"], gid.as_str(), "{what}");
            // A headless browser is a robot to the default privacy rules: kept, and flagged.
            if headless {
                assert_eq!(row["td_bot"], "user_agent", "{what}");
            } else {
                assert!(!row.contains_key("td_bot"), "{what}");
            }
            for never in ["td_write_key", "td_format", "authorization"] {
                assert!(!row.contains_key(never), "{what}");
            }
            for (name, value) in row {
                if name != "time" {
                    assert!(value.is_string(), "{what}: {name} is not a string");
                }
            }
        }
    }
    let page_of = |row: &BTreeMap<String, Value>| row["page"].as_str().unwrap().to_owned();
    let pages = ["/landing.html", "/shop/item.html"];
    // The <img> pixel: its query's columns.
    let pixels = &by_table["pixels"];
    assert_eq!(pixels.iter().map(page_of).collect::<Vec<_>>(), pages);
    for row in pixels {
        let columns: Vec<&str> = row.keys().map(String::as_str).collect();
        let mut expected = vec!["page", "td_global_id", "td_ip", "td_ua", "time"];
        if headless {
            expected.push("td_bot");
            expected.sort();
        }
        assert_eq!(columns, expected, "{row:#?}");
    }
    // The beacon: its form body's columns.
    let beacons = &by_table["beacons"];
    assert_eq!(beacons.iter().map(page_of).collect::<Vec<_>>(), pages);
    for row in beacons {
        assert_eq!(row["kind"], "beacon");
    }
    // td-js-sdk: trackPageview and trackEvent, with the SDK's own columns.
    let sdk_version = "4.4.3";
    for table in ["pageviews", "events"] {
        let rows = &by_table[table];
        for (i, row) in rows.iter().enumerate() {
            let what = format!("{table} record {row:#?}");
            let (url, path) = [
                (&first_url, "/landing.html"),
                (&second_url, "/shop/item.html"),
            ][i];
            assert_eq!(row["td_url"], url.as_str(), "{what}");
            assert_eq!(row["td_host"], host.as_str(), "{what}");
            assert_eq!(row["td_path"], path, "{what}");
            assert_eq!(
                row["td_title"],
                format!("Browser test {path}").as_str(),
                "{what}"
            );
            assert_eq!(
                row["td_referrer"],
                if i == 0 { "" } else { first_url.as_str() },
                "{what}"
            );
            assert_eq!(row["td_client_id"], client_id.as_str(), "{what}");
            assert_eq!(row["td_version"], sdk_version, "{what}");
            assert_eq!(
                row["td_user_agent"],
                format!("{ua};JSSDK/{sdk_version}").as_str(),
                "{what}"
            );
            assert_eq!(row["td_charset"], "utf-8", "{what}");
            assert_eq!(
                row["td_description"], "postback-proxy browser test page",
                "{what}"
            );
            for name in [
                "td_language",
                "td_color",
                "td_screen",
                "td_viewport",
                "td_platform",
            ] {
                assert!(
                    row.get(name)
                        .and_then(Value::as_str)
                        .is_some_and(|v| !v.is_empty()),
                    "{what}: {name}"
                );
            }
        }
    }
    for row in &by_table["events"] {
        assert_eq!(row["action"], "add_to_cart", "{row:#?}");
        assert_eq!(row["value"], "42", "numbers become their JSON text");
        assert_eq!(row["label"], "caf\u{e9} \"quoted\"", "{row:#?}");
    }
}

/// The `Max-Age` attribute of a `Set-Cookie` value.
fn max_age(set_cookie: &str) -> Option<u64> {
    set_cookie
        .split("; ")
        .find_map(|a| a.strip_prefix("Max-Age="))
        .and_then(|v| v.parse().ok())
}

/// SPEC section 7 in a real browser: td-js-sdk with `useServerSideCookie: true` and `sscServer`
/// set to the proxy's host gets its `_td_ssc_id` from the proxy's `/get_cookie_id`, a reload keeps
/// it, and the page load that carries the SDK's `_td` comes back with a server-set `_td` of the
/// same value and a two-year lifetime.
#[test]
fn chromium_td_js_sdk_server_cookie_and_cookie_extension() {
    let chromium = chromium_or_fail();
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let site = Site::start();
    let proxy = start_proxy_with(
        &site,
        &pki.server,
        "identity:\n  extend_cookies: [{ name: _td }]\n  server_cookie: { enabled: true }\n",
    );
    let url = format!("https://127.0.0.1:{}/identity.html", proxy.port);
    let run = drive_script(&chromium, "identity.mjs", &url);
    let context = || format!("browser run: {run:#}\nproxy stderr:\n{}", proxy.stderr());
    let loads = run["loads"].as_array().unwrap();
    let requests = run["sscRequests"].as_array().unwrap();
    let of_load = |n: u64| -> Vec<&Value> { requests.iter().filter(|r| r["load"] == n).collect() };

    // The first load: no cookie yet, so the SDK asks the proxy, which issues an id; the forced
    // fetch sends it back and gets the same id.
    let first = &loads[0];
    let id = first["state"]["ssc"].as_str().unwrap().to_owned();
    assert!(is_uuid(&id), "fetchServerCookie gave {id:?}; {}", context());
    assert_eq!(first["state"]["forced"], id.as_str(), "{}", context());
    assert_eq!(
        first["state"]["errors"],
        serde_json::json!([]),
        "{}",
        context()
    );
    assert_eq!(
        first["setCookies"],
        serde_json::json!([]),
        "no _td yet: nothing to extend"
    );
    let asked = of_load(1);
    assert_eq!(asked.len(), 2, "{}", context());
    for r in &asked {
        assert_eq!(r["status"], 200, "{}", context());
        assert_eq!(r["body"], format!("{{\"td_ssc_id\":\"{id}\"}}").as_str());
        let url = r["url"].as_str().unwrap();
        assert!(
            url.contains("/get_cookie_id?cookie_domain=127.0.0.1&r="),
            "{url}"
        );
        assert_eq!(
            r["setCookies"],
            serde_json::json!([format!(
                "_td_ssc_id={id}; Max-Age=63072000; Path=/; SameSite=Lax; Secure"
            )])
        );
    }
    let sent = |r: &Value| r["cookie"].as_str().unwrap_or("").to_owned();
    assert!(!sent(asked[0]).contains("_td_ssc_id="), "{}", context());
    assert!(
        sent(asked[1]).contains(&format!("_td_ssc_id={id}")),
        "{}",
        context()
    );
    let ssc = cookie(first, "_td_ssc_id");
    assert_eq!(ssc["value"], id.as_str());
    assert_eq!(ssc["httpOnly"], false, "td-js-sdk must read it");
    assert_eq!(ssc["secure"], true);
    let lifetime = ssc["expires"].as_f64().unwrap() - first["now"].as_f64().unwrap();
    // Chromium keeps no cookie longer than 400 days (RFC 6265bis caps Max-Age there).
    assert!((400.0 * 86400.0 - lifetime).abs() < 3600.0, "{lifetime}");
    let client_id = cookie(first, "_td")["value"].as_str().unwrap().to_owned();
    assert!(is_uuid(&client_id), "_td {client_id:?}");

    // The reload: the SDK keeps its id (from the cookie); the forced fetch gets it back from the
    // proxy; and the page response re-issues `_td` from the server, same value, two years.
    let second = &loads[1];
    assert_eq!(second["state"]["ssc"], id.as_str(), "{}", context());
    assert_eq!(second["state"]["forced"], id.as_str(), "{}", context());
    let asked = of_load(2);
    assert_eq!(
        asked.len(),
        1,
        "the cached id needs no request: {}",
        context()
    );
    assert!(sent(asked[0]).contains(&format!("_td_ssc_id={id}")));
    assert_eq!(
        second["setCookies"],
        serde_json::json!([format!(
            "_td={client_id}; Max-Age=63072000; Path=/; SameSite=Lax; Secure"
        )]),
        "{}",
        context()
    );
    assert_eq!(
        max_age(second["setCookies"][0].as_str().unwrap()),
        Some(63_072_000)
    );
    let tds: Vec<&Value> = second["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "_td")
        .collect();
    assert_eq!(tds.len(), 1, "one _td cookie, not two: {tds:#?}");
    assert_eq!(tds[0]["value"], client_id.as_str());
    assert_eq!(cookie(second, "_td_ssc_id")["value"], id.as_str());
    // The origin served the page twice and never saw /get_cookie_id.
    let served = site.served();
    assert_eq!(
        served.iter().filter(|s| s.uri == "/identity.html").count(),
        2
    );
    assert!(!served.iter().any(|s| s.uri.starts_with("/get_cookie_id")));
}
