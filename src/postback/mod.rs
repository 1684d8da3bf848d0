//! Turning one postback request into records and the answer to send.
//!
//! Nothing here knows Pingora: the proxy hands over a [`PostbackRequest`] (method, query, headers,
//! body, peer) and gets back either an [`Outcome`] (the records and the reply, to send once the
//! records are accepted for delivery) or a [`Refusal`]. Everything is checked before anything is
//! returned, so a refused request changes nothing.

pub mod auth;
pub mod cookie;
pub mod privacy;
pub mod query;
pub mod redirect;
pub mod reply;
pub mod route;

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{header, HeaderMap, Method};
use serde_json::Value;

use crate::postback::auth::{AuthError, KeyStore};
use crate::http::client_ip::ClientIpPolicy;
use crate::config::{CorsConfig, Format, PostbackConfig, Problem};
use cookie::GlobalIdCookie;
use crate::metrics;
use crate::postback::privacy::{BotAction, OptOutAction, PrivacyPolicy};
use crate::postback::query::parse_pairs;
use crate::record::{Record, RecordBody};
use redirect::RedirectPolicy;
use crate::postback::reply::{ErrorKind, Refusal, Reply};

/// What a postback route resolved for a request.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub database: &'a str,
    pub table: &'a str,
    /// The answer when `td_format` is absent.
    pub default_format: Format,
    /// The route's own privacy rules, if it has any.
    pub privacy: Option<&'a PrivacyPolicy>,
}

/// The parts of an HTTP request a postback needs.
#[derive(Debug)]
pub struct PostbackRequest<'a> {
    pub method: &'a Method,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The whole body (already bounded by `max_body_bytes`); empty for GET and HEAD.
    pub body: &'a [u8],
    /// The TCP peer.
    pub peer: Option<IpAddr>,
    /// Whether the request came over TLS.
    pub tls: bool,
    /// The receive time, UNIX seconds.
    pub now: i64,
}

/// An accepted postback: the records to deliver and the reply to send once they are accepted.
#[derive(Debug)]
pub struct Outcome {
    pub records: Vec<Record>,
    pub reply: Reply,
}

/// The special parameters and the columns gathered from a query, form or JSON object.
#[derive(Default)]
struct Params {
    format: Option<String>,
    write_key: Option<String>,
    record_time: Option<String>,
    redirect: Option<String>,
    /// In order; a later column with the same name wins.
    columns: Vec<(String, String)>,
}

impl Params {
    fn add(&mut self, name: String, value: String) {
        match name.as_str() {
            "td_format" => self.format = Some(value),
            "td_write_key" => self.write_key = Some(value),
            "td_record_time" => self.record_time = Some(value),
            "td_redirect" => self.redirect = Some(value),
            // `time` is always the proxy's; an empty name is no column.
            "" | "time" => {}
            _ => self.columns.push((name, value)),
        }
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> Params {
        let mut p = Params::default();
        for (name, value) in pairs {
            p.add(name, value);
        }
        p
    }

    /// Columns and `td_record_time` from a JSON object. Strings are kept, other scalars and nested
    /// values become their JSON text, `null` is no column. Write keys, formats and redirects in a
    /// body are ignored (and never become columns).
    fn from_json_object(object: serde_json::Map<String, Value>) -> Params {
        let mut p = Params::default();
        for (name, value) in object {
            let value = match value {
                Value::Null => continue,
                Value::String(s) => s,
                other => other.to_string(),
            };
            p.add(name, value);
        }
        p.write_key = None;
        p.format = None;
        p.redirect = None;
        p
    }
}

/// The postback rules from `postback:` and `auth:`.
pub struct Postback {
    keys: KeyStore,
    client_ip: ClientIpPolicy,
    cookie: GlobalIdCookie,
    redirect: RedirectPolicy,
    privacy: PrivacyPolicy,
    cors_origins: Vec<String>,
    cors_any: bool,
    max_columns: usize,
    past_secs: i64,
    future_secs: i64,
    /// Requests whose URL is longer are answered 414.
    pub max_url_bytes: usize,
    /// Requests whose body is longer are answered 413.
    pub max_body_bytes: usize,
    /// Postbacks per second allowed from one client address.
    pub rate_limit: Option<u64>,
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::BadRequest, message)
}

