//! The record every sink receives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    pub time: i64,
    #[serde(flatten)]
    pub columns: BTreeMap<String, String>,
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
}
