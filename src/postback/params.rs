//! Where a postback's columns come from: the query string, a form body, one JSON object, or a
//! td-js-sdk batch of events; and the special parameters (`td_format`, `td_write_key`,
//! `td_record_time`, `td_redirect`) that are never columns.

use std::borrow::Cow;

use http::{header, Method};
use serde_json::Value;

use super::fields::Fields;
use super::query::{for_each_pair, for_each_pair_in, max_pairs, Pair};
use super::reply::{ErrorKind, Refusal};

/// The special parameters and the columns gathered from a query, form or JSON object; what
/// needed no decoding is borrowed from the request.
#[derive(Default)]
pub struct Params<'a> {
    pub format: Option<Cow<'a, str>>,
    pub write_key: Option<Cow<'a, str>>,
    pub record_time: Option<Cow<'a, str>>,
    pub redirect: Option<Cow<'a, str>>,
    /// In order; a later column with the same name wins.
    pub columns: Vec<Pair<'a>>,
}

/// A request's parameters: the query's (and a form body's), and for a JSON body one set per
/// record to make.
pub struct Parsed<'a> {
    /// From the query string and, for a form body, the body.
    pub query: Params<'a>,
    /// `Some` for JSON bodies: one record per object. `None`: one record from `query`.
    pub objects: Option<Vec<Params<'a>>>,
}

/// A 400 with `message`.
pub fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::BadRequest, message)
}

impl Parsed<'_> {
    /// The same parameters, each copied: for a body that was decompressed into a buffer of its
    /// own.
    pub fn into_owned(self) -> Parsed<'static> {
        Parsed {
            query: self.query.into_owned(),
            objects: self
                .objects
                .map(|objects| objects.into_iter().map(Params::into_owned).collect()),
        }
    }
}

impl<'a> Params<'a> {
    /// The same parameters, each copied.
    pub fn into_owned(self) -> Params<'static> {
        let owned = |v: Option<Cow<'a, str>>| v.map(|v| Cow::Owned(v.into_owned()));
        Params {
            format: owned(self.format),
            write_key: owned(self.write_key),
            record_time: owned(self.record_time),
            redirect: owned(self.redirect),
            columns: self
                .columns
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), Cow::Owned(v.into_owned())))
                .collect(),
        }
    }

    fn add(&mut self, name: Cow<'a, str>, value: Cow<'a, str>) {
        match &*name {
            "td_format" => self.format = Some(value),
            "td_write_key" => self.write_key = Some(value),
            "td_record_time" => self.record_time = Some(value),
            "td_redirect" => self.redirect = Some(value),
            // `time` is always the proxy's; an empty name is no column.
            "" | "time" => {}
            _ => self.columns.push((name, value)),
        }
    }

    /// The parameters of a query string.
    fn from_query(query: &'a str) -> Result<Params<'a>, Refusal> {
        let mut p = Params {
            columns: Vec::with_capacity(max_pairs(query.as_bytes())),
            ..Params::default()
        };
        for_each_pair_in(query, |name, value| p.add(name, value)).map_err(|e| bad(e.0))?;
        Ok(p)
    }

    /// Columns and `td_record_time` from a JSON object. Strings are kept, other scalars and nested
    /// values become their JSON text, `null` is no column. Write keys, formats and redirects in a
    /// body are ignored (and never become columns).
    fn from_json_object(object: serde_json::Map<String, Value>) -> Params<'a> {
        let mut p = Params::default();
        for (name, value) in object {
            let value = match value {
                Value::Null => continue,
                Value::String(s) => s,
                other => other.to_string(),
            };
            p.add(Cow::Owned(name), Cow::Owned(value));
        }
        p.write_key = None;
        p.format = None;
        p.redirect = None;
        p
    }
}

/// Parses the query and, for a POST, the body by its `Content-Type`.
pub fn parse<'a>(
    method: &Method,
    query: Option<&'a str>,
    headers: Fields<'_>,
    body: &'a [u8],
) -> Result<Parsed<'a>, Refusal> {
    let mut parsed = Parsed {
        query: Params::from_query(query.unwrap_or(""))?,
        objects: None,
    };
    if *method != Method::POST {
        return Ok(parsed);
    }
    let content_type = headers.get_str(&header::CONTENT_TYPE).map(|v| {
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    match content_type.as_deref() {
        Some("application/json") => {
            parsed.objects = Some(vec![Params::from_json_object(json_object(body)?)]);
        }
        Some("application/vnd.treasuredata.v1+json" | "application/vnd.treasuredata.v1.js+json") => {
            let mut body = json_object(body)?;
            let Some(Value::Array(events)) = body.remove("events") else {
                return Err(bad("body must be {\"events\": [...]}"));
            };
            let mut objects = Vec::with_capacity(events.len());
            for event in events {
                let Value::Object(event) = event else {
                    return Err(bad("every event must be a JSON object"));
                };
                objects.push(Params::from_json_object(event));
            }
            parsed.objects = Some(objects);
            // td-js-sdk puts every column in the events; its query holds only a cache-buster
            // (`modified`), which is no column.
            parsed.query.columns.clear();
        }
        Some("application/x-www-form-urlencoded") => {
            for_each_pair(body, |name, value| parsed.query.add(name, value))
                .map_err(|e| bad(e.0))?;
        }
        None if body.is_empty() => {}
        _ => {
            return Err(Refusal::new(
                ErrorKind::UnsupportedMediaType,
                "Content-Type must be application/json, application/x-www-form-urlencoded, application/vnd.treasuredata.v1+json or application/vnd.treasuredata.v1.js+json",
            ))
        }
    }
    Ok(parsed)
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Refusal> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad("body must be a JSON object")),
        Err(e) => Err(bad(format!("body is not valid JSON: {e}"))),
    }
}
