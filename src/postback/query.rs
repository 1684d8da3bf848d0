//! Decoding `application/x-www-form-urlencoded` text: query strings and form bodies.

use percent_encoding::percent_decode;

/// A query string that is not valid UTF-8 once decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// Splits `input` on `&`, each piece on its first `=`, and decodes both halves: `+` is a space,
/// `%XX` a byte, and the result must be UTF-8. Empty pieces (`a=1&&b=2`) are skipped; a piece
/// without `=` is a name with an empty value. Runs once per postback, on the query and on a form
/// body. The error names the parameter (never its value, which may be a write key).
pub fn parse_pairs(input: &[u8]) -> Result<Vec<(String, String)>, QueryError> {
    let mut pairs = Vec::new();
    for piece in input.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        let (name, value) = match piece.iter().position(|&b| b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        let name =
            decode(name).map_err(|_| QueryError("a parameter name is not valid UTF-8".into()))?;
        let value = decode(value).map_err(|_| {
            QueryError(format!(
                "the value of parameter `{}` is not valid UTF-8",
                name.escape_default()
            ))
        })?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Decodes one name or value. Most are plain (no `+`, no `%`): those are validated and copied
/// once; the others are decoded a `+`-separated piece at a time into one buffer of the right size.
fn decode(raw: &[u8]) -> Result<String, std::string::FromUtf8Error> {
    if !raw.iter().any(|&b| b == b'+' || b == b'%') {
        return String::from_utf8(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, piece) in raw.split(|&b| b == b'+').enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend(percent_decode(piece));
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plus_and_percent_and_odd_shapes() {
        let cases: [(&str, &[(&str, &str)]); 5] = [
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
        ];
        for (query, want) in cases {
            let got = parse_pairs(query.as_bytes()).unwrap();
            let got: Vec<_> = got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(got, want, "{query}");
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
    }
}
