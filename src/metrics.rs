//! Prometheus metrics, registered in the default registry (which the admin listener serves).
//!
//! Every limit, drop and failure has a counter here.

use once_cell::sync::Lazy;
use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

/// `postback_requests_total{route,outcome}`: postback requests by route template and outcome
/// (`accepted`, `preflight`, `bad_request`, `forbidden`, `payload_too_large`, `uri_too_long`, ...).
pub static POSTBACK_REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "postback_requests_total",
        "Postback requests by route and outcome",
        &["route", "outcome"]
    )
    .expect("metric registers once")
});

/// `postback_records_total{sink,result}`: records by sink and what became of them
/// (`accepted`, `delivered`, `dropped`, `rejected`, `lost`).
pub static RECORDS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "postback_records_total",
        "Records by sink and result",
        &["sink", "result"]
    )
    .expect("metric registers once")
});

/// `postback_filtered_records_total{reason,action}`: records changed or kept out by the privacy
/// and bot rules (`opted_out`/`no_consent`/`bot`, and `strip`/`drop`/`flag`).
pub static FILTERED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "postback_filtered_records_total",
        "Records stripped, dropped or flagged by the privacy and bot rules",
        &["reason", "action"]
    )
    .expect("metric registers once")
});

/// `identity_cookies_extended_total{cookie}`: cookies re-issued on proxied pages
/// (`identity.extend_cookies`), by cookie name.
pub static COOKIES_EXTENDED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "identity_cookies_extended_total",
        "Visitor-id cookies re-issued as server-set cookies on proxied pages, by cookie",
        &["cookie"]
    )
    .expect("metric registers once")
});

/// `identity_server_ids_total{result}`: answers of the server cookie endpoint (`issued`, `kept`,
/// `opted_out`, `method_not_allowed`).
pub static SERVER_IDS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "identity_server_ids_total",
        "Answers of the server-side cookie endpoint (/get_cookie_id), by result",
        &["result"]
    )
    .expect("metric registers once")
});

/// `delivery_queue_records{sink}`: records accepted and not yet delivered.
pub static QUEUE_RECORDS: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "delivery_queue_records",
        "Records waiting for their sink",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `delivery_spool_bytes{sink}`: bytes in the disk buffer not yet delivered.
pub static SPOOL_BYTES: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "delivery_spool_bytes",
        "Bytes in the disk buffer not yet delivered",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `delivery_spool_skipped_bytes_total{sink}`: torn or corrupt bytes skipped in the disk buffer.
pub static SPOOL_SKIPPED_BYTES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "delivery_spool_skipped_bytes_total",
        "Torn or corrupt bytes skipped while reading the disk buffer",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `delivery_oldest_record_age_seconds{sink}`: how long the oldest undelivered record has waited.
pub static OLDEST_AGE: Lazy<prometheus::GaugeVec> = Lazy::new(|| {
    prometheus::register_gauge_vec!(
        "delivery_oldest_record_age_seconds",
        "Age of the oldest record not yet delivered (0 when none waits)",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `sink_errors_total{sink}`: failed sink writes (each is retried).
pub static SINK_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "sink_errors_total",
        "Failed batch writes to a sink; each is retried",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `sink_up{sink}`: 1 while the sink takes batches, 0 while it is down (its last batch failed, or
/// it knows its peer unreachable); what `/sinks` says as `state`.
pub static SINK_UP: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "sink_up",
        "1 while the sink is up, 0 while it is down",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `delivery_buffer_write_errors_total{sink}`: appends to the disk buffer that failed (a full
/// disk); each refused request was answered 503.
pub static BUFFER_WRITE_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "delivery_buffer_write_errors_total",
        "Requests whose records could not be written to the disk buffer (answered 503)",
        &["sink"]
    )
    .expect("metric registers once")
});

/// `sink_batch_records{sink}`: records per batch handed to a sink.
pub static BATCH_RECORDS: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "sink_batch_records",
        "Records per batch written to a sink",
        &["sink"],
        vec![1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0]
    )
    .expect("metric registers once")
});

/// `upstream_responses_total{status}`: answers to proxied requests, by status.
pub static UPSTREAM_RESPONSES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "upstream_responses_total",
        "Responses to proxied requests by status",
        &["status"]
    )
    .expect("metric registers once")
});

/// `request_duration_seconds{kind}`: time from request to answer, `postback` or `upstream`.
pub static REQUEST_DURATION: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "request_duration_seconds",
        "Time to answer a request, by kind (postback, upstream)",
        &["kind"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]
    )
    .expect("metric registers once")
});

/// Runs once per sink at start-up: every per-sink series exists from the start at 0, so alerts
/// and dashboards (`rate(...)`, `increase(...)`) see a sink before its first failure.
pub fn register_sink(sink: &str) {
    for result in ["delivered", "dropped", "rejected", "lost"] {
        RECORDS.with_label_values(&[sink, result]);
    }
    SPOOL_SKIPPED_BYTES.with_label_values(&[sink]);
    QUEUE_RECORDS.with_label_values(&[sink]);
    SPOOL_BYTES.with_label_values(&[sink]);
    SINK_ERRORS.with_label_values(&[sink]);
    BUFFER_WRITE_ERRORS.with_label_values(&[sink]);
}

// --- connections (issue 12; src/http/fast) ---

/// `server_connections`: connections open now (every listener of the proxy service).
pub static CONNECTIONS: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!("server_connections", "Connections open now")
        .expect("metric registers once")
});

/// `server_connections_refused_total`: connections closed at once because `server.max_connections`
/// were open.
pub static CONNECTIONS_REFUSED: Lazy<prometheus::IntCounter> = Lazy::new(|| {
    prometheus::register_int_counter!(
        "server_connections_refused_total",
        "Connections closed at once because server.max_connections were open"
    )
    .expect("metric registers once")
});

/// `server_header_timeouts_total`: connections closed because a request head did not arrive
/// within `server.header_timeout`.
pub static HEADER_TIMEOUTS: Lazy<prometheus::IntCounter> = Lazy::new(|| {
    prometheus::register_int_counter!(
        "server_header_timeouts_total",
        "Connections closed because a request head did not arrive within server.header_timeout"
    )
    .expect("metric registers once")
});

/// `fast_path_requests_total{how}`: requests on plain connections read by the fast path:
/// `answered` there, or `handed_off` to Pingora.
pub static FAST_PATH_REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fast_path_requests_total",
        "Requests read by the fast path: answered there or handed off to Pingora",
        &["how"]
    )
    .expect("metric registers once")
});

/// Renders every registered metric in the Prometheus text format.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    // Encoding into a Vec only fails for metric families without metrics, which we never register.
    let _ = encoder.encode(&prometheus::gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}
