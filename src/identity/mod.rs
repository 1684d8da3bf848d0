//! First-party identity: what a proxy that serves the site itself can do for the visitor ids of
//! its tracking, which browsers' tracking prevention cuts short when scripts write them.
//!
//! - [`extend`]: on a proxied HTML page, re-issue the id cookies the request carried (td-js-sdk's
//!   `_td`) as server-set cookies with a long lifetime, unless the visitor opted out, the origin
//!   set the cookie itself, or a shared cache may store the response.
//! - [`server_cookie`]: td-js-sdk's `fetchServerCookie()` endpoint (`/get_cookie_id`), answered by
//!   the proxy with a server-set `_td_ssc_id`.
//!
//! Nothing here knows Pingora: the HTTP side hands over headers and gets back `Set-Cookie` values
//! or a [`crate::postback::reply::Reply`].

pub mod config;
pub mod extend;
pub mod server_cookie;

use crate::config::{parse_list, Problem};
use crate::units::HumanDuration;
use config::IdentityConfig;
use extend::CookieExtension;
use server_cookie::ServerCookie;

/// The compiled `identity:` section.
pub struct Identity {
    /// Cookie extension on proxied pages.
    pub extension: CookieExtension,
    /// The server cookie endpoint, when enabled.
    pub server_cookie: Option<ServerCookie>,
}

impl Identity {
    /// Checks `identity:`; every problem names its field. Runs once at start-up.
    pub fn from_config(cfg: &IdentityConfig) -> Result<Identity, Vec<Problem>> {
        let (domains, mut problems) = parse_list("identity.domains", &cfg.domains, |d| {
            host_name(d).ok_or_else(|| "must be a host name such as example.com".to_string())
        });
        let extension = CookieExtension::from_config(cfg).map_err(|p| problems.extend(p));
        let server_cookie = match cfg.server_cookie.enabled {
            false => Ok(None),
            true => ServerCookie::from_config(&cfg.server_cookie, domains).map(Some),
        }
        .map_err(|p| problems.extend(p));
        match (extension, server_cookie) {
            (Ok(extension), Ok(server_cookie)) if problems.is_empty() => Ok(Identity {
                extension,
                server_cookie,
            }),
            _ => Err(problems),
        }
    }
}

/// `true` for a plausible visitor id: 1 to 128 of `A-Z a-z 0-9 . _ -`. Anything else is never
/// re-issued nor kept.
pub fn plausible_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The checks every cookie the configuration names gets: `{field}.{name_key}` must be a cookie
/// name and `{field}.max_age` at least one second (a `Max-Age=0` cookie is deleted at once).
pub(crate) fn check_cookie(
    problems: &mut Vec<Problem>,
    field: &str,
    (name_key, name): (&str, &str),
    max_age: &HumanDuration,
) {
    if !cookie_name(name) {
        problems.push(Problem::new(
            format!("{field}.{name_key}"),
            "must be a cookie name",
        ));
    }
    if max_age.0.as_secs() == 0 {
        problems.push(Problem::new(
            format!("{field}.max_age"),
            "must be at least 1s",
        ));
    }
}

/// `true` for a cookie name (an RFC 9110 token).
pub(crate) fn cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// `name` as a cookie domain: lower case, without a leading dot; `None` when it is not a host
/// name.
pub(crate) fn host_name(name: &str) -> Option<String> {
    let name = name.strip_prefix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(yaml: &str) -> Result<Identity, Vec<Problem>> {
        let cfg: IdentityConfig = serde_saphyr::from_str(yaml).unwrap();
        Identity::from_config(&cfg)
    }

    #[test]
    fn defaults() {
        let cfg: IdentityConfig = serde_saphyr::from_str("{}").unwrap();
        assert!(cfg.extend_cookies.is_empty());
        assert!(!cfg.allow_cached);
        assert!(!cfg.server_cookie.enabled);
        assert_eq!(cfg.server_cookie.path, "/get_cookie_id");
        assert_eq!(cfg.server_cookie.cookie, "_td_ssc_id");
        assert_eq!(cfg.server_cookie.max_age.0.as_secs(), 730 * 86400);
        assert!(cfg.domains.is_empty());
        let cfg: IdentityConfig = serde_saphyr::from_str("extend_cookies: [{name: _td}]").unwrap();
        let c = &cfg.extend_cookies[0];
        assert_eq!(
            (c.max_age.0.as_secs(), c.domain.as_deref(), c.http_only),
            (730 * 86400, None, false)
        );
        let i = identity("{}").unwrap();
        assert!(i.server_cookie.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_field() {
        let err = serde_saphyr::from_str::<IdentityConfig>("allow_cache: true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_cache"), "{err}");
        let err = serde_saphyr::from_str::<IdentityConfig>(
            "extend_cookies:\n  - { name: _td, maxage: 1d }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("maxage") && err.contains('2'), "{err}");
        let err = serde_saphyr::from_str::<IdentityConfig>("server_cookie: { max_age: soon }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a duration"), "{err}");

        let fields = |yaml: &str| -> Vec<String> {
            identity(yaml)
                .err()
                .unwrap()
                .into_iter()
                .map(|p| p.field)
                .collect()
        };
        assert_eq!(
            fields("{extend_cookies: [{name: 'a b'}, {name: _td, domain: 'x;y'}, {name: _td}], domains: ['ex ample.com']}"),
            [
                "identity.domains[0]",
                "identity.extend_cookies[0].name",
                "identity.extend_cookies[1].domain",
                "identity.extend_cookies[2].name",
            ]
        );
        assert_eq!(
            fields("{extend_cookies: [{name: _td, max_age: 0s}]}"),
            ["identity.extend_cookies[0].max_age"]
        );
        assert_eq!(
            fields(
                "{server_cookie: {enabled: true, path: get_cookie_id, cookie: '', max_age: 0s}}"
            ),
            [
                "identity.server_cookie.path",
                "identity.server_cookie.cookie",
                "identity.server_cookie.max_age",
            ]
        );
        // A disabled endpoint is not checked.
        assert!(identity("{server_cookie: {path: nope}}").is_ok());
    }

    #[test]
    fn ids_and_names() {
        assert!(plausible_id("5f0b1c2d-aaaa.bbbb_cccc"));
        assert!(plausible_id(&"a".repeat(128)));
        assert!(!plausible_id(&"a".repeat(129)));
        assert!(!plausible_id(""));
        assert!(!plausible_id("a b"));
        assert!(!plausible_id("a;b"));
        assert!(!plausible_id("é"));
        assert_eq!(host_name(".Example.COM").as_deref(), Some("example.com"));
        assert_eq!(host_name("a..b"), None);
        assert_eq!(host_name("a_b.com"), None);
        assert!(cookie_name("_td_ssc_id"));
        assert!(!cookie_name("a=b"));
    }
}
