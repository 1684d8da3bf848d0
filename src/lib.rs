//! postback-proxy: a Pingora reverse proxy that answers tracking-pixel postbacks itself and forwards
//! everything else to the origin.
//!
//! # Architecture
//!
//! Data flows one way. [`proxy::PostbackProxy`] is the Pingora [`ProxyHttp`](pingora::proxy::ProxyHttp)
//! implementation: in `request_filter` it asks the [`route::Router`] whether the path is a postback
//! route. If not, the request streams to an upstream peer picked by [`upstream`] and the proxy adds the
//! `X-Forwarded-*` headers. If it is, the proxy reads the (bounded) body and hands a plain
//! [`postback::PostbackRequest`] to [`postback::Postback::handle`], which knows nothing about Pingora:
//! it checks the write key ([`auth`]), parses the query or body ([`query`]), resolves the client
//! address ([`client_ip`]), the visitor's global id ([`cookie`]) and any redirect ([`redirect`]), and
//! returns the [`record::Record`]s plus the answer to send. The records go to [`delivery::Delivery`],
//! which owns one lane per configured sink: a bounded buffer and a background writer that batches
//! records into a [`sink::LogSink`]. Only when delivery has accepted the records does the client get
//! its GIF, redirect or `{}`. The proxy layer never sees a sink's details; the sinks never see HTTP.
//!
//! Configuration is one YAML file ([`config`]); [`app::App::build`] turns it into these parts,
//! collecting every problem with the field that caused it, so `--check` and start-up report the same
//! errors. Counters for every limit, drop and failure live in [`metrics`].

pub mod app;
pub mod config;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod postback;
pub mod record;
pub mod sink;
mod sync;
pub mod template;
pub mod units;
