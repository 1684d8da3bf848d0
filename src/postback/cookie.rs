//! The global-id cookie: reading it from `Cookie` headers and writing `Set-Cookie`.

use std::fmt;

use http::header;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use smart_default::SmartDefault;

use super::fields::Fields;
use crate::config::Problem;
use crate::identity::check_cookie;
use crate::units::HumanDuration;

/// `SameSite` of the global-id cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

/// When the global-id cookie carries `Secure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecureSetting {
    /// When the request came over TLS.
    Auto,
    Always,
    Never,
}

impl<'de> Deserialize<'de> for SecureSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SecureSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto`, `true` or `false`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SecureSetting, E> {
                Ok(if v {
                    SecureSetting::Always
                } else {
                    SecureSetting::Never
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecureSetting, E> {
                match v {
                    "auto" => Ok(SecureSetting::Auto),
                    "true" => Ok(SecureSetting::Always),
                    "false" => Ok(SecureSetting::Never),
                    _ => Err(E::custom(format!(
                        "`{v}` is not one of `auto`, `true`, `false`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `postback.global_id:`: the cookie that carries the visitor's global id.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalIdConfig {
    #[default("_td_global")]
    pub cookie: String,
    #[default(HumanDuration::secs(730 * 86400))]
    pub max_age: HumanDuration,
    /// The cookie's `Domain`; none: the request host.
    pub domain: Option<String>,
    #[default(SameSite::Lax)]
    pub same_site: SameSite,
    #[default(SecureSetting::Auto)]
    pub secure: SecureSetting,
}

/// Finds the first cookie called `name` in the `Cookie` header values `headers`.
pub fn find<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<&'a str> {
    for header in headers {
        for pair in header.split(|&b| b == b';') {
            let Ok(pair) = std::str::from_utf8(pair) else {
                continue;
            };
            if let Some((n, v)) = pair.trim().split_once('=') {
                if n.trim() == name {
                    let v = v.trim();
                    return Some(
                        v.strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v),
                    );
                }
            }
        }
    }
    None
}

/// Finds the first cookie called `name` in the `Cookie` headers of `headers`.
pub fn find_in<'a>(headers: Fields<'a>, name: &str) -> Option<&'a str> {
    find(headers.get_all(&header::COOKIE), name)
}

/// `true` for a global id we accept back from a cookie: 1 to 64 of `A-Z a-z 0-9 - _ .`.
/// Anything else is treated as no cookie, and a fresh id is issued.
pub fn valid_global_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A fresh global id: a random UUID v4.
pub fn new_global_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// How the global-id cookie is written.
#[derive(Debug)]
pub struct GlobalIdCookie {
    /// The cookie's name.
    pub name: String,
    max_age_secs: u64,
    domain: Option<String>,
    same_site: SameSite,
    secure: SecureSetting,
}

impl GlobalIdCookie {
    /// Builds the writer from `postback.global_id`.
    pub fn from_config(cfg: &GlobalIdConfig) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        check_cookie(
            &mut problems,
            "postback.global_id",
            ("cookie", &cfg.cookie),
            &cfg.max_age,
        );
        if let Some(domain) = &cfg.domain {
            if domain.is_empty()
                || !domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
            {
                problems.push(Problem::new(
                    "postback.global_id.domain",
                    "must be a host name such as .example.com",
                ));
            }
        }
        if cfg.same_site == SameSite::None && cfg.secure == SecureSetting::Never {
            problems.push(Problem::new(
                "postback.global_id.same_site",
                "`None` requires `secure: true` or `auto`",
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(GlobalIdCookie {
            name: cfg.cookie.clone(),
            max_age_secs: cfg.max_age.0.as_secs(),
            domain: cfg.domain.clone(),
            same_site: cfg.same_site,
            secure: cfg.secure,
        })
    }

    /// The `Set-Cookie` value for a newly issued `id`; `tls` says whether the request came over TLS.
    pub fn set_cookie(&self, id: &str, tls: bool) -> String {
        let mut out = format!(
            "{}={}; Max-Age={}; Path=/",
            self.name, id, self.max_age_secs
        );
        if let Some(domain) = &self.domain {
            out.push_str("; Domain=");
            out.push_str(domain);
        }
        out.push_str(match self.same_site {
            SameSite::Strict => "; SameSite=Strict",
            SameSite::Lax => "; SameSite=Lax",
            SameSite::None => "; SameSite=None",
        });
        let secure = match self.secure {
            SecureSetting::Always => true,
            SecureSetting::Never => false,
            // SameSite=None is dropped by browsers without Secure, so it implies Secure.
            SecureSetting::Auto => tls || self.same_site == SameSite::None,
        };
        if secure {
            out.push_str("; Secure");
        }
        out.push_str("; HttpOnly");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cookie() {
        let headers: [&[u8]; 2] = [b"a=1; _td_global=abc-123", b"_td_global=second"];
        assert_eq!(find(headers.into_iter(), "_td_global"), Some("abc-123"));
        let headers: [&[u8]; 1] = [b"x_td_global=1;_td_global=\"q\" ; y=2"];
        assert_eq!(find(headers.into_iter(), "_td_global"), Some("q"));
        let headers: [&[u8]; 1] = [b"other=1; broken; \xff=2"];
        assert_eq!(find(headers.into_iter(), "_td_global"), None);
        assert_eq!(find(std::iter::empty(), "_td_global"), None);
    }

    #[test]
    fn validates_ids() {
        assert!(valid_global_id(&new_global_id()));
        assert!(!valid_global_id(""));
        assert!(!valid_global_id("a b"));
        assert!(!valid_global_id("a\"b"));
        assert!(!valid_global_id(&"a".repeat(65)));
    }

    #[test]
    fn set_cookie_attributes() {
        let mut cfg = GlobalIdConfig::default();
        let c = GlobalIdCookie::from_config(&cfg).unwrap();
        assert_eq!(
            c.set_cookie("id1", false),
            "_td_global=id1; Max-Age=63072000; Path=/; SameSite=Lax; HttpOnly"
        );
        assert_eq!(
            c.set_cookie("id1", true),
            "_td_global=id1; Max-Age=63072000; Path=/; SameSite=Lax; Secure; HttpOnly"
        );
        cfg.domain = Some(".example.com".into());
        cfg.same_site = SameSite::None;
        let c = GlobalIdCookie::from_config(&cfg).unwrap();
        assert!(c
            .set_cookie("x", false)
            .contains("; Domain=.example.com; SameSite=None; Secure"));
        cfg.secure = SecureSetting::Never;
        assert_eq!(
            GlobalIdCookie::from_config(&cfg).unwrap_err()[0].field,
            "postback.global_id.same_site"
        );
        cfg.secure = SecureSetting::Auto;
        cfg.domain = Some("evil; Path=/x".into());
        assert_eq!(
            GlobalIdCookie::from_config(&cfg).unwrap_err()[0].field,
            "postback.global_id.domain"
        );
        // A cookie that would be deleted at once, or one no browser takes, is refused.
        let cfg = GlobalIdConfig {
            cookie: "a b".into(),
            max_age: HumanDuration::secs(0),
            ..GlobalIdConfig::default()
        };
        let problems: Vec<String> = GlobalIdCookie::from_config(&cfg)
            .unwrap_err()
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect();
        assert_eq!(
            problems,
            [
                "postback.global_id.cookie: must be a cookie name",
                "postback.global_id.max_age: must be at least 1s"
            ]
        );
    }
}
