//! Cookie extension: re-issuing the visitor-id cookies a request carried on the proxied HTML page
//! that answers it, as server-set cookies with a long lifetime.
//!
//! Browsers cap the lifetime of cookies written by scripts (Safari: 7 days), and of cookies set
//! by a server on another address; a cookie the site's own response sets lives as long as it
//! says. The proxy serves the site, so it re-issues `_td` (say) with the same value on the page
//! response. Never for an opted-out visitor, never when the origin sets that cookie itself, never
//! for a value that is not a plausible id, and never on a response a shared cache may store
//! (it would hand one visitor's id to the next) unless `allow_cached`.

use http::{header, HeaderMap};

use super::config::IdentityConfig;
use super::{check_cookie, cookie_name, host_name, plausible_id};
use crate::config::Problem;
use crate::postback::cookie;
use crate::postback::fields::Fields;
use crate::postback::privacy::Assessment;

/// One cookie of `identity.extend_cookies`, checked.
#[derive(Debug)]
struct Extended {
    name: String,
    max_age_secs: u64,
    domain: Option<String>,
    http_only: bool,
}

/// `identity.extend_cookies` and `allow_cached`, checked.
#[derive(Debug, Default)]
pub struct CookieExtension {
    cookies: Vec<Extended>,
    allow_cached: bool,
}

/// What the proxy knows about a response when it decides.
pub struct Page<'a> {
    /// The request's headers (its `Cookie`s).
    pub request: &'a HeaderMap,
    /// The response's status.
    pub status: u16,
    /// The response's headers, as the origin sent them.
    pub response: &'a HeaderMap,
    /// The privacy rules' view of the visitor (`postback.privacy`).
    pub assessment: Assessment,
    /// The request came over TLS.
    pub tls: bool,
}

impl CookieExtension {
    /// Checks `identity.extend_cookies`; problems name their field.
    pub fn from_config(cfg: &IdentityConfig) -> Result<CookieExtension, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut cookies: Vec<Extended> = Vec::new();
        for (i, c) in cfg.extend_cookies.iter().enumerate() {
            let field = format!("identity.extend_cookies[{i}]");
            check_cookie(&mut problems, &field, ("name", &c.name), &c.max_age);
            if cookie_name(&c.name) && cookies.iter().any(|e| e.name == c.name) {
                problems.push(Problem::new(
                    format!("{field}.name"),
                    format!("`{}` is listed twice", c.name),
                ));
            }
            let domain = match &c.domain {
                None => None,
                Some(d) => host_name(d).or_else(|| {
                    problems.push(Problem::new(
                        format!("{field}.domain"),
                        "must be a host name such as example.com",
                    ));
                    None
                }),
            };
            cookies.push(Extended {
                name: c.name.clone(),
                max_age_secs: c.max_age.0.as_secs(),
                domain,
                http_only: c.http_only,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(CookieExtension {
            cookies,
            allow_cached: cfg.allow_cached,
        })
    }

    /// Whether any cookie is configured (nothing to do for any response otherwise).
    pub fn is_enabled(&self) -> bool {
        !self.cookies.is_empty()
    }

    /// The `Set-Cookie` values to add to `page`, each with its cookie's name; empty when none.
    pub fn set_cookies<'s>(&'s self, page: &Page<'_>) -> Vec<(&'s str, String)> {
        if self.cookies.is_empty()
            || !(200..300).contains(&page.status)
            || !is_html(page.response)
            || page.assessment.opted_out.is_some()
            || !page.assessment.identifiers_allowed
            || (!self.allow_cached && shared_cacheable(page.response))
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        for c in &self.cookies {
            let value = cookie::find_in(Fields::Map(page.request), &c.name);
            let Some(value) = value.filter(|v| plausible_id(v)) else {
                continue;
            };
            if sets_cookie(page.response, &c.name) {
                continue;
            }
            let mut line = format!("{}={value}; Max-Age={}; Path=/", c.name, c.max_age_secs);
            if let Some(domain) = &c.domain {
                line.push_str("; Domain=");
                line.push_str(domain);
            }
            line.push_str("; SameSite=Lax");
            if page.tls {
                line.push_str("; Secure");
            }
            if c.http_only {
                line.push_str("; HttpOnly");
            }
            out.push((c.name.as_str(), line));
        }
        out
    }
}

/// A `text/html` response (any parameters, any case).
fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/html"))
}

/// The response already sets cookie `name`.
fn sets_cookie(headers: &HeaderMap, name: &str) -> bool {
    headers.get_all(header::SET_COOKIE).iter().any(|v| {
        let v = v.as_bytes();
        let end = v.iter().position(|&b| b == b'=').unwrap_or(v.len());
        v[..end].trim_ascii() == name.as_bytes()
    })
}

