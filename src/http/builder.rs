//! Building [`Postbacks`]: from the sections of the configuration file it reads (`routes`, `auth`,
//! `client_ip`, `postback`, `sinks`, `delivery`), with sinks of your own registered in code by name
//! beside the built-in ones.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use log::warn;

use super::client_ip::ClientIpPolicy;
use super::live::LiveView;
use super::postbacks::Postbacks;
use crate::config::{Config, Problem};
use crate::delivery::{Delivery, MAX_BODY_BYTES};
use crate::identity::Identity;
use crate::postback::auth::KeyStore;
use crate::postback::route::{Route, RouteConfig, Router};
use crate::postback::Postback;
use crate::sink::{self, LogSink, SinkConfig};

/// Why [`Postbacks`] could not be built: every problem found, each naming its field.
#[derive(Debug)]
pub struct BuildError(pub Vec<Problem>);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BuildError {}

/// Builds [`Postbacks`]; made by [`Postbacks::builder`].
pub struct PostbacksBuilder {
    config: Config,
    custom: Vec<(String, Box<dyn LogSink>)>,
    recent_records: usize,
}

/// How many recent events the live view keeps by default (`admin.recent_records`).
pub const DEFAULT_RECENT_RECORDS: usize = 1000;

/// What the checks produce before anything is opened.
struct Checked {
    router: Router,
    postback: Postback,
    identity: Identity,
    /// Every sink's name, in lane order: the file's sinks (by name), then those registered in code.
    names: Vec<String>,
}

/// No sinks in the file.
static NO_SINKS: BTreeMap<String, SinkConfig> = BTreeMap::new();

impl PostbacksBuilder {
    pub(crate) fn new(config: Config) -> Self {
        PostbacksBuilder {
            config,
            custom: Vec::new(),
            recent_records: DEFAULT_RECENT_RECORDS,
        }
    }

    /// How many recent records and refusals the admin listener's live view keeps (default
    /// 1,000); 0 turns the live view off and costs nothing per request.
    pub fn recent_records(mut self, n: usize) -> Self {
        self.recent_records = n;
        self
    }

    /// Registers `sink` under `name`: routes name it in `sink:` as they name a sink of the file,
    /// and it gets the same buffer, batching, retries, `/sinks` state and metrics.
    pub fn sink(mut self, name: impl Into<String>, sink: impl LogSink + 'static) -> Self {
        self.custom.push((name.into(), Box::new(sink)));
        self
    }

    /// Runs every check that needs no side effects (what `--check` reports); an empty list means
    /// [`PostbacksBuilder::build`] would get as far as opening the sinks and the buffer.
    pub fn check(&self) -> Vec<Problem> {
        let defaults = self.default_sinks();
        self.checked(self.file_sinks(&defaults))
            .err()
            .unwrap_or_default()
    }

    /// Without `sinks:` in the file and none registered in code, `main` is a file sink.
    fn default_sinks(&self) -> Option<BTreeMap<String, SinkConfig>> {
        (self.config.sinks.is_none() && self.custom.is_empty()).then(sink::default_sinks)
    }

