//! The record every sink receives.

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
        48 + self.database.len()
            + self.table.len()
            + self
                .body
                .columns
                .iter()
                .map(|(k, v)| k.len() + v.len() + 6)
                .sum::<usize>()
    }
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
}
