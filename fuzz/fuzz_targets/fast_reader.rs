//! The fast path's request-head reader (`http::fast::reader::parse`) on arbitrary bytes.
//!
//! Invariants: never panics; a `Request` lies inside the buffer, agrees with `httparse` (with
//! Pingora's 256-field limit) on the head's length, method, target and fields; its path and query
//! are exactly what `http::Uri` (and so Pingora's `RequestHeader`) makes of the target; every
//! field converts to an `http` name and value (which the connection loop relies on); a POST's
//! length is within the bound, GET and HEAD have none; no field that changes the framing or the
//! protocol (Transfer-Encoding, Upgrade, Expect) got through, nor a second Content-Length, Host or
//! Connection; the answer does not change when more bytes follow the head; and every strict
//! prefix of the head is `Partial`.
#![no_main]

use http::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use postback_proxy::http::fast::reader::{parse, FastMethod, Parsed};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max_body = u16::from_le_bytes([data[0], data[1]]) as usize;
    let buf = &data[2..];
    let Parsed::Request(head) = parse(buf, max_body, |_| true) else {
        return;
    };
    assert!(head.head_len <= buf.len());
    let target = head.target(buf);
    assert!(head.target.range().end <= head.head_len);
    assert_eq!(target.first(), Some(&b'/'));

    // What httparse says with Pingora's limit.
    let mut fields = vec![httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(n)) = req.parse(buf) else {
        panic!("httparse does not take the head the reader took");
    };
    assert_eq!(n, head.head_len);
    assert_eq!(req.version, Some(1));
    assert_eq!(req.path.map(str::as_bytes), Some(target));
    let method = match head.method {
        FastMethod::Get => "GET",
        FastMethod::Head => "HEAD",
        FastMethod::Post => "POST",
    };
    assert_eq!(req.method, Some(method));
    assert_eq!(req.headers.len(), head.fields().len());

    // Path and query as http::Uri (Pingora's RequestHeader) sees them.
    let uri: http::Uri = std::str::from_utf8(target)
        .expect("an ASCII target")
        .parse()
        .expect("http::Uri takes the target");
    assert_eq!(uri.path(), head.path(buf));
    assert_eq!(uri.query(), head.query(buf));

    let (mut lengths, mut hosts, mut connections) = (0, 0, 0);
    for (f, h) in head.fields().iter().zip(req.headers.iter()) {
        let name = &buf[f.name.range()];
        let value = &buf[f.value.range()];
        assert_eq!(name, h.name.as_bytes());
        assert_eq!(value, h.value);
        let name = HeaderName::from_bytes(name).expect("a valid field name");
        HeaderValue::from_bytes(value).expect("a valid field value");
        match name.as_str() {
            "content-length" => lengths += 1,
            "host" => hosts += 1,
            "connection" => connections += 1,
            "transfer-encoding" | "upgrade" | "expect" => panic!("{name} got through"),
            _ => {}
        }
    }
    assert!(lengths <= 1 && hosts <= 1 && connections <= 1);
    match head.method {
        FastMethod::Post => assert!(lengths == 1 && head.content_length <= max_body),
        _ => assert_eq!(head.content_length, 0),
    }

    // More bytes after the head change nothing; a strict prefix is partial.
    let mut longer = buf[..head.head_len].to_vec();
    longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        parse(&longer, max_body, |_| true),
        Parsed::Request(head.clone())
    );
    for cut in [head.head_len - 1, head.head_len / 2] {
        assert_eq!(
            parse(&buf[..cut], max_body, |_| true),
            Parsed::Partial,
            "prefix of {cut} bytes"
        );
    }
});