    fn file_sinks<'a>(
        &'a self,
        defaults: &'a Option<BTreeMap<String, SinkConfig>>,
    ) -> &'a BTreeMap<String, SinkConfig> {
        self.config
            .sinks
            .as_ref()
            .or(defaults.as_ref())
            .unwrap_or(&NO_SINKS)
    }

    /// Checks everything, opens the sinks and the delivery buffers (recovering what a previous
    /// run left in them). Nothing is delivered until the delivery service starts.
    pub fn build(self) -> Result<Postbacks, BuildError> {
        let defaults = self.default_sinks();
        let file_sinks = self.file_sinks(&defaults);
        let checked = self.checked(file_sinks).map_err(BuildError)?;
        let mut sinks = Vec::with_capacity(checked.names.len());
        let mut problems = Vec::new();
        for (name, cfg) in file_sinks {
            match sink::open(name, cfg) {
                Ok(s) => sinks.push((name.to_string(), s)),
                Err(p) => problems.push(p),
            }
        }
        if !problems.is_empty() {
            return Err(BuildError(problems));
        }
        sinks.extend(self.custom);
        let dir = self.config.delivery.dir.display().to_string();
        let delivery = Delivery::open(&self.config.delivery, sinks).map_err(|e| {
            BuildError(vec![Problem::new(
                "delivery.dir",
                format!("cannot open the buffer in `{dir}`: {e}"),
            )])
        })?;
        Ok(Postbacks::new(
            checked.router,
            checked.postback,
            checked.identity,
            Arc::new(delivery),
            Arc::new(LiveView::new(self.recent_records)),
        ))
    }

    fn checked(&self, file_sinks: &BTreeMap<String, SinkConfig>) -> Result<Checked, Vec<Problem>> {
        let cfg = &self.config;
        let mut problems = Vec::new();
        for (name, sink_cfg) in file_sinks {
            problems.extend(sink::validate(name, sink_cfg));
        }
        let mut names: Vec<String> = file_sinks.keys().cloned().collect();
        for (name, _) in &self.custom {
            if names.contains(name) {
                problems.push(Problem::new(
                    format!("sinks.{name}"),
                    "is also registered in code: one name, one sink",
                ));
            } else {
                names.push(name.clone());
            }
        }
        if names.is_empty() {
            problems.push(Problem::new("sinks", "must not be empty"));
        }
        let routes = compile_routes(&cfg.routes, &names, &mut problems);
        let keys = KeyStore::from_config(&cfg.auth.write_keys).map_err(|p| problems.extend(p));
        if cfg.auth.write_keys.is_empty() {
            warn!("auth.write_keys is empty: every postback will be refused with 403");
        }
        let client_ip = ClientIpPolicy::from_config(&cfg.client_ip).map_err(|p| problems.extend(p));
        let postback = match (keys, client_ip) {
            (Ok(keys), Ok(client_ip)) => {
                Postback::from_config(&cfg.postback, keys, client_ip, MAX_BODY_BYTES)
                    .map_err(|p| problems.extend(p))
                    .ok()
            }
            _ => None,
        };
        problems.extend(Delivery::validate(&cfg.delivery));
        let identity = Identity::from_config(&cfg.identity).map_err(|p| problems.extend(p));
        match (postback, identity) {
            (Some(postback), Ok(identity)) if problems.is_empty() => Ok(Checked {
                router: Router::new(routes),
                postback,
                identity,
                names,
            }),
            _ => Err(problems),
        }
    }
}

/// Compiles `routes:`, resolving each route's sinks to lanes by name.
fn compile_routes(
    configs: &[RouteConfig],
    names: &[String],
    problems: &mut Vec<Problem>,
) -> Vec<Route> {
    if configs.is_empty() {
        problems.push(Problem::new("routes", "must not be empty"));
    }
    let mut routes = Vec::new();
    for (i, r) in configs.iter().enumerate() {
        let field = format!("routes[{i}]");
        let mut sinks = Vec::new();
        let before = problems.len();
        if r.sink.names().is_empty() {
            problems.push(Problem::new(
                format!("{field}.sink"),
                "must name at least one sink",
            ));
        }
        for name in r.sink.names() {
            match names.iter().position(|n| n == name) {
                Some(id) if sinks.contains(&id) => problems.push(Problem::new(
                    format!("{field}.sink"),
                    format!("names `{name}` twice"),
                )),
                Some(id) => sinks.push(id),
                None => problems.push(Problem::new(
                    format!("{field}.sink"),
                    format!("no sink named `{name}` in `sinks`"),
                )),
            }
        }
        if problems.len() > before {
            continue;
        }
        match Route::compile(r, sinks, &field) {
            Ok(route) => routes.push(route),
            Err(p) => problems.extend(p),
        }
    }
    for name in names {
        if !configs.iter().any(|r| r.sink.names().contains(name)) {
            warn!("sink `{name}` is configured but no route uses it");
        }
    }
    routes
}
