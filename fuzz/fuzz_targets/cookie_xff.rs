//! `cookie::find` + `cookie::valid_global_id`, and `ClientIpPolicy::client_ip`, on arbitrary
//! `Cookie` and `X-Forwarded-For` header bytes.
//!
//! Invariants: never panics; a found cookie value is a piece of one of the headers and holds no
//! `;`; `valid_global_id` accepts only 1 to 64 of `A-Z a-z 0-9 - _ .`; the client address is the
//! peer when the peer is not trusted, and otherwise the peer or an address written in the headers,
//! always in canonical form, and never a trusted address when an untrusted one lies right of it.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postback_proxy::http::client_ip::{ClientIpConfig, ClientIpPolicy};
use postback_proxy::postback::cookie;

/// The input, one item per line: `C:` a `Cookie` header, `X:` an `X-Forwarded-For` header,
/// `P:` the TCP peer (an address; default 127.0.0.1, which is trusted), `N:` the cookie name
/// (`_td_global` unless given). Any other line is ignored. Header values are raw bytes.
#[derive(Debug, Default)]
struct Input<'a> {
    cookie_name: Option<&'a [u8]>,
    cookies: Vec<&'a [u8]>,
    peer: Option<&'a [u8]>,
    xff: Vec<&'a [u8]>,
}

fn parse(data: &[u8]) -> Input<'_> {
    let mut input = Input::default();
    for line in data.split(|&b| b == b'\n') {
        let (tag, rest) = (line.get(..2), line.get(2..).unwrap_or_default());
        match tag {
            Some(b"C:") => input.cookies.push(rest),
            Some(b"X:") => input.xff.push(rest),
            Some(b"P:") => input.peer = Some(rest),
            Some(b"N:") => input.cookie_name = Some(rest),
            _ => {}
        }
    }
    input
}

fn policy() -> &'static ClientIpPolicy {
    static POLICY: OnceLock<ClientIpPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let cfg: ClientIpConfig = serde_saphyr::from_str(
            "{trusted_proxies: ['127.0.0.1/32', '10.0.0.0/8', '2001:db8::/32'], anonymize: false}",
        )
        .expect("client_ip YAML");
        ClientIpPolicy::from_config(&cfg).expect("policy")
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let input = parse(data);
    // Cookies.
    let name = match input.cookie_name.map(std::str::from_utf8) {
        Some(Ok(name)) => name,
        Some(Err(_)) => return,
        None => "_td_global",
    };
    if let Some(value) = cookie::find(input.cookies.iter().copied(), name) {
        assert!(!value.contains(';'));
        assert!(
            input.cookies.iter().any(|h| contains(h, value.as_bytes())),
            "{value:?} is not in the headers"
        );
        if cookie::valid_global_id(value) {
            assert!((1..=64).contains(&value.len()));
            assert!(value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        }
    }

    // X-Forwarded-For.
    let peer = match input.peer {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(text) => match std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            Some(ip) => ip,
            None => return,
        },
    };
    let p = policy();
    let client = p.client_ip(peer, input.xff.iter().copied());
    assert_eq!(client, client.to_canonical(), "not canonical");
    let peer = peer.to_canonical();
    if !p.is_trusted(peer) {
        assert_eq!(client, peer, "an untrusted peer's XFF was believed");
        return;
    }
    if client == peer {
        return;
    }
    // Every header entry that parses as an address, in order.
    let entries: Vec<Option<IpAddr>> = input
        .xff
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|e| {
            let t = std::str::from_utf8(e).ok()?.trim();
            t.parse::<IpAddr>()
                .ok()
                .or_else(|| t.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
                .map(|ip| ip.to_canonical())
        })
        .collect();
    // The answer is the first untrusted address walking from the right, stopping at garbage.
    let mut expected = peer;
    for e in entries.iter().rev() {
        let Some(ip) = e else { break };
        expected = *ip;
        if !p.is_trusted(*ip) {
            break;
        }
    }
    assert_eq!(client, expected);
});
