//! `identity:`: first-party identity on the site's own responses, as written in the file.

use serde::Deserialize;
use smart_default::SmartDefault;

use crate::units::HumanDuration;

/// Two years: the lifetime of every identity cookie unless configured.
const TWO_YEARS: HumanDuration = HumanDuration::secs(730 * 86400);

/// `identity:`. Every key has a default; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Cookies re-issued from the proxy on proxied HTML pages (td-js-sdk's `_td`, say), so they
    /// get a server-set lifetime. Default: none.
    pub extend_cookies: Vec<ExtendCookieConfig>,
    /// Also add `Set-Cookie` to responses a shared cache may store. Default: `false`.
    pub allow_cached: bool,
    /// td-js-sdk's server-side cookie endpoint (`fetchServerCookie`).
    pub server_cookie: ServerCookieConfig,
    /// The cookie domains a `/get_cookie_id?cookie_domain=D` request may ask for. Default: none
    /// (every server cookie is host-only).
    pub domains: Vec<String>,
}

/// One entry of `identity.extend_cookies`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendCookieConfig {
    /// The cookie's name (`_td`).
    pub name: String,
    /// The lifetime it is re-issued with. Default: `730d`.
    #[serde(default = "two_years")]
    pub max_age: HumanDuration,
    /// Its `Domain`: it must be the one the page's script writes (td-js-sdk's `cookieDomain`),
    /// or the browser keeps two cookies of that name. Default: none (host-only).
    pub domain: Option<String>,
    /// Add `HttpOnly` (not for a cookie the page's script must read, like `_td`). Default: `false`.
    #[serde(default)]
    pub http_only: bool,
}

/// `identity.server_cookie`.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct ServerCookieConfig {
    /// Answer `GET {path}`. Default: `false`.
    pub enabled: bool,
    /// Default: `/get_cookie_id`, where td-js-sdk asks.
    #[default("/get_cookie_id")]
    pub path: String,
    /// Default: `_td_ssc_id`, the cookie td-js-sdk reads.
    #[default("_td_ssc_id")]
    pub cookie: String,
    /// Default: `730d`.
    #[default(TWO_YEARS)]
    pub max_age: HumanDuration,
}

fn two_years() -> HumanDuration {
    TWO_YEARS
}
