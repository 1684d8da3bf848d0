//! `type: td`: its configuration and the checks on it.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use smart_default::SmartDefault;

use super::TdSink;
use crate::config::Problem;
use crate::sink::{more_than_zero, LogSink, SinkKind};
use crate::template::Template;
use crate::units::HumanDuration;

/// `type: td`.
#[derive(Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct TdSinkConfig {
    /// The API's base URL.
    #[default("https://api.treasuredata.com")]
    pub endpoint: String,
    /// The API key (a write-only key is enough); or `api_key_file`, exactly one of them.
    pub api_key: Option<String>,
    /// A file holding the API key, so the YAML holds no secret (surrounding whitespace ignored).
    pub api_key_file: Option<PathBuf>,
    /// The database template; default: the record's own.
    #[default("{database}")]
    pub database: String,
    /// The table template; default: the record's own.
    #[default("{table}")]
    pub table: String,
    /// Create a table the API does not know (404), then import again.
    #[default(true)]
    pub auto_create_table: bool,
    /// How long one request may take.
    #[default(HumanDuration::secs(60))]
    pub timeout: HumanDuration,
}

/// Never prints the key.
impl fmt::Debug for TdSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("TdSinkConfig")
            .field("endpoint", &self.endpoint)
            .field("api_key", &self.api_key.as_ref().map(|_| "<secret>"))
            .field("api_key_file", &self.api_key_file)
            .field("database", &self.database)
            .field("table", &self.table)
            .field("auto_create_table", &self.auto_create_table)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Parses a database or table template: its literal text may hold only what Treasure Data
/// allows in names (lower-case letters, digits and `_`).
pub(super) fn parse_name(template: &str) -> Result<Template, String> {
    let t = Template::parse(template).map_err(|e| e.to_string())?;
    if t.parts().is_empty() {
        return Err("must not be empty".into());
    }
    let literal = t.render("", "");
    if !literal
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "`{template}`: a Treasure Data name holds only lower-case letters, digits and `_`"
        ));
    }
    Ok(t)
}

impl TdSinkConfig {
    /// The API key, from `api_key` or read from `api_key_file`; the error names the field.
    pub(super) fn key(&self, field: &str) -> Result<String, Problem> {
        let (key, at) = match (&self.api_key, &self.api_key_file) {
            (Some(key), None) => (key.trim().to_string(), "api_key"),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Problem::new(
                        format!("{field}.api_key_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                (text.trim().to_string(), "api_key_file")
            }
            _ => {
                return Err(Problem::new(
                    format!("{field}.api_key"),
                    "exactly one of api_key and api_key_file is needed",
                ))
            }
        };
        if key.is_empty() || key.bytes().any(|b| b.is_ascii_control()) {
            return Err(Problem::new(
                format!("{field}.{at}"),
                "the key must be one line of text, not empty",
            ));
        }
        Ok(key)
    }
}

impl SinkKind for TdSinkConfig {
    fn validate(&self, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        match reqwest::Url::parse(&self.endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.query().is_none() => {}
            _ => problems.push(Problem::new(
                format!("{field}.endpoint"),
                "must be an absolute http or https URL",
            )),
        }
        if let Err(p) = self.key(field) {
            problems.push(p);
        }
        for (sub, template) in [("database", &self.database), ("table", &self.table)] {
            if let Err(e) = parse_name(template) {
                problems.push(Problem::new(format!("{field}.{sub}"), e));
            }
        }
        problems.extend(more_than_zero(field, "timeout", self.timeout.0.is_zero()));
        problems
    }

    fn open(&self, name: &str, _field: &str) -> Result<Box<dyn LogSink>, Problem> {
        Ok(Box::new(TdSink::open(name, self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let cfg: TdSinkConfig = serde_saphyr::from_str(yaml).unwrap();
        cfg.validate("sinks.td")
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn checks_name_the_field() {
        assert_eq!(problems("{api_key: '1/abc'}"), Vec::<String>::new());
        assert_eq!(
            problems("{}"),
            vec!["sinks.td.api_key: exactly one of api_key and api_key_file is needed"]
        );
        let p = problems("{api_key: k, api_key_file: /x}");
        assert_eq!(p.len(), 1, "{p:?}");
        let p = problems("{api_key_file: /no/such/key}");
        assert!(
            p[0].starts_with("sinks.td.api_key_file: cannot read"),
            "{p:?}"
        );
        let p = problems("{api_key: k, endpoint: 'ftp://x', database: 'a-{database}', table: '{tbl}', timeout: 0s}");
        let fields: Vec<&str> = p.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "sinks.td.endpoint",
                "sinks.td.database",
                "sinks.td.table",
                "sinks.td.timeout"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "1/secret\n").unwrap();
        let cfg: TdSinkConfig =
            serde_saphyr::from_str(&format!("{{api_key_file: '{}'}}", file.display())).unwrap();
        assert_eq!(cfg.key("s").unwrap(), "1/secret");
        assert!(cfg.auto_create_table);
        assert_eq!(cfg.endpoint, "https://api.treasuredata.com");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let cfg: TdSinkConfig = serde_saphyr::from_str("{api_key: '1/supersecret'}").unwrap();
        let text = format!("{cfg:?}");
        assert!(
            !text.contains("supersecret") && text.contains("<secret>"),
            "{text}"
        );
    }
}
