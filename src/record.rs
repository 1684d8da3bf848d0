//! The record every sink receives ([`Record`]), and the borrowed form a request's rules build
//! ([`RecordRef`]): its columns point into the request where they needed no decoding, and it is
//! written as JSON straight into the buffer; a [`Record`] is made from it only for a buffer that
//! keeps records in memory.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One event: the database and table it belongs to, its `time` (UNIX seconds) and its columns.
///
/// Written as `{"database":"web","table":"pageviews","record":{"time":1764245000,"page":"/home"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub database: String,
    pub table: String,
    #[serde(rename = "record")]
    pub body: RecordBody,
}

/// The `record` object: `time` and every other column as a string.
///
/// Written as one flat JSON object, `time` first, then the columns in name order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBody {
    pub time: i64,
    pub columns: BTreeMap<String, String>,
}

// By hand rather than `#[serde(flatten)]`: flatten buffers every field of the object in serde's
// generic `Content` before it sorts them, which made reading a disk-buffer frame back the
// largest single cost of a pixel's delivery.
impl Serialize for RecordBody {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + self.columns.len()))?;
        map.serialize_entry("time", &self.time)?;
        for (name, value) in &self.columns {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for RecordBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = RecordBody;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object with an integer `time` and string columns")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RecordBody, A::Error> {
        let mut time = None;
        let mut columns = BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "time" {
                if time.is_some() {
                    return Err(de::Error::duplicate_field("time"));
                }
                time = Some(map.next_value::<i64>()?);
            } else {
                let value = map.next_value::<String>()?;
                columns.insert(name, value);
            }
        }
        let time = time.ok_or_else(|| de::Error::missing_field("time"))?;
        Ok(RecordBody { time, columns })
    }
}

impl Record {
    /// The record's JSON, one line with its `\n`: the format of the file and stdout sinks.
    pub fn to_json_line(&self, out: &mut Vec<u8>) {
        // Serializing strings and integers into a Vec cannot fail.
        serde_json::to_writer(&mut *out, self).expect("record serializes");
        out.push(b'\n');
    }

    /// The `record` object alone, as JSON (the Kafka message value).
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).expect("record serializes")
    }

    /// The visitor's global id, where the record has one (the Kafka message key).
    pub fn global_id(&self) -> Option<&str> {
        self.body.columns.get("td_global_id").map(String::as_str)
    }

    /// Roughly how many bytes the record takes as JSON; used to size batches.
    pub fn approx_len(&self) -> usize {
        approx_len(
            &self.database,
            &self.table,
            self.body
                .columns
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }
}

