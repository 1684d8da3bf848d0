//! The first rules a postback meets, before its body is read: the method, the URL's length, the
//! body's declared length and the per-client rate.

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, Method};
use pingora_limits::rate::Rate;

use super::config::PostbackConfig;
use super::reply::{ErrorKind, Refusal};
use crate::config::Problem;

/// The methods a postback route serves, in the order the `Allow` header lists them.
pub const METHODS: [Method; 4] = [Method::GET, Method::HEAD, Method::POST, Method::OPTIONS];

/// The `Allow` header of a 405: [`METHODS`], written out.
pub const ALLOW: &str = "GET, HEAD, POST, OPTIONS";

/// The largest `postback.rate_limit.per_second` (the rate counter is a signed machine word).
const MAX_RATE: u64 = isize::MAX as u64;

/// `postback.max_url_bytes`, `max_body_bytes`, `max_columns` and `rate_limit`, checked.
pub struct Limits {
    /// Requests whose path and query are longer are answered 414.
    pub max_url_bytes: usize,
    /// Requests whose body is longer are answered 413.
    pub max_body_bytes: usize,
    /// Records with more columns are answered 413.
    pub max_columns: usize,
    rate_limit: Option<isize>,
    /// Postbacks per client address in the current second.
    rate: Rate,
}

impl Limits {
    /// The limits of `postback:`; `max_body_limit` is the largest body the delivery buffer can
    /// always hold as one record. Problems name their field.
    pub fn from_config(cfg: &PostbackConfig, max_body_limit: u64) -> Result<Limits, Vec<Problem>> {
        let mut problems = Vec::new();
        if cfg.max_columns == 0 {
            problems.push(Problem::new("postback.max_columns", "must be at least 1"));
        }
        if cfg.max_body_bytes.0 > max_body_limit {
            problems.push(Problem::new(
                "postback.max_body_bytes",
                format!("must be at most {max_body_limit} bytes, so that an accepted record always fits the delivery buffer's frame"),
            ));
        }
        let rate_limit = match cfg.rate_limit.per_second {
            None => None,
            Some(0) => {
                problems.push(Problem::new(
                    "postback.rate_limit.per_second",
                    "must be at least 1",
                ));
                None
            }
            Some(n) if n > MAX_RATE => {
                problems.push(Problem::new(
                    "postback.rate_limit.per_second",
                    format!("must be at most {MAX_RATE}"),
                ));
                None
            }
            Some(n) => isize::try_from(n).ok(),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Limits {
            max_url_bytes: usize::try_from(cfg.max_url_bytes.0).unwrap_or(usize::MAX),
            max_body_bytes: usize::try_from(cfg.max_body_bytes.0).unwrap_or(usize::MAX),
            max_columns: cfg.max_columns,
            rate_limit,
            rate: Rate::new(Duration::from_secs(1)),
        })
    }

    /// Runs first for every postback: `Err` for a method we do not serve (405).
    pub fn check_method(method: &Method) -> Result<(), Refusal> {
        if METHODS.contains(method) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorKind::MethodNotAllowed,
                format!("method {method} is not allowed here"),
            ))
        }
    }

    /// `Err` (414) when the path and query are longer than `max_url_bytes`.
    pub fn check_url(&self, path_and_query_len: usize) -> Result<(), Refusal> {
        if path_and_query_len > self.max_url_bytes {
            return Err(Refusal::new(
                ErrorKind::UriTooLong,
                format!("the URL is longer than {} bytes", self.max_url_bytes),
            ));
        }
        Ok(())
    }

    /// `Err` (413) when the body is, or is declared to be, longer than `max_body_bytes`.
    pub fn check_body_len(&self, len: u64) -> Result<(), Refusal> {
        if len > self.max_body_bytes as u64 {
            return Err(self.body_too_large());
        }
        Ok(())
    }

    /// The 413 for a body over `max_body_bytes`.
    pub fn body_too_large(&self) -> Refusal {
        Refusal::new(
            ErrorKind::PayloadTooLarge,
            format!("the body is larger than {} bytes", self.max_body_bytes),
        )
    }

    /// `Err` (429) when `client` has sent more than `rate_limit.per_second` postbacks this
    /// second; counts this one. No limit configured: always `Ok`.
    pub fn check_rate(&self, client: IpAddr) -> Result<(), Refusal> {
        let Some(limit) = self.rate_limit else {
            return Ok(());
        };
        if self.rate.observe(&client, 1) > limit {
            return Err(Refusal::new(
                ErrorKind::TooManyRequests,
                format!("more than {limit} postbacks per second from this address"),
            ));
        }
        Ok(())
    }

    /// Whether a rate limit is configured (the caller then works out the client address).
    pub fn has_rate_limit(&self) -> bool {
        self.rate_limit.is_some()
    }
}

/// The request's `Content-Length`, when it has exactly one that is a number. Every reader of the
/// header goes through here, so they agree on what a malformed one means (none).
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.trim().parse::<u64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::ByteSize;

    #[test]
    fn a_rate_limit_that_does_not_fit_is_a_config_error() {
        let mut cfg = PostbackConfig::default();
        cfg.rate_limit.per_second = Some(u64::MAX);
        let problems = Limits::from_config(&cfg, u64::MAX).err().unwrap();
        assert_eq!(problems[0].field, "postback.rate_limit.per_second");
        cfg.rate_limit.per_second = Some(0);
        assert!(Limits::from_config(&cfg, u64::MAX).is_err());
        cfg.rate_limit.per_second = Some(2);
        let limits = Limits::from_config(&cfg, u64::MAX).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.check_rate(ip).is_ok());
        assert!(limits.check_rate(ip).is_ok());
        assert_eq!(
            limits.check_rate(ip).unwrap_err().kind,
            ErrorKind::TooManyRequests
        );
    }

    #[test]
    fn a_body_limit_past_the_frame_is_a_config_error() {
        let cfg = PostbackConfig {
            max_body_bytes: ByteSize::mib(100),
            ..PostbackConfig::default()
        };
        let problems = Limits::from_config(&cfg, 16 * 1024 * 1024).err().unwrap();
        assert_eq!(problems[0].field, "postback.max_body_bytes");
    }

    #[test]
    fn methods_and_content_length() {
        assert!(Limits::check_method(&Method::GET).is_ok());
        assert_eq!(
            Limits::check_method(&Method::PUT).unwrap_err().kind,
            ErrorKind::MethodNotAllowed
        );
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert("content-length", " 12 ".parse().unwrap());
        assert_eq!(content_length(&h), Some(12));
        h.append("content-length", "12".parse().unwrap());
        assert_eq!(content_length(&h), None);
    }
}
