//! Privacy and bot rules: opt-out signals, consent, and known robots.
//!
//! For each postback, [`PrivacyPolicy::assess`] reads the request headers and says whether the
//! visitor opted out (`DNT: 1`, `Sec-GPC: 1`, an opt-out cookie), whether identifiers may be kept
//! (consent), and whether the request comes from a robot or a prefetch. [`crate::postback`] then
//! drops the record, strips `td_ip`/`td_ua`/`td_global_id`, or flags it with `td_bot`.

use http::{header, HeaderName};
use serde::Deserialize;
use smart_default::SmartDefault;

use super::fields::Fields;
use crate::config::Problem;
use crate::postback::cookie;

/// What happens to the record of a visitor who opted out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptOutAction {
    /// Keep the record without `td_ip`, `td_ua` and `td_global_id`, and set no cookie.
    #[default]
    Strip,
    /// Keep no record (the answer is the same).
    Drop,
}

/// What happens to the record of a robot or a prefetch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BotAction {
    /// Keep the record with the column `td_bot` saying why (`user_agent` or `prefetch`).
    #[default]
    Flag,
    /// Keep no record (the answer is the same).
    Drop,
    /// Treat robots like everyone else.
    Off,
}

/// `postback.privacy:` (and `routes[].privacy:`, which replaces it for one route).
#[derive(Clone, Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Honour `DNT: 1`.
    pub honor_dnt: bool,
    /// Honour `Sec-GPC: 1` (Global Privacy Control, a legal opt-out in some places).
    #[default(true)]
    pub honor_gpc: bool,
    /// A cookie whose presence (with a value other than empty, `0` or `false`) means opted out.
    pub opt_out_cookie: Option<String>,
    /// What an opt-out does to the record.
    #[default(OptOutAction::Strip)]
    pub opted_out: OptOutAction,
    /// When set, identifiers (`td_global_id` and its cookie) are used only if this cookie is
    /// present with a value other than empty, `0` or `false`.
    pub consent_cookie: Option<String>,
    /// Overrides `postback.client_ip.anonymize` for the route.
    pub anonymize_ip: Option<bool>,
    /// What a robot or prefetch does to the record.
    #[default(BotAction::Flag)]
    pub bots: BotAction,
    /// More User-Agent substrings (case-insensitive) that mark robots.
    pub bot_user_agents: Vec<String>,
}

/// User-Agent substrings (lower case) of well-known robots, crawlers, link previewers and
/// headless browsers.
const KNOWN_BOTS: &[&str] = &[
    "bot",
    "crawler",
    "spider",
    "slurp",
    "crawl",
    "headlesschrome",
    "phantomjs",
    "facebookexternalhit",
    "embedly",
    "quora link preview",
    "whatsapp",
    "skypeuripreview",
    "bingpreview",
    "mediapartners-google",
    "adsbot-google",
    "apis-google",
    "feedfetcher",
    "python-requests",
    "python-urllib",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww-perl",
    "wget",
    "scrapy",
    "httpclient",
    "lighthouse",
    "pingdom",
    "uptimerobot",
    "statuscake",
    "gtmetrix",
];

/// The compiled rules.
#[derive(Clone, Debug)]
pub struct PrivacyPolicy {
    cfg: PrivacyConfig,
    /// The User-Agent needles as one automaton, ASCII case-insensitive (issue 12: one pass over
    /// the User-Agent instead of lower-casing it and searching it once per needle).
    bot_needles: aho_corasick::AhoCorasick,
    /// The same needles (lower case) for a SIMD search of a lower-cased copy of the User-Agent:
    /// about half the DFA's time, and no large table to miss in the cache. `None` where the CPU
    /// or the number of needles does not allow it.
    bot_needles_packed: Option<aho_corasick::packed::Searcher>,
}

/// A User-Agent up to this long is lower-cased on the stack for the packed search.
const PACKED_UA_MAX: usize = 512;

/// What the rules say about one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Assessment {
    /// The visitor opted out, and what to do about it.
    pub opted_out: Option<OptOutAction>,
    /// Identifiers may be kept and the global-id cookie set.
    pub identifiers_allowed: bool,
    /// Why the request looks automated (`user_agent`, `prefetch`), and what to do about it.
    pub bot: Option<(&'static str, BotAction)>,
    /// `td_ip` is anonymized.
    pub anonymize_ip: Option<bool>,
}

fn truthy(v: &str) -> bool {
    !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
}

