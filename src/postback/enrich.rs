//! Columns a route adds to its records from what they carry: `enrich: [user_agent]`.
//!
//! `user_agent` parses the record's User-Agent with woothee, the classifier Treasure Data itself
//! uses, into `td_browser`, `td_browser_version`, `td_os`, `td_os_version` and
//! `td_device_category` (woothee's `name`, `version`, `os`, `os_version` and `category`: `pc`,
//! `smartphone`, `mobilephone`, `appliance`, `crawler`, `misc`). A field woothee does not know
//! (`UNKNOWN`) is left out, so an unknown agent adds nothing. The agent is the record's `td_ua`
//! column, or, without one, td-js-sdk's `td_user_agent`. A column the record already has with a
//! value of its own is kept; one that holds its own name (`td_browser=td_browser`, the
//! placeholder older td-js-sdk versions send) is filled in.
//!
//! Parsed agents are kept in a bounded LRU cache: a site's visitors use a few hundred distinct
//! agents, so a busy site parses each once.

use std::borrow::Cow;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use serde::Deserialize;

use super::reply::{ErrorKind, Refusal};
use crate::record::RecordRef;
use crate::sync::lock;

/// One entry of a route's `enrich:`. A closed list: a misspelt name is a parse error with its
/// line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enricher {
    /// Browser, OS and device category from the User-Agent (woothee).
    UserAgent,
}

impl Enricher {
    /// The name written in `enrich:`.
    pub fn name(self) -> &'static str {
        match self {
            Enricher::UserAgent => "user_agent",
        }
    }
}

/// The columns `user_agent` adds, in the order of woothee's fields they come from.
pub const USER_AGENT_COLUMNS: [&str; 5] = [
    "td_browser",
    "td_browser_version",
    "td_os",
    "td_os_version",
    "td_device_category",
];

/// How many distinct agents the cache holds.
const CACHE_ENTRIES: usize = 4096;

/// Agents longer than this are parsed every time and not cached, so the cache's memory stays
/// bounded (at most `CACHE_ENTRIES` times this, a few MiB) whatever clients send.
const MAX_CACHED_AGENT: usize = 512;

