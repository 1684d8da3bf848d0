//! `type: http`: batches of records POSTed as NDJSON to a collector.
//!
//! A 2xx answer means delivered. 408, 429, 5xx and connection errors are failures the delivery
//! layer retries; a connection error also makes [`LogSink::peer_down`] report the peer down until
//! the next answer. Any other status refuses the batch for good: its records go to
//! `rejected.jsonl` with the status as the reason.

mod config;

use std::io::Write;
use std::time::Duration;

use async_trait::async_trait;
use flate2::write::GzEncoder;
use flate2::Compression;
use http::{HeaderMap, StatusCode};

pub use config::HttpSinkConfig;

use super::{json_lines, Batch, LogSink, PeerDown, Rejection, SinkError};

/// POSTs each batch to one URL.
pub struct HttpSink {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    gzip: bool,
    down: PeerDown,
}

impl HttpSink {
    /// Builds the client (a validated configuration).
    pub fn open(cfg: &HttpSinkConfig) -> Result<HttpSink, String> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| e.to_string())?;
        let client = http_client(cfg.timeout.0)?;
        let headers = cfg.header_map("", &mut Vec::new());
        Ok(HttpSink {
            client,
            url,
            headers,
            gzip: cfg.gzip,
            down: PeerDown::default(),
        })
    }
}

/// An HTTP client (rustls, HTTP/2 by ALPN) whose requests may take `timeout`; shared by the
/// http and td sinks.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    crate::http::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A failed request as a [`SinkError`]: a connection error is `Unreachable`.
pub(crate) fn request_error(what: String, peer: &reqwest::Url, e: reqwest::Error) -> SinkError {
    if e.is_connect() {
        SinkError::unreachable(peer.as_str(), e)
    } else if e.is_timeout() {
        SinkError::Timeout(format!("{what} timed out: {e}"))
    } else {
        SinkError::caused(format!("{what} failed: {e}"), e)
    }
}

/// Gzip of `body`.
pub(crate) fn gzip(body: &[u8]) -> Result<Vec<u8>, SinkError> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .map_err(|e| SinkError::io("gzip failed", e))
}

/// The first 200 characters of a response body, for a reason or an error.
pub(crate) async fn excerpt(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    text.chars().take(200).collect()
}

#[async_trait]
impl LogSink for HttpSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        let mut body = json_lines(batch);
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(http::header::CONTENT_TYPE, "application/x-ndjson");
        if self.gzip {
            body = gzip(&body)?;
            request = request.header(http::header::CONTENT_ENCODING, "gzip");
        }
        let sent = request.body(body).send().await;
        let response = self
            .down
            .track(sent.map_err(|e| request_error(format!("POST {}", self.url), &self.url, e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Vec::new());
        }
        let detail = excerpt(response).await;
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            return Err(SinkError::Refused {
                peer: self.url.to_string(),
                status: status.as_u16(),
                detail,
            });
        }
        let reason = format!("{} answered {status}: {detail}", self.url);
        Ok((0..batch.len())
            .map(|index| Rejection {
                index,
                reason: reason.clone(),
            })
            .collect())
    }

    fn peer_down(&self) -> Option<String> {
        self.down.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::test_support::{test_record, write};

    #[tokio::test]
    async fn a_connect_failure_is_unreachable_until_an_answer() {
        let cfg: HttpSinkConfig =
            serde_saphyr::from_str("{url: 'http://127.0.0.1:1/bulk', timeout: 2s}").unwrap();
        let sink = HttpSink::open(&cfg).unwrap();
        let records = [test_record("web", "pv", 1, &[])];
        let e = write(&sink, &records).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(
            e.to_string()
                .starts_with("cannot connect to http://127.0.0.1:1/bulk"),
            "{e}"
        );
        assert!(sink.peer_down().is_some());
        sink.down.track(Ok(())).unwrap();
        assert_eq!(sink.peer_down(), None);
    }
}
