//! SPEC section 5: every request that is not a postback goes to the origin unchanged (method,
//! path, query, headers, body), the origin's answer comes back unchanged, `X-Forwarded-*` are
//! added, bodies stream in both directions, upgrades pass, and an unreachable origin is a 502
//! while postbacks keep working.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn method_path_query_headers_and_body_reach_the_origin_unchanged() {
    let (origin, proxy) = harness();
    let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    for (i, method) in ["GET", "POST", "PUT", "DELETE", "PATCH", "PURGE", "OPTIONS"]
        .iter()
        .enumerate()
    {
        let target = format!("/app/a%20b/c;p=1?i={i}&x=1&y=%2F&x=2&empty=&flag&sp=a+b");
        let with_body = matches!(*method, "POST" | "PUT" | "PATCH");
        let mut req = client()
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                proxy.url(&target),
            )
            .header("x-custom", "Some  Value; with=stuff")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .header("cookie", "sid=1; _td_global=abc")
            .header("user-agent", "e2e-agent/1.0")
            .header("authorization", "Bearer upstream-token");
        if with_body {
            req = req
                .header("content-type", "application/octet-stream")
                .body(body.clone());
        }
        let r = send(req).await;
        assert_eq!(r.status, 200, "{method}: {:?}", r.text());
        assert_eq!(r.header("x-origin").as_deref(), Some("yes"), "{method}");

        let seen = origin.request_to(&target);
        assert_eq!(seen.method, *method);
        assert_eq!(
            seen.header("host"),
            Some(format!("127.0.0.1:{}", proxy.port).as_str()),
            "{method}: Host"
        );
        assert_eq!(seen.header("x-custom"), Some("Some  Value; with=stuff"));
        assert_eq!(seen.header_all("x-multi"), ["1", "2"], "{method}");
        assert_eq!(seen.header("cookie"), Some("sid=1; _td_global=abc"));
        assert_eq!(seen.header("user-agent"), Some("e2e-agent/1.0"));
        assert_eq!(seen.header("authorization"), Some("Bearer upstream-token"));
        if with_body {
            assert_eq!(
                seen.header("content-type"),
                Some("application/octet-stream")
            );
            assert_eq!(seen.body.len(), body.len(), "{method}: body length");
            assert!(seen.body == body, "{method}: the body changed on the way");
        } else {
            assert!(seen.body.is_empty(), "{method}: a body appeared");
        }
        // The answer is the origin's echo, byte for byte.
        let echo = r.json();
        assert_eq!(echo["uri"], target.as_str());
        assert_eq!(echo["method"], *method);
    }
    let postbacks = proxy.records_until_marker().await;
    assert!(postbacks.is_empty(), "proxied requests became records");
}

