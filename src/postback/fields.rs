//! A request's header fields as the postback rules read them: Pingora's `HeaderMap`, or the
//! fields the fast path's reader found in the request's bytes, with no map built per request.

use http::{HeaderMap, HeaderName};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// A request's header fields. Lookups are by lower-case name and give the raw value bytes, in
/// the order the fields came, as `HeaderMap::get_all` does.
#[derive(Clone, Copy, Debug)]
pub enum Fields<'a> {
    /// Pingora's parsed request header.
    Map(&'a HeaderMap),
    /// `(name, value)` pairs as they came (the fast path's reader has checked that `http` would
    /// take each name and value).
    Raw(&'a [(&'a [u8], &'a [u8])]),
}

impl<'a> Fields<'a> {
    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// The first value of `name` when it is visible ASCII (or tabs), as `HeaderValue::to_str`.
    pub fn get_str(&self, name: &HeaderName) -> Option<&'a str> {
        self.get(name).and_then(visible_ascii)
    }

    /// Every value of `name`, in the order they came.
    pub fn get_all<'n>(&self, name: &'n HeaderName) -> Values<'a, 'n> {
        match *self {
            Fields::Map(map) => Values::Map(map.get_all(name).iter()),
            Fields::Raw(fields) => Values::Raw {
                name: name.as_str().as_bytes(),
                fields: fields.iter(),
            },
        }
    }
}

/// The values of one field name: see [`Fields::get_all`].
pub enum Values<'a, 'n> {
    Map(http::header::ValueIter<'a, http::HeaderValue>),
    Raw {
        name: &'n [u8],
        fields: std::slice::Iter<'a, (&'a [u8], &'a [u8])>,
    },
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(values) => values.next().map(|v| v.as_bytes()),
            Values::Raw { name, fields } => fields
                .find(|(n, _)| n.len() == name.len() && n.eq_ignore_ascii_case(name))
                .map(|&(_, v)| v),
        }
    }
}

/// `value` as text when every byte is visible ASCII or a tab (what `HeaderValue::to_str` takes).
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn raw_fields_read_as_the_map_does() {
        let wire: &[(&[u8], &[u8])] = &[
            (b"Host", b"example.com"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"cookie", b"a=1"),
            (b"x-forwarded-for", b"10.0.0.2, 10.0.0.3"),
            (b"User-Agent", b"caf\xc3\xa9"),
            (b"Origin", b"https://a.example\t"),
        ];
        let mut map = HeaderMap::new();
        for (n, v) in wire {
            map.append(
                HeaderName::from_bytes(n).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        let xff = HeaderName::from_static("x-forwarded-for");
        for fields in [Fields::Map(&map), Fields::Raw(wire)] {
            assert_eq!(
                fields.get_all(&xff).collect::<Vec<_>>(),
                [&b"10.0.0.1"[..], b"10.0.0.2, 10.0.0.3"],
                "{fields:?}"
            );
            assert_eq!(fields.get(&header::HOST), Some(&b"example.com"[..]));
            assert_eq!(fields.get_str(&header::COOKIE), Some("a=1"));
            // Not visible ASCII: no text, as `HeaderValue::to_str`.
            assert_eq!(fields.get_str(&header::USER_AGENT), None);
            assert_eq!(fields.get(&header::USER_AGENT), Some("café".as_bytes()));
            assert_eq!(fields.get_str(&header::ORIGIN), Some("https://a.example\t"));
            assert_eq!(fields.get(&header::CONTENT_TYPE), None);
            assert_eq!(fields.get_all(&header::CONTENT_TYPE).count(), 0);
        }
        for v in [&b"a\x7fb"[..], b"\x01", b"ok \x80"] {
            let value = http::HeaderValue::from_bytes(v).ok();
            assert_eq!(
                visible_ascii(v),
                value.as_ref().and_then(|v| v.to_str().ok()),
                "{v:?}"
            );
        }
    }
}
