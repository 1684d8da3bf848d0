//! Your own Pingora proxy, with Treasure Data postbacks and a sink of your own.
//!
//!     cargo run --example embed -- 127.0.0.1:8080 127.0.0.1:3000 /tmp/embed-buffer
//!
//! Postbacks (`/postback/v3/event/{database}/{table}?td_write_key=demo-key&...`) are answered by
//! `Postbacks`; their records go to `CountingSink`, which prints a running count per table. Every
//! other request goes to the upstream given on the command line, by this proxy's own logic.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::prelude::*;
use postback_proxy::{Batch, Config, LogSink, Postbacks, Rejection, SinkError};

/// Counts records per `database.table` and prints each new count.
#[derive(Default)]
struct CountingSink(Mutex<BTreeMap<String, u64>>);

#[async_trait]
impl LogSink for CountingSink {
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<Vec<Rejection>, SinkError> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for record in batch {
            let table = format!("{}.{}", record.database, record.table);
            let n = counts.entry(table.clone()).or_default();
            *n += 1;
            println!(
                "{table} {n} page={}",
                record.body.columns.get("page").map_or("", |p| p)
            );
        }
        Ok(Vec::new())
    }
}

/// The user's proxy: its own upstream choice, with postbacks taken first.
struct MyProxy {
    postbacks: Arc<Postbacks>,
    upstream: String,
}

#[async_trait]
impl ProxyHttp for MyProxy {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        self.postbacks.handle(session).await
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    let dir = args.next().unwrap_or_else(|| "data/embed-buffer".into());
    let config = Config::parse(&format!(
        "auth: {{ write_keys: [{{ key: demo-key, databases: ['*'] }}] }}\n\
         routes: [{{ path: '/postback/v3/event/{{database}}/{{table}}', sink: counter }}]\n\
         delivery: {{ dir: '{dir}', batch: {{ max_wait: 10ms }} }}"
    ))?;
    let postbacks = Postbacks::builder(config)
        .sink("counter", CountingSink::default())
        .build()?;
    let postbacks = Arc::new(postbacks);

    let mut server = Server::new(None)?;
    server.bootstrap();
    server.add_service(postbacks.delivery_service(&server.configuration));
    let mut proxy = http_proxy_service(
        &server.configuration,
        MyProxy {
            postbacks,
            upstream,
        },
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