/// A shared cache may store the response: `Cache-Control` has `public` or `s-maxage`, or has a
/// `max-age` above 0 and none of `private`, `no-store`, `no-cache`.
pub fn shared_cacheable(headers: &HeaderMap) -> bool {
    let (mut public, mut s_maxage, mut private, mut max_age) = (false, false, false, 0u64);
    for value in headers.get_all(header::CACHE_CONTROL) {
        let text = String::from_utf8_lossy(value.as_bytes());
        for directive in text.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n, Some(a.trim().trim_matches('"'))),
                None => (directive, None),
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "public" => public = true,
                "s-maxage" => s_maxage = true,
                "private" | "no-store" | "no-cache" => private = true,
                "max-age" => max_age = arg.and_then(|a| a.parse().ok()).unwrap_or(0),
                _ => {}
            }
        }
    }
    public || s_maxage || (!private && max_age > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extension(yaml: &str) -> CookieExtension {
        let cfg: IdentityConfig = serde_saphyr::from_str(yaml).unwrap();
        CookieExtension::from_config(&cfg).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    const CONFIG: &str = "{extend_cookies: [{name: _td, domain: .example.com}, {name: _td_global, max_age: 1d, http_only: true}]}";

    fn set(
        e: &CookieExtension,
        request: &[(&'static str, &str)],
        status: u16,
        response: &[(&'static str, &str)],
        tls: bool,
    ) -> Vec<String> {
        let (request, response) = (headers(request), headers(response));
        let assessment = crate::postback::privacy::PrivacyPolicy::from_config(
            &Default::default(),
            "postback.privacy",
        )
        .unwrap()
        .assess(Fields::Map(&request));
        e.set_cookies(&Page {
            request: &request,
            status,
            response: &response,
            assessment,
            tls,
        })
        .into_iter()
        .map(|(_, v)| v)
        .collect()
    }

    const HTML: (&str, &str) = ("content-type", "text/html; charset=utf-8");

    #[test]
    fn re_issues_the_cookies_the_request_carried() {
        let e = extension(CONFIG);
        let cookies = ("cookie", "a=1; _td=abc-123; _td_global=g.1");
        assert_eq!(
            set(&e, &[cookies], 200, &[HTML], false),
            [
                "_td=abc-123; Max-Age=63072000; Path=/; Domain=example.com; SameSite=Lax",
                "_td_global=g.1; Max-Age=86400; Path=/; SameSite=Lax; HttpOnly",
            ]
        );
        assert_eq!(
            set(
                &e,
                &[("cookie", "_td=x")],
                203,
                &[("content-type", "TEXT/HTML")],
                true
            ),
            ["_td=x; Max-Age=63072000; Path=/; Domain=example.com; SameSite=Lax; Secure"]
        );
        assert!(set(&e, &[("cookie", "other=1")], 200, &[HTML], false).is_empty());
        assert!(set(&e, &[], 200, &[HTML], false).is_empty());
    }

    #[test]
    fn never_where_it_must_not() {
        let e = extension(CONFIG);
        let c = ("cookie", "_td=abc");
        // Not a 2xx, not HTML.
        for status in [301, 304, 404, 500] {
            assert!(set(&e, &[c], status, &[HTML], false).is_empty(), "{status}");
        }
        assert!(set(
            &e,
            &[c],
            200,
            &[("content-type", "application/json")],
            false
        )
        .is_empty());
        assert!(set(&e, &[c], 200, &[], false).is_empty());
        // The origin sets it itself (another cookie of the origin's does not matter).
        assert!(set(
            &e,
            &[c],
            200,
            &[HTML, ("set-cookie", "_td=new; Path=/")],
            false
        )
        .is_empty());
        assert_eq!(
            set(&e, &[c], 200, &[HTML, ("set-cookie", "_tdx=1")], false).len(),
            1
        );
        // Not a plausible id.
        for bad in ["_td=", "_td=a b", "_td=\"a,b\"", "_td=%3Cscript%3E"] {
            assert!(
                set(&e, &[("cookie", bad)], 200, &[HTML], false).is_empty(),
                "{bad}"
            );
        }
        let long = format!("_td={}", "a".repeat(129));
        assert!(set(&e, &[("cookie", &long)], 200, &[HTML], false).is_empty());
        // Opted out (GPC is honoured by default).
        assert!(set(&e, &[c, ("sec-gpc", "1")], 200, &[HTML], false).is_empty());
    }

    #[test]
    fn shared_caches() {
        let e = extension(CONFIG);
        let c = ("cookie", "_td=abc");
        for cc in [
            "public",
            "public, max-age=60",
            "s-maxage=60",
            "max-age=60",
            "max-age=\"5\", must-revalidate",
        ] {
            assert!(
                set(&e, &[c], 200, &[HTML, ("cache-control", cc)], false).is_empty(),
                "{cc}"
            );
        }
        for cc in [
            "private, max-age=600",
            "no-store",
            "no-cache, max-age=60",
            "max-age=0",
            "must-revalidate",
        ] {
            assert_eq!(
                set(&e, &[c], 200, &[HTML, ("cache-control", cc)], false).len(),
                1,
                "{cc}"
            );
        }
        let allowed = extension("{allow_cached: true, extend_cookies: [{name: _td}]}");
        assert_eq!(
            set(
                &allowed,
                &[c],
                200,
                &[HTML, ("cache-control", "public")],
                false
            )
            .len(),
            1
        );
    }
}
