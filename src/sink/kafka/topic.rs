//! Kafka topics: the template (`{database}`, `{table}`) and the names Kafka accepts.

use crate::template::Template;

/// Kafka's limit on the length of a topic name.
pub(super) const MAX_TOPIC_LEN: usize = 249;

/// Parses the topic template; an unknown or unclosed placeholder, or nothing at all, is an error.
pub(super) fn parse(template: &str) -> Result<Template, String> {
    let t = Template::parse(template).map_err(|e| e.to_string())?;
    if t.parts().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(t)
}

/// Why a topic name is not one Kafka accepts, if it is not.
pub(super) fn name_problem(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("the topic name is empty".into());
    }
    if topic == "." || topic == ".." {
        return Some(format!("the topic name {topic:?} is not allowed"));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Some(format!(
            "the topic name {topic:?} is longer than Kafka's {MAX_TOPIC_LEN} characters"
        ));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some(format!(
            "the topic name {topic:?} may hold only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_template_renders_and_rejects_unknown_placeholders() {
        let t = parse("{database}.{table}").unwrap();
        assert_eq!(t.render("web", "pageviews"), "web.pageviews");
        let t = parse("td-{table}_{database}-{table}").unwrap();
        assert_eq!(t.render("web", "pv"), "td-pv_web-pv");
        // Replaced in one pass: a name that looks like a placeholder stays as it is.
        let t = parse("{database}/{table}").unwrap();
        assert_eq!(t.render("{table}", "x"), "{table}/x");
        assert_eq!(parse("events").unwrap().render("a", "b"), "events");
        assert!(parse("{db}.{table}").unwrap_err().contains("{db}"));
        assert!(parse("{database").is_err());
        assert!(parse("database}").is_err());
        assert_eq!(parse("").unwrap_err(), "must not be empty");
    }

    #[test]
    fn topic_names_kafka_refuses() {
        assert_eq!(name_problem("web.pageviews"), None);
        assert_eq!(name_problem("a-b_c.D9"), None);
        assert!(name_problem("").is_some());
        assert!(name_problem("..").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem("a/b").is_some());
        assert_eq!(name_problem(&"x".repeat(249)), None);
        assert!(name_problem(&"x".repeat(250)).unwrap().contains("249"));
    }
}
