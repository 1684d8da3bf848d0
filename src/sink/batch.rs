//! What a sink is handed: [`Batch`], the records of one delivery attempt and its id.
//!
//! With `buffer: disk` the records arrive as the JSON lines the buffer holds
//! ([`EncodedRecords`]): a sink that writes JSON lines (file, stdout, http) copies those bytes
//! through [`Batch::json_lines`], and the records are decoded only for a sink that asks for
//! them ([`Batch::records`]), once per batch.

use std::borrow::Cow;
use std::sync::OnceLock;

use log::error;

use crate::metrics;
use crate::record::Record;

/// One batch handed to [`super::LogSink::write_batch`]: the records, and an id for the batch.
///
/// The batch dereferences to its records (`batch.iter()`, `&batch[..]`).
pub struct Batch<'a> {
    records: Records<'a>,
    id: String,
}

enum Records<'a> {
    Decoded(&'a [Record]),
    Encoded(&'a EncodedRecords),
}

impl<'a> Batch<'a> {
    /// A batch of `records` with the id `id` (see [`Batch::id`]).
    pub fn new(records: &'a [Record], id: String) -> Self {
        Batch {
            records: Records::Decoded(records),
            id,
        }
    }

    /// A batch of the records in `encoded`, as the disk buffer read them.
    pub(crate) fn encoded(encoded: &'a EncodedRecords, id: String) -> Self {
        Batch {
            records: Records::Encoded(encoded),
            id,
        }
    }

    /// The records, in the order they were accepted (decoded on the first call when they came
    /// from the disk buffer).
    pub fn records(&self) -> &'a [Record] {
        match self.records {
            Records::Decoded(records) => records,
            Records::Encoded(encoded) => encoded.decoded(),
        }
    }

    /// How many records the batch holds.
    pub fn len(&self) -> usize {
        match self.records {
            Records::Decoded(records) => records.len(),
            Records::Encoded(encoded) => encoded.len(),
        }
    }

    /// `true` for a batch of no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each record as one JSON line with its `\n` (the format of [`Record::to_json_line`]), in
    /// order: borrowed from the disk buffer's bytes, or encoded now.
    pub fn json_lines(&self) -> impl Iterator<Item = Cow<'a, [u8]>> + 'a {
        let (decoded, encoded) = match self.records {
            Records::Decoded(records) => (records, None),
            Records::Encoded(encoded) => (&[][..], Some(encoded)),
        };
        let encode = decoded.iter().map(|record| {
            let mut line = Vec::with_capacity(record.approx_len());
            record.to_json_line(&mut line);
            Cow::Owned(line)
        });
        encode.chain(
            encoded
                .into_iter()
                .flat_map(EncodedRecords::lines)
                .map(Cow::Borrowed),
        )
    }

    /// Appends every record's JSON line to `out`: one copy of the disk buffer's bytes, or each
    /// record encoded straight into `out`.
    pub fn write_json_lines(&self, out: &mut Vec<u8>) {
        match self.records {
            Records::Decoded(records) => {
                for record in records {
                    record.to_json_line(out);
                }
            }
            Records::Encoded(encoded) => out.extend_from_slice(&encoded.text),
        }
    }

    /// An id for this batch: the same id is passed every time the same records are retried, and,
    /// for a sink whose [`super::LogSink::needs_stable_batch_ids`] is `true`, also after a restart
    /// when the buffer is `disk`, so a sink whose peer de-duplicates by id (the `td` sink)
    /// delivers exactly once. With `buffer: memory` it is unique per process only.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl<'a> IntoIterator for &Batch<'a> {
    type Item = &'a Record;
    type IntoIter = std::slice::Iter<'a, Record>;
    fn into_iter(self) -> Self::IntoIter {
        self.records().iter()
    }
}

impl std::ops::Deref for Batch<'_> {
    type Target = [Record];
    fn deref(&self) -> &[Record] {
        self.records()
    }
}

/// Records as JSON lines, the way a disk-buffer frame holds them (every frame's checksum already
/// checked); decoded into [`Record`]s only when a sink asks for them.
pub struct EncodedRecords {
    sink: String,
    text: Vec<u8>,
    /// Where each line ends in `text` (after its `\n`).
    ends: Vec<usize>,
    decoded: OnceLock<Vec<Record>>,
}

