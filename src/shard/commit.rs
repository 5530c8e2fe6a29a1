//! The group commit of one executor's shards: waits for appends (optionally lingering to grow
//! the group), makes each shard's log durable with an io_uring `fdatasync` (or, in
//! `--write-mode dsync`, an io_uring write on an `O_DSYNC` descriptor; or a DAX flush) while the
//! executor keeps serving, then completes the groups waiting on it and releases their
//! subscription events. It owns the commit policy (Strict: start at once, after the fixed
//! linger, or, with the adaptive linger, after a bounded wait for company while recent groups
//! were small; Relaxed: on the interval) and marking a shard whose log failed a sync
//! (`/readyz`); a commit whose log found no space to write its group (`log::Error::NoSpace`) is
//! retried after a pause, not marked. It does not append (`shard`) and does not write acks
//! (`net`).
//!
//! Invariant: waiters complete only for positions below the durable position the log reported
//! after its sync (or its `O_DSYNC` write) completed; a poisoned log completes nothing more; a
//! group never waits past its linger (fixed or adaptive) from its first append, and a full group
//! (`--commit-entries-max`) never waits.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::limits::{
    COMMIT_ADAPTIVE_AVERAGE_WEIGHT, COMMIT_ADAPTIVE_SMALL_GROUP_ENTRIES,
    COMMIT_NO_SPACE_RETRY_INTERVAL, STOP_POLL_INTERVAL, SYNC_FILES_MAX,
};
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

    /// A commit found no space to write its group (a full copy-on-write file system): the
    /// entries stay staged, nothing is durable or acked, the log is not poisoned. Waits a pause
    /// and hands the group back to the next commit (which writes them, as a later append would).
    async fn defer_no_space(
        &self,
        slot: &StoreSlot,
        e: &crate::store::Error,
        pending: usize,
        pending_since: Option<Instant>,
    ) {
        if let Some(suppressed) = slot.refusal_log.check() {
            tracing::warn!(shard = %slot.shard, error = %e, suppressed_since_last = suppressed, "commit deferred: no space to write the group; retrying");
        }
        rt::sleep(COMMIT_NO_SPACE_RETRY_INTERVAL).await;
        slot.pending_entries
            .set(slot.pending_entries.get() + pending);
        if slot.pending_since.get().is_none() {
            slot.pending_since.set(pending_since);
        }
    }

    /// Commits one shard: makes everything appended so far durable, then completes waiters.
    /// Returns the size of the group it committed (0 if it committed nothing).
    async fn commit_slot(&self, slot: &StoreSlot) -> usize {
        let started = Instant::now();
        let pending = slot.pending_entries.get();
        slot.probe.group_entries.observe(pending as f64);
        slot.pending_entries.set(0);
        let pending_since = slot.pending_since.take();
        let durable_before = slot.store.borrow().durable();
        let begun = slot.store.borrow_mut().commit_begin();
        let durable = match begun {
            Err(e @ crate::store::Error::Log(crate::log::Error::NoSpace { .. })) => {
                self.defer_no_space(slot, &e, pending, pending_since).await;
                return 0;
            }
            Err(e) => {
                tracing::error!(shard = %slot.shard, error = %e, "commit refused; shard log poisoned");
                self.storage_fault(slot.shard, &e);
                return 0;
            }
            Ok(Commit::Idle) => slot.store.borrow().durable(),
            Ok(Commit::Done(p)) => p,
            Ok(Commit::Sync(job)) if job.dsync_write().is_some() => {
                // `--write-mode dsync`: one io_uring write of the group on the segment's
                // `O_DSYNC` descriptor; its completion is the durability point.
                let w = job.dsync_write().expect("checked by the guard");
                let result = match w.fd() {
                    Some(fd) => {
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
                        // Cached per segment like the fdatasync handles: a log's segments are
                        // all written in one mode, so a base names one kind of descriptor.
                        match self.sync_file(slot, w.base().0, fd).await {
                            Ok(f) => f.write_all_at(w.bytes(), w.offset()).await,
                            Err(e) => Err(e),
                        }
                    }
                    // A simulated disk's job (never in a server): run it inline.
                    None => job.run_blocking(),
                };
                // The store's borrow ends here, before any await below.
                let ended = slot.store.borrow_mut().commit_end(job, result);
                match ended {
                    Ok(p) => p,
                    Err(e @ crate::store::Error::Log(crate::log::Error::NoSpace { .. })) => {
                        self.defer_no_space(slot, &e, pending, pending_since).await;
                        return 0;
                    }
                    Err(e) => {
                        tracing::error!(shard = %slot.shard, error = %e, "commit failed; shard log poisoned");
                        self.storage_fault(slot.shard, &e);
                        return 0;
                    }
                }
            }
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
                        return 0;
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
            return pending;
        }
        self.complete_below(slot, durable);
        pending
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
        // The adaptive linger (Strict and Replicated only; config refuses it beside a fixed
        // linger). `average` is the running average of this executor's group sizes times
        // `COMMIT_ADAPTIVE_AVERAGE_WEIGHT` (integer arithmetic); it starts at the threshold, so
        // nobody waits before the groups have shown they are small.
        let adaptive = if relaxed || !linger.is_zero() {
            Duration::ZERO
        } else {
            policy.commit_linger_adaptive
        };
        let small_scaled = COMMIT_ADAPTIVE_SMALL_GROUP_ENTRIES * COMMIT_ADAPTIVE_AVERAGE_WEIGHT;
        let mut average = small_scaled;
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
            if !adaptive.is_zero() && average < small_scaled {
                self.linger_for_company(adaptive).await;
            }
            let commits = self
                .stores
                .iter()
                .filter(|s| s.pending_entries.get() > 0)
                .map(|s| self.commit_slot(s));
            for group in futures_util::future::join_all(commits).await {
                if group > 0 {
                    average = adaptive_average(average, group as u64);
                }
            }
        }
    }

    /// The adaptive linger's wait: until a shard's group is full (`--commit-entries-max`), or
    /// the oldest pending append has waited `most`, whichever comes first (woken by every
    /// append to look again; never longer than `most` from the group's first append).
    async fn linger_for_company(&self, most: Duration) {
        let full = self.shared.cfg.commit_entries_max;
        loop {
            if self.stores.iter().any(|s| s.pending_entries.get() >= full) {
                return;
            }
            let Some(oldest) = self
                .stores
                .iter()
                .filter(|s| s.pending_entries.get() > 0)
                .filter_map(|s| s.pending_since.get())
                .min()
            else {
                return;
            };
            let waited = oldest.elapsed();
            if waited >= most {
                return;
            }
            rt::timeout(most - waited, self.commit_signal.wait()).await;
        }
    }
}

