//! Postback routes: path templates such as `/postback/v3/event/{database}/{table}`, tried in order.

use serde::Deserialize;

use crate::config::Problem;
use crate::postback::enrich::Enricher;
use crate::postback::privacy::PrivacyConfig;
use crate::postback::privacy::PrivacyPolicy;
use crate::template::{Part, Template};

/// The answer a route gives when the request has no `td_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The 1x1 GIF.
    Pixel,
    /// `{}` as `application/json`.
    #[default]
    Json,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The path template, e.g. `/postback/v3/event/{database}/{table}`.
    pub path: String,
    /// A fixed database, for templates without `{database}`.
    pub database: Option<String>,
    /// A fixed table, for templates without `{table}`.
    pub table: Option<String>,
    #[serde(default)]
    pub default_format: Format,
    /// The sink or sinks (keys of `sinks:`) that get every record of the route: `sink: main` or
    /// `sink: [kafka, archive]`.
    #[serde(default = "default_sink_names")]
    pub sink: SinkNames,
    /// Replaces `postback.privacy` for this route.
    pub privacy: Option<PrivacyConfig>,
    /// Columns added to every record from what it carries: `[user_agent]`.
    #[serde(default)]
    pub enrich: Vec<Enricher>,
}

/// `sink:` of a route: one name or a list of names.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SinkNames {
    /// `sink: main`.
    One(String),
    /// `sink: [kafka, archive]`.
    Many(Vec<String>),
}

impl SinkNames {
    /// The names, in the order written.
    pub fn names(&self) -> &[String] {
        match self {
            SinkNames::One(name) => std::slice::from_ref(name),
            SinkNames::Many(names) => names,
        }
    }
}

fn default_sink_names() -> SinkNames {
    SinkNames::One("main".into())
}

pub(crate) fn default_routes() -> Vec<RouteConfig> {
    vec![RouteConfig {
        path: "/postback/v3/event/{database}/{table}".into(),
        database: None,
        table: None,
        default_format: Format::Json,
        sink: default_sink_names(),
        privacy: None,
        enrich: Vec::new(),
    }]
}

pub use crate::delivery::SinkId;

/// `true` for a valid database or table name: ASCII letters, digits and `_`, 1 to 255 bytes.
pub fn valid_name(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Var {
    Database,
    Table,
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Capture {
        prefix: String,
        var: Var,
        suffix: String,
    },
}

/// A postback route, compiled from one entry of `routes:`.
#[derive(Debug)]
pub struct Route {
    /// The template as written; the `route` label of the metrics.
    pub template: String,
    segments: Vec<Segment>,
    database: Option<String>,
    table: Option<String>,
    /// The answer when the request has no `td_format`.
    pub default_format: Format,
    /// Where the route's records go: every record to each of these sinks.
    pub sinks: Vec<SinkId>,
    /// The route's own privacy rules, replacing `postback.privacy`.
    pub privacy: Option<PrivacyPolicy>,
    /// The route's `enrich:`, each enricher once.
    pub enrich: Vec<Enricher>,
}

/// What [`Router::find`] found for a path.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteMatch<'r> {
    /// The path has the shape of a route and valid names.
    Postback {
        route: &'r Route,
        database: Name<'r>,
        table: Name<'r>,
    },
    /// The path has the shape of a route but a name that is not allowed: answer 400.
    BadName { route: &'r Route, message: String },
}

/// A database or table name of a match: the route's fixed name, or where the path holds it (no
/// copy of the path is made per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name<'r> {
    Fixed(&'r str),
    /// Bytes `start..end` of the matched path.
    InPath {
        start: usize,
        end: usize,
    },
}

impl<'r> Name<'r> {
    /// The name, given the path that was matched.
    pub fn in_path<'p>(self, path: &'p str) -> &'p str
    where
        'r: 'p,
    {
        match self {
            Name::Fixed(name) => name,
            Name::InPath { start, end } => path.get(start..end).unwrap_or_default(),
        }
    }
}

