//! Turning one postback request into records and the answer to send.
//!
//! Nothing here knows Pingora: the HTTP side hands over a [`PostbackRequest`] (method, query,
//! headers, body, peer) and gets back either an [`Outcome`] (the records and the reply, to send
//! once the records are accepted for delivery) or a [`Refusal`]. The rules run in this order, each
//! in its own module: [`limits`] (method, URL length, body length, rate) and [`cors`] (`OPTIONS`)
//! before the body is read ([`Postback::check_head`]); then [`params`] (query, form, JSON,
//! td-js-sdk batches), [`auth`], [`privacy`], [`cookie`] (the global id), [`redirect`],
//! [`records`] and [`reply`] ([`Postback::handle`]). Everything is checked before anything is
//! returned, so a refused request changes nothing. Which requests are postbacks at all is
//! [`route`]'s job.

pub mod auth;
pub mod config;
pub mod cookie;
pub mod cors;
pub mod encoding;
pub mod enrich;
pub mod fields;
pub mod limits;
pub mod params;
pub mod privacy;
pub mod query;
pub mod records;
pub mod redirect;
pub mod reply;
pub mod route;

use std::borrow::Cow;
use std::net::IpAddr;

use http::Method;

use crate::config::Problem;
use crate::http::client_ip::ClientIpPolicy;
use crate::metrics;
use crate::record::RecordRef;
use auth::KeyStore;
use config::PostbackConfig;
use cookie::GlobalIdCookie;
use cors::Cors;
use enrich::{Enricher, UserAgents};
use fields::Fields;
use limits::Limits;
use params::bad;
use privacy::{Assessment, BotAction, OptOutAction, PrivacyPolicy};
use records::{Identity, RecordBuilder};
use redirect::RedirectPolicy;
use reply::{ErrorKind, Refusal, Reply};
use route::Format;

/// The receive time of a request: UNIX seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What a postback route resolved for a request.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The record's database.
    pub database: &'a str,
    /// The record's table.
    pub table: &'a str,
    /// The answer when `td_format` is absent.
    pub default_format: Format,
    /// The route's own privacy rules, if it has any.
    pub privacy: Option<&'a PrivacyPolicy>,
    /// The route's `enrich:`.
    pub enrich: &'a [Enricher],
}

/// The parts of an HTTP request a postback needs.
#[derive(Debug)]
pub struct PostbackRequest<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The length of the request target (path and query), for `max_url_bytes`.
    pub url_len: usize,
    /// The request's header fields.
    pub headers: Fields<'a>,
    /// The whole body as received (already bounded by `max_body_bytes`), still compressed when
    /// it has a `Content-Encoding`; empty for GET and HEAD, and before the body is read.
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
pub struct Outcome<'a> {
    /// The records to deliver (none when the privacy rules drop the request), borrowing from
    /// the request where their columns needed no decoding.
    pub records: Vec<RecordRef<'a>>,
    /// The answer to send once delivery accepted the records.
    pub reply: Reply,
}

/// The postback rules from `postback:`, `auth:` and `client_ip:`.
pub struct Postback {
    keys: KeyStore,
    client_ip: ClientIpPolicy,
    cookie: GlobalIdCookie,
    redirect: RedirectPolicy,
    privacy: PrivacyPolicy,
    cors: Cors,
    limits: Limits,
    user_agents: UserAgents,
    past_secs: i64,
    future_secs: i64,
}

/// Collects the problems of one part's `from_config` into `problems`, keeping the part.
fn collect<T>(result: Result<T, Vec<Problem>>, problems: &mut Vec<Problem>) -> Option<T> {
    result.map_err(|p| problems.extend(p)).ok()
}

