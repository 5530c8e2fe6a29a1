//! Retention of one executor's shards: periodically hands every sink's consumed position to the
//! log, checkpoints the last locations of segments about to expire and deletes segments past
//! retention that every consumer has passed, and warns while a sink's backlog is over budget. It
//! owns when and in which steps that happens (the checkpoint file is written and fsynced on a
//! helper thread, the replaced files unmapped on another, so the executor keeps serving); what is
//! deleted and how the checkpoint is built are the store's (`store`, `checkpoint`).
//!
//! Invariant: no store borrow is held across an await; a segment is deleted only after the
//! checkpoint covering its last locations is durable.

use std::rc::Rc;
use std::time::Duration;

use crate::limits::RETENTION_CHECK_INTERVAL;
use crate::rt;
use crate::shard::core::{Core, StoreSlot};
use crate::store::RetentionStep;

impl Core {
    /// Periodically hands every sink's consumed position to the log, deletes segments past
    /// retention that every consumer has passed, and warns while a sink's backlog is over budget.
    pub async fn retention_loop(self: Rc<Self>) {
        let cfg = &self.shared.cfg;
        let mut warned = vec![false; self.stores.len()];
        loop {
            rt::timeout(RETENTION_CHECK_INTERVAL, self.stop.wait()).await;
            if self.stopping() {
                return;
            }
            for (i, slot) in self.stores.iter().enumerate() {
                let feed = &self.shared.feeds[slot.shard.0 as usize];
                if !cfg.sinks.is_empty() {
                    let mut store = slot.store.borrow_mut();
                    let consumed = feed.consumed().min(store.durable());
                    if let Err(e) = store.set_consumed(crate::flusher::CONSUMER_NAME, consumed) {
                        tracing::warn!(shard = %slot.shard, error = %e, "could not record the sinks' position");
                    }
                }
                if let Some(retention) = cfg.retention {
                    let res = self.retention_step(slot, retention).await;
                    match res {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(shard = %slot.shard, segments = n, "retention deleted segments")
                        }
                        Err(e) => {
                            tracing::warn!(shard = %slot.shard, error = %e, "retention failed")
                        }
                    }
                }
                if let Some(warn) = cfg.sink_backlog_warn_bytes {
                    let backlog = feed.backlog_bytes();
                    if backlog > warn && !warned[i] {
                        tracing::warn!(shard = %slot.shard, backlog_bytes = backlog, warn_bytes = warn, max_bytes = ?cfg.sink_backlog_max_bytes, "sink backlog over its warning budget: a sink is slow or down; past the maximum, new heartbeats are refused");
                    } else if backlog <= warn && warned[i] {
                        tracing::info!(shard = %slot.shard, backlog_bytes = backlog, "sink backlog back under its warning budget");
                    }
                    warned[i] = backlog > warn;
                }
            }
        }
    }

    /// One retention run for one shard: checkpoints the last locations below the new log start
    /// (positions collected here in slices of one table chunk; the file built, written and
    /// fsynced on a helper thread so the executor keeps serving), then deletes the expired
    /// segments. The store is not borrowed across an await.
    async fn retention_step(
        &self,
        slot: &StoreSlot,
        retention: Duration,
    ) -> Result<usize, crate::store::Error> {
        let step = slot.store.borrow().retention_begin_within(
            std::time::SystemTime::now(),
            retention,
            Duration::ZERO,
        );
        match step {
            RetentionStep::Nothing => Ok(0),
            RetentionStep::Delete(end) => slot.store.borrow_mut().delete_below(end),
            RetentionStep::Checkpoint(mut job) => {
                // Collect in slices of one table chunk, letting other tasks run in between.
                while !job.collect_slice(&slot.store.borrow()) {
                    rt::yield_if_needed().await;
                }
                let (tx, rx) = futures_channel::oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("geobeat-ckpt".into())
                    .spawn(move || {
                        let res = job.write();
                        let _ = tx.send((job, res));
                    });
                let failed = |source| {
                    Err(crate::checkpoint::Error::Io {
                        shard: slot.shard,
                        op: "write the last-location checkpoint in",
                        path: slot.store.borrow().log().dir().to_path_buf(),
                        source,
                    }
                    .into())
                };
                if let Err(e) = spawned {
                    return failed(e);
                }
                let Ok((job, res)) = rx.await else {
                    // The writer thread died: nothing was deleted; the next run tries again.
                    return failed(std::io::Error::other(
                        "writer thread ended without an answer",
                    ));
                };
                let retired = slot.store.borrow_mut().retention_end(job, res)?;
                let n = retired.segments();
                // Unmapping the replaced files can take tens of milliseconds: not here.
                let dropper = std::thread::Builder::new()
                    .name("geobeat-unmap".into())
                    .spawn(move || drop(retired));
                if let Err(e) = dropper {
                    tracing::warn!(shard = %slot.shard, error = %e, "could not unmap retired files on a helper thread; unmapped here");
                }
                Ok(n)
            }
        }
    }
}
