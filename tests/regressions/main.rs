//! Regression tests for what the fuzzers (fuzz/, see fuzz/run.sh) found, calling the library
//! functions directly with the minimized inputs. Each test names the fuzz target and the
//! artifact that found it.

use http::{HeaderMap, Method};
use postback_proxy::http::client_ip::ClientIpPolicy;
use postback_proxy::postback::auth::{KeyStore, WriteKeyConfig};
use postback_proxy::postback::config::PostbackConfig;
use postback_proxy::postback::fields::Fields;
use postback_proxy::postback::redirect::{RedirectConfig, RedirectError, RedirectPolicy};
use postback_proxy::postback::reply::Refusal;
use postback_proxy::postback::route::Format;
use postback_proxy::postback::{Postback, PostbackRequest, Target};
use postback_proxy::record::{Record, RecordRef};

fn redirect_policy(hosts: &str) -> RedirectPolicy {
    let cfg: RedirectConfig =
        serde_saphyr::from_str(&format!("{{allowed_hosts: {hosts}}}")).unwrap();
    RedirectPolicy::from_config(&cfg).unwrap()
}

/// fuzz target `redirect`: `https://%2E.example.org:8#g` was accepted for `*.example.org`.
/// The URL parser decodes the host to `..example.org`: no subdomain label at all, only empty
/// ones; `*.example.org` is "any subdomain, not the domain itself", and a resolver that drops
/// empty labels lands on the apex. The check in `RedirectPolicy::check` only asks that what
/// precedes `example.org` be longer than one byte and end in `.`.
#[test]
fn a_subdomain_pattern_needs_a_real_label() {
    let p = redirect_policy("['*.example.org', 'example.com']");
    for target in [
        "https://%2E.example.org:8#g",
        "https://..example.org/",
        "https://...example.org/",
        "https://%2E%2E.example.org/",
    ] {
        assert_eq!(
            p.check(target).map(|u| u.to_string()),
            Err(RedirectError::HostNotAllowed),
            "{target}"
        );
    }
    // Real subdomains stay allowed.
    assert!(p.check("https://a.example.org/").is_ok());
    assert!(p.check("https://a.b.example.org./").is_ok());
}

const KEY: &str = "regression-key";
const NOW: i64 = 1_764_245_000;

fn postback(extra: &str) -> Postback {
    let cfg: PostbackConfig = serde_saphyr::from_str(&format!("max_columns: 3\n{extra}")).unwrap();
    let keys: Vec<WriteKeyConfig> =
        serde_saphyr::from_str(&format!("- {{key: '{KEY}', databases: [web]}}")).unwrap();
    let keys = KeyStore::from_config(&keys).unwrap();
    Postback::from_config(&cfg, keys, ClientIpPolicy::default(), u64::MAX).unwrap()
}

/// The records of a GET, copied out of the request.
fn get(
    p: &Postback,
    query: &str,
    headers: &[(&'static str, &str)],
) -> Result<Vec<Record>, Refusal> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(*k, v.parse().unwrap());
    }
    p.handle(
        Target {
            database: "web",
            table: "t",
            default_format: Format::Json,
            privacy: None,
            enrich: &[],
        },
        &PostbackRequest {
            method: &Method::GET,
            query: Some(query),
            url_len: query.len(),
            headers: Fields::Map(&map),
            body: b"",
            peer: Some("203.0.113.7".parse().unwrap()),
            tls: false,
            now: NOW,
        },
    )
    .map(|o| o.records.iter().map(RecordRef::to_record).collect())
}

/// fuzz target `postback`: an accepted record never has more than `max_columns` columns, the
/// `td_bot` flag included (it is added after the column count is checked).
#[test]
fn a_bot_flag_does_not_pass_max_columns() {
    let p = postback("");
    let q = format!("td_write_key={KEY}&a=1&b=2&c=3");
    match get(&p, &q, &[("user-agent", "Googlebot/2.1")]) {
        Ok(records) => {
            for r in &records {
                assert!(
                    r.body.columns.len() <= 3,
                    "{} columns with max_columns 3: {:?}",
                    r.body.columns.len(),
                    r.body.columns
                );
            }
        }
        Err(refusal) => assert_eq!(refusal.kind.status(), 413),
    }
}
