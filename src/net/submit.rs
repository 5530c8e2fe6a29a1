//! Durable submission for request/response protocols: [`submit_durable`] hands heartbeats that
//! arrived in one request (an OsmAnd query, an OwnTracks POST) to the shards that own their
//! devices and returns once every one is durable, so the caller answers 200 only then. It owns
//! no protocol and no socket; it rides on the same machinery as a WebSocket frame: the request
//! is a one-frame connection in the executor's [`crate::shard::acks::AckLedger`], its groups
//! are appended locally or forwarded over the data mesh, and the commit loops complete them.
//!
//! Invariant: `Ok` means every heartbeat is durable (the ledger's ack covers the request's
//! whole frame and no group reported a storage refusal); any error means some may not be, and
//! the client must resend. A resend is deduplicated on (device, device timestamp) against the
//! device's last `limits::DEDUPE_DEVICE_TIME_ENTRIES_MAX` stored entries (`store::Dedupe`).

use std::time::{Duration, Instant};

use crate::limits::DEVICE_HTTP_DURABLE_WAIT_MS;
use crate::metrics::ExecProbe;
use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::rt;
use crate::shard::acks::{AckLedger, ConnKey};
use crate::shard::core::Core;
use crate::shard::mesh::Batch;
use crate::store::Dedupe;

/// Why submitted heartbeats are not (known to be) durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The server is shutting down and takes nothing new.
    #[error("server shutting down; retry")]
    ShuttingDown,
    /// The owning executor cannot be reached (its mesh channel closed).
    #[error("shard unavailable; retry")]
    MeshClosed,
    /// The owning shard refused to store a heartbeat (`storage_full`, `sink_backlog_full`,
    /// `storage_unavailable`, `invalid`, ...: the reason of the WebSocket error frame).
    #[error("not stored: {0}")]
    Refused(&'static str),
    /// Not durable within [`DEVICE_HTTP_DURABLE_WAIT_MS`] (it may still become durable).
    #[error("not durable within {0} ms; retry")]
    Timeout(u64),
}

/// Closes the request's ledger entry however the submission ends (completions still in flight
/// are then dropped by the ledger).
struct Entry<'a> {
    ledger: &'a AckLedger,
    key: ConnKey,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.ledger.close(self.key);
    }
}

/// Stores `heartbeats` (validated, at least one) on the shards owning their devices and waits
/// until all are durable, or fails (see [`SubmitError`]).
pub async fn submit_durable(core: &Core, heartbeats: Vec<Heartbeat>) -> Result<(), SubmitError> {
    assert!(!heartbeats.is_empty(), "a submission carries heartbeats");
    if core.stopping() {
        return Err(SubmitError::ShuttingDown);
    }
    let entry = Entry {
        ledger: &core.acks,
        key: core.acks.open(),
    };
    let wait = Duration::from_millis(DEVICE_HTTP_DURABLE_WAIT_MS);
    match rt::timeout(wait, submit_and_wait(core, entry.key, heartbeats)).await {
        Some(done) => done,
        None => Err(SubmitError::Timeout(DEVICE_HTTP_DURABLE_WAIT_MS)),
    }
}

async fn submit_and_wait(
    core: &Core,
    key: ConnKey,
    heartbeats: Vec<Heartbeat>,
) -> Result<(), SubmitError> {
    let received = Instant::now();
    let count = heartbeats.len() as u64;
    // Seqs 1..=count number the heartbeats within this one-frame connection.
    let router = &core.shared.router;
    let mut groups: Vec<(ShardId, Vec<(u64, Heartbeat)>)> = Vec::new();
    for (i, hb) in heartbeats.into_iter().enumerate() {
        let shard = router.shard_of(&hb.device_id);
        let at = match groups.iter().position(|(s, _)| *s == shard) {
            Some(at) => at,
            None => {
                groups.push((shard, core.take_batch_vec()));
                groups.len() - 1
            }
        };
        groups[at].1.push((i as u64 + 1, hb));
    }
    let probe = &core.probe;
    ExecProbe::add(&probe.accepted, count);
    let frame = core.acks.frame_begin(
        key,
        count,
        groups.len() as u32,
        received,
        &probe.ack_latency,
    );
    for (shard, items) in groups {
        if core.owner(shard) == core.index {
            core.append_local(
                shard,
                key,
                frame,
                Dedupe::DeviceTime,
                items.iter().map(|(s, h)| (*s, h)),
            );
            core.recycle(items);
        } else {
            let batch = Batch {
                conn: key,
                frame,
                items,
                failed: Vec::new(),
                dedupe: Dedupe::DeviceTime,
            };
            // Waits for room in the owner's channel: a slow owner slows this request.
            core.forward(shard, batch)
                .await
                .map_err(|_| SubmitError::MeshClosed)?;
        }
    }
    let signal = core
        .acks
        .with(key, |c| c.signal.clone())
        .expect("the entry is open until this returns");
    loop {
        // Registered before the state is read (nothing runs in between), so no completion
        // between the two is missed.
        let changed = signal.wait();
        let (acked, refused) = core
            .acks
            .with(key, |c| (c.ack_ready, c.errors.pop_front()))
            .expect("the entry is open until this returns");
        // A refused group completes its frame too: look at the refusals first.
        if let Some((_, reason)) = refused {
            return Err(SubmitError::Refused(reason));
        }
        if acked >= count {
            return Ok(());
        }
        changed.await;
    }
}
