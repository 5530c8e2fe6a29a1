//! The per-executor revocation watch: every `REVOCATIONS_POLL_INTERVAL` it asks the server's
//! revocation registry to reload the list if its file changed (one `stat`; whichever executor
//! sees the change first reloads it for all), and when the list in force changed since its last
//! look it wakes this executor's WebSocket connections (the signal of
//! [`crate::net::auth::revocations_changed`]; each checks its own token and closes with 1008
//! `token_revoked` if revoked) and ends this executor's revoked MQTT connections
//! ([`crate::net::mqtt::end_revoked`]). It owns no list (`crate::revoke`) and no refusal rule
//! (`net::auth`).
//!
//! Invariant: one timer per executor, none per connection; a change of the file reaches every
//! executor's connections within two poll intervals (one for the reload, one for the look).

use std::rc::Rc;
use std::time::Duration;

use crate::limits::{REPEAT_LOG_INTERVAL_MS, REVOCATIONS_POLL_INTERVAL};
use crate::net::edge::Edge;
use crate::ratelog::LogEvery;
use crate::rt;

/// Watches the revocation list until shutdown (spawned once per executor by `server`).
pub async fn watch_loop(edge: Rc<Edge>) {
    let core = &edge.core;
    let registry = &core.shared.revocations;
    let signal = crate::net::auth::revocations_changed();
    let error_log = LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS));
    let mut seen = registry.generation();
    while !core.stopping() {
        rt::timeout(REVOCATIONS_POLL_INTERVAL, core.stop.wait()).await;
        if core.stopping() {
            return;
        }
        match registry.refresh() {
            Ok(true) => tracing::info!(
                executor = core.index.0,
                revoked_subjects = registry.current().len(),
                "revocation list reloaded"
            ),
            Ok(false) => {}
            Err(e) => {
                if let Some(suppressed) = error_log.check() {
                    tracing::error!(error = %e, suppressed_since_last = suppressed, "revocation list not reloaded; the previous list stays in force");
                }
            }
        }
        let generation = registry.generation();
        if generation != seen {
            seen = generation;
            signal.notify();
            crate::net::mqtt::end_revoked(&core.shared);
        }
    }
}
