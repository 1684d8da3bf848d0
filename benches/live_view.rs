//! Does a live-view viewer that never reads slow the postbacks down? `cargo bench --bench
//! live_view [-- --requests 20000 --rounds 3]`.
//!
//! Starts the release proxy (memory buffer, file sink, admin listener), then, round after round,
//! sends `--requests` pixels over 8 keep-alive connections twice: once with no viewer, once with
//! an `/events/stream` viewer that connected and never reads a byte (its socket buffers fill up
//! within the first few thousand events). Prints requests/s of both and their ratio, and checks
//! that every pixel was answered 200, every record reached the sink (each run waits for the
//! previous run's records to be delivered, so delivery never overlaps a measurement) and the
//! viewer's connection is still open.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 8;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` pixels on one keep-alive connection; panics on anything but 200.
fn pixels(port: u16, n: usize) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).ok();
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let request = b"GET /postback/v3/event/web/pageviews?td_format=pixel&td_write_key=bench-key&page=/home&td_ip=td_ip HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n";
    let mut line = String::new();
    let mut body = [0u8; 64];
    for _ in 0..n {
        writer.write_all(request).expect("send");
        line.clear();
        reader.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1.1 200"), "answer: {line:?}");
        let mut length = 0;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().expect("a length");
            }
        }
        reader.read_exact(&mut body[..length]).expect("body");
    }
}

/// Sends `n` pixels (a warm-up) and returns how many were sent.
fn round_sent(port: u16, n: usize) -> usize {
    round(port, n);
    n / CONNECTIONS * CONNECTIONS
}

/// Requests/s of `n` pixels spread over [`CONNECTIONS`] connections.
fn round(port: u16, n: usize) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| std::thread::spawn(move || pixels(port, n / CONNECTIONS)))
        .collect();
    for t in threads {
        t.join().expect("a load thread");
    }
    (n / CONNECTIONS * CONNECTIONS) as f64 / started.elapsed().as_secs_f64()
}

/// Waits until the file sink holds `n` records, so one run's delivery does not overlap the next.
fn delivered(events: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = std::fs::read(events).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
        if lines >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {lines} of {n} records reached the sink"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut requests, mut rounds) = (20_000usize, 3usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => requests = args.next().and_then(|v| v.parse().ok()).unwrap_or(requests),
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            _ => {}
        }
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{ threads: 1, grace_period_seconds: 1, graceful_shutdown_timeout_seconds: 2, \
             upgrade_sock: {d}/up.sock, pid_file: {d}/pid }}\n\
             listen: [{{ address: 127.0.0.1:{port} }}]\n\
             admin: {{ address: 127.0.0.1:{admin} }}\n\
             upstream: {{ peers: [\"127.0.0.1:1\"] }}\n\
             auth: {{ write_keys: [{{ key: bench-key }}] }}\n\
             sinks: {{ main: {{ type: file, path: {d}/events.jsonl }} }}\n\
             delivery: {{ buffer: memory, dir: {d}/buffer }}\n",
            d = dir.path().display()
        ),
    )
    .expect("write the config");
    let _proxy = Proxy(
        Command::new(env!("CARGO_BIN_EXE_postback-proxy"))
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the proxy"),
    );
    wait_listening(port);
    wait_listening(admin);
    let events = dir.path().join("events.jsonl");
    let mut sent = round_sent(port, 2_000); // warm up
    delivered(&events, sent);

    println!("{requests} pixels per run, {CONNECTIONS} connections, {rounds} rounds");
    println!("round  no viewer req/s  stalled viewer req/s  ratio");
    let mut ratios = Vec::new();
    for r in 1..=rounds {
        let alone = round(port, requests);
        sent += requests / CONNECTIONS * CONNECTIONS;
        delivered(&events, sent);
        let mut viewer = TcpStream::connect(("127.0.0.1", admin)).expect("connect the viewer");
        viewer
            .write_all(b"GET /events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("ask for the stream");
        // The viewer reads nothing, ever.
        let watched = round(port, requests);
        sent += requests / CONNECTIONS * CONNECTIONS;
        delivered(&events, sent);
        viewer.set_nonblocking(true).expect("nonblocking");
        let mut probe = [0u8; 1];
        let open = !matches!(viewer.peek(&mut probe), Ok(0));
        assert!(open, "the proxy closed the stalled viewer's stream");
        drop(viewer);
        let ratio = watched / alone;
        ratios.push(ratio);
        println!("{r:>5}  {alone:>15.0}  {watched:>20.0}  {ratio:.2}x");
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median: a stalled viewer leaves {:.2}x of the postback rate",
        ratios[ratios.len() / 2]
    );
}
