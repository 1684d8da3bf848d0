//! Decoding `application/x-www-form-urlencoded` text: query strings and form bodies.

use std::borrow::Cow;
use std::ops::Range;

/// A query string that is not valid UTF-8 once decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// One decoded `name=value`: borrowed from the input where it needed no decoding.
pub type Pair<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Splits `input` on `&`, each piece on its first `=`, and decodes both halves: `+` is a space,
/// `%XX` a byte, and the result must be UTF-8. Empty pieces (`a=1&&b=2`) are skipped; a piece
/// without `=` is a name with an empty value. The error names the parameter (never its value,
/// which may be a write key).
pub fn parse_pairs(input: &[u8]) -> Result<Vec<Pair<'_>>, QueryError> {
    let mut pairs = Vec::with_capacity(max_pairs(input));
    for_each_pair(input, |name, value| pairs.push((name, value)))?;
    Ok(pairs)
}

/// The most pairs `input` can hold: one per `&`-separated piece (one vectorized pass).
pub fn max_pairs(input: &[u8]) -> usize {
    1 + memchr::memchr_iter(b'&', input).count()
}

/// [`parse_pairs`], handing each pair to `f` in order rather than collecting them. Runs once per
/// postback, on the query and on a form body; pairs before an error have been handed over.
pub fn for_each_pair<'a>(
    input: &'a [u8],
    f: impl FnMut(Cow<'a, str>, Cow<'a, str>),
) -> Result<(), QueryError> {
    // Checked once as a whole: a piece of valid UTF-8 cut at an ASCII `&` or `=` is valid too.
    pairs_of(input, std::str::from_utf8(input).ok(), f)
}

/// [`for_each_pair`] on text (a query string): no second UTF-8 check.
pub fn for_each_pair_in<'a>(
    input: &'a str,
    f: impl FnMut(Cow<'a, str>, Cow<'a, str>),
) -> Result<(), QueryError> {
    pairs_of(input.as_bytes(), Some(input), f)
}

/// The pairs of `input`; `text` is `input` when it is UTF-8 as a whole.
fn pairs_of<'a>(
    input: &'a [u8],
    text: Option<&'a str>,
    mut f: impl FnMut(Cow<'a, str>, Cow<'a, str>),
) -> Result<(), QueryError> {
    // One pass over the bytes finds the pieces, their first `=` and which halves need decoding.
    let mut piece = Piece::starting(0);
    for (i, &b) in input.iter().enumerate() {
        match b {
            b'&' => {
                piece.end(input, text, i, &mut f)?;
                piece = Piece::starting(i + 1);
            }
            b'=' if piece.eq.is_none() => piece.eq = Some(i),
            b'%' | b'+' if piece.eq.is_none() => piece.name_escaped = true,
            b'%' | b'+' => piece.value_escaped = true,
            _ => {}
        }
    }
    piece.end(input, text, input.len(), &mut f)
}

/// The `&`-separated piece being read.
struct Piece {
    start: usize,
    /// Where its first `=` is.
    eq: Option<usize>,
    name_escaped: bool,
    value_escaped: bool,
}

impl Piece {
    fn starting(start: usize) -> Piece {
        Piece {
            start,
            eq: None,
            name_escaped: false,
            value_escaped: false,
        }
    }

    /// Decodes the piece, which ends at `end`, and hands it to `f` (unless it is empty).
    fn end<'a>(
        &self,
        input: &'a [u8],
        text: Option<&'a str>,
        end: usize,
        f: &mut impl FnMut(Cow<'a, str>, Cow<'a, str>),
    ) -> Result<(), QueryError> {
        if self.start == end {
            return Ok(());
        }
        let (name, value) = match self.eq {
            Some(eq) => (self.start..eq, eq + 1..end),
            None => (self.start..end, end..end),
        };
        let name = decode(input, text, name, self.name_escaped)
            .map_err(|_| QueryError("a parameter name is not valid UTF-8".into()))?;
        let value = decode(input, text, value, self.value_escaped).map_err(|_| {
            QueryError(format!(
                "the value of parameter `{}` is not valid UTF-8",
                name.escape_default()
            ))
        })?;
        f(name, value);
        Ok(())
    }
}

/// Decodes the name or value at `range` of `input` (`text` is `input` when it is UTF-8). Most are
/// plain (no `+`, no `%`): those are borrowed; the others are decoded a `+`-separated piece at a
/// time into one buffer of the right size.
fn decode<'a>(
    input: &'a [u8],
    text: Option<&'a str>,
    range: Range<usize>,
    escaped: bool,
) -> Result<Cow<'a, str>, std::str::Utf8Error> {
    let raw = &input[range.clone()];
    if !escaped {
        return match text {
            Some(text) => Ok(Cow::Borrowed(&text[range])),
            None => std::str::from_utf8(raw).map(Cow::Borrowed),
        };
    }
    // Copied in runs between the bytes that need work (`+` and `%`), not byte by byte.
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.iter().position(|&b| b == b'+' || b == b'%') {
        out.extend_from_slice(&rest[..at]);
        let (byte, used) = match rest[at] {
            b'+' => (b' ', 1),
            _ => match (hex_digit(rest.get(at + 1)), hex_digit(rest.get(at + 2))) {
                (Some(high), Some(low)) => (high << 4 | low, 3),
                // A lone or broken escape is kept as written, as browsers do.
                _ => (b'%', 1),
            },
        };
        out.push(byte);
        rest = &rest[at + used..];
    }
    out.extend_from_slice(rest);
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|e| e.utf8_error())
}

