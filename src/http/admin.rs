//! The admin listener: `/metrics`, `/healthz` and `/readyz`. Bind it to a private address only.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::delivery::Delivery;
use crate::metrics;

/// Answers the admin endpoints.
pub struct AdminApp {
    delivery: Arc<Delivery>,
}

impl AdminApp {
    /// The admin endpoints, reporting readiness from `delivery`.
    pub fn new(delivery: Arc<Delivery>) -> Self {
        AdminApp { delivery }
    }
}

fn text(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    if let Ok(v) = content_type.parse() {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::CONTENT_LENGTH, len.into());
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    /// Runs for every admin request.
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let _ = session.drain_request_body().await;
        match session.req_header().uri.path() {
            "/metrics" => {
                self.delivery.update_gauges();
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics::render().into_bytes(),
                )
            }
            "/healthz" => text(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.delivery.ready() {
                    text(StatusCode::OK, "text/plain", b"ready\n".to_vec())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        b"not ready: a sink is failing or a buffer is full\n".to_vec(),
                    )
                }
            }
            _ => text(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}
