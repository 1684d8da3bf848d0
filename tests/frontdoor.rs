//! The front door and the back door: TLS listeners (HTTP/1.1 and HTTP/2 by ALPN, `Secure`
//! cookies, `X-Forwarded-Proto: https`, WebSocket, a certificate that cannot be loaded), TLS to
//! the origin (a private CA trusted through `SSL_CERT_FILE`, `verify_cert`, `sni`), HTTP health
//! checks, 504 on a slow origin, the zero-downtime upgrade (`--upgrade` + SIGQUIT) under load
//! with both buffers, a request in flight across it, a certificate rotated by it, and the
//! example configurations `conf/tls.yaml` and `conf/upstreams.yaml`.
//!
//! Certificates are made per test with the `openssl` command; nothing secret is committed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{binary, check, openssl, TestPki};
use common::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// An HTTPS client that trusts only the test CA; `http1`: HTTP/1.1 only (else ALPN offers h2).
fn https_client(ca: &Path, http1: bool) -> reqwest::Client {
    let _ = client(); // installs the rustls provider once
    let pem = std::fs::read(ca).expect("read the CA certificate");
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()]);
    if http1 {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

/// A response with its HTTP version.
async fn fetch(req: reqwest::RequestBuilder) -> (reqwest::Version, Resp) {
    let resp = req.send().await.expect("request to the proxy failed");
    (resp.version(), Resp::from(resp).await)
}

/// The value and the attribute names (lower-cased) of a `Set-Cookie` header.
fn cookie_parts(set_cookie: &str) -> (String, Vec<String>) {
    let mut parts = set_cookie.split(';').map(str::trim);
    let first = parts.next().unwrap_or_default();
    let value = first
        .strip_prefix("_td_global=")
        .unwrap_or_else(|| panic!("not the global-id cookie: {set_cookie}"))
        .to_string();
    let attrs = parts
        .map(|a| a.split('=').next().unwrap().to_ascii_lowercase())
        .collect();
    (value, attrs)
}

fn pixel_path(table: &str, via: &str) -> String {
    format!(
        "/postback/v3/event/web/{table}?td_write_key={KEY}&td_format=pixel&via={via}\
         &td_global_id=td_global_id"
    )
}

/// Runs `postback-proxy -c FILE --check` in `cwd`.
fn run_check(file: &Path, cwd: &Path) -> (Output, String, String) {
    check("-c", file, cwd)
}

/// Makes the self-signed pair `conf/tls.yaml` expects, in `conf/tls/` under `dir`, as the
/// comment in that file says.
fn conf_tls_pair(dir: &Path) {
    std::fs::create_dir_all(dir.join("conf/tls")).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            "conf/tls/key.pem",
            "-out",
            "conf/tls/cert.pem",
        ],
    );
}

/// Creates the directory `path` and returns it.
fn mkdir(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf")
        .join(name)
}

/// The environment that makes the proxy trust only `ca` for its TLS connections to the origin:
/// Pingora's rustls connector loads its roots from `SSL_CERT_FILE` / `SSL_CERT_DIR`.
fn trust_only(ca: &Path, empty_dir: &Path) -> Vec<(String, String)> {
    std::fs::create_dir_all(empty_dir).unwrap();
    vec![
        ("SSL_CERT_FILE".into(), ca.display().to_string()),
        ("SSL_CERT_DIR".into(), empty_dir.display().to_string()),
    ]
}

// ---------------------------------------------------------------------------------------------
// The TLS listener

