//! `{database}` / `{table}` templates: route path segments, Kafka topics, Fluentd tags and the
//! `td` sink's names are all written this way, parsed here once, with one wording for every error.

use std::fmt;

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Text(String),
    /// The record's database.
    Database,
    /// The record's table.
    Table,
}

/// Why a template could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` with no `}` after it.
    #[error("has a `{{` without its `}}`")]
    Unclosed,
    /// A `}` with no `{` before it.
    #[error("has a `}}` without its `{{`")]
    Unopened,
    /// A placeholder other than `{database}` and `{table}`.
    #[error("has an unknown placeholder `{{{0}}}`: only `{{database}}` and `{{table}}`")]
    Unknown(String),
}

/// A parsed template: literal text with `{database}` and `{table}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `template`. Runs at start-up; an unknown or unbalanced placeholder is an error.
    pub fn parse(template: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(TemplateError::Unopened);
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(TemplateError::Unclosed)?;
            let name = &after[..close];
            if name.contains('{') {
                return Err(TemplateError::Unclosed);
            }
            let part = match name {
                "database" => Part::Database,
                "table" => Part::Table,
                other => return Err(TemplateError::Unknown(other.to_owned())),
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            parts.push(part);
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The pieces, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The template with the placeholders replaced (in one pass: a name is never expanded again).
    pub fn render(&self, database: &str, table: &str) -> String {
        let mut out = String::with_capacity(self.literal_len() + database.len() + table.len());
        for part in &self.parts {
            out.push_str(match part {
                Part::Text(t) => t,
                Part::Database => database,
                Part::Table => table,
            });
        }
        out
    }

    /// The length of the literal text, placeholders left out.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.len(),
                _ => 0,
            })
            .sum()
    }

    /// Whether the template has any placeholder (a fixed name has none).
    pub fn has_placeholders(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Text(_)))
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => f.write_str(t)?,
                Part::Database => f.write_str("{database}")?,
                Part::Table => f.write_str("{table}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders() {
        let t = Template::parse("td.{database}.{table}").unwrap();
        assert_eq!(t.render("web", "pv"), "td.web.pv");
        assert_eq!(t.to_string(), "td.{database}.{table}");
        assert_eq!(t.literal_len(), 4);
        assert!(t.has_placeholders());
        let fixed = Template::parse("events").unwrap();
        assert!(!fixed.has_placeholders());
        assert_eq!(fixed.render("a", "b"), "events");
        // A name that looks like a placeholder is not expanded again.
        assert_eq!(
            Template::parse("{database}")
                .unwrap()
                .render("{table}", "x"),
            "{table}"
        );
    }

    #[test]
    fn refuses_bad_placeholders() {
        assert_eq!(Template::parse("a{database"), Err(TemplateError::Unclosed));
        assert_eq!(Template::parse("a}b"), Err(TemplateError::Unopened));
        assert_eq!(
            Template::parse("{{database}}"),
            Err(TemplateError::Unclosed)
        );
        assert_eq!(
            Template::parse("{db}"),
            Err(TemplateError::Unknown("db".into()))
        );
        assert_eq!(
            TemplateError::Unknown("db".into()).to_string(),
            "has an unknown placeholder `{db}`: only `{database}` and `{table}`"
        );
    }
}