/// The value of one hexadecimal digit, `None` for any other byte (or none).
fn hex_digit(byte: Option<&u8>) -> Option<u8> {
    match *byte? {
        b @ b'0'..=b'9' => Some(b - b'0'),
        b @ b'a'..=b'f' => Some(b - b'a' + 10),
        b @ b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plus_and_percent_and_odd_shapes() {
        let cases: [(&str, &[(&str, &str)]); 6] = [
            (
                "page=%2Fhome&q=a+b%2Bc&e=%E2%82%AC",
                &[("page", "/home"), ("q", "a b+c"), ("e", "€")],
            ),
            (
                "&&a&b=&=v&c=x=y",
                &[("a", ""), ("b", ""), ("", "v"), ("c", "x=y")],
            ),
            ("", &[]),
            // A lone or broken escape is kept as written, as browsers do.
            ("a=100%&b=%zz", &[("a", "100%"), ("b", "%zz")]),
            // `+` is a space even next to an escape; an escaped `+` stays one.
            (
                "a=%+b&c=%2+&d=+%2B+&e%2B=f+",
                &[("a", "% b"), ("c", "%2 "), ("d", " + "), ("e+", "f ")],
            ),
            // Only the half with an escape is decoded; the first `=` splits, escaped or not.
            (
                "a+b=c%26d=e&x=y+z&p%3Dq=r",
                &[("a b", "c&d=e"), ("x", "y z"), ("p=q", "r")],
            ),
        ];
        for (query, want) in cases {
            let got = parse_pairs(query.as_bytes()).unwrap();
            let got: Vec<_> = got.iter().map(|(k, v)| (&**k, &**v)).collect();
            assert_eq!(got, want, "{query}");
        }
    }

    /// The decoder against `percent-encoding`'s, applied to each `+`-separated piece: the same
    /// bytes (or the same refusal) for the odd shapes and for random inputs over the bytes that
    /// matter (`%`, `+`, hex digits of both cases, non-hex, non-ASCII).
    #[test]
    fn decodes_like_percent_encoding_does() {
        fn reference(raw: &[u8]) -> Result<String, std::str::Utf8Error> {
            let mut out = Vec::new();
            for (i, piece) in raw.split(|&b| b == b'+').enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                out.extend(percent_encoding::percent_decode(piece));
            }
            String::from_utf8(out).map_err(|e| e.utf8_error())
        }
        let alphabet = b"%+%+0aF9gZ-\xc3\xa9\xff";
        let mut inputs: Vec<Vec<u8>> = [
            "",
            "%",
            "%%",
            "%2",
            "%2+",
            "%+2",
            "%zz",
            "100%",
            "%41%4a%4A",
            "%E2%82%AC",
            "+++",
            "%%41",
            "a%2",
            "%c3%a9+%C3%A9",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let mut rng = fastrand::Rng::with_seed(12);
        for _ in 0..20_000 {
            let len = rng.usize(0..12);
            inputs.push(
                (0..len)
                    .map(|_| alphabet[rng.usize(..alphabet.len())])
                    .collect(),
            );
        }
        for raw in inputs {
            let got = decode(&raw, None, 0..raw.len(), true).map(Cow::into_owned);
            assert_eq!(got, reference(&raw), "{:?}", String::from_utf8_lossy(&raw));
        }
    }

    /// Whole queries against the plainest reading of the rules: split on `&`, drop empty pieces,
    /// split each on its first `=`, decode both halves.
    #[test]
    fn splits_like_the_plain_reading_does() {
        let alphabet = b"&&==%+2Fa";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..16);
            let raw: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            // `None`: some half is not UTF-8 once decoded (`%Fa`), which is an error.
            let want: Option<Vec<(String, String)>> = raw
                .split(|&b| b == b'&')
                .filter(|piece| !piece.is_empty())
                .map(|piece| {
                    let (name, value) = match piece.iter().position(|&b| b == b'=') {
                        Some(eq) => (&piece[..eq], &piece[eq + 1..]),
                        None => (piece, &piece[piece.len()..]),
                    };
                    let text = |half: &[u8]| {
                        decode(half, None, 0..half.len(), true)
                            .ok()
                            .map(Cow::into_owned)
                    };
                    Some((text(name)?, text(value)?))
                })
                .collect();
            let got = parse_pairs(&raw).ok().map(|pairs| {
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&raw));
        }
    }

    #[test]
    fn invalid_utf8_is_an_error_that_does_not_echo_the_value() {
        let err = parse_pairs(b"td_write_key=%FFsecret").unwrap_err();
        assert_eq!(
            err.0,
            "the value of parameter `td_write_key` is not valid UTF-8"
        );
        assert!(parse_pairs(b"%C3%28=1").is_err());
        assert!(parse_pairs(b"a=\xff").is_err());
        // Not UTF-8 as a whole, yet UTF-8 once decoded: a raw `\xC3` then `%A9` is "é".
        let pairs = parse_pairs(b"a=1&n=\xC3%A9&b=\xC3\xA9").unwrap();
        let pairs: Vec<_> = pairs.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(pairs, [("a", "1"), ("n", "é"), ("b", "é")]);
    }
}
