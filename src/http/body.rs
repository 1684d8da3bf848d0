//! Reading a postback's request body within its limit, and settling the body of a request that
//! was answered early, so the connection can be reused.

use pingora::proxy::Session;

use crate::postback::limits::{content_length, Limits};
use crate::postback::reply::{ErrorKind, Refusal};

/// Reads the whole body, refusing it with 413 past `max_body_bytes`.
pub async fn read_body(session: &mut Session, limits: &Limits) -> Result<Vec<u8>, Refusal> {
    let declared = content_length(&session.req_header().headers);
    if let Some(n) = declared {
        limits.check_body_len(n)?;
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limits.max_body_bytes {
                    return Err(limits.body_too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                // The framing is broken: what follows on this connection cannot be trusted to be
                // a request boundary, so the connection closes after the answer.
                session.set_keepalive(None);
                return Err(Refusal::new(
                    ErrorKind::BadRequest,
                    format!("cannot read the request body: {:?}", e.etype()),
                ));
            }
        }
    }
}

/// After an early answer: drain a body of known, acceptable size so the connection can be
/// reused; otherwise close the connection after the answer.
pub async fn settle_body(session: &mut Session, limits: &Limits) {
    if session.is_body_done() {
        return;
    }
    let small = content_length(&session.req_header().headers)
        .is_some_and(|n| n <= limits.max_body_bytes as u64);
    if !small || session.drain_request_body().await.is_err() {
        session.set_keepalive(None);
    }
}