impl Postback {
    /// Builds the rules, collecting every problem in `postback:` (and the keys' and client
    /// address's, built by the caller). `max_body_limit` is the largest body delivery can hold as
    /// one record. Runs once at start-up.
    pub fn from_config(
        cfg: &PostbackConfig,
        keys: KeyStore,
        client_ip: ClientIpPolicy,
        max_body_limit: u64,
    ) -> Result<Postback, Vec<Problem>> {
        let mut problems = Vec::new();
        let cookie = collect(GlobalIdCookie::from_config(&cfg.global_id), &mut problems);
        let redirect = collect(RedirectPolicy::from_config(&cfg.redirect), &mut problems);
        let privacy = collect(
            PrivacyPolicy::from_config(&cfg.privacy, "postback.privacy"),
            &mut problems,
        );
        let cors = collect(Cors::from_config(&cfg.cors), &mut problems);
        let limits = collect(Limits::from_config(cfg, max_body_limit), &mut problems);
        let (Some(cookie), Some(redirect), Some(privacy), Some(cors), Some(limits), true) =
            (cookie, redirect, privacy, cors, limits, problems.is_empty())
        else {
            return Err(problems);
        };
        Ok(Postback {
            keys,
            client_ip,
            cookie,
            redirect,
            privacy,
            cors,
            limits,
            user_agents: UserAgents::default(),
            past_secs: cfg.record_time_window.past.0.as_secs() as i64,
            future_secs: cfg.record_time_window.future.0.as_secs() as i64,
        })
    }

    /// The limits (the HTTP side bounds the body it reads by them).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The CORS headers for the request's `Origin`, when it is allowed; added to every postback
    /// answer, refusals included.
    pub fn cors_headers(&self, headers: Fields<'_>) -> Vec<(&'static str, String)> {
        self.cors.headers(headers)
    }

    /// What `postback.privacy` says about the visitor of a request that is no postback (a
    /// proxied page, the server cookie endpoint).
    pub fn assess(&self, headers: Fields<'_>) -> Assessment {
        self.privacy.assess(headers)
    }

    /// The client's address as the records see it (used for `td_ip`).
    pub fn client_ip_policy(&self) -> &ClientIpPolicy {
        &self.client_ip
    }

    /// Runs for every postback before its body is read: the rate limit, the URL's length and the
    /// method (the body's length is checked as it is read). `Ok(Some(reply))` answers an `OPTIONS` preflight;
    /// `Ok(None)`: read the body and call [`Postback::handle`].
    pub fn check_head(&self, req: &PostbackRequest<'_>) -> Result<Option<Reply>, Refusal> {
        if let (true, Some(peer)) = (self.limits.has_rate_limit(), req.peer) {
            let xff = req.headers.get_all(&fields::X_FORWARDED_FOR);
            self.limits
                .check_rate(self.client_ip.client_ip(peer, xff))?;
        }
        self.limits.check_url(req.url_len)?;
        Limits::check_method(req.method)?;
        if *req.method == Method::OPTIONS {
            return self.cors.preflight(req.headers).map(Some);
        }
        if *req.method == Method::POST {
            // An encoding we cannot read is refused before the body is.
            encoding::of(req.headers)?;
        }
        Ok(None)
    }