/// A record whose columns are borrowed from the request they came from, where they needed no
/// decoding: what [`crate::postback::Postback::handle`] returns and delivery takes. Written as
/// JSON ([`RecordRef::write_json`]) exactly as the [`Record`] [`RecordRef::to_record`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub database: &'a str,
    pub table: &'a str,
    pub time: i64,
    /// Sorted by name, each name once.
    columns: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> RecordRef<'a> {
    /// A record of `columns`, in any order; of two columns with the same name the later wins.
    pub fn new(
        database: &'a str,
        table: &'a str,
        time: i64,
        mut columns: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    ) -> Self {
        // A stable sort keeps equal names in their order. `dedup_by` hands over each column
        // (`later`) with the one kept before it; the swap keeps the later value.
        columns.sort_by(|a, b| a.0.cmp(&b.0));
        columns.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        RecordRef {
            database,
            table,
            time,
            columns,
        }
    }

    /// The columns, in name order (`time` aside).
    pub fn columns(&self) -> &[(Cow<'a, str>, Cow<'a, str>)] {
        &self.columns
    }

    /// The value of column `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name).ok().map(|i| &*self.columns[i].1)
    }

    /// Sets column `name` to `value`, replacing the value it had.
    pub fn insert(&mut self, name: Cow<'a, str>, value: Cow<'a, str>) {
        match self.find(&name) {
            Ok(i) => self.columns[i].1 = value,
            Err(i) => self.columns.insert(i, (name, value)),
        }
    }

    /// How many columns the record has (`time` aside).
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// `true` for a record with no column but `time`.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The owned [`Record`] of the same content.
    pub fn to_record(&self) -> Record {
        Record {
            database: self.database.to_owned(),
            table: self.table.to_owned(),
            body: RecordBody {
                time: self.time,
                columns: self
                    .columns
                    .iter()
                    .map(|(k, v)| (k.clone().into_owned(), v.clone().into_owned()))
                    .collect(),
            },
        }
    }

    /// Roughly how many bytes the record takes as JSON, as [`Record::approx_len`].
    pub fn approx_len(&self) -> usize {
        approx_len(
            self.database,
            self.table,
            self.columns.iter().map(|(k, v)| (&**k, &**v)),
        )
    }

    /// Appends the record's JSON to `out`: the bytes `Record`'s `Serialize` gives for
    /// [`RecordRef::to_record`], written without serde's per-value dispatch. Runs for every
    /// accepted record, into the disk buffer's frame (and the live view's event).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        self.write_json_members(out);
        out.push(b'}');
    }

    /// [`RecordRef::write_json`] without the outer braces (`"database":…,"record":{…}`), for
    /// an object that carries the record's members among its own.
    pub fn write_json_members(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\"database\":");
        write_json_str(out, self.database);
        out.extend_from_slice(b",\"table\":");
        write_json_str(out, self.table);
        out.extend_from_slice(b",\"record\":{\"time\":");
        // Writing an integer into a Vec cannot fail.
        serde_json::to_writer(&mut *out, &self.time).expect("an integer serializes");
        for (name, value) in &self.columns {
            out.push(b',');
            write_json_str(out, name);
            out.push(b':');
            write_json_str(out, value);
        }
        out.push(b'}');
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.columns.binary_search_by(|(k, _)| (**k).cmp(name))
    }
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(record: &'a Record) -> Self {
        RecordRef {
            database: &record.database,
            table: &record.table,
            time: record.body.time,
            columns: record
                .body
                .columns
                .iter()
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                .collect(),
        }
    }
}

/// Appends `text` as a JSON string. Most need no escape and are copied whole; serde_json writes
/// the others, so that both give the same bytes.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    // serde_json escapes control characters, `"` and `\`, nothing else. No early exit, so that
    // the check is one vectorized pass.
    let plain = text.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        serde_json::to_writer(&mut *out, text).expect("a string serializes");
    }
}

