//! The group commit of one executor's shards: waits for appends (optionally lingering to grow
//! the group), makes each shard's log durable with an io_uring `fdatasync` (or a DAX flush)
//! while the executor keeps serving, then completes the groups waiting on it and releases their
//! subscription events. It owns the commit policy (Strict: start at once, or after the linger;
//! Relaxed: on the interval) and marking a shard whose log failed a sync (`/readyz`); a commit
//! whose log found no space to write its group (`log::Error::NoSpace`) is retried after a pause,
//! not marked. It does not append (`shard`) and does not write acks (`net`).
//!
//! Invariant: waiters complete only for positions below the durable position the log reported
//! after its sync; a poisoned log completes nothing more.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::limits::{COMMIT_NO_SPACE_RETRY_INTERVAL, STOP_POLL_INTERVAL, SYNC_FILES_MAX};
use crate::log::Commit;
use crate::route::ShardId;
use crate::rt::{self, SyncFile};
use crate::shard::core::{Core, StoreSlot};

impl Core {
    fn any_pending(&self) -> bool {
        self.stores.iter().any(|s| s.pending_entries.get() > 0)
    }

    async fn sync_file(
        &self,
        slot: &StoreSlot,
        base: u64,
        fd: std::os::fd::RawFd,
    ) -> std::io::Result<Rc<SyncFile>> {
        if let Some((_, f)) = slot.sync_files.borrow().iter().find(|(b, _)| *b == base) {
            return Ok(f.clone());
        }
        let f = Rc::new(SyncFile::from_fd(fd)?);
        let mut files = slot.sync_files.borrow_mut();
        if files.len() >= SYNC_FILES_MAX {
            files.remove(0);
        }
        files.push((base, f.clone()));
        Ok(f)
    }

    /// Records why `shard`'s log stopped accepting, for `/readyz` (the first reason stays).
    fn storage_fault(&self, shard: ShardId, e: &crate::store::Error) {
        let _ = self.shared.storage_faults[shard.0 as usize].set(e.to_string());
    }

    /// Commits one shard: makes everything appended so far durable, then completes waiters.
    async fn commit_slot(&self, slot: &StoreSlot) {
        let started = Instant::now();
        let pending = slot.pending_entries.get();
        slot.probe.group_entries.observe(pending as f64);
        slot.pending_entries.set(0);
        let pending_since = slot.pending_since.take();
        let durable_before = slot.store.borrow().durable();
        let begun = slot.store.borrow_mut().commit_begin();
        let durable = match begun {
            Err(e @ crate::store::Error::Log(crate::log::Error::NoSpace { .. })) => {
                // The log could not write its staged entries (a full copy-on-write file system):
                // they stay staged, nothing is durable or acked, the log is not poisoned. Try
                // again after a pause (the next commit writes them, as a later append would).
                if let Some(suppressed) = slot.refusal_log.check() {
                    tracing::warn!(shard = %slot.shard, error = %e, suppressed_since_last = suppressed, "commit deferred: no space to write the group; retrying");
                }
                rt::sleep(COMMIT_NO_SPACE_RETRY_INTERVAL).await;
                slot.pending_entries
                    .set(slot.pending_entries.get() + pending);
                if slot.pending_since.get().is_none() {
                    slot.pending_since.set(pending_since);
                }
                return;
            }
            Err(e) => {
                tracing::error!(shard = %slot.shard, error = %e, "commit refused; shard log poisoned");
                self.storage_fault(slot.shard, &e);
                return;
            }
            Ok(Commit::Idle) => slot.store.borrow().durable(),
            Ok(Commit::Done(p)) => p,
            Ok(Commit::Sync(job)) => {
                let mut result = Ok(());
                let targets: Vec<(u64, Option<std::os::fd::RawFd>)> = job
                    .files()
                    .iter()
                    .map(|f| {
                        (
                            f.base().0,
                            f.fd().map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd)),
                        )
                    })
                    .collect();
                for (base, fd) in targets {
                    let Some(fd) = fd else { continue };
                    let r = match self.sync_file(slot, base, fd).await {
                        Ok(f) => f.fdatasync().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        result = Err(e);
                        break;
                    }
                }
                match slot.store.borrow_mut().commit_end(job, result) {
                    Ok(p) => p,
                    Err(e) => {
                        // The log is poisoned: nothing more becomes durable. Waiters stay
                        // un-acked; devices see no ack and resend elsewhere after restart.
                        tracing::error!(shard = %slot.shard, error = %e, "commit failed; shard log poisoned");
                        self.storage_fault(slot.shard, &e);
                        return;
                    }
                }
            }
        };
        // The durable position only moves forward, and never past what was written.
        assert!(durable >= durable_before, "durable position went back");
        debug_assert!(durable <= slot.store.borrow().stats().written);
        slot.probe
            .commit_latency
            .observe(started.elapsed().as_secs_f64());
        self.shared.feeds[slot.shard.0 as usize].publish_durable(durable);
        // Subscription events of this group go out now that it is durable.
        self.fanout
            .durable(self.shared.owner(slot.shard).1, durable);
        if self.shared.replication.is_some() {
            // Replicated mode: the replication loop acks once the streams hold it too.
            self.replicate_signal.notify();
            return;
        }
        self.complete_below(slot, durable);
    }

    /// Completes the waiters of `slot` whose group ends below `upto` (durable, and in
    /// replicated mode also in the streams).
    pub(super) fn complete_below(&self, slot: &StoreSlot, upto: crate::log::LogPos) {
        loop {
            let next = {
                let mut w = slot.waiters.borrow_mut();
                match w.front() {
                    Some(front) if front.pos < upto => w.pop_front(),
                    _ => None,
                }
            };
            match next {
                Some(w) => {
                    // The precondition of every ack: the group's last entry is durable.
                    debug_assert!(w.pos < slot.store.borrow().durable());
                    self.complete(w.target)
                }
                None => break,
            }
        }
    }

    /// Commits every shard with pending appends, group by group, until shutdown has drained
    /// every executor. Spawned once per executor by `server`.
    pub async fn commit_loop(self: Rc<Self>) {
        let policy = &self.shared.cfg;
        let relaxed = policy.durability == crate::config::Durability::Relaxed;
        let linger = if relaxed {
            policy.commit_interval
        } else {
            policy.commit_linger.min(policy.commit_interval)
        };
        loop {
            if !self.any_pending() {
                if self.stopping()
                    && self.shared.executors_drained.load(Ordering::Acquire)
                        == self.shared.executors
                {
                    return;
                }
                // Wake on the next append, or periodically while stopping to notice the drain.
                rt::timeout(STOP_POLL_INTERVAL, self.commit_signal.wait()).await;
                continue;
            }
            // Group: in Strict mode start at once when idle (the group grows while the previous
            // fdatasync is in flight) unless a linger is configured; Relaxed mode syncs on the
            // interval, since nobody waits for it.
            let wait = if relaxed {
                linger.max(Duration::from_millis(1))
            } else {
                linger
            };
            if !wait.is_zero() {
                let due = |s: &StoreSlot| {
                    s.pending_entries.get() >= policy.commit_entries_max
                        || s.pending_since.get().is_some_and(|t| t.elapsed() >= wait)
                };
                while !self.stores.iter().any(due) {
                    rt::timeout(
                        wait / 4 + Duration::from_micros(50),
                        self.commit_signal.wait(),
                    )
                    .await;
                }
            }
            let commits = self
                .stores
                .iter()
                .filter(|s| s.pending_entries.get() > 0)
                .map(|s| self.commit_slot(s));
            futures_util::future::join_all(commits).await;
        }
    }
}