/// What one agent adds: (column, value) pairs.
type Columns = Arc<[(&'static str, String)]>;

/// The `user_agent` enricher with its cache; one per process, shared by every route.
pub struct UserAgents {
    parser: woothee::parser::Parser,
    cache: Mutex<LruCache<Box<str>, Columns>>,
}

impl Default for UserAgents {
    fn default() -> Self {
        UserAgents::new(CACHE_ENTRIES)
    }
}

impl UserAgents {
    /// An enricher whose cache holds `entries` agents (at least 1).
    pub fn new(entries: usize) -> Self {
        UserAgents {
            parser: woothee::parser::Parser::new(),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// The columns `agent` adds; from the cache when it was seen before.
    pub fn columns(&self, agent: &str) -> Columns {
        if agent.len() > MAX_CACHED_AGENT {
            return self.parse(agent);
        }
        if let Some(hit) = lock(&self.cache).get(agent) {
            return hit.clone();
        }
        // Parsed outside the lock: two threads may parse the same new agent once each.
        let columns = self.parse(agent);
        lock(&self.cache).put(agent.into(), columns.clone());
        columns
    }

    fn parse(&self, agent: &str) -> Columns {
        let Some(r) = self.parser.parse(agent) else {
            return Arc::new([]);
        };
        let fields = [r.name, r.version, r.os, &r.os_version, r.category];
        USER_AGENT_COLUMNS
            .iter()
            .zip(fields)
            .filter(|(_, v)| !v.is_empty() && *v != woothee::woothee::VALUE_UNKNOWN)
            .map(|(c, v)| (*c, v.to_owned()))
            .collect()
    }

    /// Adds the agent's columns to `record`; 413 when that takes it past `max_columns`.
    pub fn enrich(&self, record: &mut RecordRef<'_>, max_columns: usize) -> Result<(), Refusal> {
        let agent = ["td_ua", "td_user_agent"]
            .iter()
            .find_map(|c| record.get(c).filter(|v| !v.is_empty()));
        let Some(columns) = agent.map(|agent| self.columns(agent)) else {
            return Ok(());
        };
        for (name, value) in columns.iter() {
            match record.get(name) {
                Some(existing) if existing != *name => {}
                _ => record.insert(Cow::Borrowed(name), Cow::Owned(value.clone())),
            }
        }
        if record.len() > max_columns {
            return Err(Refusal::new(
                ErrorKind::PayloadTooLarge,
                format!("more than {max_columns} columns (the user_agent columns included)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
    pub const SAFARI_IOS: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
    pub const FIREFOX: &str =
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
    pub const GOOGLEBOT: &str =
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    pub const CURL: &str = "curl/8.5.0";

    fn cols(ua: &str) -> Vec<(&'static str, String)> {
        UserAgents::new(8).columns(ua).to_vec()
    }

    fn expect(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        pairs.iter().map(|(c, v)| (*c, v.to_string())).collect()
    }

    #[test]
    fn real_agents() {
        assert_eq!(
            cols(CHROME),
            expect(&[
                ("td_browser", "Chrome"),
                ("td_browser_version", "120.0.0.0"),
                ("td_os", "Windows 10"),
                ("td_os_version", "NT 10.0"),
                ("td_device_category", "pc"),
            ])
        );
        assert_eq!(
            cols(SAFARI_IOS),
            expect(&[
                ("td_browser", "Safari"),
                ("td_browser_version", "17.1"),
                ("td_os", "iPhone"),
                ("td_os_version", "17.1"),
                ("td_device_category", "smartphone"),
            ])
        );
        assert_eq!(
            cols(FIREFOX),
            expect(&[
                ("td_browser", "Firefox"),
                ("td_browser_version", "121.0"),
                ("td_os", "Linux"),
                ("td_device_category", "pc"),
            ])
        );
        assert_eq!(
            cols(GOOGLEBOT),
            expect(&[
                ("td_browser", "Googlebot"),
                ("td_device_category", "crawler")
            ])
        );
        // woothee's answer for command-line HTTP clients, as Treasure Data records it.
        assert_eq!(
            cols(CURL),
            expect(&[
                ("td_browser", "HTTP Library"),
                ("td_browser_version", "curl"),
                ("td_device_category", "misc"),
            ])
        );
        assert_eq!(cols("something/1.0"), expect(&[]));
        assert_eq!(cols(""), expect(&[]));
    }

    fn record<'a>(columns: &[(&'a str, &'a str)]) -> RecordRef<'a> {
        let columns = columns
            .iter()
            .map(|(a, b)| (Cow::Borrowed(*a), Cow::Borrowed(*b)))
            .collect();
        RecordRef::new("web", "t", 1, columns)
    }

    #[test]
    fn enriches_from_td_ua_or_td_user_agent_and_keeps_the_records_own_values() {
        let ua = UserAgents::new(8);
        let mut r = record(&[("td_ua", FIREFOX), ("td_browser", "Mine")]);
        ua.enrich(&mut r, 10).unwrap();
        assert_eq!(r.get("td_browser").unwrap(), "Mine");
        assert_eq!(r.get("td_os").unwrap(), "Linux");
        let sdk = format!("{CHROME};JSSDK/4.4.3");
        let mut r = record(&[("td_user_agent", &sdk), ("td_os", "td_os")]);
        ua.enrich(&mut r, 10).unwrap();
        assert_eq!(r.get("td_browser").unwrap(), "Chrome");
        assert_eq!(r.get("td_os").unwrap(), "Windows 10");
        let mut r = record(&[("page", "/")]);
        ua.enrich(&mut r, 1).unwrap();
        assert_eq!(r.len(), 1);
        let mut r = record(&[("td_ua", CHROME), ("a", "1")]);
        assert_eq!(
            ua.enrich(&mut r, 6).unwrap_err().kind,
            ErrorKind::PayloadTooLarge
        );
    }

    #[test]
    fn the_cache_is_bounded_and_serves_repeats() {
        let ua = UserAgents::new(2);
        let first = ua.columns(CHROME);
        assert!(Arc::ptr_eq(&first, &ua.columns(CHROME)));
        ua.columns(FIREFOX);
        ua.columns(GOOGLEBOT);
        assert_eq!(lock(&ua.cache).len(), 2);
        assert!(!Arc::ptr_eq(&first, &ua.columns(CHROME)));
        let long = format!("{CHROME} {}", "x".repeat(MAX_CACHED_AGENT));
        assert_eq!(ua.columns(&long)[0].1, "Chrome");
        assert!(lock(&ua.cache)
            .iter()
            .all(|(k, _)| k.len() <= MAX_CACHED_AGENT));
    }
}