impl EncodedRecords {
    /// None yet, for the buffer of the sink `sink`.
    pub fn new(sink: &str) -> Self {
        EncodedRecords {
            sink: sink.to_owned(),
            text: Vec::new(),
            ends: Vec::new(),
            decoded: OnceLock::new(),
        }
    }

    /// Adds one record's JSON (a frame's payload).
    pub fn push(&mut self, json: &[u8]) {
        self.decoded.take();
        self.text.extend_from_slice(json);
        self.text.push(b'\n');
        self.ends.push(self.text.len());
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes of JSON held, newlines included.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// `true` when there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Forgets every record, keeping the allocations.
    pub fn clear(&mut self) {
        self.decoded.take();
        self.text.clear();
        self.ends.clear();
    }

    /// Each record's JSON line, with its `\n`.
    fn lines(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(s, &e)| &self.text[s..e])
    }

    /// The records, decoded once. A line that is not a record cannot come from this proxy's own
    /// writer behind a valid checksum; should one appear it is logged, counted as skipped bytes
    /// of the buffer, and left out.
    fn decoded(&self) -> &[Record] {
        self.decoded.get_or_init(|| {
            let mut records = Vec::with_capacity(self.len());
            for line in self.lines() {
                match serde_json::from_slice(line) {
                    Ok(record) => records.push(record),
                    Err(e) => {
                        error!(
                            "sink {}: a buffered line (a disk-buffer frame with a valid checksum, or a queued record) is not a record ({e}); its {} bytes are skipped",
                            self.sink,
                            line.len()
                        );
                        metrics::SPOOL_SKIPPED_BYTES
                            .with_label_values(&[&self.sink])
                            .inc_by(line.len() as u64);
                    }
                }
            }
            records
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::test_support::test_record;

    #[test]
    fn encoded_and_decoded_batches_give_the_same_records_and_lines() {
        let records: Vec<Record> = (0..3)
            .map(|i| test_record("web", "t", i, &[("page", "/a\"b"), ("n", &i.to_string())]))
            .collect();
        let mut encoded = EncodedRecords::new("main");
        for r in &records {
            let mut line = Vec::new();
            r.to_json_line(&mut line);
            encoded.push(&line[..line.len() - 1]);
        }
        let plain = Batch::new(&records, "a".into());
        let from_disk = Batch::encoded(&encoded, "a".into());
        assert_eq!((plain.len(), from_disk.len()), (3, 3));
        let lines: Vec<Vec<u8>> = plain.json_lines().map(Cow::into_owned).collect();
        let disk_lines: Vec<Vec<u8>> = from_disk.json_lines().map(Cow::into_owned).collect();
        assert_eq!(lines, disk_lines);
        assert!(lines.iter().all(|l| l.ends_with(b"}\n")));
        let (mut all, mut disk_all) = (Vec::new(), Vec::new());
        plain.write_json_lines(&mut all);
        from_disk.write_json_lines(&mut disk_all);
        assert_eq!(all, lines.concat());
        assert_eq!(disk_all, all);
        assert_eq!(from_disk.records(), &records[..]);
        assert_eq!(&from_disk[1], &records[1]);

        // More records after a decode are decoded again; clear keeps nothing.
        encoded.push(br#"{"database":"d","table":"t","record":{"time":1}}"#);
        assert_eq!(Batch::encoded(&encoded, "b".into()).records().len(), 4);
        encoded.clear();
        assert!(Batch::encoded(&encoded, "c".into()).is_empty());
        assert_eq!(Batch::encoded(&encoded, "c".into()).json_lines().count(), 0);
    }

    #[test]
    fn a_line_that_is_no_record_is_left_out_and_counted() {
        let mut encoded = EncodedRecords::new("batch-test-sink");
        encoded.push(br#"{"database":"d","table":"t","record":{"time":1}}"#);
        encoded.push(br#"{"not":"a record"}"#);
        let before = metrics::SPOOL_SKIPPED_BYTES
            .with_label_values(&["batch-test-sink"])
            .get();
        let batch = Batch::encoded(&encoded, "x".into());
        assert_eq!(batch.records().len(), 1);
        assert_eq!(batch.len(), 2);
        assert_eq!(
            metrics::SPOOL_SKIPPED_BYTES
                .with_label_values(&["batch-test-sink"])
                .get()
                - before,
            19
        );
    }
}
