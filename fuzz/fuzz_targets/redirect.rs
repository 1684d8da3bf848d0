//! `RedirectPolicy::check`, then `redirect::location`, on arbitrary `td_redirect` values and
//! global ids.
//!
//! Invariants: never panics; an accepted target is an absolute http/https URL to an allowed host,
//! without credentials; its `Location` is a valid header value with no CR, LF, space or other
//! control character, parses again as a URL to the same scheme, host and port, and holds the
//! visitor's id wherever the target asked for it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postback_proxy::postback::redirect::RedirectConfig;
use postback_proxy::postback::redirect::{location, RedirectPolicy};

/// The input: the target URL, then optionally a 0xFF byte and the global id to substitute
/// (without it, an id shaped like the ones the proxy makes).
fn split(data: &[u8]) -> Option<(&str, &str)> {
    let (target, id) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], std::str::from_utf8(&data[i + 1..]).ok()?),
        None => (data, "5f0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d"),
    };
    Some((std::str::from_utf8(target).ok()?, id))
}

fn policy() -> &'static RedirectPolicy {
    static POLICY: OnceLock<RedirectPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let cfg: RedirectConfig = serde_saphyr::from_str(
            "{allowed_hosts: ['example.com', '*.example.org', '203.0.113.7', '[2001:db8::1]']}",
        )
        .expect("redirect YAML");
        RedirectPolicy::from_config(&cfg).expect("policy")
    })
}

/// The allow-list, written out: `example.com`, the two addresses, or a name that ends in
/// `.example.org` after something. (Empty labels, as in `a..example.org` or `example.com...`,
/// are let through by the policy: such a host can only ever resolve, if at all, inside the
/// allowed domain, so they are not counted as an escape here.)
fn allowed(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host == "example.com"
        || host == "203.0.113.7"
        || host == "[2001:db8::1]"
        || host
            .strip_suffix(".example.org")
            .is_some_and(|sub| !sub.trim_matches('.').is_empty())
}

fuzz_target!(|data: &[u8]| {
    let Some((target, id)) = split(data) else {
        return;
    };
    let Ok(url) = policy().check(target) else {
        return;
    };
    assert!(matches!(url.scheme(), "http" | "https"), "{url}");
    let host = url.host_str().expect("an accepted URL has a host");
    assert!(allowed(host), "host {host:?} of {:?} accepted", target);
    assert!(url.username().is_empty() && url.password().is_none());

    let loc = location(url.clone(), id);
    assert!(
        !loc.bytes().any(|b| b.is_ascii_control() || b == b' '),
        "Location {loc:?}"
    );
    assert!(
        http::HeaderValue::from_str(&loc).is_ok(),
        "Location {loc:?} is not a header value"
    );
    let again = url::Url::parse(&loc).unwrap_or_else(|e| panic!("Location {loc:?}: {e}"));
    assert_eq!(again.scheme(), url.scheme(), "{loc:?}");
    assert_eq!(again.host_str(), url.host_str(), "{loc:?}");
    assert_eq!(again.port_or_known_default(), url.port_or_known_default());
    assert_eq!(again.path(), url.path(), "{loc:?}");
    // Every parameter that asked for the id now holds it (percent-encoded).
    if let Some(q) = url.query() {
        let asked = q
            .split('&')
            .filter(|p| p.split_once('=').is_some_and(|(_, v)| v == "td_global_id"))
            .count();
        if asked > 0 {
            let got = again.query_pairs().filter(|(_, v)| v == id).count();
            assert!(got >= asked, "{loc:?}: {got} of {asked} ids");
        }
    }
});
