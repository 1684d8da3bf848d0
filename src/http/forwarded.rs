//! The `X-Forwarded-For`, `-Proto` and `-Host` headers sent upstream, and the peer address.

use std::net::IpAddr;

use http::header;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::client_ip::ClientIpPolicy;
use crate::postback::fields::X_FORWARDED_FOR;

/// The TCP peer's address (IPv4-mapped IPv6 addresses as IPv4).
pub fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

/// Whether the request came over TLS.
pub fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Runs for every proxied request: adds `X-Forwarded-For`, `-Proto` and `-Host` to `upstream`.
/// From a trusted proxy (`client_ip.trusted_proxies`), the chain it sent is kept and extended;
/// from anyone else, what the client claimed is replaced.
pub fn add_forwarded_headers(
    session: &Session,
    policy: &ClientIpPolicy,
    upstream: &mut RequestHeader,
) -> Result<()> {
    let peer = peer_ip(session);
    let trusted = peer.is_some_and(|ip| policy.is_trusted(ip));
    if let Some(ip) = peer {
        let mut value = String::new();
        if trusted {
            for v in session
                .req_header()
                .headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
            {
                value.push_str(v);
                value.push_str(", ");
            }
        }
        value.push_str(&ip.to_string());
        upstream.insert_header("X-Forwarded-For", value)?;
    }
    let keep_proto = trusted && upstream.headers.contains_key("x-forwarded-proto");
    let keep_host = trusted && upstream.headers.contains_key("x-forwarded-host");
    if !keep_proto {
        let proto = if is_tls(session) { "https" } else { "http" };
        upstream.insert_header("X-Forwarded-Proto", proto)?;
    }
    if !keep_host {
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| req.uri.authority().and_then(|a| a.as_str().parse().ok()));
        match host {
            Some(host) => upstream.insert_header("X-Forwarded-Host", host)?,
            None => {
                upstream.remove_header("X-Forwarded-Host");
            }
        }
    }
    Ok(())
}
