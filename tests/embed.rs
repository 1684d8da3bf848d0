//! `examples/embed.rs`, the crate used as a module in someone's own Pingora proxy: the real
//! example binary, a real origin behind it, a pixel and a passthrough request.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::proxy::free_port;
use common::{get, Origin, PIXEL_GIF};

/// The example's binary: a whole `cargo test` builds it beside the test binaries; a run of
/// this file alone (`cargo test --test embed`) builds it here.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/debug");
    let path = dir.join("examples").join("embed");
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "embed"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --example embed failed");
    }
    path
}

struct Example(Child);

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_embedding_example_answers_pixels_into_its_own_sink_and_proxies_the_rest() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(example_binary())
        .arg(format!("127.0.0.1:{port}"))
        .arg(origin.peer())
        .arg(dir.path().join("buffer"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the example");
    let stdout = child.stdout.take().unwrap();
    let _guard = Example(child);
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the example did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let base = format!("http://127.0.0.1:{port}");

    let pixel = format!(
        "{base}/postback/v3/event/web/pageviews?td_format=pixel&td_write_key=demo-key&page=/home"
    );
    let pixel = get(&pixel, &[]).await;
    assert_eq!(pixel.status, 200);
    assert_eq!(pixel.header("content-type").as_deref(), Some("image/gif"));
    assert_eq!(pixel.body, PIXEL_GIF);
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the custom sink printed the record");
    assert_eq!(line, "web.pageviews 1 page=/home");

    let refused = get(
        &format!("{base}/postback/v3/event/web/pageviews?td_write_key=wrong"),
        &[],
    )
    .await;
    assert_eq!(refused.status, 403);

    let page = get(&format!("{base}/shop?x=1"), &[]).await;
    assert_eq!(page.status, 200);
    let seen = origin.request_to("/shop?x=1");
    assert_eq!(seen.method, "GET");
    assert!(lines.try_recv().is_err(), "only the pixel became a record");
}
