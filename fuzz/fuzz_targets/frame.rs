//! The disk buffer's framing: `decode_frame` on arbitrary bytes (a torn or corrupt segment), and
//! `encode_frame` then `decode_frame` on arbitrary records.
//!
//! Invariants: never panics; a decoded frame's size is at most the input's length and at least
//! the header; `Incomplete` asks for more than there is; a record encoded and decoded comes back
//! the same with exactly its frame's size, even when more bytes follow; flipping any byte of a
//! frame's header or payload never decodes to a different record.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use postback_proxy::delivery::disk::{decode_frame, encode_frame, Frame};
use postback_proxy::record::{Record, RecordBody, RecordRef};

#[derive(Arbitrary, Debug)]
struct Rec {
    database: String,
    table: String,
    time: i64,
    columns: Vec<(String, String)>,
    appended_ms: u64,
    trailing: Vec<u8>,
    flip_at: u16,
    flip_with: u8,
}

fn check_raw(data: &[u8]) {
    match decode_frame(data) {
        Frame::Record { size, .. } => {
            assert!(size <= data.len(), "size {size} > input {}", data.len());
            assert!(size > 16, "size {size} without a payload");
        }
        Frame::Incomplete { need } => assert!(need > data.len(), "need {need}"),
        Frame::Corrupt(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check_raw(data);

    let Ok(rec) = Rec::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let columns: BTreeMap<String, String> = rec
        .columns
        .into_iter()
        .filter(|(k, _)| k != "time")
        .collect();
    let record = Record {
        database: rec.database,
        table: rec.table,
        body: RecordBody {
            time: rec.time,
            columns,
        },
    };
    let mut buf = Vec::new();
    encode_frame(&RecordRef::from(&record), rec.appended_ms, &mut buf);
    let frame_len = buf.len();
    buf.extend_from_slice(&rec.trailing);
    match decode_frame(&buf) {
        Frame::Record {
            record: back,
            appended_ms,
            size,
        } => {
            assert_eq!(back, record);
            assert_eq!(appended_ms, rec.appended_ms);
            assert_eq!(size, frame_len);
        }
        other => panic!("an encoded frame did not decode: {other:?}"),
    }
    // Every shorter prefix is incomplete, never a record.
    for cut in [0, 1, 15, 16, frame_len / 2, frame_len - 1] {
        if cut < frame_len {
            assert!(
                matches!(decode_frame(&buf[..cut]), Frame::Incomplete { .. }),
                "prefix of {cut} bytes"
            );
        }
    }
    // A flipped byte inside the frame is detected (or, at worst, gives the same record).
    let at = rec.flip_at as usize % frame_len;
    let mut torn = buf[..frame_len].to_vec();
    torn[at] ^= rec.flip_with.max(1);
    check_raw(&torn);
    if let Frame::Record { record: r, .. } = decode_frame(&torn) {
        assert_eq!(
            r, record,
            "a corrupt frame decoded to another record (byte {at})"
        );
    }
});
