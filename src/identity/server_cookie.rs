//! td-js-sdk's server-side cookie endpoint: `GET /get_cookie_id?cookie_domain=D&r=N`.
//!
//! With `useServerSideCookie` on, td-js-sdk's `fetchServerCookie()` fetches
//! `https://{sscServer}/get_cookie_id?cookie_domain={sscDomain}&r={time}` with credentials and
//! reads `td_ssc_id` from the JSON answer (no JSONP). The proxy answers it itself: the id of the
//! visitor's valid `_td_ssc_id` cookie if it has one, else a new one, and sets the cookie from
//! the server, readable by JavaScript, for `D` when `D` is the request's host or a parent of it
//! and listed in `identity.domains` (host-only otherwise).

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::config::ServerCookieConfig;
use super::{check_cookie, host_name, plausible_id};
use crate::config::Problem;
use crate::postback::cookie;
use crate::postback::fields::Fields;
use crate::postback::privacy::Assessment;
use crate::postback::query::parse_pairs;
use crate::postback::reply::Reply;

/// `identity.server_cookie` (enabled) and `identity.domains`, checked.
#[derive(Debug)]
pub struct ServerCookie {
    path: String,
    cookie: String,
    max_age_secs: u64,
    domains: Vec<String>,
}

/// What the endpoint did: the `result` label of `identity_server_ids_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdResult {
    /// A new id.
    Issued,
    /// The visitor's own valid id, re-issued.
    Kept,
    /// An opted-out visitor: no id, no cookie.
    OptedOut,
    /// Not GET or HEAD: 405.
    Refused,
}

impl IdResult {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            IdResult::Issued => "issued",
            IdResult::Kept => "kept",
            IdResult::OptedOut => "opted_out",
            IdResult::Refused => "method_not_allowed",
        }
    }
}

/// The parts of the request the endpoint reads.
pub struct IdRequest<'a> {
    pub method: &'a Method,
    pub query: Option<&'a str>,
    /// The request's host (without the port), lower case.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub assessment: Assessment,
    pub tls: bool,
}

impl ServerCookie {
    /// Checks `identity.server_cookie`; `domains` are `identity.domains`, already checked.
    pub fn from_config(
        cfg: &ServerCookieConfig,
        domains: Vec<String>,
    ) -> Result<ServerCookie, Vec<Problem>> {
        let mut problems = Vec::new();
        if !cfg.path.starts_with('/')
            || cfg
                .path
                .bytes()
                .any(|b| b == b'?' || b == b'#' || !b.is_ascii_graphic())
        {
            problems.push(Problem::new(
                "identity.server_cookie.path",
                "must be a path such as /get_cookie_id",
            ));
        }
        check_cookie(
            &mut problems,
            "identity.server_cookie",
            ("cookie", &cfg.cookie),
            &cfg.max_age,
        );
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ServerCookie {
            path: cfg.path.clone(),
            cookie: cfg.cookie.clone(),
            max_age_secs: cfg.max_age.0.as_secs(),
            domains,
        })
    }

    /// The path the endpoint answers.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The answer to a request for [`ServerCookie::path`].
    pub fn answer(&self, req: &IdRequest<'_>) -> (Reply, IdResult) {
        if *req.method != Method::GET && *req.method != Method::HEAD {
            let reply = Reply::json(
                405,
                Bytes::from_static(
                    br#"{"error":"method_not_allowed","message":"only GET and HEAD"}"#,
                ),
            )
            .with_header("Allow", "GET, HEAD".into());
            return (reply, IdResult::Refused);
        }
        if req.assessment.opted_out.is_some() || !req.assessment.identifiers_allowed {
            return (
                Reply::json(200, Bytes::from_static(b"{}")),
                IdResult::OptedOut,
            );
        }
        let existing =
            cookie::find_in(Fields::Map(req.headers), &self.cookie).filter(|v| plausible_id(v));
        let (id, result) = match existing {
            Some(id) => (id.to_owned(), IdResult::Kept),
            None => (cookie::new_global_id(), IdResult::Issued),
        };
        let body = serde_json::json!({ "td_ssc_id": id }).to_string();
        let mut line = format!(
            "{}={id}; Max-Age={}; Path=/",
            self.cookie, self.max_age_secs
        );
        if let Some(domain) = self.domain_for(req.query, req.host) {
            line.push_str("; Domain=");
            line.push_str(domain);
        }
        line.push_str("; SameSite=Lax");
        if req.tls {
            line.push_str("; Secure");
        }
        let reply = Reply::json(200, Bytes::from(body)).with_header("Set-Cookie", line);
        (reply, result)
    }

    /// The `Domain` for `cookie_domain=D`: `D` when it is listed in `identity.domains` and is
    /// `host` or a parent of it; `None` (host-only) otherwise.
    fn domain_for(&self, query: Option<&str>, host: Option<&str>) -> Option<&str> {
        let pairs = parse_pairs(query.unwrap_or("").as_bytes()).ok()?;
        let asked = pairs
            .into_iter()
            .rev()
            .find(|(n, _)| n == "cookie_domain")
            .and_then(|(_, v)| host_name(&v))?;
        let host = host?.to_ascii_lowercase();
        let listed = self.domains.iter().find(|d| **d == asked)?;
        let covers = host == *listed
            || host
                .strip_suffix(listed.as_str())
                .is_some_and(|rest| rest.ends_with('.'));
        covers.then_some(listed.as_str())
    }
}

