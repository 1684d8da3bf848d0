//! postback-proxy: Treasure Data compatible tracking-pixel postbacks for a Pingora reverse proxy.
//!
//! # Use it in your own Pingora proxy
//!
//! [`Postbacks`] answers postback requests (`/postback/v3/event/{database}/{table}?...`) in your
//! `request_filter` and hands each record to a sink; every other request is yours to proxy. Sinks
//! come from the configuration's `sinks:` (file, stdout, kafka, fluent, http) or are your own
//! [`LogSink`], registered by name; either way they get the disk buffer, batching, retries,
//! `/sinks` state and metrics.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use pingora::prelude::*;
//! use postback_proxy::{Batch, Config, LogSink, Postbacks, Rejection, SinkError};
//!
//! /// A sink of your own: here, it prints each record.
//! struct Print;
//!
//! #[async_trait]
//! impl LogSink for Print {
//!     async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
//!         for record in batch {
//!             println!("{}.{}: {:?}", record.database, record.table, record.body.columns);
//!         }
//!         Ok(Vec::new())
//!     }
//! }
//!
//! struct MyProxy {
//!     postbacks: Arc<Postbacks>,
//! }
//!
//! #[async_trait]
//! impl ProxyHttp for MyProxy {
//!     type CTX = ();
//!     fn new_ctx(&self) {}
//!
//!     async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
//!         // true: a postback, answered. false: proxy it as you always did.
//!         self.postbacks.handle(session).await
//!     }
//!
//!     async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
//!         Ok(Box::new(HttpPeer::new("127.0.0.1:3000", false, String::new())))
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = Config::parse(
//!         "auth: { write_keys: [{ key: 'KEY' }] }\nroutes: [{ path: '/postback/v3/event/{database}/{table}', sink: print }]",
//!     )?;
//!     let postbacks = Arc::new(Postbacks::builder(config).sink("print", Print).build()?);
//!     let mut server = Server::new(None)?;
//!     server.bootstrap();
//!     server.add_service(postbacks.delivery_service(&server.configuration));
//!     let mut proxy = http_proxy_service(&server.configuration, MyProxy { postbacks });
//!     proxy.add_tcp("0.0.0.0:8080");
//!     server.add_service(proxy);
//!     server.run_forever();
//! }
//! ```
//!
//! # Architecture
//!
//! Data flows one way: request -> route -> record -> delivery -> sink.
//! - `http/`: the Pingora side. [`Postbacks::handle`] matches the path against the routes, reads a
//!   bounded body, and hands a plain request to the postback rules; the standalone proxy service
//!   (`http::proxy`) adds the upstream peers with health checks and the `X-Forwarded-*` headers
//!   (`http::forwarded`, the client address in `http::client_ip`); the admin listener
//!   ([`AdminApp`]) and TLS set-up live here too.
//! - `postback/`: request -> records + reply, knowing nothing of Pingora: routes, then limits,
//!   CORS, parameters (query, form, JSON, td-js-sdk), write keys, privacy, the global-id cookie,
//!   redirects, the records and the reply, each in its own module, in the order they apply.
//! - `delivery/`: one lane per sink: a buffer (the crash-safe disk log by default, or memory),
//!   batching, retries with backoff, `rejected.jsonl`. Only when delivery accepted the records does
//!   the client get its answer.
//! - `identity/`: first-party identity on the site's own responses, knowing nothing of Pingora:
//!   re-issuing visitor-id cookies on proxied HTML pages ([`Postbacks::extend_cookies`], from a
//!   `response_filter`) and td-js-sdk's server cookie endpoint (`/get_cookie_id`, answered by
//!   [`Postbacks::handle`]).
//! - `sink/`: the [`LogSink`] trait and one folder per built-in sink; the proxy never sees a
//!   sink's details, and sinks never see HTTP.
//! - Shared leaves: [`Record`] (and `record::RecordRef`, the form the rules build, borrowing
//!   from the request, which delivery writes straight into the buffer), `metrics` (Prometheus), `template` (`{database}`/`{table}`),
//!   `units` (durations, sizes, addresses), `config` (the file's root, and [`Problem`]).
//!
//! The standalone binary is [`App`]: it reads the whole file ([`Config`]), builds [`Postbacks`]
//! through the same builder, and adds listeners, TLS and upstreams.
#![deny(missing_docs)]

// The crate's inner modules are public only for its own fuzz targets, benches and regression
// tests; they are hidden from the documentation and carry no stability promise. The API is what
// the crate root re-exports.
mod app;
mod clock;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod delivery;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod identity;
mod metrics;
#[doc(hidden)]
pub mod postback;
#[doc(hidden)]
pub mod record;
#[doc(hidden)]
pub mod sink;
mod sync;
#[doc(hidden)]
pub mod template;
#[doc(hidden)]
pub mod units;

pub use app::App;
pub use config::{Config, ConfigError, Problem};
pub use http::admin::AdminApp;
pub use http::builder::{BuildError, PostbacksBuilder};
pub use http::postbacks::{DeliveryService, Postbacks};
pub use record::{Record, RecordBody};
pub use sink::{Batch, LocalLog, LogSink, Rejection, SinkError};
