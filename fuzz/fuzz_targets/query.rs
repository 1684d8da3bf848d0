//! `query::parse_pairs` on arbitrary bytes: query strings and form bodies.
//!
//! Invariants: never panics; never more pairs than `&`-separated pieces; without `%` or `+` in a
//! valid UTF-8 input, decoding is the identity; what is decoded is what the `url` crate's
//! `form_urlencoded::parse` decodes; and what comes out, encoded again, parses back to the same
//! pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postback_proxy::postback::query::parse_pairs;

fuzz_target!(|data: &[u8]| {
    let Ok(pairs) = parse_pairs(data) else {
        // Errors only ever come from bytes that are not UTF-8 once decoded.
        assert!(data.contains(&b'%') || std::str::from_utf8(data).is_err());
        return;
    };
    let pairs: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    let pieces = data.split(|&b| b == b'&').filter(|p| !p.is_empty()).count();
    assert_eq!(pairs.len(), pieces, "one pair per non-empty piece");

    if let Ok(text) = std::str::from_utf8(data) {
        if !text.contains(['%', '+']) {
            let expected: Vec<(String, String)> = text
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (n, v) = p.split_once('=').unwrap_or((p, ""));
                    (n.to_owned(), v.to_owned())
                })
                .collect();
            assert_eq!(pairs, expected, "no escapes: the text itself");
        }
    }

    // The same pairs as the standard decoder (which replaces bad UTF-8 where we refuse it).
    let standard: Vec<(String, String)> = url::form_urlencoded::parse(data)
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(pairs, standard, "as form_urlencoded decodes it");

    // Round trip through the standard encoder.
    let encoded = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish();
    let again = parse_pairs(encoded.as_bytes()).expect("an encoded query parses");
    assert!(
        again
            .iter()
            .map(|(n, v)| (&**n, &**v))
            .eq(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))),
        "encoded {encoded:?}"
    );
});