    /// Runs for every GET, HEAD or POST to a postback route, after [`Postback::check_head`] and
    /// with the body read: checks the request and builds its records and reply. Nothing is
    /// delivered here; the caller delivers `records` and, once they are accepted, sends `reply`.
    pub fn handle<'a>(
        &self,
        target: Target<'a>,
        req: &PostbackRequest<'a>,
    ) -> Result<Outcome<'a>, Refusal> {
        let body = match *req.method {
            Method::POST => encoding::decode(
                encoding::of(req.headers)?,
                req.body,
                self.limits.max_body_bytes,
            )?,
            _ => Cow::Borrowed(req.body),
        };
        let params::Parsed { query, objects } = match body {
            Cow::Borrowed(body) => params::parse(req.method, req.query, req.headers, body)?,
            // A decompressed body is gone when this returns: its columns are copied.
            Cow::Owned(body) => {
                params::parse(req.method, req.query, req.headers, &body)?.into_owned()
            }
        };
        // The answer, checked before anything is accepted.
        let format = match query.format.as_deref() {
            None => target.default_format,
            Some("pixel") => Format::Pixel,
            Some("json") => Format::Json,
            Some(_) => return Err(bad("td_format must be `pixel` or `json`")),
        };
        let redirect = match &query.redirect {
            Some(raw) => Some(self.redirect.check(raw).map_err(|e| bad(e.to_string()))?),
            None => None,
        };
        let key = auth::header_write_key(req.headers).or(query.write_key.as_deref());
        self.keys
            .check(key, target.database)
            .map_err(|e| Refusal::new(ErrorKind::Forbidden, e.to_string()))?;

        let assessment = target.privacy.unwrap_or(&self.privacy).assess(req.headers);
        let dropped = match (assessment.opted_out, assessment.bot) {
            (Some(OptOutAction::Drop), _) => Some("opted_out"),
            (_, Some((_, BotAction::Drop))) => Some("bot"),
            _ => None,
        };
        let existing = cookie::find_in(req.headers, &self.cookie.name)
            .filter(|id| cookie::valid_global_id(id));
        let identifiers = assessment.identifiers_allowed && dropped.is_none();
        let global_id = match (identifiers, existing) {
            (false, _) => Cow::Borrowed(""),
            (true, Some(id)) => Cow::Borrowed(id),
            (true, None) => Cow::Owned(cookie::new_global_id()),
        };

        let identity = Identity {
            global_id: global_id.clone(),
            anonymize: assessment.anonymize_ip,
            identifiers,
            strip: assessment.opted_out.is_some(),
        };
        let mut builder = RecordBuilder::new(
            req,
            target,
            &self.client_ip,
            identity,
            self.limits.max_columns,
        );
        let mut records = builder.records(query, objects, |t| self.record_time(t, req.now))?;
        if target.enrich.contains(&Enricher::UserAgent) {
            for r in &mut records {
                self.user_agents.enrich(r, self.limits.max_columns)?;
            }
        }
        self.apply_privacy(&mut records, &assessment, dropped)?;

        let mut reply = match redirect {
            Some(url) => Reply::redirect(redirect::location(url, &global_id)),
            None => match format {
                Format::Pixel => Reply::pixel(),
                Format::Json => Reply::json_ok(),
            },
        };
        if identifiers && existing.is_none() {
            reply.headers.to_mut().push((
                "Set-Cookie",
                self.cookie.set_cookie(&global_id, req.tls).into(),
            ));
        }
        Ok(Outcome { records, reply })
    }

    /// Drops the records of an opted-out visitor or a bot (by the rules), or flags a bot's with a
    /// `td_bot` column; counts each.
    fn apply_privacy(
        &self,
        records: &mut Vec<RecordRef<'_>>,
        assessment: &Assessment,
        dropped: Option<&'static str>,
    ) -> Result<(), Refusal> {
        if let Some(reason) = dropped {
            metrics::FILTERED
                .with_label_values(&[reason, "drop"])
                .inc_by(records.len() as u64);
            records.clear();
            return Ok(());
        }
        if let Some((why, BotAction::Flag)) = assessment.bot {
            metrics::FILTERED
                .with_label_values(&["bot", "flag"])
                .inc_by(records.len() as u64);
            for r in records.iter_mut() {
                r.insert(Cow::Borrowed("td_bot"), Cow::Borrowed(why));
                if r.len() > self.limits.max_columns {
                    return Err(Refusal::new(
                        ErrorKind::PayloadTooLarge,
                        format!(
                            "more than {} columns (td_bot included)",
                            self.limits.max_columns
                        ),
                    ));
                }
            }
        }
        if assessment.opted_out.is_some() {
            metrics::FILTERED
                .with_label_values(&["opted_out", "strip"])
                .inc_by(records.len() as u64);
        }
        Ok(())
    }

    /// `td_record_time` when it is an integer inside the window, else the receive time.
    fn record_time(&self, raw: Option<&str>, now: i64) -> i64 {
        raw.and_then(|t| t.trim().parse::<i64>().ok())
            .filter(|t| *t >= now - self.past_secs && *t <= now + self.future_secs)
            .unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::client_ip::ClientIpConfig;
    use crate::postback::auth::WriteKeyConfig;
    use crate::postback::reply::PIXEL_GIF;
    use http::HeaderMap;

    const NOW: i64 = 1_764_245_000;

    fn postback(extra: &str) -> Postback {
        let cfg: PostbackConfig = serde_saphyr::from_str(&format!(
            "redirect: {{allowed_hosts: [example.com]}}\ncors: {{allowed_origins: ['https://www.example.com']}}\nmax_columns: 6\n{extra}"
        ))
        .unwrap();
        let keys: Vec<WriteKeyConfig> =
            serde_saphyr::from_str("- {key: 'KEY', databases: [web]}").unwrap();
        let client_ip: ClientIpConfig =
            serde_saphyr::from_str("trusted_proxies: [10.0.0.1]").unwrap();
        let client_ip = ClientIpPolicy::from_config(&client_ip).unwrap();
        Postback::from_config(
            &cfg,
            KeyStore::from_config(&keys).unwrap(),
            client_ip,
            u64::MAX,
        )
        .unwrap()
    }

    const TARGET: Target<'static> = Target {
        database: "web",
        table: "pageviews",
        default_format: Format::Json,
        privacy: None,
        enrich: &[],
    };

    /// The headers of a JSON body with the write key.
    const JSON_WITH_KEY: [(&str, &str); 2] = [
        ("content-type", "application/json"),
        ("x-td-write-key", "KEY"),
    ];

    fn get(
        p: &Postback,
        query: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Handled, Refusal> {
        request(p, Method::GET, query, headers, b"")
    }

    fn request(
        p: &Postback,
        method: Method,
        query: &str,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> Result<Handled, Refusal> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, v.parse().unwrap());
        }
        p.handle(
            TARGET,
            &PostbackRequest {
                query: Some(query),
                url_len: query.len(),
                body,
                peer: Some("10.0.0.1".parse().unwrap()),
                ..head(&method, &map)
            },
        )
        .map(|o| Handled {
            records: o.records.iter().map(RecordRef::to_record).collect(),
            reply: o.reply,
        })
    }

    /// An [`Outcome`] with its records copied out of the request.
    #[derive(Debug)]
    struct Handled {
        records: Vec<crate::record::Record>,
        reply: Reply,
    }

    /// A request with no query, no body and no peer, as `check_head` sees it.
    fn head<'a>(method: &'a Method, headers: &'a HeaderMap) -> PostbackRequest<'a> {
        PostbackRequest {
            method,
            query: None,
            url_len: 1,
            headers: Fields::Map(headers),
            body: b"",
            peer: None,
            tls: false,
            now: NOW,
        }
    }

    /// What a refused request was refused as.
    fn kind(r: Result<Handled, Refusal>) -> ErrorKind {
        r.unwrap_err().kind
    }

    fn columns(o: &Handled) -> Vec<(String, String)> {
        o.records[0].body.columns.clone().into_iter().collect()
    }

    fn header<'a>(o: &'a Handled, name: &str) -> Option<&'a str> {
        o.reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| &**v)
    }

    #[test]
    fn pixel_with_columns_and_placeholders() {
        let o = get(
            &postback(""),
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
        for (query, want) in [
            ("page=x", ErrorKind::Forbidden),
            ("td_write_key=nope", ErrorKind::Forbidden),
            ("td_write_key=KEY&td_format=png", ErrorKind::BadRequest),
            ("td_write_key=KEY&a=%FF", ErrorKind::BadRequest),
            (
                "td_write_key=KEY&a=1&b=2&c=3&d=4&e=5&f=6&g=7",
                ErrorKind::PayloadTooLarge,
            ),
        ] {
            assert_eq!(kind(get(&p, query, &[])), want, "{query}");
        }
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
            kind(get(&p, "td_write_key=KEY", &[("x-td-write-key", "nope")])),
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
        let evil = "td_write_key=KEY&td_redirect=https%3A%2F%2Fevil.net%2F";
        assert_eq!(kind(get(&p, evil, &[])), ErrorKind::BadRequest);
    }

    #[test]
    fn post_bodies() {
        let p = postback("");
        let o = request(
            &p,
            Method::POST,
            "",
            &JSON_WITH_KEY,
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
                kind(request(&p, Method::POST, "", &JSON_WITH_KEY, body)),
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
            kind(request(&p, Method::POST, "", &other, b"<a/>")),
            ErrorKind::UnsupportedMediaType
        );
    }

    #[test]
    fn compressed_bodies() {
        use std::io::Write;
        let p = postback("max_body_bytes: 200");
        let gzip = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let h = |enc: &'static str| {
            [
                JSON_WITH_KEY[0],
                JSON_WITH_KEY[1],
                ("content-encoding", enc),
            ]
        };
        let o = request(&p, Method::POST, "", &h("gzip"), &gzip(br#"{"page":"/z"}"#)).unwrap();
        assert_eq!(columns(&o), [("page".to_string(), "/z".to_string())]);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(br#"{"page":"/d"}"#).unwrap();
        let o = request(&p, Method::POST, "", &h("deflate"), &z.finish().unwrap()).unwrap();
        assert_eq!(columns(&o), [("page".to_string(), "/d".to_string())]);
        let big = format!(r#"{{"page":"{}"}}"#, "a".repeat(300));
        let refused = |enc, body: &[u8]| kind(request(&p, Method::POST, "", &h(enc), body));
        assert_eq!(
            refused("gzip", &gzip(big.as_bytes())),
            ErrorKind::PayloadTooLarge
        );
        assert_eq!(refused("gzip", b"{\"page\":1}"), ErrorKind::BadRequest);
        assert_eq!(refused("br", b"{}"), ErrorKind::UnsupportedMediaType);
        // Unknown encodings are refused before the body is read.
        let mut map = HeaderMap::new();
        map.insert("content-encoding", "br".parse().unwrap());
        assert_eq!(
            p.check_head(&head(&Method::POST, &map)).unwrap_err().kind,
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
        // Every event's placeholders are filled in (the address is worked out once, for all).
        let h2 = [
            h[0],
            h[1],
            ("x-forwarded-for", "203.0.113.7"),
            ("cookie", "_td_global=gid-1"),
        ];
        let body =
            br#"{"events":[{"td_ip":"td_ip","td_global_id":"td_global_id"},{"td_ip":"td_ip"}]}"#;
        let o = request(&p, Method::POST, "", &h2, body).unwrap();
        let ips: Vec<_> = o
            .records
            .iter()
            .map(|r| r.body.columns["td_ip"].as_str())
            .collect();
        assert_eq!(ips, ["203.0.113.7", "203.0.113.7"]);
        assert_eq!(o.records[0].body.columns["td_global_id"], "gid-1");
        let o = request(&p, Method::POST, "", &h, br#"{"events":[]}"#).unwrap();
        assert!(o.records.is_empty());
        for body in [&br#"{"events":[1]}"#[..], br#"{"e":[]}"#] {
            assert_eq!(
                kind(request(&p, Method::POST, "", &h, body)),
                ErrorKind::BadRequest
            );
        }
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
        for (header, flag) in [
            (("user-agent", "Googlebot/2.1"), "user_agent"),
            (("purpose", "prefetch"), "prefetch"),
        ] {
            let o = get(&p, "td_write_key=KEY&a=1", &[header]).unwrap();
            assert_eq!(o.records[0].body.columns["td_bot"], flag);
        }

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
            query: Some("td_write_key=KEY&td_ip=td_ip"),
            url_len: 27,
            peer: Some("203.0.113.7".parse().unwrap()),
            ..head(&Method::GET, headers)
        };
        assert!(p.handle(target, &req(&map)).unwrap().records.is_empty());
        let empty = HeaderMap::new();
        let o = p.handle(target, &req(&empty)).unwrap();
        assert_eq!(o.records[0].get("td_ip"), Some("203.0.113.0"));
    }

    #[test]
    fn cors() {
        let p = postback("");
        let mut h = HeaderMap::new();
        h.insert("origin", "https://www.example.com".parse().unwrap());
        assert_eq!(
            p.cors_headers(Fields::Map(&h))[0].1,
            "https://www.example.com"
        );
        assert_eq!(
            p.check_head(&head(&Method::OPTIONS, &h))
                .unwrap()
                .unwrap()
                .status,
            204
        );
        h.insert("origin", "https://evil.net".parse().unwrap());
        assert!(p.cors_headers(Fields::Map(&h)).is_empty());
        assert_eq!(
            p.check_head(&head(&Method::OPTIONS, &h)).unwrap_err().kind,
            ErrorKind::Forbidden
        );
    }
}
