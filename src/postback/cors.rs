//! CORS for browser POSTs: the allowed origins, the headers added to every postback answer, and
//! the answer to an `OPTIONS` preflight.

use http::header;
use serde::Deserialize;

use super::fields::Fields;
use super::reply::{ErrorKind, Refusal, Reply};
use crate::config::Problem;

/// `postback.cors:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins (`https://www.example.com`) allowed to POST from browsers; `*` for any.
    pub allowed_origins: Vec<String>,
}

/// The CORS rules of `postback.cors`.
pub struct Cors {
    origins: Vec<String>,
    any: bool,
}

impl Cors {
    /// The rules of `postback.cors`; a malformed origin names its index.
    pub fn from_config(cfg: &CorsConfig) -> Result<Cors, Vec<Problem>> {
        let mut problems = Vec::new();
        for (i, origin) in cfg.allowed_origins.iter().enumerate() {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                problems.push(Problem::new(
                    format!("postback.cors.allowed_origins[{i}]"),
                    "must be `*` or an origin such as https://www.example.com",
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Cors {
            any: cfg.allowed_origins.iter().any(|o| o == "*"),
            origins: cfg
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        })
    }

    /// The CORS headers for the request's `Origin`, when it is allowed; added to every postback answer.
    pub fn headers(&self, headers: Fields<'_>) -> Vec<(&'static str, String)> {
        match self.allowed_origin(headers) {
            Some(origin) => vec![
                ("Access-Control-Allow-Origin", origin.to_owned()),
                ("Access-Control-Allow-Credentials", "true".into()),
                ("Vary", "Origin".into()),
            ],
            None => Vec::new(),
        }
    }

    fn allowed_origin<'h>(&self, headers: Fields<'h>) -> Option<&'h str> {
        let origin = headers.get_str(&header::ORIGIN)?;
        let allowed = self.any
            || self
                .origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin.trim_end_matches('/')));
        allowed.then_some(origin)
    }

    /// Answers an `OPTIONS` preflight: 204 for an allowed origin (the caller adds the CORS
    /// headers, as to every answer), 403 otherwise.
    pub fn preflight(&self, headers: Fields<'_>) -> Result<Reply, Refusal> {
        if self.allowed_origin(headers).is_none() {
            return Err(Refusal::new(ErrorKind::Forbidden, "origin not allowed"));
        }
        let requested = headers
            .get_str(&header::ACCESS_CONTROL_REQUEST_HEADERS)
            .filter(|v| {
                v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b", -_".contains(&b))
            })
            .unwrap_or("Content-Type, X-TD-Write-Key, Authorization");
        Ok(Reply::no_content()
            .with_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS".into())
            .with_header("Access-Control-Allow-Headers", requested.to_owned())
            .with_header("Access-Control-Max-Age", "86400".into()))
    }
}
