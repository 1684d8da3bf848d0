//! `type: http`: batches of records POSTed as NDJSON to a collector.
//!
//! A 2xx answer means delivered. 408, 429, 5xx and connection errors are failures the delivery
//! layer retries. Any other status refuses the batch for good: its records go to
//! `rejected.jsonl` with the status as the reason.

use std::io::Write;
use std::time::Duration;

use async_trait::async_trait;
use flate2::write::GzEncoder;
use flate2::Compression;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{Batch, LogSink, Rejection, SinkError};
use crate::config::{HttpSinkConfig, Problem};

/// POSTs each batch to one URL.
pub struct HttpSink {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    gzip: bool,
}

fn parse_headers(cfg: &HttpSinkConfig, field: &str, problems: &mut Vec<Problem>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &cfg.headers {
        match (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(n), Ok(v)) => {
                headers.insert(n, v);
            }
            _ => problems.push(Problem::new(
                format!("{field}.headers.{name}"),
                "is not a valid HTTP header name and value",
            )),
        }
    }
    headers
}

impl HttpSink {
    /// Checks the configuration; problems are reported under `field`.
    pub fn validate(cfg: &HttpSinkConfig, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        match reqwest::Url::parse(&cfg.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => problems.push(Problem::new(
                format!("{field}.url"),
                "must be an absolute http or https URL",
            )),
        }
        parse_headers(cfg, field, &mut problems);
        if cfg.timeout.0.is_zero() {
            problems.push(Problem::new(
                format!("{field}.timeout"),
                "must be more than 0",
            ));
        }
        problems
    }

    /// Builds the client (a validated configuration).
    pub fn open(cfg: &HttpSinkConfig) -> Result<HttpSink, String> {
        crate::http::tls::install_crypto_provider();
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut problems = Vec::new();
        let headers = parse_headers(cfg, "", &mut problems);
        Ok(HttpSink {
            client,
            url,
            headers,
            gzip: cfg.gzip,
        })
    }
}

#[async_trait]
impl LogSink for HttpSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        let mut body = Vec::with_capacity(batch.len() * 256);
        for record in batch {
            record.to_json_line(&mut body);
        }
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(http::header::CONTENT_TYPE, "application/x-ndjson");
        if self.gzip {
            let mut encoder =
                GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
            encoder
                .write_all(&body)
                .map_err(|e| SinkError(format!("gzip failed: {e}")))?;
            body = encoder
                .finish()
                .map_err(|e| SinkError(format!("gzip failed: {e}")))?;
            request = request.header(http::header::CONTENT_ENCODING, "gzip");
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError(format!("POST {} failed: {e}", self.url)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Vec::new());
        }
        let text = response.text().await.unwrap_or_default();
        let excerpt: String = text.chars().take(200).collect();
        let reason = format!("{} answered {status}: {excerpt}", self.url);
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            return Err(SinkError(reason));
        }
        Ok((0..batch.len())
            .map(|index| Rejection {
                index,
                reason: reason.clone(),
            })
            .collect())
    }
}