/// The host of a request target or `Host` header value, without the port, lower case.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postback::privacy::PrivacyPolicy;
    use crate::postback::reply::NO_CACHE;

    fn endpoint() -> ServerCookie {
        let cfg: ServerCookieConfig = serde_saphyr::from_str("{enabled: true}").unwrap();
        ServerCookie::from_config(&cfg, vec!["example.com".into(), "shop.example.net".into()])
            .unwrap()
    }

    fn ask(
        e: &ServerCookie,
        method: Method,
        query: &str,
        host: &str,
        headers: &[(&'static str, &str)],
    ) -> (Reply, IdResult) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, v.parse().unwrap());
        }
        let assessment = PrivacyPolicy::from_config(&Default::default(), "postback.privacy")
            .unwrap()
            .assess(Fields::Map(&map));
        e.answer(&IdRequest {
            method: &method,
            query: Some(query),
            host: Some(host),
            headers: &map,
            assessment,
            tls: false,
        })
    }

    fn get(
        e: &ServerCookie,
        query: &str,
        host: &str,
        headers: &[(&'static str, &str)],
    ) -> (Reply, IdResult) {
        ask(e, Method::GET, query, host, headers)
    }

    fn set_cookie(r: &Reply) -> Option<&str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == "Set-Cookie")
            .map(|(_, v)| &**v)
    }

    #[test]
    fn issues_a_new_id_and_keeps_a_valid_one() {
        let e = endpoint();
        let (r, result) = get(&e, "cookie_domain=example.com&r=1", "www.example.com", &[]);
        assert_eq!((r.status, result), (200, IdResult::Issued));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let id = body["td_ssc_id"].as_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(
            set_cookie(&r).unwrap(),
            format!("_td_ssc_id={id}; Max-Age=63072000; Path=/; Domain=example.com; SameSite=Lax")
        );
        assert!(r.headers.contains(&("Cache-Control", NO_CACHE.into())));
        assert!(r
            .headers
            .contains(&("Content-Type", "application/json".into())));

        let (r, result) = get(
            &e,
            "r=2",
            "www.example.com",
            &[("cookie", "_td_ssc_id=mine-1")],
        );
        assert_eq!(result, IdResult::Kept);
        assert_eq!(&r.body[..], br#"{"td_ssc_id":"mine-1"}"#);
        assert_eq!(
            set_cookie(&r).unwrap(),
            "_td_ssc_id=mine-1; Max-Age=63072000; Path=/; SameSite=Lax"
        );
        let (_, result) = get(&e, "", "a.b", &[("cookie", "_td_ssc_id=bad value")]);
        assert_eq!(result, IdResult::Issued);
    }

    #[test]
    fn the_domain_only_when_listed_and_covering_the_host() {
        let e = endpoint();
        let domain = |query: &str, host: &str| {
            let (r, _) = get(&e, query, host, &[]);
            set_cookie(&r)
                .unwrap()
                .split("; ")
                .find_map(|a| a.strip_prefix("Domain="))
                .map(str::to_owned)
        };
        assert_eq!(
            domain("cookie_domain=example.com", "example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            domain("cookie_domain=.EXAMPLE.com", "a.b.example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(domain("cookie_domain=example.com", "notexample.com"), None);
        assert_eq!(domain("cookie_domain=example.com", "evil.net"), None);
        assert_eq!(domain("cookie_domain=other.com", "www.other.com"), None);
        assert_eq!(
            domain("cookie_domain=example.net", "shop.example.net"),
            None
        );
        assert_eq!(
            domain("cookie_domain=shop.example.net", "shop.example.net").as_deref(),
            Some("shop.example.net")
        );
        assert_eq!(domain("r=1", "www.example.com"), None);
        assert_eq!(domain("cookie_domain=%FF", "www.example.com"), None);
    }

    #[test]
    fn opted_out_visitors_and_other_methods() {
        let e = endpoint();
        let (r, result) = get(&e, "", "example.com", &[("sec-gpc", "1")]);
        assert_eq!((r.status, result), (200, IdResult::OptedOut));
        assert_eq!(&r.body[..], b"{}");
        assert_eq!(set_cookie(&r), None);
        let (r, result) = ask(&e, Method::POST, "", "example.com", &[]);
        assert_eq!((r.status, result), (405, IdResult::Refused));
        assert_eq!(set_cookie(&r), None);
    }

    #[test]
    fn hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("127.0.0.1:1"), "127.0.0.1");
    }
}