#[tokio::test]
async fn tls_listener_answers_pixels_over_http2_and_http1_with_a_secure_cookie() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let (_origin, proxy) = origin_and_proxy(|s| {
        s.tls_listener = Some(pki.server.clone());
    });

    let mut ids = Vec::new();
    for (via, http1, version) in [
        ("h2", false, reqwest::Version::HTTP_2),
        ("h1", true, reqwest::Version::HTTP_11),
    ] {
        let c = https_client(&pki.ca, http1);
        let (v, r) = fetch(c.get(proxy.https_url(&pixel_path("tls_pixel", via)))).await;
        assert_eq!(v, version, "{via}: the HTTP version negotiated by ALPN");
        assert_eq!(r.status, 200, "{via}: {:?}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some("image/gif"));
        assert_eq!(r.body, PIXEL_GIF, "{via}");
        assert_eq!(r.header("cache-control").as_deref(), Some(NO_CACHE));
        let set = r
            .header("set-cookie")
            .unwrap_or_else(|| panic!("{via}: no Set-Cookie for a new visitor"));
        let (id, attrs) = cookie_parts(&set);
        assert!(
            attrs.iter().any(|a| a == "secure"),
            "{via}: the cookie set over TLS lacks Secure: {set}"
        );
        assert!(attrs.iter().any(|a| a == "httponly"), "{via}: {set}");
        ids.push((via, id));
    }

    // The plain listener of the same proxy: no Secure.
    let (v, r) = fetch(client().get(proxy.url(&pixel_path("tls_pixel", "plain")))).await;
    assert_eq!(v, reqwest::Version::HTTP_11);
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(r.body, PIXEL_GIF);
    let set = r
        .header("set-cookie")
        .expect("no Set-Cookie over plain HTTP");
    let (id, attrs) = cookie_parts(&set);
    assert!(
        !attrs.iter().any(|a| a == "secure"),
        "the cookie set over plain HTTP has Secure (secure: auto): {set}"
    );
    ids.push(("plain", id));

    // A returning visitor over TLS gets no new cookie.
    let c = https_client(&pki.ca, false);
    let (_, r) = fetch(
        c.get(proxy.https_url(&pixel_path("tls_pixel", "h2-returning")))
            .header("cookie", format!("_td_global={}", ids[0].1)),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").is_none(), "{:?}", r.headers);

    let records = proxy.records_until_marker().await;
    let got: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            assert_eq!(r["database"], "web");
            assert_eq!(r["table"], "tls_pixel");
            (
                r["record"]["via"].as_str().unwrap().to_string(),
                r["record"]["td_global_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want: Vec<(String, String)> = ids
        .iter()
        .map(|(via, id)| (via.to_string(), id.clone()))
        .collect();
    want.push(("h2-returning".into(), ids[0].1.clone()));
    assert_eq!(got, want, "{records:#?}");
}

#[tokio::test]
async fn tls_listener_passes_requests_through_with_forwarded_proto_https() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let (origin, proxy) = origin_and_proxy(|s| {
        s.tls_listener = Some(pki.server.clone());
    });
    let host = format!("127.0.0.1:{}", proxy.tls_port);
    let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();

    for (via, http1, version) in [
        ("h2", false, reqwest::Version::HTTP_2),
        ("h1", true, reqwest::Version::HTTP_11),
    ] {
        let c = https_client(&pki.ca, http1);
        let target = format!("/app/tls/{via}?q=1&x=%2F");
        let (v, r) = fetch(
            c.post(proxy.https_url(&target))
                .header("content-type", "application/octet-stream")
                .header("x-custom", "Some  Value")
                .body(body.clone()),
        )
        .await;
        assert_eq!(v, version, "{via}");
        assert_eq!(r.status, 200, "{via}: {:?}", r.text());
        assert_eq!(r.header("x-origin").as_deref(), Some("yes"), "{via}");
        assert_eq!(r.json()["uri"], target.as_str(), "{via}");

        let seen = origin.request_to(&target);
        assert_eq!(seen.method, "POST", "{via}");
        assert_eq!(seen.header_all("x-forwarded-proto"), ["https"], "{via}");
        assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"], "{via}");
        assert_eq!(
            seen.header_all("x-forwarded-host"),
            [host.as_str()],
            "{via}"
        );
        assert_eq!(
            seen.header("host"),
            Some(host.as_str()),
            "{via}: the origin must get a Host header (from :authority over HTTP/2)"
        );
        assert_eq!(seen.header("x-custom"), Some("Some  Value"), "{via}");
        assert!(seen.body == body, "{via}: the body changed on the way");

        // An origin error status comes back as it is.
        let (_, r) = fetch(c.get(proxy.https_url("/status/404"))).await;
        assert_eq!(r.status, 404, "{via}");
        assert_eq!(r.text(), "status 404 from origin\n");
    }

    // The plain listener still says http.
    let r = get(&proxy.url("/app/plain"), &[]).await;
    assert_eq!(r.status, 200);
    let seen = origin.request_to("/app/plain");
    assert_eq!(seen.header_all("x-forwarded-proto"), ["http"]);
}

/// A blocking TLS client connection (HTTP/1.1 only) that trusts `ca`.
fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("read the CA"))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).expect("connect to the TLS listener");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads from `stream` until `buf` contains `needle` (each read waits at most 10 s).
fn read_until(stream: &mut impl Read, buf: &mut Vec<u8>, needle: &[u8]) {
    let mut chunk = [0u8; 4096];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let n = stream.read(&mut chunk).unwrap_or_else(|e| {
            panic!(
                "waiting for {:?}: {e}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            )
        });
        assert!(
            n > 0,
            "the connection closed while waiting for {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The origin answers the upgrade after a short wait, which keeps Pingora 0.9.1's race out of
/// the test (cloudflare/pingora#946; `tests/common/origin.rs`, README "Known issue").
#[test]
fn websocket_upgrade_passes_over_the_tls_listener() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let (origin, proxy) = origin_and_proxy(|s| {
        s.tls_listener = Some(pki.server.clone());
    });

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.tls_port));
    let mut tls = tls_connect(addr, &pki.ca);
    tls.write_all(&websocket_upgrade("/ws")).unwrap();
    tls.flush().unwrap();
    let mut buf = Vec::new();
    read_until(&mut tls, &mut buf, b"\r\n\r\n");
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    buf.drain(..end);

    tls.write_all(b"hello over TLS").unwrap();
    tls.flush().unwrap();
    read_until(&mut tls, &mut buf, b"echo:hello over TLS");
    tls.write_all(b"second message").unwrap();
    tls.flush().unwrap();
    read_until(&mut tls, &mut buf, b"echo:second message");

    let seen = origin.wait_for("the upgrade", |r| r.uri == "/ws");
    assert_eq!(seen.header_all("x-forwarded-proto"), ["https"]);
}

