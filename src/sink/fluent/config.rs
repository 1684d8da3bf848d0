//! `type: fluent`: its configuration and the checks on it.

use serde::Deserialize;

use super::FluentSink;
use crate::config::Problem;
use crate::sink::{more_than_zero, LogSink, SinkKind};
use crate::template::Template;
use crate::units::{check_host_port, HumanDuration};

/// `type: fluent`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluentSinkConfig {
    /// `host:port` of the forward input.
    pub address: String,
    /// Tag template: `{database}` and `{table}` are replaced.
    #[serde(default = "default_fluent_tag")]
    pub tag: String,
    /// Send the `chunk` option and wait for the matching `ack`.
    #[serde(default = "default_true")]
    pub require_ack: bool,
    /// How long a connect, a write or waiting for an ack may take.
    #[serde(default = "default_fluent_timeout")]
    pub timeout: HumanDuration,
}

fn default_fluent_tag() -> String {
    "td.{database}.{table}".into()
}
fn default_true() -> bool {
    true
}
fn default_fluent_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

/// Parses a tag template: not empty, no spaces, and `{database}` / `{table}` as its only
/// placeholders.
pub(super) fn parse_tag(tag: &str) -> Result<Template, String> {
    if tag.is_empty() {
        return Err("must not be empty".into());
    }
    if tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    Template::parse(tag).map_err(|e| e.to_string())
}

impl SinkKind for FluentSinkConfig {
    fn validate(&self, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(e) = check_host_port(&self.address) {
            problems.push(Problem::new(format!("{field}.address"), e));
        }
        if let Err(e) = parse_tag(&self.tag) {
            problems.push(Problem::new(format!("{field}.tag"), e));
        }
        problems.extend(more_than_zero(field, "timeout", self.timeout.0.is_zero()));
        problems
    }

    fn open(&self, name: &str, _field: &str) -> Result<Box<dyn LogSink>, Problem> {
        Ok(Box::new(FluentSink::open(name, self)?))
    }
}
