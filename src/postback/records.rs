//! Building a postback's records from its parameters: the `time` column, the placeholders
//! (`td_ip`, `td_ua`, `td_global_id`) filled in as the privacy rules allow, and `max_columns`.

use std::borrow::Cow;
use std::fmt::Write;
use std::net::IpAddr;

use http::header;

use super::fields::X_FORWARDED_FOR;
use super::params::Params;
use super::reply::{ErrorKind, Refusal};
use super::{PostbackRequest, Target};
use crate::http::client_ip::ClientIpPolicy;
use crate::record::RecordRef;

/// What a record's columns may carry for this visitor, from the privacy assessment.
pub struct Identity<'a> {
    /// The visitor's global id (empty when identifiers are not allowed): borrowed from the
    /// request's cookie, or a new one.
    pub global_id: Cow<'a, str>,
    /// The route's `anonymize_ip` override.
    pub anonymize: Option<bool>,
    /// Identifiers (`td_global_id`) may be recorded: consent given and not opted out.
    pub identifiers: bool,
    /// The visitor opted out: no `td_ip`, `td_ua` or `td_global_id` column at all.
    pub strip: bool,
}

/// Makes the records of one request; the placeholders' values are worked out once. The records
/// borrow from the request (`'a`) where their columns needed no decoding.
pub struct RecordBuilder<'b, 'a> {
    req: &'b PostbackRequest<'a>,
    target: Target<'a>,
    client_ip: &'b ClientIpPolicy,
    identity: Identity<'a>,
    max_columns: usize,
    /// `td_ip`'s value, once worked out.
    ip: Option<String>,
    /// More than one record may take `td_ip`: keep `ip` for the next (else it is moved into the
    /// record).
    keep_ip: bool,
}

impl<'b, 'a> RecordBuilder<'b, 'a> {
    /// A builder for the records of `req` to `target`.
    pub fn new(
        req: &'b PostbackRequest<'a>,
        target: Target<'a>,
        client_ip: &'b ClientIpPolicy,
        identity: Identity<'a>,
        max_columns: usize,
    ) -> Self {
        RecordBuilder {
            req,
            target,
            client_ip,
            identity,
            max_columns,
            ip: None,
            keep_ip: true,
        }
    }

    /// One record at `time` with `columns` (a later column of the same name wins); 413 past
    /// `max_columns`.
    pub fn record(
        &mut self,
        time: i64,
        columns: impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
    ) -> Result<RecordRef<'a>, Refusal> {
        let mut kept = Vec::with_capacity(columns.size_hint().0);
        for (name, value) in columns {
            if let Some(value) = self.value(&name, value) {
                kept.push((name, value));
            }
        }
        let record = RecordRef::new(self.target.database, self.target.table, time, kept);
        if record.len() > self.max_columns {
            return Err(Refusal::new(
                ErrorKind::PayloadTooLarge,
                format!("more than {} columns", self.max_columns),
            ));
        }
        Ok(record)
    }

    /// The records of a request: one from the query's columns, or one per JSON object with the
    /// query's columns first. `time_of` gives a record's `time` from its `td_record_time`.
    pub fn records(
        &mut self,
        query: Params<'a>,
        objects: Option<Vec<Params<'a>>>,
        time_of: impl Fn(Option<&str>) -> i64,
    ) -> Result<Vec<RecordRef<'a>>, Refusal> {
        let base_time = time_of(query.record_time.as_deref());
        let Some(objects) = objects else {
            // One record: its `td_ip` column takes the address itself (should the query name
            // `td_ip` twice, the second works it out again).
            self.keep_ip = false;
            return Ok(vec![self.record(base_time, query.columns.into_iter())?]);
        };
        let mut records = Vec::with_capacity(objects.len());
        for object in objects {
            let time = match object.record_time.as_deref() {
                Some(t) => time_of(Some(t)),
                None => base_time,
            };
            let columns = query.columns.iter().cloned().chain(object.columns);
            records.push(self.record(time, columns)?);
        }
        Ok(records)
    }

    /// The value column `name` gets, or `None` when the privacy rules leave it out.
    fn value(&mut self, name: &str, value: Cow<'a, str>) -> Option<Cow<'a, str>> {
        match name {
            "td_ip" | "td_ua" | "td_global_id" if self.identity.strip => return None,
            "td_global_id" if !self.identity.identifiers => return None,
            _ if name != value => return Some(value),
            _ => {}
        }
        Some(match name {
            "td_ip" => {
                let ip = match self.ip.take() {
                    Some(ip) => ip,
                    None => client_ip(self.req, self.client_ip, self.identity.anonymize),
                };
                if self.keep_ip {
                    self.ip = Some(ip.clone());
                }
                Cow::Owned(ip)
            }
            "td_ua" => self
                .req
                .headers
                .get(&header::USER_AGENT)
                // `from_utf8` first: its ASCII fast path is many times quicker than the lossy
                // scan, which only a User-Agent that is not UTF-8 needs.
                .map(|v| match std::str::from_utf8(v) {
                    Ok(ua) => Cow::Borrowed(ua),
                    Err(_) => String::from_utf8_lossy(v),
                })
                .unwrap_or_default(),
            "td_global_id" => self.identity.global_id.clone(),
            _ => value,
        })
    }
}

/// The address `td_ip` records: the client by `client_ip:`, anonymized as configured.
fn client_ip(
    req: &PostbackRequest<'_>,
    policy: &ClientIpPolicy,
    anonymize: Option<bool>,
) -> String {
    let Some(peer) = req.peer else {
        return String::new();
    };
    let xff = req.headers.get_all(&X_FORWARDED_FOR);
    ip_text(policy.recorded(policy.client_ip(peer, xff), anonymize))
}

/// `ip` as `Display` writes it, IPv4 (the common case) without `fmt`'s machinery.
fn ip_text(ip: IpAddr) -> String {
    // Room for the longest IPv6 address: written without growing.
    let mut text = String::with_capacity(39);
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                if octet >= 100 {
                    text.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    text.push(char::from(b'0' + octet / 10 % 10));
                }
                text.push(char::from(b'0' + octet % 10));
            }
        }
        // Writing into a String cannot fail.
        IpAddr::V6(_) => {
            let _ = write!(text, "{ip}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// Every octet value in every position is written as `Display` writes it; IPv6 by `Display`.
    #[test]
    fn ip_is_written_as_display_writes_it() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_text(v6), "2001:db8::1");
        for n in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(n, 0, 9, 10),
                Ipv4Addr::new(99, n, 100, 255),
                Ipv4Addr::new(1, 200, n, 0),
                Ipv4Addr::new(255, 7, 30, n),
            ] {
                assert_eq!(ip_text(ip.into()), ip.to_string());
            }
        }
    }
}