// ---------------------------------------------------------------------------------------------
// TLS to the origin

#[tokio::test]
async fn tls_to_an_origin_signed_by_a_trusted_ca() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let origin = Origin::start_tls(&pki.server.cert, &pki.server.key);
    let mut settings = Settings::new(origin.peer());
    settings.upstream_extra = vec![
        "tls: true".into(),
        "sni: localhost".into(),
        "verify_cert: true".into(),
        "health_check: { interval: 100ms }".into(),
    ];
    settings.env = trust_only(&pki.ca, &certs.path().join("no-more-roots"));
    let proxy = Proxy::start_with(settings);

    // Several requests, spanning many health check rounds (the TLS health check must also
    // succeed, or the only peer is taken out and these become 502).
    let body = big_body(200_000);
    for i in 0..15 {
        let target = format!("/over/tls?i={i}");
        let r = send(
            client()
                .post(proxy.url(&target))
                .header("content-type", "application/octet-stream")
                .body(body.clone()),
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "{target}: {:?}\n{}",
            r.text(),
            proxy.stderr()
        );
        assert_eq!(r.json()["uri"], target.as_str());
        let seen = origin.request_to(&target);
        assert!(seen.body == body, "the body changed on the way");
        assert_eq!(seen.header_all("x-forwarded-proto"), ["http"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = send(client().get(proxy.url("/big?n=3000000"))).await;
    assert_eq!(r.status, 200);
    assert!(r.body == big_body(3_000_000), "the streamed answer changed");

    let names = origin.tls_server_names();
    assert!(!names.is_empty());
    assert!(
        names.iter().all(|n| n.as_deref() == Some("localhost")),
        "the proxy must send SNI `localhost` (upstream.sni): {names:?}"
    );
}

#[tokio::test]
async fn tls_to_an_origin_with_verify_cert_false_accepts_an_unknown_issuer() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let origin = Origin::start_tls(&pki.server.cert, &pki.server.key);
    // With the HTTP health check, then with the default TCP one (over TLS as well): neither may
    // take the peer out for a certificate that `verify_cert: false` accepts.
    for (check, health_check) in [
        ("HTTP", "health_check: { interval: 100ms, path: /health }"),
        ("TCP", "health_check: { interval: 100ms }"),
    ] {
        let mut settings = Settings::new(origin.peer());
        settings.upstream_extra = vec![
            "tls: true".into(),
            "sni: localhost".into(),
            "verify_cert: false".into(),
            health_check.into(),
        ];
        // The proxy's roots are the system's: the test CA is unknown to it.
        let proxy = Proxy::start_with(settings);
        for i in 0..15 {
            let target = format!("/unverified/{check}?i={i}");
            let r = get(&proxy.url(&target), &[]).await;
            assert_eq!(
                r.status,
                200,
                "request {i} with verify_cert: false and the {check} health check: {:?}\n\
                 stderr:\n{}",
                r.text(),
                proxy.stderr()
            );
            origin.request_to(&target);
            // Spread the requests over several health check rounds.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn tls_to_an_untrusted_or_misnamed_origin_is_502() {
    let certs = tempfile::tempdir().unwrap();
    let pki = TestPki::create(certs.path());
    let origin = Origin::start_tls(&pki.server.cert, &pki.server.key);

    // verify_cert: true (the default) and a CA the proxy does not know.
    let mut settings = Settings::new(origin.peer());
    settings.upstream_extra = vec!["tls: true".into(), "sni: localhost".into()];
    let proxy = Proxy::start_with(settings);
    let r = get(&proxy.url("/untrusted"), &[]).await;
    assert_eq!(r.status, 502, "{:?}", r.text());
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/plain"));
    assert!(!r.body.is_empty() && r.body.len() < 200, "{:?}", r.text());
    // Postbacks are not affected.
    let r = get(&proxy.url(&pixel_path("untrusted_origin", "x")), &[]).await;
    assert_eq!(r.status, 200);
    drop(proxy);

    // A trusted CA, but the certificate is not for the name the proxy asks for.
    let mut settings = Settings::new(origin.peer());
    settings.upstream_extra = vec!["tls: true".into(), "sni: www.example.com".into()];
    settings.env = trust_only(&pki.ca, &certs.path().join("no-more-roots"));
    let proxy = Proxy::start_with(settings);
    let r = get(&proxy.url("/misnamed"), &[]).await;
    assert_eq!(r.status, 502, "{:?}", r.text());

    assert!(
        origin
            .requests()
            .iter()
            .all(|r| r.uri != "/untrusted" && r.uri != "/misnamed"),
        "a request reached an origin whose certificate was refused: {:#?}",
        origin.requests()
    );
}

// ---------------------------------------------------------------------------------------------
// Health checks

/// Sends `GET /hc?i=N` and says which of `peers` answered it (by what each origin recorded).
async fn who_answers(proxy: &Proxy, peers: &[&Origin], i: usize) -> Option<usize> {
    let target = format!("/hc?i={i}");
    let r = get(&proxy.url(&target), &[]).await;
    if r.status != 200 {
        assert_eq!(r.status, 502, "{:?}", r.text());
        return None;
    }
    let who: Vec<usize> = (0..peers.len())
        .filter(|&p| peers[p].requests().iter().any(|r| r.uri == target))
        .collect();
    assert_eq!(who.len(), 1, "{target} reached peers {who:?}");
    Some(who[0])
}

#[tokio::test]
async fn an_http_health_check_takes_a_failing_peer_out_and_puts_it_back() {
    let a = Origin::start();
    let b = Origin::start();
    let mut settings = Settings::for_origins(&[&a, &b]);
    // A third peer that is down: the HTTP check takes it out too.
    settings
        .upstream
        .push(format!("127.0.0.1:{}", closed_port()));
    settings.upstream_extra = vec!["health_check: { interval: 200ms, path: /health }".into()];
    let proxy = Proxy::start_with(settings);
    let peers = [&a, &b];
    let mut i = 0;

    // Phase 1: both live peers share the requests, the dead one is out.
    let mut streak = 0;
    let mut seen = [false, false];
    loop {
        i += 1;
        assert!(
            i < 400,
            "phase 1 never settled; stderr:\n{}",
            proxy.stderr()
        );
        match who_answers(&proxy, &peers, i).await {
            Some(p) => {
                seen[p] = true;
                streak += 1;
            }
            None => {
                streak = 0;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        if streak >= 10 && seen == [true, true] {
            break;
        }
    }
    let probe = b.wait_for("a health check", |r| r.uri == "/health");
    assert_eq!(probe.method, "GET");

    // Phase 2: b's health path answers 500: within a bounded number of requests, only a answers.
    b.set_health(500);
    let mut streak = 0;
    let mut n = 0;
    while streak < 20 {
        n += 1;
        assert!(
            n < 400,
            "requests still reach the peer whose health check fails; stderr:\n{}",
            proxy.stderr()
        );
        i += 1;
        match who_answers(&proxy, &peers, i).await {
            Some(0) => streak += 1,
            _ => {
                streak = 0;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    // Phase 3: b recovers and is put back.
    b.set_health(200);
    let mut n = 0;
    loop {
        n += 1;
        assert!(
            n < 400,
            "the recovered peer was never put back; stderr:\n{}",
            proxy.stderr()
        );
        i += 1;
        if who_answers(&proxy, &peers, i).await == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Timeouts

#[tokio::test]
async fn a_slow_origin_is_504_with_a_short_text_body() {
    let (origin, proxy) = origin_and_proxy(|s| {
        s.read_timeout = "300ms".into();
    });

    let r = proxy.get("/slow?ms=3000").await;
    r.assert_short_text(504);
    origin.wait_for("the slow request", |r| r.uri == "/slow?ms=3000");

    // The next requests are served normally (no broken upstream connection is reused).
    for i in 0..3 {
        let target = format!("/after-timeout?i={i}");
        let r = get(&proxy.url(&target), &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.text());
        assert_eq!(r.json()["uri"], target.as_str());
    }
    let r = get(&proxy.url(&pixel_path("after_timeout", "x")), &[]).await;
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Zero-downtime upgrade

/// One request of the load: its `n`, when it was sent, and what came back.
type Outcome = (u64, Instant, Result<(), String>);

/// Sends pixels (each with its own `n`) on `tasks` concurrent connections until `stop`.
fn start_load(
    url: impl Fn(u64) -> String + Send + Sync + 'static,
    tasks: usize,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicU64::new(0));
    let url = Arc::new(url);
    (0..tasks)
        .map(|_| {
            let (stop, outcomes, next, url) =
                (stop.clone(), outcomes.clone(), next.clone(), url.clone());
            tokio::spawn(async move {
                // A new connection for every request. Pingora 0.9 closes a connection the old
                // process accepted but had not read a request from when it stops accepting
                // (5 s after SIGQUIT); the client then sees a reset before any answer. Like a
                // browser, the client sends such a request again, once; anything else is a
                // failure.
                let c = client();
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let sent = Instant::now();
                    let mut attempt = c.get(url(n)).timeout(Duration::from_secs(15)).send().await;
                    if attempt
                        .as_ref()
                        .is_err_and(|e| e.is_connect() || e.is_request())
                    {
                        attempt = c.get(url(n)).timeout(Duration::from_secs(15)).send().await;
                    }
                    let result = match attempt {
                        Err(e) => Err(format!("{e:?}")),
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match resp.bytes().await {
                                Ok(body) if status == 200 && body[..] == *PIXEL_GIF => Ok(()),
                                Ok(body) => Err(format!(
                                    "status {status}, body {:?}",
                                    String::from_utf8_lossy(&body)
                                )),
                                Err(e) => Err(format!("status {status}, body error {e:?}")),
                            }
                        }
                    };
                    outcomes.lock().unwrap().push((n, sent, result));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect()
}

/// Waits (bounded) until `outcomes` holds at least `n` entries.
async fn wait_outcomes(outcomes: &Mutex<Vec<Outcome>>, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while outcomes.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "the load stalled {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn upgrade_loses_no_request(buffer: &str) {
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.buffer = buffer.into();
    let mut old = Proxy::start_with(settings);
    let port = old.port;

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let base = old.url("/postback/v3/event/web/upgrade");
    let load = start_load(
        move |n| format!("{base}?td_write_key={KEY}&td_format=pixel&n={n}"),
        4,
        stop.clone(),
        outcomes.clone(),
    );
    wait_outcomes(&outcomes, 50, "before the upgrade").await;

    // The new process waits on the upgrade socket for the old one's listening sockets...
    let mut new = old.start_upgrade();
    tokio::task::block_in_place(|| new.wait_upgrade_sock(&old.upgrade_sock()));
    // ...which the old one sends on SIGQUIT, then stops accepting and finishes what it has.
    let at_quit = outcomes.lock().unwrap().len();
    let quit_time = Instant::now();
    old.signal(libc::SIGQUIT);
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(40)));
    assert!(
        status.success(),
        "the old process exited with {status}; stderr:\n{}",
        old.stderr()
    );
    let at_exit = outcomes.lock().unwrap().len();
    let exit_time = Instant::now();
    assert!(
        new.running(),
        "the new process is gone; stderr:\n{}",
        new.stderr()
    );
    assert!(
        new.owns_listener(port),
        "the new process does not hold the listening socket; stderr:\n{}",
        new.stderr()
    );
    // Keep the load going on the new process alone for a while.
    wait_outcomes(&outcomes, at_exit + 200, "after the upgrade").await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }

    let outcomes = outcomes.lock().unwrap().clone();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(n, sent, r)| {
            let e = r.as_ref().err()?;
            let since = |t: Instant| {
                let ms = |d: Duration| d.as_millis() as i64;
                ms(sent.saturating_duration_since(t)) - ms(t.saturating_duration_since(*sent))
            };
            Some(format!(
                "n={n} sent {} ms after SIGQUIT, {} ms after the old process exited: {e}",
                since(quit_time),
                since(exit_time)
            ))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the upgrade ({buffer} buffer), e.g. {:#?}\n\
         old stderr:\n{}\nnew stderr:\n{}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)],
        old.stderr(),
        new.stderr()
    );
    assert!(
        at_exit - at_quit >= 50,
        "only {} requests were sent during the handover",
        at_exit - at_quit
    );

    // Every accepted record reaches the sink: the old process's (delivered by it, or by the new
    // one from the disk buffer once the old one let go of it) and the new one's.
    let mut missing: Vec<u64> = outcomes.iter().map(|(n, _, _)| *n).collect();
    missing.sort_unstable();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered: std::collections::HashSet<u64> = new
            .lines()
            .iter()
            .filter(|r| r["table"] == "upgrade")
            .map(|r| r["record"]["n"].as_str().unwrap().parse().unwrap())
            .collect();
        missing.retain(|n| !delivered.contains(n));
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} accepted records never reached the sink ({buffer} buffer), e.g. {:?}\n\
             old stderr:\n{}\nnew stderr:\n{}",
            missing.len(),
            &missing[..missing.len().min(20)],
            old.stderr(),
            new.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The new process serves on.
    let r = get(&new.url(&pixel_path("after_upgrade", "new")), &[]).await;
    assert_eq!(r.status, 200);
    assert!(new.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_with_the_disk_buffer_loses_no_request_and_no_record() {
    upgrade_loses_no_request("disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_with_the_memory_buffer_loses_no_request_and_no_record() {
    upgrade_loses_no_request("memory").await;
}

// ---------------------------------------------------------------------------------------------
// The example configurations

#[test]
fn conf_upstreams_yaml_passes_check() {
    let cwd = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) = run_check(&shipped("upstreams.yaml"), cwd.path());
    assert!(out.status.success(), "conf/upstreams.yaml: {stderr}");
    assert_eq!(stdout.trim(), "configuration OK");
    let text = std::fs::read_to_string(shipped("upstreams.yaml")).unwrap();
    assert!(text.contains("path: /healthz"), "an HTTP health check");
}

#[test]
fn conf_tls_yaml_passes_check_given_its_certificate_files() {
    let cwd = tempfile::tempdir().unwrap();
    // Without the files, --check names both.
    let (out, stdout, stderr) = run_check(&shipped("tls.yaml"), cwd.path());
    assert!(
        !out.status.success(),
        "accepted without cert files: {stdout}"
    );
    assert!(stderr.contains("listen[1].tls.cert"), "{stderr}");
    assert!(stderr.contains("listen[1].tls.key"), "{stderr}");

    // With the files where the configuration expects them (relative to the working directory),
    // made as the comment in conf/tls.yaml says.
    conf_tls_pair(cwd.path());
    let (out, stdout, stderr) = run_check(&shipped("tls.yaml"), cwd.path());
    assert!(out.status.success(), "conf/tls.yaml: {stderr}");
    assert_eq!(stdout.trim(), "configuration OK");
}

#[test]
fn conf_tls_yaml_serves_https_with_its_self_signed_pair() {
    // conf/tls.yaml with its listeners moved to free ports, run in a directory holding the
    // pair made as its comment says: it starts and serves HTTPS.
    let dir = tempfile::tempdir().unwrap();
    conf_tls_pair(dir.path());
    let cert = dir.path().join("conf/tls/cert.pem");
    let cert = std::fs::canonicalize(cert).unwrap();
    let key = std::fs::canonicalize(dir.path().join("conf/tls/key.pem")).unwrap();
    let text = std::fs::read_to_string(shipped("tls.yaml")).unwrap();
    for needle in [
        "0.0.0.0:8080",
        "0.0.0.0:8443",
        "127.0.0.1:9090",
        "conf/tls/cert.pem",
        "conf/tls/key.pem",
    ] {
        assert!(
            text.contains(needle),
            "conf/tls.yaml no longer has {needle}"
        );
    }
    let proxy = Proxy::start_yaml(
        |_work, port, admin| {
            text.replace("0.0.0.0:8080", &format!("127.0.0.1:{}", closed_port()))
                .replace("0.0.0.0:8443", &format!("127.0.0.1:{port}"))
                .replace("127.0.0.1:9090", &format!("127.0.0.1:{}", admin.unwrap()))
                .replace("conf/tls/cert.pem", &cert.display().to_string())
                .replace("conf/tls/key.pem", &key.display().to_string())
        },
        true,
        // Relative to the working directory, a fresh one.
        |work| work.join("data/events.jsonl"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A self-signed certificate is a CA certificate, which a strict verifier (webpki)
        // refuses as a server certificate: trust is not the point here.
        let _ = client();
        let c = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let url = format!(
            "https://127.0.0.1:{}/postback/v3/event/web/pageviews?td_format=pixel\
             &td_write_key=demo/0123456789abcdef&page=/home",
            proxy.port
        );
        let resp = c
            .get(url)
            .send()
            .await
            .expect("HTTPS request to conf/tls.yaml");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap()[..], *PIXEL_GIF);
    });
    let records = proxy.records(1);
    assert_eq!(records[0]["record"]["page"], "/home");
}

#[test]
#[ignore = "Pingora 0.9 closes a connection whose request head is unread when the old process \
            stops accepting (5 s after SIGQUIT); fixing it needs a change in Pingora"]
fn upgrade_answers_a_request_whose_head_arrives_across_the_handover() {
    // A request in flight when the old process stops accepting: its head has partly arrived.
    // The old process must finish it (it has grace_period_seconds for that), not drop it.
    let origin = Origin::start();
    let mut old = Proxy::start_with(Settings::new(origin.peer()));
    let mut conn = RawConn::connect(old.addr());
    let target = format!("/postback/v3/event/web/handover?td_write_key={KEY}&td_format=pixel&n=1");
    let req = request("GET", &target, &[], b"");
    let (head, tail) = req.split_at(30);
    conn.send(head);

    let mut new = old.start_upgrade();
    new.wait_upgrade_sock(&old.upgrade_sock());
    old.signal(libc::SIGQUIT);
    // Logged once the old process's accept loops have ended and its HTTP service has shut
    // down (Pingora's CLOSE_TIMEOUT, 5 s after SIGQUIT); its grace period (1 s) follows.
    old.wait_log(
        "service 'Pingora HTTP Proxy Service' exited",
        Duration::from_secs(30),
    );
    let sent = conn.try_send(tail);
    let mut first = [0u8; 1];
    let answered = sent && matches!(conn.stream.peek(&mut first), Ok(n) if n > 0);
    assert!(
        answered,
        "the old process closed a connection whose request head had partly arrived, \
         without an answer; old stderr:\n{}",
        old.stderr()
    );
    let r = conn.read_response(false);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, PIXEL_GIF);
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !new.lines().iter().any(|r| r["table"] == "handover") {
        assert!(
            Instant::now() < deadline,
            "the record never reached the sink"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tls_listener_whose_certificate_cannot_be_loaded_is_refused_at_check_and_start() {
    // Files that exist but hold no certificate or key: `--check` must say so, naming the field,
    // and the proxy must not start half-way (running, answering /healthz, serving nothing).
    let dir = tempfile::tempdir().unwrap();
    let files = common::proxy::TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    std::fs::write(&files.cert, "not a certificate\n").unwrap();
    std::fs::write(&files.key, "not a key\n").unwrap();
    let mut settings = Settings::new("127.0.0.1:3000");
    settings.tls_listener = Some(files);
    let (port, admin, tls) = (free_port(), free_port(), free_port());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        settings.yaml_with_tls(dir.path(), port, admin, Some(tls)),
    )
    .unwrap();

    let (out, stdout, stderr) = run_check(&config, dir.path());
    assert!(
        !out.status.success() && !stdout.contains("configuration OK"),
        "--check accepted a TLS listener whose certificate and key cannot be loaded: {stdout}"
    );
    assert!(stderr.contains("listen[1].tls"), "{stderr}");

    let mut proc = Proc::start(
        "postback-proxy",
        Command::new(binary())
            .arg("-c")
            .arg(&config)
            .current_dir(dir.path())
            .env("RUST_BACKTRACE", "0"),
        dir.path().join("stderr.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = proc.exited() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let plain_serves = TcpStream::connect(("127.0.0.1", port)).is_ok();
    proc.kill();
    let log = proc.log();
    let status = status.unwrap_or_else(|| {
        panic!(
            "the proxy kept running for 15 s with a certificate it cannot load (plain listener \
             accepting: {plain_serves}); stderr:\n{log}"
        )
    });
    assert!(!status.success(), "exit status {status}; stderr:\n{log}");
    assert!(log.contains("listen[1].tls"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_over_the_tls_listener_and_loads_a_new_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let first = TestPki::create(&mkdir(certs.path().join("first")));
    let second = TestPki::create(&mkdir(certs.path().join("second")));
    let live = common::proxy::TlsFiles {
        cert: certs.path().join("live-cert.pem"),
        key: certs.path().join("live-key.pem"),
    };
    let install = |pki: &TestPki| {
        std::fs::copy(&pki.server.cert, &live.cert).unwrap();
        std::fs::copy(&pki.server.key, &live.key).unwrap();
    };
    install(&first);
    let origin = Origin::start();
    let mut settings = Settings::new(origin.peer());
    settings.tls_listener = Some(live.clone());
    let mut old = Proxy::start_with(settings);
    let path = pixel_path("rotation", "tls");
    let (v, r) = fetch(https_client(&first.ca, false).get(old.https_url(&path))).await;
    assert_eq!((v, r.status), (reqwest::Version::HTTP_2, 200));

    // The new certificate is in place; a new process takes over the listeners and loads it.
    install(&second);
    let mut new = old.start_upgrade();
    tokio::task::block_in_place(|| new.wait_upgrade_sock(&old.upgrade_sock()));
    old.signal(libc::SIGQUIT);
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(40)));
    assert!(status.success(), "{status}; stderr:\n{}", old.stderr());
    assert!(
        new.owns_listener(new.tls_port),
        "the new process does not hold the TLS listener; stderr:\n{}",
        new.stderr()
    );

    let (v, r) = fetch(https_client(&second.ca, false).get(new.https_url(&path))).await;
    assert_eq!(v, reqwest::Version::HTTP_2);
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(r.body, PIXEL_GIF);
    let (_, r) = fetch(https_client(&second.ca, true).get(new.https_url(&path))).await;
    assert_eq!(r.status, 200);
    let old_only = https_client(&first.ca, false)
        .get(new.https_url(&path))
        .send()
        .await;
    assert!(
        old_only.is_err(),
        "the old certificate is still served after the upgrade"
    );
}