#[tokio::test]
async fn forwarded_headers_are_added_and_extended_from_a_trusted_peer() {
    let (origin, proxy) = harness(); // 127.0.0.1 is a trusted proxy
    let host = format!("127.0.0.1:{}", proxy.port);

    get(&proxy.url("/fwd/1"), &[]).await;
    let seen = origin.request_to("/fwd/1");
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.header_all("x-forwarded-host"), [host.as_str()]);

    get(&proxy.url("/fwd/2"), &[("x-forwarded-for", "1.2.3.4")]).await;
    let seen = origin.request_to("/fwd/2");
    assert_eq!(seen.header_all("x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.header_all("x-forwarded-host"), [host.as_str()]);
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let (origin, proxy) = origin_and_proxy(|s| {
        s.trusted_proxies = vec!["10.0.0.0/8".into()];
    });
    let r = get(
        &proxy.url("/fwd/untrusted?q=1"),
        &[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed.example"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = origin.request_to("/fwd/untrusted?q=1");
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(
        seen.header_all("x-forwarded-host"),
        [format!("127.0.0.1:{}", proxy.port).as_str()]
    );
}

#[tokio::test]
async fn origin_answers_come_back_unchanged() {
    let (_origin, proxy) = harness();
    for code in [404u16, 500, 201, 418] {
        let r = send(client().get(proxy.url(&format!("/status/{code}")))).await;
        assert_eq!(r.status, code);
        assert_eq!(r.text(), format!("status {code} from origin\n"));
        assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
        assert_eq!(r.header("x-origin").as_deref(), Some("yes"));
        assert_eq!(
            r.header("x-custom-resp").as_deref(),
            Some("Value  With Spaces")
        );
        assert_eq!(r.header_all("set-cookie"), ["a=1; Path=/", "b=2; Path=/"]);
        assert!(
            r.header("cache-control").is_none(),
            "the proxy added Cache-Control to an origin answer"
        );
    }
}

#[tokio::test]
async fn large_bodies_pass_in_both_directions() {
    let (origin, proxy) = harness();

    // Chunked from the origin.
    let n = 8_000_000;
    let r = send(client().get(proxy.url(&format!("/big?n={n}")))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(
        r.body == big_body(n),
        "the streamed body changed on the way"
    );

    // With Content-Length from the origin.
    let n = 3_000_001;
    let r = send(client().get(proxy.url(&format!("/big?n={n}&len=1")))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(n.to_string()));
    assert!(r.body == big_body(n), "the body changed on the way");

    // A large upload (bigger than any postback limit: it is not a postback).
    let upload = big_body(5_000_000);
    let r = send(
        client()
            .post(proxy.url("/upload/large"))
            .header("content-type", "application/octet-stream")
            .body(upload.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], upload.len());
    let seen = origin.request_to("/upload/large");
    assert!(seen.body == upload, "the upload changed on the way");
}

#[tokio::test]
async fn request_body_streams_to_the_origin_before_it_ends() {
    let (origin, proxy) = harness();
    let mut conn = RawConn::connect(proxy.addr());
    conn.send(&request(
        "POST",
        "/upload/stream",
        &["Content-Type: text/plain", "Transfer-Encoding: chunked"],
        b"",
    ));
    conn.send(b"9\r\npart-one;\r\n");
    // The origin sees the first piece while the client has not finished sending.
    origin.wait_for("the first part of the body", |r| {
        r.uri == "/upload/stream" && r.body == b"part-one;" && !r.complete
    });
    conn.send(b"8\r\npart-two\r\n0\r\n\r\n");
    let r = conn.read_response(false);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = origin.request_to("/upload/stream");
    assert_eq!(seen.body, b"part-one;part-two");
}

#[tokio::test]
async fn response_body_streams_to_the_client_before_it_ends() {
    let (origin, proxy) = harness();
    let mut conn = RawConn::connect(proxy.addr());
    conn.send(&request("GET", "/hold", &[], b""));
    let (status, _) = conn.read_head();
    assert_eq!(status, 200);
    // The origin holds the rest of its answer (for 30 s) until released; the read gives up
    // after 10 s, so a proxy that buffers the whole answer fails here.
    conn.read_until(b"first\n");
    origin.release();
    conn.read_until(b"second\n");
}

#[tokio::test]
async fn websocket_upgrade_passes() {
    let (_origin, proxy) = harness();
    let mut conn = RawConn::connect(proxy.addr());
    conn.send(&websocket_upgrade("/ws"));
    let (status, headers) = conn.read_head();
    assert_eq!(status, 101, "headers: {headers:?}");
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "upgrade" && v.eq_ignore_ascii_case("websocket")),
        "headers: {headers:?}"
    );
    conn.send(b"hello over the tunnel");
    conn.read_until(b"echo:hello over the tunnel");
    conn.send(b"second message");
    conn.read_until(b"echo:second message");
}

#[tokio::test]
async fn upstream_down_is_502_and_postbacks_still_work() {
    // Nothing listens on the upstream port.
    let proxy = Proxy::start(format!("127.0.0.1:{}", closed_port()));
    for (method, path) in [
        ("GET", "/page"),
        ("POST", "/form"),
        ("GET", "/page?again=1"),
    ] {
        let mut req = client().request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            proxy.url(path),
        );
        if method == "POST" {
            req = req.body("a=1");
        }
        let r = send(req).await;
        assert_eq!(r.status, 502, "{method} {path}: {:?}", r.text());
        r.assert_short_text(502);

        let r = get(
            &proxy.url(&format!(
                "/postback/v3/event/web/while_down?td_write_key={KEY}&p={path}&td_format=pixel"
            )),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.text());
        assert_eq!(r.body, PIXEL_GIF);
    }
    let records = proxy.records_until_marker().await;
    let ps: Vec<&serde_json::Value> = records.iter().map(|r| &r["record"]["p"]).collect();
    assert_eq!(ps, ["/page", "/form", "/page?again=1"], "{records:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_proxied_request_in_flight_finish() {
    let (origin, mut proxy) = harness();
    let url = proxy.url("/slow?ms=800");
    let pending = tokio::spawn(async move { send(client().get(url)).await });
    origin.wait_for("the slow request", |r| r.uri.starts_with("/slow"));
    proxy.sigterm();
    let r = pending.await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(r.json()["uri"], "/slow?ms=800");
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        proxy.stderr()
    );
}

#[tokio::test]
async fn several_peers_share_the_requests_round_robin() {
    let a = Origin::start();
    let b = Origin::start();
    let proxy = Proxy::start_with(Settings::for_origins(&[&a, &b]));
    for i in 0..10 {
        let r = get(&proxy.url(&format!("/rr?i={i}")), &[]).await;
        assert_eq!(r.status, 200);
    }
    let (na, nb) = (a.requests().len(), b.requests().len());
    assert_eq!(na + nb, 10);
    assert!(
        na >= 3 && nb >= 3,
        "round robin over two peers sent {na} and {nb} requests"
    );
}

#[tokio::test]
async fn a_dead_peer_is_taken_out_by_the_health_check() {
    let live = Origin::start();
    let mut settings = Settings::new(live.peer());
    settings
        .upstream
        .push(format!("127.0.0.1:{}", closed_port()));
    settings.upstream_extra = vec!["health_check: { interval: 100ms }".into()];
    let proxy = Proxy::start_with(settings);
    // Within a bounded number of requests, every request reaches the live peer.
    let mut consecutive = 0;
    for i in 0..400 {
        let r = get(&proxy.url(&format!("/hc?i={i}")), &[]).await;
        if r.status == 200 {
            consecutive += 1;
            if consecutive == 20 {
                return;
            }
        } else {
            assert_eq!(r.status, 502, "{:?}", r.text());
            consecutive = 0;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    panic!(
        "requests still reach the dead peer; stderr:\n{}",
        proxy.stderr()
    );
}
