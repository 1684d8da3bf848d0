//! The frame codec: how one record is laid out in a segment, and how damage is recognised.
//!
//! A frame is `len: u32 LE`, `crc32: u32 LE` (of the next two fields), `appended_ms: u64 LE` (when
//! the record was accepted), then `len` bytes of the record's JSON.

use crate::record::{Record, RecordRef};

/// Bytes before a frame's payload.
pub const HEADER: usize = 16;

/// The largest payload (a record's JSON) a frame may carry. A longer record is refused before
/// the client is answered ([`super::super::DeliveryError::TooLarge`]); a longer length on disk is
/// damage.
pub const MAX_FRAME_PAYLOAD: usize = 64 << 20;

/// Appends one record's frame to `out`; returns the payload's length.
pub fn encode_frame(record: &RecordRef<'_>, appended_ms: u64, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    record.write_json(out);
    let len = out.len() - start - HEADER;
    out[start + 8..start + 16].copy_from_slice(&appended_ms.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    len
}

/// What [`decode_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A whole, valid frame of `size` bytes (header included).
    Record {
        record: Record,
        appended_ms: u64,
        size: usize,
    },
    /// The buffer ends before the frame does: `need` bytes are needed in all.
    Incomplete { need: usize },
    /// Not a valid frame: a torn write or corruption.
    Corrupt(&'static str),
}

/// What [`check_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Checked<'a> {
    /// A whole frame whose checksum holds, of `size` bytes (header included).
    Valid {
        payload: &'a [u8],
        appended_ms: u64,
        size: usize,
    },
    /// The buffer ends before the frame does: `need` bytes are needed in all.
    Incomplete { need: usize },
    /// Not a valid frame: a torn write or corruption.
    Corrupt(&'static str),
}

/// Checks the frame at the start of `buf` (length and checksum) without reading its record: the
/// buffer's reader hands the payload on as it is.
pub fn check_frame(buf: &[u8]) -> Checked<'_> {
    if buf.len() < HEADER {
        return Checked::Incomplete { need: HEADER };
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_FRAME_PAYLOAD {
        return Checked::Corrupt("impossible frame length");
    }
    let size = HEADER + len;
    if buf.len() < size {
        return Checked::Incomplete { need: size };
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc32fast::hash(&buf[8..size]) != crc {
        return Checked::Corrupt("checksum mismatch");
    }
    Checked::Valid {
        payload: &buf[HEADER..size],
        appended_ms: u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default()),
        size,
    }
}

/// Decodes the frame at the start of `buf`: [`check_frame`], then its record.
pub fn decode_frame(buf: &[u8]) -> Frame {
    match check_frame(buf) {
        Checked::Valid {
            payload,
            appended_ms,
            size,
        } => match serde_json::from_slice::<Record>(payload) {
            Ok(record) => Frame::Record {
                record,
                appended_ms,
                size,
            },
            Err(_) => Frame::Corrupt("not a record"),
        },
        Checked::Incomplete { need } => Frame::Incomplete { need },
        Checked::Corrupt(why) => Frame::Corrupt(why),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::record;
    use super::*;

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut buf = Vec::new();
        encode_frame(&RecordRef::from(&record(7)), 123, &mut buf);
        let size = buf.len();
        assert_eq!(
            decode_frame(&buf),
            Frame::Record {
                record: record(7),
                appended_ms: 123,
                size
            }
        );
        assert_eq!(decode_frame(&buf[..10]), Frame::Incomplete { need: HEADER });
        assert_eq!(
            decode_frame(&buf[..size - 1]),
            Frame::Incomplete { need: size }
        );
        let mut flipped = buf.clone();
        flipped[size - 2] ^= 1;
        assert_eq!(decode_frame(&flipped), Frame::Corrupt("checksum mismatch"));
        assert_eq!(
            decode_frame(&[0u8; 32]),
            Frame::Corrupt("impossible frame length")
        );
    }
}
