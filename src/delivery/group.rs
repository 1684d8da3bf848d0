//! What the disk buffer ([`super::disk::writer`]) and a sink that is its own buffer
//! ([`super::direct`]) share: the group commit (requests add their bytes to a pending group; the
//! first of a group leads it, the others wait for its outcome), and the probe for space after a
//! failed append.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A group's outcome, as its requests wait for it: `None` until the group is written.
pub(super) type Outcome = Option<Result<(), Arc<str>>>;

/// A request's part in a group commit, once its bytes are in the pending group. The leader
/// (`lead` is `Some`) yields once, so that every request the runtime has ready joins the group,
/// then runs its `commit`, which writes the group and sends the outcome; should the leader be
/// cancelled before that finished, dropping its guard must write the group instead. Every request
/// then gets the outcome from `done`; `closed` is the error if the group is gone unwritten.
pub(super) async fn lead_or_wait<G, C: Future<Output = ()>>(
    mut done: watch::Receiver<Outcome>,
    lead: Option<(G, C)>,
    closed: &str,
) -> Result<(), Arc<str>> {
    if let Some((guard, commit)) = lead {
        tokio::task::yield_now().await;
        commit.await;
        std::mem::forget(guard);
    }
    match done.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
        Err(_) => Err(Arc::from(closed)),
    }
}

/// While appends fail (a full disk), whether space is back: at most once a second (`probed` says
/// when it was last tried), writes 64 KiB to `probe` and deletes it again. `false` between two
/// tries.
pub(super) fn space_is_back(probed: &mut Option<Instant>, probe: &Path) -> bool {
    if probed.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
        return false;
    }
    *probed = Some(Instant::now());
    let ok = std::fs::write(probe, [0u8; 64 << 10]).is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}