fn approx_len<'s>(
    database: &str,
    table: &str,
    columns: impl Iterator<Item = (&'s str, &'s str)>,
) -> usize {
    // `{"database":"","table":"","record":{"time":}}` is 45 bytes, a `time` up to 19 digits, and
    // each column `,"":""`, so that a record needing no escapes fits.
    64 + database.len() + table.len() + columns.map(|(k, v)| k.len() + v.len() + 6).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_and_escaping() {
        let mut columns = BTreeMap::new();
        columns.insert("page".to_string(), "/home".to_string());
        columns.insert(
            "q\"uote".to_string(),
            "line\nbreak\u{0}</script>".to_string(),
        );
        let r = Record {
            database: "web".into(),
            table: "pageviews".into(),
            body: RecordBody {
                time: 1764245000,
                columns,
            },
        };
        let mut line = Vec::new();
        r.to_json_line(&mut line);
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            "{\"database\":\"web\",\"table\":\"pageviews\",\"record\":{\"time\":1764245000,\"page\":\"/home\",\"q\\\"uote\":\"line\\nbreak\\u0000</script>\"}}\n"
        );
        let back: Record = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            r.body_json(),
            br#"{"time":1764245000,"page":"/home","q\"uote":"line\nbreak\u0000</script>"}"#
        );
        assert!(r.approx_len() >= line.len() / 2);
        let plain = Record {
            database: "web".into(),
            table: "pageviews".into(),
            body: RecordBody {
                time: i64::MAX,
                columns: [("page".to_string(), "/home".to_string())].into(),
            },
        };
        let mut line = Vec::new();
        plain.to_json_line(&mut line);
        assert_eq!(
            plain.approx_len(),
            line.len() - 1,
            "fits a record without escapes"
        );
    }

    #[test]
    fn reading_a_record_back_needs_an_integer_time_and_string_columns() {
        let ok: RecordBody = serde_json::from_str(r#"{"page":"/a","time":5,"ab":"b"}"#).unwrap();
        assert_eq!(ok.time, 5);
        assert_eq!(
            ok.columns.into_iter().collect::<Vec<_>>(),
            vec![("ab".into(), "b".into()), ("page".into(), "/a".into())]
        );
        for bad in [
            r#"{"page":"/a"}"#,
            r#"{"time":"5"}"#,
            r#"{"time":5,"n":1}"#,
            r#"{"time":5,"time":6}"#,
            r#"[5]"#,
        ] {
            assert!(serde_json::from_str::<RecordBody>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_borrowed_record_sorts_keeps_the_later_column_and_writes_the_same_json() {
        let columns = vec![
            (Cow::Borrowed("page"), Cow::Borrowed("/a")),
            (
                Cow::Borrowed("q\"uote"),
                Cow::Owned("line\nbreak\u{0}".to_string()),
            ),
            (Cow::Borrowed("ab"), Cow::Borrowed("first")),
            (Cow::Borrowed("zz"), Cow::Borrowed("1")),
            (Cow::Borrowed("ab"), Cow::Borrowed("between")),
            (Cow::Borrowed("ab"), Cow::Borrowed("second")),
            (Cow::Borrowed("zz"), Cow::Borrowed("2")),
        ];
        let mut r = RecordRef::new("web", "pageviews", 1764245000, columns);
        assert_eq!(r.len(), 4);
        assert_eq!(r.get("ab"), Some("second"));
        assert_eq!(r.get("zz"), Some("2"));
        assert_eq!(r.get("z"), None);
        r.insert("td_bot".into(), "crawler".into());
        r.insert("page".into(), "/b".into());
        let names: Vec<&str> = r.columns().iter().map(|(k, _)| &**k).collect();
        assert_eq!(names, ["ab", "page", "q\"uote", "td_bot", "zz"]);

        let owned = r.to_record();
        let mut line = Vec::new();
        owned.to_json_line(&mut line);
        line.pop();
        let mut written = Vec::new();
        r.write_json(&mut written);
        assert_eq!(written, line);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            r#"{"database":"web","table":"pageviews","record":{"time":1764245000,"ab":"second","page":"/b","q\"uote":"line\nbreak\u0000","td_bot":"crawler","zz":"2"}}"#
        );
        assert_eq!(r.approx_len(), owned.approx_len());
        assert_eq!(RecordRef::from(&owned), r);
    }

    #[test]
    fn write_json_gives_the_bytes_serde_gives() {
        let mut texts: Vec<String> = (0u8..=0x7f).map(|b| format!("a{}b", b as char)).collect();
        texts.extend(
            [
                "",
                "plain",
                "é ü 日本",
                "\u{2028}",
                "\"\\",
                "</script>",
                "\u{7f}",
                "tab\t",
            ]
            .map(String::from),
        );
        texts.push("long and plain ".repeat(20));
        for text in &texts {
            let columns = vec![
                (Cow::Borrowed(text.as_str()), Cow::Borrowed("v")),
                (Cow::Borrowed("k"), Cow::Borrowed(text.as_str())),
            ];
            for time in [0, -1, 1764245000, i64::MIN, i64::MAX] {
                let r = RecordRef::new(text, "t", time, columns.clone());
                let mut out = b"prefix".to_vec();
                r.write_json(&mut out);
                assert_eq!(&out[..6], b"prefix");
                let serde = serde_json::to_vec(&r.to_record()).unwrap();
                assert_eq!(out[6..], serde, "{text:?}");
            }
        }
    }
}