impl PrivacyPolicy {
    /// Compiles `cfg`; problems are reported under `field`.
    pub fn from_config(cfg: &PrivacyConfig, field: &str) -> Result<PrivacyPolicy, Vec<Problem>> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("opt_out_cookie", &cfg.opt_out_cookie),
            ("consent_cookie", &cfg.consent_cookie),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| v.is_empty() || v.contains([';', '=', ' ', ',']))
            {
                problems.push(Problem::new(
                    format!("{field}.{name}"),
                    "must be a cookie name",
                ));
            }
        }
        if cfg.bot_user_agents.iter().any(|s| s.trim().is_empty()) {
            problems.push(Problem::new(
                format!("{field}.bot_user_agents"),
                "must not hold empty strings",
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut bot_needles: Vec<String> = KNOWN_BOTS.iter().map(|s| s.to_string()).collect();
        bot_needles.extend(
            cfg.bot_user_agents
                .iter()
                .map(|s| s.trim().to_ascii_lowercase()),
        );
        let bot_needles_packed = aho_corasick::packed::Searcher::new(bot_needles.iter());
        // A DFA: the scan for a User-Agent the packed searcher does not take.
        let bot_needles = aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(&bot_needles)
            .map_err(|e| {
                vec![Problem::new(
                    format!("{field}.bot_user_agents"),
                    e.to_string(),
                )]
            })?;
        Ok(PrivacyPolicy {
            cfg: cfg.clone(),
            bot_needles,
            bot_needles_packed,
        })
    }

    /// Runs for every accepted postback: reads the signals in `headers`.
    pub fn assess(&self, headers: Fields<'_>) -> Assessment {
        let header_is_1 =
            |name: &HeaderName| headers.get(name).is_some_and(|v| v.trim_ascii() == b"1");
        let cookie = |name: &str| cookie::find_in(headers, name);
        let opted_out = (self.cfg.honor_dnt && header_is_1(&header::DNT))
            || (self.cfg.honor_gpc && header_is_1(&SEC_GPC))
            || self
                .cfg
                .opt_out_cookie
                .as_deref()
                .and_then(cookie)
                .is_some_and(truthy);
        let consent = match self.cfg.consent_cookie.as_deref() {
            None => true,
            Some(name) => cookie(name).is_some_and(truthy),
        };
        let bot = if self.cfg.bots == BotAction::Off {
            None
        } else if is_prefetch(headers) {
            Some(("prefetch", self.cfg.bots))
        } else if self.is_bot_agent(headers) {
            Some(("user_agent", self.cfg.bots))
        } else {
            None
        };
        Assessment {
            opted_out: opted_out.then_some(self.cfg.opted_out),
            identifiers_allowed: consent && !opted_out,
            bot,
            anonymize_ip: self.cfg.anonymize_ip,
        }
    }

    fn is_bot_agent(&self, headers: Fields<'_>) -> bool {
        let Some(ua) = headers.get(&header::USER_AGENT) else {
            return false;
        };
        // As before the automaton: the User-Agent as (lossy) UTF-8, ASCII letters folded.
        match std::str::from_utf8(ua) {
            Ok(ua) => match &self.bot_needles_packed {
                Some(packed) if ua.len() <= PACKED_UA_MAX => {
                    let mut lower = [0u8; PACKED_UA_MAX];
                    let lower = &mut lower[..ua.len()];
                    lower.copy_from_slice(ua.as_bytes());
                    lower.make_ascii_lowercase();
                    packed.find(&*lower).is_some()
                }
                _ => self.bot_needles.is_match(ua),
            },
            Err(_) => self
                .bot_needles
                .is_match(String::from_utf8_lossy(ua).as_ref()),
        }
    }
}

/// `Purpose: prefetch`, `Sec-Purpose: prefetch` (also `prefetch;prerender`), `X-Moz: prefetch`,
/// `X-Purpose: preview`.
fn is_prefetch(headers: Fields<'_>) -> bool {
    PREFETCH_HEADERS.iter().any(|name| {
        headers.get(name).is_some_and(|v| {
            let v = String::from_utf8_lossy(v).to_ascii_lowercase();
            v.contains("prefetch") || v.contains("preview") || v.contains("prerender")
        })
    })
}

static SEC_GPC: HeaderName = HeaderName::from_static("sec-gpc");

/// The fields that announce a prefetch or a preview.
static PREFETCH_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("purpose"),
    HeaderName::from_static("sec-purpose"),
    HeaderName::from_static("x-purpose"),
    HeaderName::from_static("x-moz"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> PrivacyPolicy {
        let cfg: PrivacyConfig = serde_saphyr::from_str(yaml).unwrap();
        PrivacyPolicy::from_config(&cfg, "postback.privacy").unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn defaults_honour_gpc_not_dnt() {
        let p = policy("{}");
        assert_eq!(
            p.assess(Fields::Map(&headers(&[("sec-gpc", "1")])))
                .opted_out,
            Some(OptOutAction::Strip)
        );
        assert_eq!(
            p.assess(Fields::Map(&headers(&[("dnt", "1")]))).opted_out,
            None
        );
        let a = p.assess(Fields::Map(&headers(&[])));
        assert!(a.identifiers_allowed);
        assert_eq!(a.bot, None);
    }

    #[test]
    fn opt_out_cookie_and_consent() {
        let p = policy("{opt_out_cookie: td_optout, consent_cookie: consent, honor_dnt: true, opted_out: drop}");
        assert_eq!(
            p.assess(Fields::Map(&headers(&[(
                "cookie",
                "td_optout=1; consent=yes"
            )])))
            .opted_out,
            Some(OptOutAction::Drop)
        );
        assert_eq!(
            p.assess(Fields::Map(&headers(&[(
                "cookie",
                "td_optout=0; consent=yes"
            )])))
            .opted_out,
            None
        );
        assert!(
            p.assess(Fields::Map(&headers(&[("cookie", "consent=yes")])))
                .identifiers_allowed
        );
        assert!(
            !p.assess(Fields::Map(&headers(&[("cookie", "consent=false")])))
                .identifiers_allowed
        );
        assert!(!p.assess(Fields::Map(&headers(&[]))).identifiers_allowed);
        assert_eq!(
            p.assess(Fields::Map(&headers(&[("dnt", "1")]))).opted_out,
            Some(OptOutAction::Drop)
        );
    }

    #[test]
    fn bots_and_prefetch() {
        let p = policy("{bot_user_agents: [MyMonitor]}");
        let ua = |s: &str| p.assess(Fields::Map(&headers(&[("user-agent", s)]))).bot;
        assert_eq!(
            ua("Mozilla/5.0 (compatible; Googlebot/2.1)"),
            Some(("user_agent", BotAction::Flag))
        );
        assert_eq!(
            ua("facebookexternalhit/1.1"),
            Some(("user_agent", BotAction::Flag))
        );
        assert_eq!(ua("mymonitor 2.0"), Some(("user_agent", BotAction::Flag)));
        assert_eq!(ua("Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0"), None);
        assert_eq!(
            p.assess(Fields::Map(&headers(&[(
                "sec-purpose",
                "prefetch;prerender"
            )])))
            .bot,
            Some(("prefetch", BotAction::Flag))
        );
        assert_eq!(
            policy("{bots: off}")
                .assess(Fields::Map(&headers(&[("purpose", "prefetch")])))
                .bot,
            None
        );
    }

    #[test]
    fn the_packed_search_and_the_automaton_agree() {
        let p = policy("{bot_user_agents: [MyMonitor, \"Ünï Agent\"]}");
        let mut agents: Vec<String> = KNOWN_BOTS
            .iter()
            .map(|n| format!("Mozilla/5.0 ({}) x", n.to_ascii_uppercase()))
            .collect();
        agents.extend([
            "MYMONITOR".to_string(),
            "Ünï AGENT/1".to_string(),
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0".to_string(),
            "b".to_string(),
            // Past the stack copy: the automaton alone.
            format!("{}Bot", "x".repeat(PACKED_UA_MAX)),
            "x".repeat(PACKED_UA_MAX + 1),
        ]);
        for ua in &agents {
            let want = p.bot_needles.is_match(ua.as_str());
            let h = headers(&[("user-agent", ua)]);
            assert_eq!(p.is_bot_agent(Fields::Map(&h)), want, "{ua}");
        }
        assert!(p.bot_needles_packed.is_some(), "SIMD search on this CPU");
        assert_eq!(
            agents
                .iter()
                .filter(|ua| p.bot_needles.is_match(ua.as_str()))
                .count(),
            KNOWN_BOTS.len() + 3
        );
    }

    #[test]
    fn bad_cookie_names_are_problems() {
        let cfg: PrivacyConfig = serde_saphyr::from_str("{consent_cookie: 'a=b'}").unwrap();
        let err = PrivacyPolicy::from_config(&cfg, "routes[1].privacy").unwrap_err();
        assert_eq!(err[0].field, "routes[1].privacy.consent_cookie");
    }
}