impl Postback {
    /// Builds the rules, collecting every problem in `postback:` and `auth:`.
    pub fn from_config(cfg: &PostbackConfig, keys: KeyStore) -> Result<Postback, Vec<Problem>> {
        let mut problems = Vec::new();
        let client_ip = ClientIpPolicy::from_config(&cfg.client_ip).map_err(|p| problems.extend(p));
        let cookie = GlobalIdCookie::from_config(&cfg.global_id).map_err(|p| problems.extend(p));
        let redirect = RedirectPolicy::from_config(&cfg.redirect).map_err(|p| problems.extend(p));
        let privacy = PrivacyPolicy::from_config(&cfg.privacy, "postback.privacy")
            .map_err(|p| problems.extend(p));
        let CorsConfig { allowed_origins } = &cfg.cors;
        for (i, origin) in allowed_origins.iter().enumerate() {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                problems.push(Problem::new(
                    format!("postback.cors.allowed_origins[{i}]"),
                    "must be `*` or an origin such as https://www.example.com",
                ));
            }
        }
        if cfg.rate_limit.per_second == Some(0) {
            problems.push(Problem::new(
                "postback.rate_limit.per_second",
                "must be at least 1",
            ));
        }
        if cfg.max_columns == 0 {
            problems.push(Problem::new("postback.max_columns", "must be at least 1"));
        }
        let (Ok(client_ip), Ok(cookie), Ok(redirect), Ok(privacy), true) =
            (client_ip, cookie, redirect, privacy, problems.is_empty())
        else {
            return Err(problems);
        };
        Ok(Postback {
            keys,
            client_ip,
            cookie,
            redirect,
            privacy,
            cors_any: allowed_origins.iter().any(|o| o == "*"),
            cors_origins: allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            max_columns: cfg.max_columns,
            past_secs: cfg.record_time_window.past.0.as_secs() as i64,
            future_secs: cfg.record_time_window.future.0.as_secs() as i64,
            max_url_bytes: usize::try_from(cfg.max_url_bytes.0).unwrap_or(usize::MAX),
            max_body_bytes: usize::try_from(cfg.max_body_bytes.0).unwrap_or(usize::MAX),
            rate_limit: cfg.rate_limit.per_second,
        })
    }

    /// The client's address as the records see it (used for `td_ip`).
    pub fn client_ip_policy(&self) -> &ClientIpPolicy {
        &self.client_ip
    }

    /// Runs for every postback before its body is read: `Err` for a method we do not serve.
    pub fn check_method(method: &Method) -> Result<(), Refusal> {
        match *method {
            Method::GET | Method::HEAD | Method::POST | Method::OPTIONS => Ok(()),
            _ => Err(Refusal::new(
                ErrorKind::MethodNotAllowed,
                format!("method {method} is not allowed here"),
            )),
        }
    }

    /// The CORS headers for the request's `Origin`, when it is allowed; added to every postback answer.
    pub fn cors_headers(&self, headers: &HeaderMap) -> Vec<(&'static str, String)> {
        match self.allowed_origin(headers) {
            Some(origin) => vec![
                ("Access-Control-Allow-Origin", origin.to_owned()),
                ("Access-Control-Allow-Credentials", "true".into()),
                ("Vary", "Origin".into()),
            ],
            None => Vec::new(),
        }
    }

    fn allowed_origin<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
        let allowed = self.cors_any
            || self
                .cors_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin.trim_end_matches('/')));
        allowed.then_some(origin)
    }

    /// Answers an `OPTIONS` preflight: 204 with the CORS headers for an allowed origin, 403 otherwise.
    pub fn preflight(&self, headers: &HeaderMap) -> Result<Reply, Refusal> {
        if self.allowed_origin(headers).is_none() {
            return Err(Refusal::new(ErrorKind::Forbidden, "origin not allowed"));
        }
        let requested = headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b", -_".contains(&b))
            })
            .unwrap_or("Content-Type, X-TD-Write-Key, Authorization");
        Ok(Reply::no_content()
            .with_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS".into())
            .with_header("Access-Control-Allow-Headers", requested.to_owned())
            .with_header("Access-Control-Max-Age", "86400".into()))
    }

    /// Runs for every GET, HEAD or POST to a postback route: checks the request and builds its
    /// records and reply. Nothing is delivered here; the caller delivers `records` and, once they
    /// are accepted, sends `reply`.
    pub fn handle(
        &self,
        target: Target<'_>,
        req: &PostbackRequest<'_>,
    ) -> Result<Outcome, Refusal> {
        let query = parse_pairs(req.query.unwrap_or("").as_bytes()).map_err(|e| bad(e.0))?;
        let mut params = Params::from_pairs(query);
        // Some for JSON bodies: one record per object. None: one record from the query (and form).
        let mut objects: Option<Vec<Params>> = None;
        if *req.method == Method::POST {
            let content_type = req
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            match content_type.as_deref() {
                Some("application/json") => {
                    objects = Some(vec![Params::from_json_object(json_object(req.body)?)]);
                }
                Some("application/vnd.treasuredata.v1+json" | "application/vnd.treasuredata.v1.js+json") => {
                    let mut body = json_object(req.body)?;
                    let Some(Value::Array(events)) = body.remove("events") else {
                        return Err(bad("body must be {\"events\": [...]}"));
                    };
                    let mut parsed = Vec::with_capacity(events.len());
                    for event in events {
                        let Value::Object(event) = event else {
                            return Err(bad("every event must be a JSON object"));
                        };
                        parsed.push(Params::from_json_object(event));
                    }
                    objects = Some(parsed);
                    // td-js-sdk puts every column in the events; its query holds only a
                    // cache-buster (`modified`), which is no column.
                    params.columns.clear();
                }
                Some("application/x-www-form-urlencoded") => {
                    for (name, value) in parse_pairs(req.body).map_err(|e| bad(e.0))? {
                        params.add(name, value);
                    }
                }
                None if req.body.is_empty() => {}
                _ => {
                    return Err(Refusal::new(
                        ErrorKind::UnsupportedMediaType,
                        "Content-Type must be application/json, application/x-www-form-urlencoded, application/vnd.treasuredata.v1+json or application/vnd.treasuredata.v1.js+json",
                    ))
                }
            }
        }

        // The answer, checked before anything is accepted.
        let format = match params.format.as_deref() {
            None => target.default_format,
            Some("pixel") => Format::Pixel,
            Some("json") => Format::Json,
            Some(_) => return Err(bad("td_format must be `pixel` or `json`")),
        };
        let redirect = match &params.redirect {
            Some(raw) => Some(self.redirect.check(raw).map_err(|e| bad(e.to_string()))?),
            None => None,
        };

        let header_key = header_write_key(req.headers);
        let key = header_key.or(params.write_key.as_deref());
        self.keys.check(key, target.database).map_err(|e| match e {
            AuthError::Missing | AuthError::Unknown | AuthError::DatabaseNotAllowed(_) => {
                Refusal::new(ErrorKind::Forbidden, e.to_string())
            }
        })?;

        let assessment = target.privacy.unwrap_or(&self.privacy).assess(req.headers);
        let dropped = match (assessment.opted_out, assessment.bot) {
            (Some(OptOutAction::Drop), _) => Some("opted_out"),
            (_, Some((_, BotAction::Drop))) => Some("bot"),
            _ => None,
        };
        let existing = cookie::find(
            req.headers
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes()),
            &self.cookie.name,
        )
        .filter(|id| cookie::valid_global_id(id));
        let identifiers = assessment.identifiers_allowed && dropped.is_none();
        let global_id = match (identifiers, existing) {
            (false, _) => String::new(),
            (true, Some(id)) => id.to_owned(),
            (true, None) => cookie::new_global_id(),
        };
        let mut fill = Placeholders {
            postback: self,
            req,
            global_id: &global_id,
            ip: None,
            anonymize: assessment.anonymize_ip,
            identifiers,
            strip: assessment.opted_out.is_some(),
        };

        let base_time = self.record_time(params.record_time.as_deref(), req.now);
        let mut records = Vec::new();
        if let Some(objects) = objects {
            records.reserve(objects.len());
            for object in objects {
                let time = object
                    .record_time
                    .as_deref()
                    .map_or(base_time, |t| self.record_time(Some(t), req.now));
                let columns = params.columns.iter().cloned().chain(object.columns);
                records.push(self.record(target, time, columns, &mut fill)?);
            }
        } else {
            records.push(self.record(target, base_time, params.columns.into_iter(), &mut fill)?);
        }
        if let Some(reason) = dropped {
            metrics::FILTERED
                .with_label_values(&[reason, "drop"])
                .inc_by(records.len() as u64);
            records.clear();
        } else {
            if let Some((why, BotAction::Flag)) = assessment.bot {
                metrics::FILTERED
                    .with_label_values(&["bot", "flag"])
                    .inc_by(records.len() as u64);
                for r in &mut records {
                    r.body.columns.insert("td_bot".into(), why.into());
                    if r.body.columns.len() > self.max_columns {
                        return Err(Refusal::new(
                            ErrorKind::PayloadTooLarge,
                            format!("more than {} columns (td_bot included)", self.max_columns),
                        ));
                    }
                }
            }
            if assessment.opted_out.is_some() {
                metrics::FILTERED
                    .with_label_values(&["opted_out", "strip"])
                    .inc_by(records.len() as u64);
            }
        }

        let mut reply = match redirect {
            Some(url) => Reply::redirect(redirect::location(url, &global_id)),
            None => match format {
                Format::Pixel => Reply::pixel(),
                Format::Json => Reply::json_ok(),
            },
        };
        if identifiers && existing.is_none() {
            reply
                .headers
                .push(("Set-Cookie", self.cookie.set_cookie(&global_id, req.tls)));
        }
        Ok(Outcome { records, reply })
    }

    /// `td_record_time` when it is an integer inside the window, else the receive time.
    fn record_time(&self, raw: Option<&str>, now: i64) -> i64 {
        raw.and_then(|t| t.trim().parse::<i64>().ok())
            .filter(|t| *t >= now - self.past_secs && *t <= now + self.future_secs)
            .unwrap_or(now)
    }

    fn record(
        &self,
        target: Target<'_>,
        time: i64,
        columns: impl Iterator<Item = (String, String)>,
        fill: &mut Placeholders<'_>,
    ) -> Result<Record, Refusal> {
        let mut map = BTreeMap::new();
        for (name, value) in columns {
            let Some(value) = fill.value(&name, value) else {
                continue;
            };
            map.insert(name, value);
            if map.len() > self.max_columns {
                return Err(Refusal::new(
                    ErrorKind::PayloadTooLarge,
                    format!("more than {} columns", self.max_columns),
                ));
            }
        }
        Ok(Record {
            database: target.database.to_owned(),
            table: target.table.to_owned(),
            body: RecordBody { time, columns: map },
        })
    }
}

