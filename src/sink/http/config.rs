//! `type: http`: its configuration and the checks on it.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::HttpSink;
use crate::config::Problem;
use crate::sink::{more_than_zero, LogSink, SinkKind};
use crate::units::HumanDuration;

/// `type: http`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where batches are POSTed.
    pub url: String,
    /// Extra request headers (an `Authorization`, say).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Compress each batch with gzip (`Content-Encoding: gzip`).
    #[serde(default)]
    pub gzip: bool,
    /// How long one POST may take.
    #[serde(default = "default_http_timeout")]
    pub timeout: HumanDuration,
}

fn default_http_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

impl SinkKind for HttpSinkConfig {
    fn validate(&self, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => problems.push(Problem::new(
                format!("{field}.url"),
                "must be an absolute http or https URL",
            )),
        }
        self.header_map(field, &mut problems);
        problems.extend(more_than_zero(field, "timeout", self.timeout.0.is_zero()));
        problems
    }

    fn open(&self, _name: &str, field: &str) -> Result<Box<dyn LogSink>, Problem> {
        let sink = HttpSink::open(self).map_err(|e| Problem::new(format!("{field}.url"), e))?;
        Ok(Box::new(sink))
    }
}

impl HttpSinkConfig {
    /// The extra headers; those that are not valid are left out and reported in `problems`.
    pub(super) fn header_map(&self, field: &str, problems: &mut Vec<Problem>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
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
}
