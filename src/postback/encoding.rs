//! Compressed POST bodies: `Content-Encoding: gzip` or `deflate`, decompressed within
//! `max_body_bytes`.
//!
//! The decompressed size is bounded while decompressing: a zip bomb is refused (413) as soon as
//! its output passes the limit, without inflating the rest. The compressed body itself was
//! already bounded by the same limit when it was read. A stream that does not decompress is 400;
//! an encoding other than `gzip`, `x-gzip`, `deflate` or `identity` is 415.

use std::borrow::Cow;
use std::io::Read;

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use http::header;

use super::fields::{visible_ascii, Fields};
use super::reply::{ErrorKind, Refusal};

/// How a request body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Not compressed (no `Content-Encoding`, or `identity`).
    Identity,
    /// `gzip` (or `x-gzip`): one or more gzip members.
    Gzip,
    /// `deflate`: a zlib stream as RFC 9110 says, or, as some clients send, a raw deflate stream.
    Deflate,
}

/// The request's `Content-Encoding`; 415 for any other coding, or more than one.
pub fn of(headers: Fields<'_>) -> Result<Encoding, Refusal> {
    let mut codings = Vec::new();
    for value in headers.get_all(&header::CONTENT_ENCODING) {
        let Some(value) = visible_ascii(value) else {
            return Err(unsupported());
        };
        codings.extend(
            value
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty() && c != "identity"),
        );
    }
    match codings.as_slice() {
        [] => Ok(Encoding::Identity),
        [one] if one == "gzip" || one == "x-gzip" => Ok(Encoding::Gzip),
        [one] if one == "deflate" => Ok(Encoding::Deflate),
        _ => Err(unsupported()),
    }
}

fn unsupported() -> Refusal {
    Refusal::new(
        ErrorKind::UnsupportedMediaType,
        "Content-Encoding must be gzip or deflate (or none)",
    )
}

/// `body` decoded; `Err` 413 once the output passes `max` bytes, 400 for a broken stream.
pub fn decode(encoding: Encoding, body: &[u8], max: usize) -> Result<Cow<'_, [u8]>, Refusal> {
    match encoding {
        Encoding::Identity => Ok(Cow::Borrowed(body)),
        Encoding::Gzip => bounded(MultiGzDecoder::new(body), max),
        Encoding::Deflate if is_zlib(body) => bounded(ZlibDecoder::new(body), max),
        Encoding::Deflate => bounded(DeflateDecoder::new(body), max),
    }
}

/// A zlib header: compression method 8 and a header checksum that divides by 31.
fn is_zlib(body: &[u8]) -> bool {
    match body {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

/// Reads at most `max + 1` bytes out of `decoder`: one more than the limit is enough to know the
/// body is too large.
fn bounded(decoder: impl Read, max: usize) -> Result<Cow<'static, [u8]>, Refusal> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    decoder.take(limit).read_to_end(&mut out).map_err(|e| {
        Refusal::new(
            ErrorKind::BadRequest,
            format!("cannot decompress the body: {e}"),
        )
    })?;
    if out.len() > max {
        return Err(Refusal::new(
            ErrorKind::PayloadTooLarge,
            format!("the decompressed body is larger than {max} bytes"),
        ));
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;

    use super::*;
    use http::HeaderMap;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CONTENT_ENCODING, v.parse().unwrap());
        }
        h
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn content_encodings() {
        assert_eq!(of(Fields::Map(&headers(&[]))), Ok(Encoding::Identity));
        assert_eq!(
            of(Fields::Map(&headers(&["identity"]))),
            Ok(Encoding::Identity)
        );
        assert_eq!(of(Fields::Map(&headers(&["GZIP"]))), Ok(Encoding::Gzip));
        assert_eq!(of(Fields::Map(&headers(&["x-gzip"]))), Ok(Encoding::Gzip));
        assert_eq!(
            of(Fields::Map(&headers(&[" deflate "]))),
            Ok(Encoding::Deflate)
        );
        for bad in [
            &["br"][..],
            &["gzip, deflate"],
            &["gzip", "gzip"],
            &["zstd"],
        ] {
            assert_eq!(
                of(Fields::Map(&headers(bad))).unwrap_err().kind,
                ErrorKind::UnsupportedMediaType,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn gzip_and_both_kinds_of_deflate_decode() {
        let data = br#"{"page":"/home"}"#;
        assert_eq!(&*decode(Encoding::Gzip, &gzip(data), 100).unwrap(), data);
        // Two members, as `cat a.gz b.gz` makes.
        let mut two = gzip(b"ab");
        two.extend(gzip(b"cd"));
        assert_eq!(&*decode(Encoding::Gzip, &two, 100).unwrap(), b"abcd");
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(data).unwrap();
        assert_eq!(
            &*decode(Encoding::Deflate, &z.finish().unwrap(), 100).unwrap(),
            data
        );
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(data).unwrap();
        assert_eq!(
            &*decode(Encoding::Deflate, &raw.finish().unwrap(), 100).unwrap(),
            data
        );
        assert_eq!(&*decode(Encoding::Identity, data, 1).unwrap(), data);
    }

    #[test]
    fn the_decompressed_size_is_bounded() {
        let data = vec![b'a'; 1000];
        assert_eq!(
            decode(Encoding::Gzip, &gzip(&data), 1000).unwrap().len(),
            1000
        );
        assert_eq!(
            decode(Encoding::Gzip, &gzip(&data), 999).unwrap_err().kind,
            ErrorKind::PayloadTooLarge
        );
        // A bomb: 1 GiB of zeros would be about 1 MiB compressed; 64 MiB is enough to see that
        // only the limit's worth is inflated (this returns at once).
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100 << 10);
        let started = std::time::Instant::now();
        assert_eq!(
            decode(Encoding::Gzip, &bomb, 64 << 10).unwrap_err().kind,
            ErrorKind::PayloadTooLarge
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn broken_streams_are_bad_requests() {
        let good = gzip(b"hello world, hello world");
        let truncated = &good[..good.len() - 6];
        assert_eq!(
            decode(Encoding::Gzip, truncated, 100).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        assert_eq!(
            decode(Encoding::Gzip, b"not gzip at all", 100)
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
        let mut corrupt = good.clone();
        corrupt[12] ^= 0xff;
        assert_eq!(
            decode(Encoding::Gzip, &corrupt, 100).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        assert_eq!(
            decode(Encoding::Deflate, &[0x78, 0x9c, 0xff, 0xff], 100)
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
    }
}