/// The values of the `td_ip`, `td_ua` and `td_global_id` placeholders, worked out when first asked for.
struct Placeholders<'a> {
    postback: &'a Postback,
    req: &'a PostbackRequest<'a>,
    global_id: &'a str,
    ip: Option<String>,
    /// The route's `anonymize_ip` override.
    anonymize: Option<bool>,
    /// Identifiers (`td_global_id`) may be recorded: consent given and not opted out.
    identifiers: bool,
    /// The visitor opted out: no `td_ip`, `td_ua` or `td_global_id` column at all.
    strip: bool,
}

impl Placeholders<'_> {
    /// The value column `name` gets, or `None` when the privacy rules leave it out.
    fn value(&mut self, name: &str, value: String) -> Option<String> {
        match name {
            "td_ip" | "td_ua" | "td_global_id" if self.strip => return None,
            "td_global_id" if !self.identifiers => return None,
            _ if name != value => return Some(value),
            _ => {}
        }
        Some(match name {
            "td_ip" => {
                if self.ip.is_none() {
                    self.ip = Some(self.client_ip());
                }
                self.ip.clone().unwrap_or_default()
            }
            "td_ua" => self
                .req
                .headers
                .get(header::USER_AGENT)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
            "td_global_id" => self.global_id.to_owned(),
            _ => value,
        })
    }

    fn client_ip(&self) -> String {
        let Some(peer) = self.req.peer else {
            return String::new();
        };
        let policy = &self.postback.client_ip;
        let xff = self
            .req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes());
        policy
            .recorded(policy.client_ip(peer, xff), self.anonymize)
            .to_string()
    }
}

