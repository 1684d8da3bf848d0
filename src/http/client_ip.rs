//! The client's address: the TCP peer, or what trusted proxies say in `X-Forwarded-For`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::{parse_list, Problem};

/// `client_ip:`: who the client is, for `td_ip`, rate limits and the `X-Forwarded-For` sent upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientIpConfig {
    /// Addresses or CIDR blocks whose `X-Forwarded-For` is believed; none by default.
    pub trusted_proxies: Vec<String>,
    /// Zero the last IPv4 octet / the last 80 bits of IPv6 before the address is recorded.
    pub anonymize: bool,
}

/// Decides which address a record's `td_ip` gets.
#[derive(Clone, Debug, Default)]
pub struct ClientIpPolicy {
    trusted: Vec<IpNet>,
    anonymize: bool,
}

impl ClientIpPolicy {
    /// Builds the policy from `client_ip:`; a bad CIDR names its index.
    pub fn from_config(cfg: &ClientIpConfig) -> Result<Self, Vec<Problem>> {
        let (trusted, problems) =
            parse_list("client_ip.trusted_proxies", &cfg.trusted_proxies, |text| {
                parse_net(text)
                    .ok_or_else(|| format!("`{text}` is not an IP address or CIDR block"))
            });
        if problems.is_empty() {
            Ok(ClientIpPolicy {
                trusted,
                anonymize: cfg.anonymize,
            })
        } else {
            Err(problems)
        }
    }

    /// `true` when `ip` is one of the trusted proxies.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Runs for postbacks that record `td_ip` and for rate limiting: the peer when it is not
    /// trusted; otherwise the right-most `X-Forwarded-For` entry that is not trusted (entries to
    /// its left could have been written by anyone). Walking stops at an entry that is not an
    /// address, keeping the last trusted hop. `xff` yields each `X-Forwarded-For` header value in
    /// order. Not anonymized: see [`ClientIpPolicy::recorded`].
    pub fn client_ip<'a>(&self, peer: IpAddr, xff: impl Iterator<Item = &'a [u8]>) -> IpAddr {
        let peer = peer.to_canonical();
        let mut client = peer;
        if self.is_trusted(peer) {
            let entries: Vec<&[u8]> = xff.flat_map(|v| v.split(|&b| b == b',')).collect();
            for entry in entries.iter().rev() {
                let Some(ip) = parse_forwarded_entry(entry) else {
                    break;
                };
                client = ip;
                if !self.is_trusted(ip) {
                    break;
                }
            }
        }
        client
    }

    /// The address as a record keeps it: anonymized when the route's override or, without one,
    /// `client_ip.anonymize` says so.
    pub fn recorded(&self, ip: IpAddr, anonymize_override: Option<bool>) -> IpAddr {
        if anonymize_override.unwrap_or(self.anonymize) {
            anonymize(ip)
        } else {
            ip
        }
    }
}

fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// One `X-Forwarded-For` entry: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_forwarded_entry(raw: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

/// Zeroes the last IPv4 octet, or the last 80 bits of an IPv6 address.
pub fn anonymize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, 0))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 80) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(trusted: &[&str], anonymize: bool) -> ClientIpPolicy {
        ClientIpPolicy::from_config(&ClientIpConfig {
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            anonymize,
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn resolve(p: &ClientIpPolicy, peer: &str, xff: &[&str]) -> String {
        let client = p.client_ip(ip(peer), xff.iter().map(|s| s.as_bytes()));
        p.recorded(client, None).to_string()
    }

    #[test]
    fn untrusted_peer_ignores_xff() {
        let p = policy(&["10.0.0.0/8"], false);
        assert_eq!(resolve(&p, "198.51.100.9", &["1.2.3.4"]), "198.51.100.9");
    }

    #[test]
    fn trusted_peer_uses_rightmost_untrusted_entry() {
        let p = policy(&["10.0.0.0/8", "127.0.0.1"], false);
        assert_eq!(
            resolve(&p, "127.0.0.1", &["6.6.6.6, 203.0.113.7, 10.1.1.1"]),
            "203.0.113.7"
        );
        assert_eq!(
            resolve(&p, "127.0.0.1", &["6.6.6.6", "203.0.113.7:4711"]),
            "203.0.113.7"
        );
        assert_eq!(
            resolve(&p, "::ffff:127.0.0.1", &["[2001:db8::1]:80"]),
            "2001:db8::1"
        );
        // Everything trusted: the left-most address.
        assert_eq!(
            resolve(&p, "127.0.0.1", &["10.0.0.2, 10.0.0.3"]),
            "10.0.0.2"
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            resolve(&p, "127.0.0.1", &["6.6.6.6, unknown, 10.0.0.3"]),
            "10.0.0.3"
        );
        assert_eq!(resolve(&p, "127.0.0.1", &["nonsense"]), "127.0.0.1");
        assert_eq!(resolve(&p, "127.0.0.1", &[]), "127.0.0.1");
    }

    #[test]
    fn anonymizes() {
        let p = policy(&[], true);
        assert_eq!(resolve(&p, "203.0.113.7", &[]), "203.0.113.0");
        assert_eq!(resolve(&p, "2001:db8:1:2:3:4:5:6", &[]), "2001:db8:1::");
    }

    #[test]
    fn bad_cidr_names_the_entry() {
        let err = ClientIpPolicy::from_config(&ClientIpConfig {
            trusted_proxies: vec!["10.0.0.0/8".into(), "10.0.0.0/99".into()],
            anonymize: false,
        })
        .unwrap_err();
        assert_eq!(err[0].field, "client_ip.trusted_proxies[1]");
    }
}