/// The running average of group sizes, scaled by `COMMIT_ADAPTIVE_AVERAGE_WEIGHT`, after one
/// more group of `group` heartbeats: `avg += (group - avg) / weight`, in integers.
pub(crate) fn adaptive_average(scaled: u64, group: u64) -> u64 {
    scaled - scaled / COMMIT_ADAPTIVE_AVERAGE_WEIGHT + group
}

#[cfg(test)]
mod tests {
    use super::adaptive_average;
    use crate::limits::{COMMIT_ADAPTIVE_AVERAGE_WEIGHT, COMMIT_ADAPTIVE_SMALL_GROUP_ENTRIES};

    /// Checks the running average the adaptive linger decides on: a run of small groups brings
    /// it below the threshold within a few dozen groups, a run of large ones above it, and it
    /// settles at the group size (times the weight) for a steady load.
    #[test]
    fn adaptive_average_follows_the_recent_group_sizes() {
        let w = COMMIT_ADAPTIVE_AVERAGE_WEIGHT;
        let small = COMMIT_ADAPTIVE_SMALL_GROUP_ENTRIES * w;
        let mut avg = small;
        for _ in 0..64 {
            avg = adaptive_average(avg, 1);
        }
        assert!(avg < small, "small groups make the average small: {avg}");
        assert!(avg / w <= 2, "it settles near 1: {avg}");
        for _ in 0..64 {
            avg = adaptive_average(avg, 500);
        }
        assert!(avg >= small, "large groups make it large: {avg}");
        assert!(
            avg / w >= 490 && avg / w <= 500,
            "it settles near 500: {avg}"
        );
        // One large group among small ones does not switch it for long.
        let mut avg = w;
        avg = adaptive_average(avg, 100);
        for _ in 0..32 {
            avg = adaptive_average(avg, 1);
        }
        assert!(avg < small);
    }
}