/// The write key from `X-TD-Write-Key: KEY` or `Authorization: TD1 KEY`.
fn header_write_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-td-write-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("TD1").then(|| key.trim())
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Refusal> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad("body must be a JSON object")),
        Err(e) => Err(bad(format!("body is not valid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PostbackConfig, WriteKeyConfig};
    use crate::postback::reply::PIXEL_GIF;

    const NOW: i64 = 1_764_245_000;

    fn postback(extra: &str) -> Postback {
        let cfg: PostbackConfig = serde_saphyr::from_str(&format!(
            "redirect: {{allowed_hosts: [example.com]}}\nclient_ip: {{trusted_proxies: [10.0.0.1]}}\ncors: {{allowed_origins: ['https://www.example.com']}}\nmax_columns: 6\n{extra}"
        ))
        .unwrap();
        let keys: Vec<WriteKeyConfig> =
            serde_saphyr::from_str("- {key: 'KEY', databases: [web]}").unwrap();
        Postback::from_config(&cfg, KeyStore::from_config(&keys).unwrap()).unwrap()
    }

    const TARGET: Target<'static> = Target {
        database: "web",
        table: "pageviews",
        default_format: Format::Json,
        privacy: None,
    };

    fn get(
        p: &Postback,
        query: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Outcome, Refusal> {
        request(p, Method::GET, query, headers, b"")
    }

    fn request(
        p: &Postback,
        method: Method,
        query: &str,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> Result<Outcome, Refusal> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, v.parse().unwrap());
        }
        p.handle(
            TARGET,
            &PostbackRequest {
                method: &method,
                query: Some(query),
                headers: &map,
                body,
                peer: Some("10.0.0.1".parse().unwrap()),
                tls: false,
                now: NOW,
            },
        )
    }

    fn columns(o: &Outcome) -> Vec<(String, String)> {
        o.records[0].body.columns.clone().into_iter().collect()
    }

    fn header<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
        o.reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn pixel_with_columns_and_placeholders() {
        let p = postback("");
        let o = get(
            &p,
            "td_format=pixel&td_write_key=KEY&page=%2Fhome&td_ip=td_ip&td_ua=td_ua&td_global_id=td_global_id&time=5&a=1&a=2",
            &[("user-agent", "Mozilla/5.0 (X11)"), ("x-forwarded-for", "203.0.113.7"), ("cookie", "_td_global=gid-1")],
        )
        .unwrap();
        assert_eq!(o.reply.status, 200);
        assert_eq!(&o.reply.body[..], PIXEL_GIF);
        assert_eq!(header(&o, "Set-Cookie"), None);
        assert_eq!(o.records.len(), 1);
        assert_eq!(o.records[0].body.time, NOW);
        assert_eq!(
            columns(&o),
            [
                ("a", "2"),
                ("page", "/home"),
                ("td_global_id", "gid-1"),
                ("td_ip", "203.0.113.7"),
                ("td_ua", "Mozilla/5.0 (X11)")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn placeholders_with_other_values_are_plain_columns() {
        let o = get(&postback(""), "td_write_key=KEY&td_ip=1.2.3.4&td_ua=x", &[]).unwrap();
        assert_eq!(columns(&o)[0], ("td_ip".into(), "1.2.3.4".into()));
        assert_eq!(columns(&o)[1], ("td_ua".into(), "x".into()));
    }

    #[test]
    fn new_visitor_gets_a_cookie_and_a_json_answer() {
        let o = get(
            &postback(""),
            "td_write_key=KEY&td_global_id=td_global_id",
            &[],
        )
        .unwrap();
        assert_eq!(&o.reply.body[..], b"{}");
        let id = &o.records[0].body.columns["td_global_id"];
        assert_eq!(id.len(), 36);
        assert!(header(&o, "Set-Cookie")
            .unwrap()
            .starts_with(&format!("_td_global={id}; Max-Age=")));
    }

    #[test]
    fn record_time_window() {
        let p = postback("");
        let t = |q: &str| {
            get(&p, &format!("td_write_key=KEY&td_record_time={q}"), &[])
                .unwrap()
                .records[0]
                .body
                .time
        };
        assert_eq!(t(&(NOW - 3600).to_string()), NOW - 3600);
        assert_eq!(t(&(NOW - 8 * 86400).to_string()), NOW);
        assert_eq!(t(&(NOW + 2 * 86400).to_string()), NOW + 2 * 86400);
        assert_eq!(t(&(NOW + 4 * 86400).to_string()), NOW);
        assert_eq!(t("soon"), NOW);
        assert_eq!(t("1.5"), NOW);
    }

    #[test]
    fn refusals() {
        let p = postback("");
        let kind = |r: Result<Outcome, Refusal>| r.unwrap_err().kind;
        assert_eq!(kind(get(&p, "page=x", &[])), ErrorKind::Forbidden);
        assert_eq!(
            kind(get(&p, "td_write_key=nope", &[])),
            ErrorKind::Forbidden
        );
        assert_eq!(
            kind(get(&p, "td_write_key=KEY&td_format=png", &[])),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(get(&p, "td_write_key=KEY&a=%FF", &[])),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(get(&p, "td_write_key=KEY&a=1&b=2&c=3&d=4&e=5&f=6&g=7", &[])),
            ErrorKind::PayloadTooLarge
        );
        assert!(get(&p, "td_write_key=KEY&a=1&b=2&c=3&d=4&e=5&f=6&a=7", &[]).is_ok());
        let err = get(&p, "td_write_key=SECRETKEY", &[]).unwrap_err();
        assert!(!err.message.contains("SECRETKEY"));
    }

    #[test]
    fn header_key_wins_over_query() {
        let p = postback("");
        assert!(get(&p, "td_write_key=nope", &[("x-td-write-key", "KEY")]).is_ok());
        assert!(get(&p, "td_write_key=nope", &[("authorization", "TD1 KEY")]).is_ok());
        assert_eq!(
            get(&p, "td_write_key=KEY", &[("x-td-write-key", "nope")])
                .unwrap_err()
                .kind,
            ErrorKind::Forbidden
        );
    }

    #[test]
    fn redirects() {
        let p = postback("");
        let o = get(
            &p,
            "td_write_key=KEY&td_redirect=https%3A%2F%2Fexample.com%2Fland%3Fuid%3Dtd_global_id",
            &[("cookie", "_td_global=abc")],
        )
        .unwrap();
        assert_eq!(o.reply.status, 302);
        assert_eq!(
            header(&o, "Location"),
            Some("https://example.com/land?uid=abc")
        );
        assert!(o.reply.body.is_empty());
        let err = get(
            &p,
            "td_write_key=KEY&td_redirect=https%3A%2F%2Fevil.net%2F",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::BadRequest);
    }

    #[test]
    fn post_bodies() {
        let p = postback("");
        let json = [
            ("content-type", "application/json"),
            ("x-td-write-key", "KEY"),
        ];
        let o = request(
            &p,
            Method::POST,
            "",
            &json,
            br#"{"page":"/a","n":3,"ok":true,"nested":{"x":[1]},"none":null,"td_write_key":"KEY"}"#,
        )
        .unwrap();
        assert_eq!(
            columns(&o),
            [
                ("n", "3"),
                ("nested", "{\"x\":[1]}"),
                ("ok", "true"),
                ("page", "/a")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        for body in [&b"[1]"[..], b"{", b"\"s\""] {
            assert_eq!(
                request(&p, Method::POST, "", &json, body).unwrap_err().kind,
                ErrorKind::BadRequest
            );
        }
        let form = [(
            "content-type",
            "application/x-www-form-urlencoded; charset=UTF-8",
        )];
        let o = request(
            &p,
            Method::POST,
            "td_format=pixel",
            &form,
            b"td_write_key=KEY&page=%2Fb+c",
        )
        .unwrap();
        assert_eq!(columns(&o), [("page".to_string(), "/b c".to_string())]);
        assert_eq!(o.reply.headers[1].1, "image/gif");
        let other = [("content-type", "text/xml"), ("x-td-write-key", "KEY")];
        assert_eq!(
            request(&p, Method::POST, "", &other, b"<a/>")
                .unwrap_err()
                .kind,
            ErrorKind::UnsupportedMediaType
        );
    }

    #[test]
    fn td_js_sdk_batch() {
        let p = postback("");
        let h = [
            ("content-type", "application/vnd.treasuredata.v1+json"),
            ("authorization", "TD1 KEY"),
        ];
        let body = format!(
            r#"{{"events":[{{"a":"1","td_record_time":{}}},{{"b":"2","time":7}}]}}"#,
            NOW - 60
        );
        let o = request(
            &p,
            Method::POST,
            "time=99&modified=1764245000123",
            &h,
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(o.records.len(), 2);
        assert_eq!(o.records[0].body.time, NOW - 60);
        assert_eq!(o.records[1].body.time, NOW);
        assert_eq!(o.records[1].body.columns.len(), 1);
        let o = request(&p, Method::POST, "", &h, br#"{"events":[]}"#).unwrap();
        assert!(o.records.is_empty());
        assert_eq!(
            request(&p, Method::POST, "", &h, br#"{"events":[1]}"#)
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
        assert_eq!(
            request(&p, Method::POST, "", &h, br#"{"e":[]}"#)
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn gpc_strips_identifiers_and_sets_no_cookie() {
        let p = postback("");
        let q = "td_write_key=KEY&page=a&td_ip=td_ip&td_ua=td_ua&td_global_id=td_global_id";
        let o = get(&p, q, &[("sec-gpc", "1"), ("user-agent", "Firefox")]).unwrap();
        assert_eq!(columns(&o), [("page".to_string(), "a".to_string())]);
        assert_eq!(header(&o, "Set-Cookie"), None);
        assert_eq!(&o.reply.body[..], b"{}");
        // DNT is not honoured by default.
        let o = get(&p, q, &[("dnt", "1"), ("user-agent", "Firefox")]).unwrap();
        assert_eq!(o.records[0].body.columns.len(), 4);
    }

    #[test]
    fn opt_out_drop_and_consent() {
        let p = postback("privacy: {honor_dnt: true, opted_out: drop, consent_cookie: ok}");
        let q = "td_write_key=KEY&td_global_id=td_global_id&td_ip=td_ip";
        let o = get(&p, q, &[("dnt", "1")]).unwrap();
        assert!(o.records.is_empty());
        assert_eq!(o.reply.status, 200);
        // No consent cookie: no global id, no cookie, the rest is kept.
        let o = get(&p, q, &[]).unwrap();
        assert_eq!(columns(&o), [("td_ip".to_string(), "10.0.0.1".to_string())]);
        assert_eq!(header(&o, "Set-Cookie"), None);
        let o = get(&p, q, &[("cookie", "ok=1")]).unwrap();
        assert_eq!(o.records[0].body.columns["td_global_id"].len(), 36);
        assert!(header(&o, "Set-Cookie").is_some());
    }

    #[test]
    fn bots_are_flagged_or_dropped_and_ip_anonymized_per_route() {
        let p = postback("");
        let o = get(
            &p,
            "td_write_key=KEY&a=1",
            &[("user-agent", "Googlebot/2.1")],
        )
        .unwrap();
        assert_eq!(o.records[0].body.columns["td_bot"], "user_agent");
        let o = get(&p, "td_write_key=KEY&a=1", &[("purpose", "prefetch")]).unwrap();
        assert_eq!(o.records[0].body.columns["td_bot"], "prefetch");

        let cfg: crate::postback::privacy::PrivacyConfig =
            serde_saphyr::from_str("{bots: drop, anonymize_ip: true}").unwrap();
        let route_privacy = PrivacyPolicy::from_config(&cfg, "routes[0].privacy").unwrap();
        let target = Target {
            privacy: Some(&route_privacy),
            ..TARGET
        };
        let mut map = HeaderMap::new();
        map.insert("user-agent", "Googlebot/2.1".parse().unwrap());
        let req = |headers| PostbackRequest {
            method: &Method::GET,
            query: Some("td_write_key=KEY&td_ip=td_ip"),
            headers,
            body: b"",
            peer: Some("203.0.113.7".parse().unwrap()),
            tls: false,
            now: NOW,
        };
        assert!(p.handle(target, &req(&map)).unwrap().records.is_empty());
        let o = p.handle(target, &req(&HeaderMap::new())).unwrap();
        assert_eq!(o.records[0].body.columns["td_ip"], "203.0.113.0");
    }

    #[test]
    fn cors() {
        let p = postback("");
        let mut h = HeaderMap::new();
        h.insert("origin", "https://www.example.com".parse().unwrap());
        assert_eq!(p.cors_headers(&h)[0].1, "https://www.example.com");
        assert_eq!(p.preflight(&h).unwrap().status, 204);
        h.insert("origin", "https://evil.net".parse().unwrap());
        assert!(p.cors_headers(&h).is_empty());
        assert_eq!(p.preflight(&h).unwrap_err().kind, ErrorKind::Forbidden);
    }
}
