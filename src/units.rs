//! Human-written durations (`250ms`, `5s`, `7d`) and sizes (`64KiB`, `16MiB`) for the configuration file.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as `250ms`, `5s`, `10m`, `7d` (anything `humantime` reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// A duration of `secs` seconds.
    pub const fn secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }

    /// A duration of `ms` milliseconds.
    pub const fn millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "`{text}` is not a duration like 250ms, 5s, 7d: {e}"
                ))
            })
    }
}

/// A size in bytes, written as a plain integer or with a unit: `512B`, `64KiB`, `16MiB`, `1GiB`
/// (binary) or `64KB`, `16MB`, `1GB` (decimal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024 * 1024)
    }

    /// Parses `64KiB`, `16 MiB`, `1048064`; `None` for anything else, or a value that overflows.
    pub fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return None,
        };
        n.checked_mul(factor).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_word(d, "a size such as 1048064, 64KiB or 16MiB", |v| {
            ByteSize::parse(v).ok_or_else(|| {
                if v.starts_with('-') {
                    "a size must not be negative".to_string()
                } else {
                    format!("`{v}` is not a size such as 1048064, 64KiB or 16MiB")
                }
            })
        })
    }
}

/// Deserializes a value the file may write as a number or as a word (`acks: 1`, `acks: all`): a
/// number reaches `parse` as its decimal text. `expecting` names what is wanted; the message
/// `parse` refuses with is the error.
pub(crate) fn number_or_word<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    struct WordVisitor<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for WordVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_any(WordVisitor { expecting, parse })
}

/// Checks an address written `host:port`: a non-empty host name or IPv4 address, or an IPv6 address
/// in brackets, and a port from 1 to 65535. Used for every peer address of the configuration
/// (Kafka brokers, the Fluentd forward input), so they accept and refuse the same things.
pub fn check_host_port(address: &str) -> Result<(), &'static str> {
    const SHAPE: &str = "must be host:port with a port from 1 to 65535 (IPv6 in brackets)";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(SHAPE);
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && !host.contains([':', '/', ' ', '[', ']', ','])
            && !host.contains(char::is_whitespace)
    };
    if !host_ok {
        return Err(SHAPE);
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(SHAPE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("64KiB"), Some(ByteSize(65536)));
        assert_eq!(ByteSize::parse("16 MiB"), Some(ByteSize(16 << 20)));
        assert_eq!(ByteSize::parse("1048064"), Some(ByteSize(1_048_064)));
        assert_eq!(ByteSize::parse("2MB"), Some(ByteSize(2_000_000)));
        assert_eq!(ByteSize::parse("1GiB"), Some(ByteSize::gib(1)));
        assert_eq!(ByteSize::parse("12XB"), None);
        assert_eq!(ByteSize::parse("KiB"), None);
        assert_eq!(ByteSize::parse("-1"), None);
        assert_eq!(ByteSize::parse("99999999999999999999GiB"), None);
    }

    #[test]
    fn sizes_from_yaml() {
        let s: Vec<ByteSize> = serde_saphyr::from_str("[1048064, 64KiB]").unwrap();
        assert_eq!(s, vec![ByteSize(1_048_064), ByteSize::kib(64)]);
        let negative: Result<ByteSize, _> = serde_saphyr::from_str("-1");
        assert!(negative
            .unwrap_err()
            .to_string()
            .contains("must not be negative"));
        let bad: Result<ByteSize, _> = serde_saphyr::from_str("lots");
        assert!(bad.unwrap_err().to_string().contains("not a size"));
    }

    #[test]
    fn durations_from_yaml() {
        let d: Vec<HumanDuration> = serde_saphyr::from_str("[250ms, 5s, 10m, 7d]").unwrap();
        assert_eq!(
            d,
            vec![
                HumanDuration::millis(250),
                HumanDuration::secs(5),
                HumanDuration::secs(600),
                HumanDuration::secs(7 * 86400)
            ]
        );
        let bad: Result<HumanDuration, _> = serde_saphyr::from_str("soon");
        assert!(bad.unwrap_err().to_string().contains("not a duration"));
    }
}
