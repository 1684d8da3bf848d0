//! `td_redirect`: which targets are allowed, and the `td_global_id` substitution.

use serde::Deserialize;
use url::{Host, Url};

use crate::config::{parse_list, Problem};

/// `postback.redirect:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedirectConfig {
    /// Hosts `td_redirect` may point to: `example.com`, or `*.example.com` for its subdomains.
    pub allowed_hosts: Vec<String>,
}

/// Why a `td_redirect` target was refused (answered with 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("td_redirect must be an absolute http or https URL")]
    NotAbsoluteHttp,
    #[error("td_redirect must not contain control characters, spaces or backslashes")]
    BadCharacters,
    #[error("td_redirect must not carry a user name or password")]
    Credentials,
    #[error("td_redirect host is not allowed")]
    HostNotAllowed,
}

#[derive(Debug)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: any subdomain of `example.com`, not the domain itself.
    Subdomains(String),
}

/// The allow-list of redirect hosts.
#[derive(Debug, Default)]
pub struct RedirectPolicy {
    allowed: Vec<HostPattern>,
}

impl RedirectPolicy {
    /// Builds the allow-list from `postback.redirect`; an empty list refuses every redirect.
    pub fn from_config(cfg: &RedirectConfig) -> Result<Self, Vec<Problem>> {
        let (allowed, problems) = parse_list(
            "postback.redirect.allowed_hosts",
            &cfg.allowed_hosts,
            |raw| {
                let lower = raw.trim().to_ascii_lowercase();
                let (pattern, host) = match lower.strip_prefix("*.") {
                    Some(rest) => (HostPattern::Subdomains(rest.to_owned()), rest.to_owned()),
                    None => (HostPattern::Exact(lower.clone()), lower.clone()),
                };
                if host.is_empty()
                    || !host.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']')
                    })
                {
                    return Err(format!("`{raw}` is not a host name or `*.` pattern"));
                }
                Ok(pattern)
            },
        );
        if problems.is_empty() {
            Ok(RedirectPolicy { allowed })
        } else {
            Err(problems)
        }
    }

    /// Runs for postbacks with `td_redirect`: the parsed target when it is an absolute http(s) URL
    /// without credentials to an allowed host.
    pub fn check(&self, raw: &str) -> Result<Url, RedirectError> {
        // The URL parser silently strips tabs and newlines and reads `\` as `/`; refuse them instead.
        if raw
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'\\')
        {
            return Err(RedirectError::BadCharacters);
        }
        let url = Url::parse(raw).map_err(|_| RedirectError::NotAbsoluteHttp)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(RedirectError::NotAbsoluteHttp);
        }
        // `https://` must be followed by the host itself: no `https:/x`, `https:x` or `https:///x`.
        let after_scheme = &raw[url.scheme().len() + 1..];
        if !after_scheme.starts_with("//") || after_scheme[2..].starts_with('/') {
            return Err(RedirectError::NotAbsoluteHttp);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(RedirectError::Credentials);
        }
        let host = match url.host() {
            Some(Host::Domain(d)) => d.to_owned(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err(RedirectError::NotAbsoluteHttp),
        };
        // One trailing dot (the root) is allowed; empty labels are not.
        let host = host.strip_suffix('.').unwrap_or(&host);
        if host.split('.').any(str::is_empty) {
            return Err(RedirectError::HostNotAllowed);
        }
        let allowed = self.allowed.iter().any(|p| match p {
            HostPattern::Exact(h) => host == h,
            HostPattern::Subdomains(parent) => host
                .strip_suffix(parent.as_str())
                .and_then(|sub| sub.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
        });
        if allowed {
            Ok(url)
        } else {
            Err(RedirectError::HostNotAllowed)
        }
    }
}

/// The `Location` for `target`: every query parameter whose value is exactly `td_global_id`
/// gets the visitor's `global_id` instead. The rest of the query is kept as it was written.
pub fn location(mut target: Url, global_id: &str) -> String {
    if let Some(query) = target.query() {
        if query
            .split('&')
            .any(|p| p.split_once('=').is_some_and(|(_, v)| v == "td_global_id"))
        {
            let encoded: String =
                url::form_urlencoded::byte_serialize(global_id.as_bytes()).collect();
            let replaced: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((name, "td_global_id")) => format!("{name}={encoded}"),
                    _ => p.to_owned(),
                })
                .collect();
            target.set_query(Some(&replaced.join("&")));
        }
    }
    target.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> RedirectPolicy {
        RedirectPolicy::from_config(&RedirectConfig {
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn allows_listed_hosts_only() {
        let p = policy(&["example.com", "*.example.org"]);
        assert!(p.check("https://example.com/landing?a=1").is_ok());
        assert!(p.check("http://EXAMPLE.com:8080/").is_ok());
        assert!(p.check("https://www.example.org/").is_ok());
        assert!(p.check("https://a.b.example.org/").is_ok());
        assert_eq!(
            p.check("https://example.org/"),
            Err(RedirectError::HostNotAllowed)
        );
        assert_eq!(
            p.check("https://www.example.com/"),
            Err(RedirectError::HostNotAllowed)
        );
        assert_eq!(
            p.check("https://evilexample.org/"),
            Err(RedirectError::HostNotAllowed)
        );
        assert_eq!(
            p.check("https://example.com.evil.net/"),
            Err(RedirectError::HostNotAllowed)
        );
    }

    #[test]
    fn refuses_tricks() {
        let p = policy(&["example.com"]);
        assert_eq!(
            p.check("//example.com/"),
            Err(RedirectError::NotAbsoluteHttp)
        );
        assert_eq!(p.check("/relative"), Err(RedirectError::NotAbsoluteHttp));
        assert_eq!(
            p.check("javascript:alert(1)"),
            Err(RedirectError::NotAbsoluteHttp)
        );
        assert_eq!(
            p.check("ftp://example.com/"),
            Err(RedirectError::NotAbsoluteHttp)
        );
        assert_eq!(
            p.check("https:example.com"),
            Err(RedirectError::NotAbsoluteHttp)
        );
        assert_eq!(
            p.check("https:///example.com"),
            Err(RedirectError::NotAbsoluteHttp)
        );
        assert_eq!(
            p.check("https://example.com@evil.net/"),
            Err(RedirectError::Credentials)
        );
        assert_eq!(
            p.check("https://evil.net\\@example.com/"),
            Err(RedirectError::BadCharacters)
        );
        assert_eq!(
            p.check("https://example.com/\r\nSet-Cookie: x=1"),
            Err(RedirectError::BadCharacters)
        );
        assert_eq!(
            p.check("https://exa\tmple.com/"),
            Err(RedirectError::BadCharacters)
        );
        assert_eq!(p.check(""), Err(RedirectError::NotAbsoluteHttp));
        assert_eq!(
            policy(&[]).check("https://example.com/"),
            Err(RedirectError::HostNotAllowed)
        );
    }

    #[test]
    fn substitutes_the_global_id() {
        let p = policy(&["example.com"]);
        let url = p
            .check("https://example.com/l?uid=td_global_id&x=a%20b&y=td_global_id_not")
            .unwrap();
        assert_eq!(
            location(url, "5f0b-1"),
            "https://example.com/l?uid=5f0b-1&x=a%20b&y=td_global_id_not"
        );
        let url = p.check("https://example.com/l").unwrap();
        assert_eq!(location(url, "id"), "https://example.com/l");
    }
}