impl RouteMatch<'_> {
    /// The database and table of a match on `path` (the path given to [`Router::find`]); a name
    /// that is not allowed is a 400.
    pub fn names<'p>(&'p self, path: &'p str) -> Result<(&'p str, &'p str), super::reply::Refusal> {
        match self {
            RouteMatch::Postback {
                database, table, ..
            } => Ok((database.in_path(path), table.in_path(path))),
            RouteMatch::BadName { message, .. } => Err(super::reply::Refusal::new(
                super::reply::ErrorKind::BadRequest,
                message.clone(),
            )),
        }
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Route {}

impl Route {
    /// Compiles `cfg`; `sinks` are the already resolved sinks. Problems are reported against `field`.
    pub fn compile(
        cfg: &RouteConfig,
        sinks: Vec<SinkId>,
        field: &str,
    ) -> Result<Route, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut segments = Vec::new();
        let mut seen = Vec::new();
        match cfg.path.strip_prefix('/') {
            None => problems.push(Problem::new(format!("{field}.path"), "must start with `/`")),
            Some(rest) => {
                for raw in rest.split('/') {
                    match parse_segment(raw) {
                        Ok(segment) => {
                            if let Segment::Capture { var, .. } = &segment {
                                if seen.contains(var) {
                                    problems.push(Problem::new(
                                        format!("{field}.path"),
                                        format!("`{raw}` repeats a placeholder"),
                                    ));
                                }
                                seen.push(*var);
                            }
                            segments.push(segment);
                        }
                        Err(message) => {
                            problems.push(Problem::new(format!("{field}.path"), message))
                        }
                    }
                }
            }
        }
        for (var, name, fixed) in [
            (Var::Database, "database", &cfg.database),
            (Var::Table, "table", &cfg.table),
        ] {
            match (seen.contains(&var), fixed) {
                (true, Some(_)) => problems.push(Problem::new(
                    format!("{field}.{name}"),
                    format!("the path already has `{{{name}}}`"),
                )),
                (false, None) => problems.push(Problem::new(
                    format!("{field}.path"),
                    format!("has no `{{{name}}}` and the route sets no `{name}`"),
                )),
                (false, Some(n)) if !valid_name(n) => problems.push(Problem::new(
                    format!("{field}.{name}"),
                    "only ASCII letters, digits and `_`, 1 to 255 bytes",
                )),
                _ => {}
            }
        }
        let privacy = match &cfg.privacy {
            Some(p) => PrivacyPolicy::from_config(p, &format!("{field}.privacy"))
                .map_err(|p| problems.extend(p))
                .ok(),
            None => None,
        };
        let mut enrich = Vec::new();
        for e in &cfg.enrich {
            if enrich.contains(e) {
                problems.push(Problem::new(
                    format!("{field}.enrich"),
                    format!("lists `{}` twice", e.name()),
                ));
            }
            enrich.push(*e);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Route {
            template: cfg.path.clone(),
            segments,
            database: cfg.database.clone(),
            table: cfg.table.clone(),
            default_format: cfg.default_format,
            sinks,
            privacy,
            enrich,
        })
    }

    /// Matches `path` (without the query): `None` when the shape differs.
    fn matches(&self, path: &str) -> Option<RouteMatch<'_>> {
        let rest = path.strip_prefix('/')?.as_bytes();
        let mut database = self.database.as_deref().map(Name::Fixed);
        let mut table = self.table.as_deref().map(Name::Fixed);
        // Split as bytes (a plain loop over a short path; `str::split` costs more in its
        // searcher's setup than in the search).
        let mut parts = rest.split(|&b| b == b'/');
        // Where the next part starts in `path`.
        let mut at = 1;
        for segment in &self.segments {
            let part = parts.next()?;
            let start = at;
            at += part.len() + 1;
            match segment {
                Segment::Literal(lit) => {
                    if part != lit.as_bytes() {
                        return None;
                    }
                }
                Segment::Capture {
                    prefix,
                    var,
                    suffix,
                } => {
                    if part.len() < prefix.len() + suffix.len() {
                        return None;
                    }
                    // A whole-segment placeholder has neither: no comparison to make (each
                    // one is a `memcmp` call, which showed in the fast path's profile).
                    if !prefix.is_empty() && !part.starts_with(prefix.as_bytes()) {
                        return None;
                    }
                    if !suffix.is_empty() && !part.ends_with(suffix.as_bytes()) {
                        return None;
                    }
                    let name = Name::InPath {
                        start: start + prefix.len(),
                        end: start + part.len() - suffix.len(),
                    };
                    match var {
                        Var::Database => database = Some(name),
                        Var::Table => table = Some(name),
                    }
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        // Both are set: compile() guarantees a placeholder or a fixed name for each.
        let database = database.unwrap_or(Name::Fixed(""));
        let table = table.unwrap_or(Name::Fixed(""));
        for (what, name) in [("database", database), ("table", table)] {
            if !valid_name(name.in_path(path)) {
                return Some(RouteMatch::BadName {
                    route: self,
                    message: format!(
                        "{what} name must be 1 to 255 ASCII letters, digits or underscores"
                    ),
                });
            }
        }
        Some(RouteMatch::Postback {
            route: self,
            database,
            table,
        })
    }
}

/// One path segment: literal text, or text around one `{database}` or `{table}` (parsed by the
/// shared [`Template`], so a route's errors read like a topic's or a tag's).
fn parse_segment(raw: &str) -> Result<Segment, String> {
    let template = Template::parse(raw).map_err(|e| format!("`{raw}` {e}"))?;
    let text = |p: Option<&Part>| match p {
        Some(Part::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let parts = template.parts();
    let Some(at) = parts.iter().position(|p| !matches!(p, Part::Text(_))) else {
        return Ok(Segment::Literal(raw.to_owned()));
    };
    let var = match parts[at] {
        Part::Database => Var::Database,
        _ => Var::Table,
    };
    let prefix = if at == 0 { None } else { text(parts.first()) };
    let suffix = text(parts.get(at + 1));
    let used = at + 1 + usize::from(suffix.is_some());
    if at > 1 || used != parts.len() {
        return Err(format!(
            "`{raw}` has more than one placeholder: at most one per segment"
        ));
    }
    Ok(Segment::Capture {
        prefix: prefix.unwrap_or_default(),
        var,
        suffix: suffix.unwrap_or_default(),
    })
}

/// The compiled `routes:`, tried in order.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// A router over `routes`, tried in the given order.
    pub fn new(routes: Vec<Route>) -> Self {
        Router { routes }
    }

    /// Runs for every request: the first route whose shape matches `path`, or `None` to proxy it.
    pub fn find(&self, path: &str) -> Option<RouteMatch<'_>> {
        self.routes.iter().find_map(|r| r.matches(path))
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route to the sink `main` with this `path` and `database`.
    fn config(path: &str, database: Option<&str>) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            database: database.map(Into::into),
            table: None,
            default_format: Format::Json,
            sink: SinkNames::One("main".into()),
            privacy: None,
            enrich: Vec::new(),
        }
    }

    fn route(path: &str, database: Option<&str>) -> Route {
        Route::compile(&config(path, database), vec![0], "routes[0]").unwrap()
    }

    fn found(router: &Router, path: &str) -> Option<(String, String, String)> {
        match router.find(path)? {
            RouteMatch::Postback {
                route,
                database,
                table,
            } => Some((
                route.template.clone(),
                database.in_path(path).to_owned(),
                table.in_path(path).to_owned(),
            )),
            RouteMatch::BadName { message, .. } => Some(("400".into(), message, String::new())),
        }
    }

    #[test]
    fn treasure_data_route() {
        let r = Router::new(vec![route("/postback/v3/event/{database}/{table}", None)]);
        let (_, db, table) = found(&r, "/postback/v3/event/web/pageviews").unwrap();
        assert_eq!((db.as_str(), table.as_str()), ("web", "pageviews"));
        assert_eq!(found(&r, "/postback/v3/event/a"), None);
        assert_eq!(found(&r, "/postback/v3/event/a/b/c"), None);
        assert_eq!(found(&r, "/postback/v3/event/a/b/"), None);
        assert_eq!(found(&r, "/postback/v3/events/a/b"), None);
        assert_eq!(found(&r, "/"), None);
        assert_eq!(found(&r, ""), None);
        assert_eq!(found(&r, "/postback/v3/event/we-b/t").unwrap().0, "400");
        assert_eq!(found(&r, "/postback/v3/event//t").unwrap().0, "400");
        assert_eq!(found(&r, "/postback/v3/event/w%20b/t").unwrap().0, "400");
        let long = format!("/postback/v3/event/{}/t", "a".repeat(256));
        assert_eq!(found(&r, &long).unwrap().0, "400");
        let ok = format!("/postback/v3/event/{}/t", "a".repeat(255));
        assert_eq!(found(&r, &ok).unwrap().1.len(), 255);
    }

    #[test]
    fn fixed_database_and_suffix() {
        let r = Router::new(vec![
            route("/px/{table}.gif", Some("web")),
            route("/td/{database}/{table}", None),
        ]);
        let (t, db, table) = found(&r, "/px/clicks.gif").unwrap();
        assert_eq!(
            (t.as_str(), db.as_str(), table.as_str()),
            ("/px/{table}.gif", "web", "clicks")
        );
        assert_eq!(found(&r, "/px/clicks.png"), None);
        assert_eq!(found(&r, "/px/.gif").unwrap().0, "400");
        assert_eq!(found(&r, "/td/a/b").unwrap().0, "/td/{database}/{table}");
        // A prefix before the placeholder, and both around it.
        let r = Router::new(vec![
            route("/p/t_{table}", Some("web")),
            route("/q/{table}-x.gif", Some("web")),
        ]);
        assert_eq!(found(&r, "/p/t_clicks").unwrap().2, "clicks");
        assert_eq!(found(&r, "/p/x_clicks"), None);
        assert_eq!(found(&r, "/q/a-x.gif").unwrap().2, "a");
        assert_eq!(found(&r, "/q/a-y.gif"), None);
    }

    #[test]
    fn first_matching_route_wins() {
        let r = Router::new(vec![
            route("/e/{table}", Some("one")),
            route("/e/{table}", Some("two")),
        ]);
        assert_eq!(found(&r, "/e/t").unwrap().1, "one");
    }

    #[test]
    fn bad_templates_name_the_field() {
        let bad = |path: &str, db: Option<&str>| {
            Route::compile(&config(path, db), vec![0], "routes[2]").unwrap_err()
        };
        assert_eq!(bad("px/{table}", Some("w"))[0].field, "routes[2].path");
        assert!(bad("/px/{table}", None)[0].message.contains("{database}"));
        assert!(bad("/px/{tabel}/{database}", None)[0]
            .message
            .contains("unknown placeholder"));
        assert!(bad("/px/{table}{database}", None)[0]
            .message
            .contains("one placeholder"));
        assert!(bad("/{table}/{table}/{database}", None)[0]
            .message
            .contains("repeats"));
        assert_eq!(
            bad("/{database}/{table}", Some("w"))[0].field,
            "routes[2].database"
        );
        assert_eq!(
            bad("/x/{table}", Some("no-dash"))[0].field,
            "routes[2].database"
        );
    }

    #[test]
    fn enrich_is_a_closed_list() {
        let cfg: RouteConfig =
            serde_saphyr::from_str("{path: '/td/{database}/{table}', enrich: [user_agent]}")
                .unwrap();
        assert_eq!(cfg.enrich, [crate::postback::enrich::Enricher::UserAgent]);
        let err = serde_saphyr::from_str::<RouteConfig>(
            "path: '/td/{database}/{table}'\nenrich: [user_agnet]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("user_agnet") && err.contains('2'), "{err}");
        let cfg: RouteConfig = serde_saphyr::from_str(
            "{path: '/td/{database}/{table}', enrich: [user_agent, user_agent]}",
        )
        .unwrap();
        let err = Route::compile(&cfg, vec![0], "routes[1]").unwrap_err();
        assert_eq!(err[0].field, "routes[1].enrich");
    }

    #[test]
    fn names() {
        assert!(valid_name("web_2024"));
        assert!(!valid_name(""));
        assert!(!valid_name("a.b"));
        assert!(!valid_name("é"));
    }
}
