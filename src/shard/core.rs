//! [`Core`]: one executor's shard core (see the `shard` module comment): its stores
//! ([`StoreSlot`]), appends in groups and the waiters they register, completions, control jobs,
//! queries and metrics snapshots. The commit and retention loops are `impl Core` blocks of their
//! own files.
//!
//! Invariants: an ack never covers a heartbeat that is not durable (Strict mode); a heartbeat is
//! appended only to the shard its device routes to, on the executor that owns that shard (both
//! asserted at the storage call); no `RefCell` borrow is held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datadir::DataDir;
use crate::limits::{BATCH_POOL_MAX, REPEAT_LOG_INTERVAL_MS, RESUME_DURABLE_WAIT_MS};
use crate::log::LogPos;
use crate::metrics::{ExecProbe, ExecSnapshot, ShardSnapshot, StoreProbe};
use crate::node::{ExecutorId, Shared};
use crate::record::{DeviceSeq, Heartbeat};
use crate::route::ShardId;
use crate::rt::{self, Signal, Stop, SyncFile};
use crate::store::{Dedupe, Outcome, ShardStore, StoreConfig};
use crate::subscribe::Fanout;

use crate::shard::acks::{AckLedger, ConnKey};
use crate::shard::mesh::{self, Append, Batch, Done, StoreJob};

/// A control message to a core.
pub type Control = mesh::Control<Core>;
/// A job run against a core.
pub type CoreJob = mesh::CoreJob<Core>;

/// Who is told when a group becomes durable.
pub(super) enum Target {
    /// A connection on this executor.
    Local {
        conn: ConnKey,
        frame: u64,
        failed: Vec<(u64, &'static str)>,
    },
    /// A connection on another executor: the batch goes back in a reply.
    Remote { peer: ExecutorId, batch: Batch },
}

pub(super) struct Waiter {
    /// Position of the group's last entry: durable once `durable() > pos`.
    pub(super) pos: LogPos,
    pub(super) target: Target,
}

/// One logical shard owned by this executor.
pub struct StoreSlot {
    /// The logical shard.
    pub shard: ShardId,
    /// Its log and last-location table.
    pub store: RefCell<ShardStore>,
    /// Groups waiting for durability, in position order.
    pub(super) waiters: RefCell<VecDeque<Waiter>>,
    /// Segment files opened for fdatasync, by segment base position.
    pub(super) sync_files: RefCell<Vec<(u64, Rc<SyncFile>)>>,
    /// Entries appended since the last commit started.
    pub(super) pending_entries: Cell<usize>,
    /// When the first of those was appended.
    pub(super) pending_since: Cell<Option<Instant>>,
    /// Rate limit of the "append refused" warning: when it was last logged and how many
    /// refusals were not logged since (a full disk refuses every heartbeat; one line per
    /// heartbeat would flood the log at fleet scale).
    pub(super) refusal_log: crate::ratelog::LogEvery,
    /// Commit counters.
    pub probe: StoreProbe,
    /// The shard's devices written by other nodes of the cluster, as followed from the streams
    /// (`shard::follow`; empty on a node without a cluster). Never in the log or checkpoint.
    pub view: RefCell<crate::table::view::ViewTable>,
}

/// This executor's mesh senders and the outgoing replies waiting for room.
struct Links {
    data: rt::mesh::Senders<Append>,
    control: rt::mesh::Senders<Control>,
    replies: rt::mesh::Senders<Done>,
    /// Per peer, completions not yet sent (the reply sender never makes the commit loop wait).
    outbox: Vec<RefCell<VecDeque<Done>>>,
    outbox_signal: Vec<Rc<Signal>>,
}

/// One executor's shard core (see the module comment), shared by its tasks through `Rc`.
pub struct Core {
    /// This executor.
    pub index: ExecutorId,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Owned shards; local index = logical shard / executors.
    pub stores: Vec<StoreSlot>,
    /// The ack state of this executor's ingest connections.
    pub acks: AckLedger,
    /// Shutdown, as this executor sees it.
    pub stop: Stop,
    /// This executor's counters.
    pub probe: ExecProbe,
    /// Subscription fan-out: interest replica, pending events, subscriber connections.
    pub fanout: Fanout,
    /// Wakes the commit loop after appends.
    pub(super) commit_signal: Rc<Signal>,
    /// Wakes the replication loop after commits (`--durability replicated`).
    pub(super) replicate_signal: Rc<Signal>,
    links: Links,
    batch_pool: RefCell<Vec<Vec<(u64, Heartbeat)>>>,
}

/// Opens (recovers) the logical shards executor `index` owns, in local-index order.
pub fn open_stores(
    index: ExecutorId,
    shared: &Shared,
    datadir: &DataDir,
) -> Result<Vec<StoreSlot>, std::io::Error> {
    let mut stores = Vec::new();
    for k in (index.0..shared.shard_count as usize).step_by(shared.executors) {
        let shard = ShardId(k as u32);
        let mut cfg = StoreConfig::new(datadir.shard_dir(shard), shard);
        cfg.segment_bytes = shared.cfg.segment_bytes;
        cfg.write_mode = match shared.cfg.write_mode {
            crate::config::WriteMode::Mmap => crate::log::WriteMode::Mmap,
            crate::config::WriteMode::Pwrite => crate::log::WriteMode::Pwrite,
            crate::config::WriteMode::Dsync => crate::log::WriteMode::Dsync,
        };
        let started = Instant::now();
        let (mut store, report) = ShardStore::open_chained(&cfg, shared.cfg.audit_chain)
            .map_err(|e| std::io::Error::other(format!("opening shard {shard}: {e}")))?;
        tracing::info!(shard = %shard, executor = index.0, elapsed_ms = started.elapsed().as_millis() as u64, report = ?report, "shard recovered");
        if !shared.cfg.sinks.is_empty() {
            store
                .register_consumer(crate::flusher::CONSUMER_NAME)
                .map_err(|e| std::io::Error::other(format!("shard {shard}: {e}")))?;
        }
        if shared.replication.is_some() {
            // Retention keeps what the streams do not hold yet.
            store
                .register_consumer(crate::replicate::CONSUMER_NAME)
                .map_err(|e| std::io::Error::other(format!("shard {shard}: {e}")))?;
        }
        shared.feeds[k].publish_durable(store.durable());
        stores.push(StoreSlot {
            shard,
            store: RefCell::new(store),
            waiters: RefCell::new(VecDeque::new()),
            sync_files: RefCell::new(Vec::new()),
            pending_entries: Cell::new(0),
            pending_since: Cell::new(None),
            refusal_log: crate::ratelog::LogEvery::new(Duration::from_millis(
                REPEAT_LOG_INTERVAL_MS,
            )),
            probe: StoreProbe::default(),
            view: RefCell::new(crate::table::view::ViewTable::new()),
        });
    }
    Ok(stores)
}

impl Core {
    /// The core of executor `index` with its recovered `stores` and its mesh senders.
    pub fn new(
        index: ExecutorId,
        shared: Arc<Shared>,
        stores: Vec<StoreSlot>,
        tx: mesh::Tx<Core>,
    ) -> Core {
        let peers = shared.executors;
        let fanout = Fanout::new(
            index.0,
            peers,
            stores.len(),
            tx.events,
            shared.fences.clone(),
        );
        let links = Links {
            data: tx.data,
            control: tx.control,
            replies: tx.replies,
            outbox: (0..peers).map(|_| RefCell::new(VecDeque::new())).collect(),
            outbox_signal: (0..peers).map(|_| Signal::new()).collect(),
        };
        Core {
            index,
            stop: Stop::new(shared.stopping.clone()),
            shared,
            stores,
            acks: AckLedger::new(),
            probe: ExecProbe::new(peers),
            fanout,
            commit_signal: Signal::new(),
            replicate_signal: Signal::new(),
            links,
            batch_pool: RefCell::new(Vec::new()),
        }
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.stop.stopping()
    }

    /// The executor that owns logical shard `shard`.
    pub fn owner(&self, shard: ShardId) -> ExecutorId {
        self.shared.owner(shard).0
    }

    /// The slot of a logical shard this executor owns.
    pub fn slot(&self, shard: ShardId) -> &StoreSlot {
        let (exec, local) = self.shared.owner(shard);
        assert_eq!(
            exec, self.index,
            "shard {shard} is not owned by executor {}",
            self.index
        );
        let slot = &self.stores[local];
        debug_assert_eq!(slot.shard, shard);
        slot
    }

    // ----- appends -----

    /// A forwarding buffer from the pool.
    pub fn take_batch_vec(&self) -> Vec<(u64, Heartbeat)> {
        self.batch_pool.borrow_mut().pop().unwrap_or_default()
    }

    /// Returns a forwarding buffer to the pool.
    pub fn recycle(&self, mut v: Vec<(u64, Heartbeat)>) {
        v.clear();
        let mut pool = self.batch_pool.borrow_mut();
        if pool.len() < BATCH_POOL_MAX {
            pool.push(v);
        }
    }

    /// Appends `items` to a local shard; the group completes `target` once durable. Items that
    /// cannot be stored (disk full, poisoned log) are reported through the target's failure list.
    /// With `dedupe` on, a duplicate is not stored, but the group's position becomes at least
    /// that of the entry it duplicates, so its ack waits until that entry is durable too.
    fn append_group<'a>(
        &self,
        slot: &StoreSlot,
        items: impl Iterator<Item = (u64, &'a Heartbeat)>,
        dedupe: Dedupe,
        failed: &mut Vec<(u64, &'static str)>,
    ) -> Option<LogPos> {
        let mut last = None;
        if let Some(max) = self.shared.cfg.sink_backlog_max_bytes {
            let backlog = self.shared.feeds[slot.shard.0 as usize].backlog_bytes();
            if backlog > max {
                // Past the hard budget of unconsumed log: refuse (devices see it and retry
                // later) rather than delete anything a sink has not consumed.
                for (seq, _) in items {
                    failed.push((seq, "sink_backlog_full"));
                    self.probe.reject("sink_backlog_full");
                }
                return None;
            }
        }
        let router = &self.shared.router;
        let mut store = slot.store.borrow_mut();
        let mut appended = 0usize;
        // One cheap check per group: with no subscription anywhere nothing else happens.
        let fanout = self
            .fanout
            .active()
            .then(|| self.shared.owner(slot.shard).1);
        if fanout.is_some() {
            self.fanout.poll_fences();
        }
        for (index, (seq, hb)) in items.enumerate() {
            // An MQTT PUBLISH numbers its heartbeats from its `seq` property.
            let (dseq, dedupe) = match dedupe {
                Dedupe::SeqFrom { epoch, first } => (first + index as u64, Dedupe::Seq(epoch)),
                other => (seq, other),
            };
            // The storage call's precondition: the device routes to this shard (glommio's
            // sharding example asserts the same in its handler).
            assert_eq!(
                router.shard_of(&hb.device_id),
                slot.shard,
                "device routed to the wrong shard"
            );
            // On a cluster node the device's last location may be one another node wrote (the
            // shard's view): fence transitions start from it.
            let view_prev =
                fanout.and_then(|_| store.view_before(&slot.view.borrow(), &hb.device_id));
            let result = match (fanout, dedupe) {
                (None, Dedupe::Off) => store.append(hb),
                (Some(local), Dedupe::Off) => store.append_tracked(hb).map(|a| {
                    let a = a.with_view(view_prev, hb);
                    self.fanout.on_append(local, hb, &a);
                    a.pos
                }),
                (_, dedupe) => match store.append_dedupe(hb, dseq, dedupe) {
                    Ok(Outcome::Stored(a)) => {
                        if let Some(local) = fanout {
                            let a = a.with_view(view_prev, hb);
                            self.fanout.on_append(local, hb, &a);
                        }
                        Ok(a.pos)
                    }
                    Ok(Outcome::Duplicate(original)) => {
                        // Acked with the group, never before the original is durable.
                        self.probe.duplicate();
                        if store.durable() <= original {
                            last = Some(last.map_or(original, |l: LogPos| l.max(original)));
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(pos) => {
                    debug_assert!(last.is_none_or(|l| l < pos), "positions rise in a group");
                    last = Some(pos);
                    appended += 1;
                }
                Err(e) => {
                    if let Some(suppressed) = slot.refusal_log.check() {
                        tracing::warn!(shard = %slot.shard, error = %e, suppressed_since_last = suppressed, "append refused");
                    }
                    failed.push((seq, storage_reason(&e)));
                    // Disk full and friends show in metrics as rejections with their reason.
                    self.probe.reject(storage_reason(&e));
                }
            }
        }
        if appended > 0 {
            slot.pending_entries
                .set(slot.pending_entries.get() + appended);
            if slot.pending_since.get().is_none() {
                slot.pending_since.set(Some(Instant::now()));
            }
            self.commit_signal.notify();
        }
        last
    }

    fn register(&self, slot: &StoreSlot, pos: Option<LogPos>, target: Target) {
        let relaxed = self.shared.cfg.durability == crate::config::Durability::Relaxed;
        // Relaxed acks once the group is in the page cache, where a process crash keeps it: the
        // log may still hold it in its stage (`log::WriteMode::Pwrite`), so write it out first
        // (one pwrite per group). If that fails (no space, poisoned) the group waits for
        // durability like a strict one.
        let in_page_cache =
            relaxed && pos.is_some() && slot.store.borrow_mut().write_staged().is_ok();
        // Replicated mode: an ack also waits for the streams (the replication loop's position,
        // never past the durable one).
        let floor = match &self.shared.replication {
            Some(plan) => crate::log::LogPos(plan.replicated(slot.shard.0 as usize)),
            None => slot.store.borrow().durable(),
        };
        match pos {
            Some(pos) if !in_page_cache && floor <= pos => {
                let mut waiters = slot.waiters.borrow_mut();
                // Waiters complete in position order: each registers behind the last. A group of
                // duplicates only waits for an earlier entry: it waits behind the last waiter
                // instead (a little longer, never shorter).
                let pos = waiters.back().map_or(pos, |w| w.pos.max(pos));
                waiters.push_back(Waiter { pos, target });
            }
            _ => self.complete(target),
        }
    }

    /// Appends a frame group from a local connection to a local shard.
    pub fn append_local<'a>(
        &self,
        shard: ShardId,
        conn: ConnKey,
        frame: u64,
        dedupe: Dedupe,
        items: impl Iterator<Item = (u64, &'a Heartbeat)>,
    ) {
        let slot = self.slot(shard);
        let mut failed = Vec::new();
        let pos = self.append_group(slot, items, dedupe, &mut failed);
        self.register(
            slot,
            pos,
            Target::Local {
                conn,
                frame,
                failed,
            },
        );
    }

    /// Appends a group forwarded by `peer` (from the data mesh).
    pub fn append_remote(&self, peer: ExecutorId, msg: Append) {
        let Append { shard, mut batch } = msg;
        ExecProbe::add(&self.probe.received_from[peer.0], 1);
        let slot = self.slot(shard);
        let mut failed = std::mem::take(&mut batch.failed);
        let pos = self.append_group(
            slot,
            batch.items.iter().map(|(s, h)| (*s, h)),
            batch.dedupe,
            &mut failed,
        );
        batch.failed = failed;
        self.register(slot, pos, Target::Remote { peer, batch });
    }

    /// Sends a group of a local connection's frame to the executor owning `shard` (waiting for
    /// room in the data channel: a slow owner slows the connection's reader).
    pub async fn forward(&self, shard: ShardId, batch: Batch) -> Result<(), MeshClosed> {
        let owner = self.owner(shard);
        debug_assert_ne!(
            owner, self.index,
            "local groups are appended, not forwarded"
        );
        ExecProbe::add(&self.probe.sent_to[owner.0], 1);
        self.links
            .data
            .send_to(owner.0, Append { shard, batch })
            .await
            .map_err(|_| MeshClosed)
    }

    pub(super) fn complete(&self, target: Target) {
        match target {
            Target::Local {
                conn,
                frame,
                failed,
            } => self
                .acks
                .group_done(conn, frame, &failed, &self.probe.ack_latency),
            Target::Remote { peer, batch } => {
                self.links.outbox[peer.0]
                    .borrow_mut()
                    .push_back(Done(batch));
                self.links.outbox_signal[peer.0].notify();
            }
        }
    }

    /// A completion from the owner of a group this executor forwarded (from the reply mesh).
    pub fn on_done(&self, done: Done) {
        let Done(batch) = done;
        self.acks.group_done(
            batch.conn,
            batch.frame,
            &batch.failed,
            &self.probe.ack_latency,
        );
        self.recycle(batch.items);
    }

    /// Sends the completions queued for `peer` until the reply mesh closes. Never makes the
    /// commit loop wait: completions queue here while the channel is full.
    pub async fn reply_send_loop(self: Rc<Self>, peer: ExecutorId) {
        loop {
            let next = self.links.outbox[peer.0].borrow_mut().pop_front();
            match next {
                Some(msg) => {
                    if self.links.replies.send_to(peer.0, msg).await.is_err() {
                        return;
                    }
                }
                None => self.links.outbox_signal[peer.0].wait().await,
            }
        }
    }

    // ----- control -----

    /// Runs a control message from `peer` (from the control mesh).
    pub fn on_control(&self, peer: ExecutorId, msg: Control) {
        ExecProbe::add(&self.probe.received_from[peer.0], 1);
        match msg {
            Control::Query { shard, job } => job(&self.slot(shard).store.borrow()),
            Control::Run(job) => job(self),
        }
    }

    /// Runs `job` against the store of `shard`, wherever it lives, and returns its answer.
    pub async fn query<T: Send + 'static>(
        &self,
        shard: ShardId,
        job: impl FnOnce(&ShardStore) -> T + Send + 'static,
    ) -> Option<T> {
        let owner = self.owner(shard);
        if owner == self.index {
            return Some(job(&self.slot(shard).store.borrow()));
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let job: StoreJob = Box::new(move |store| {
            let _ = tx.send(job(store));
        });
        self.send_control(owner, Control::Query { shard, job })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Runs `job` against the store of `shard` and its cluster view, wherever they live, and
    /// returns its answer (`None`: that executor cannot answer).
    pub async fn query_view<T: Send + 'static>(
        &self,
        shard: ShardId,
        job: impl FnOnce(&ShardStore, &crate::table::view::ViewTable) -> T + Send + 'static,
    ) -> Option<T> {
        self.run_on(self.owner(shard), move |core: &Core| {
            let slot = core.slot(shard);
            let store = slot.store.borrow();
            let view = slot.view.borrow();
            job(&store, &view)
        })
        .await
    }

    async fn send_control(&self, to: ExecutorId, msg: Control) -> Result<(), MeshClosed> {
        ExecProbe::add(&self.probe.sent_to[to.0], 1);
        self.links
            .control
            .send_to(to.0, msg)
            .await
            .map_err(|_| MeshClosed)
    }

    /// The durable high-water mark of `device_id` (issue 18), for a resume frame: the mark as
    /// appended, once the log is durable past its entry (a device drops everything at or below
    /// the mark it is told, so it must never be told a mark a crash could still take back).
    /// `Some(None)`: no mark yet. `None`: the shard cannot answer, or its log did not become
    /// durable within `limits::RESUME_DURABLE_WAIT_MS` (a failing disk): close the connection.
    pub async fn durable_mark(&self, device_id: &str) -> Option<Option<DeviceSeq>> {
        let shard = self.shared.router.shard_of(device_id);
        let deadline = Instant::now() + Duration::from_millis(RESUME_DURABLE_WAIT_MS);
        loop {
            let id = device_id.to_owned();
            let (mark, durable) = self
                .query(shard, move |store| {
                    let a = store.audit(&id).filter(|a| a.mark.is_some());
                    (
                        a.and_then(|a| a.mark),
                        a.is_none_or(|a| store.durable() > a.mark_pos),
                    )
                })
                .await?;
            if durable {
                return Some(mark);
            }
            if Instant::now() >= deadline {
                return None;
            }
            rt::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Runs `job` on executor `to`'s core (here directly if it is this one) and returns its
    /// answer; `None` if that executor cannot answer (its mesh closed at shutdown).
    pub async fn run_on<T: Send + 'static>(
        &self,
        to: ExecutorId,
        job: impl FnOnce(&Core) -> T + Send + 'static,
    ) -> Option<T> {
        if to == self.index {
            return Some(job(self));
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let run: CoreJob = Box::new(move |core: &Core| {
            let _ = tx.send(job(core));
        });
        self.send_control(to, Control::Run(run)).await.ok()?;
        rx.await.ok()
    }

    /// Runs `job` on every executor's core (here directly, elsewhere over the control mesh) and
    /// collects the answers in executor order; executors that cannot answer are left out.
    pub async fn on_all<T: Send + 'static>(
        &self,
        job: impl Fn(&Core) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(self.shared.executors);
        for i in (0..self.shared.executors).map(ExecutorId) {
            if i == self.index {
                out.push(job(self));
                continue;
            }
            let (tx, rx) = futures_channel::oneshot::channel();
            let job = job.clone();
            let run: CoreJob = Box::new(move |core: &Core| {
                let _ = tx.send(job(core));
            });
            if self.send_control(i, Control::Run(run)).await.is_ok() {
                if let Ok(v) = rx.await {
                    out.push(v);
                }
            }
        }
        out
    }

    /// This executor's metrics snapshot.
    pub fn snapshot(&self) -> ExecSnapshot {
        let mut snap = self.probe.snapshot(self.index.0, self.acks.open_count());
        snap.subscribers_open = self.fanout.conns_open();
        snap.events_delivered = self.fanout.delivered.get();
        snap.events_missed = self.fanout.missed.get();
        for slot in &self.stores {
            let store = slot.store.borrow();
            let stats = store.stats();
            let (seq_gaps, duplicates_dropped) = store.table().audit_totals();
            snap.shards.push(ShardSnapshot {
                shard: slot.shard.0,
                executor: self.index.0,
                log_bytes: stats.bytes,
                segments: stats.segments,
                entries: stats.entries,
                written: stats.written.0,
                durable: stats.durable.0,
                devices: store.table().len(),
                table_bytes: store.table().heap_bytes(),
                seq_devices: store.table().audits().count(),
                seq_gaps,
                duplicates_dropped,
                // `dsync` for `--write-mode dsync` on an fdatasync-mode file: its durability
                // point is the O_DSYNC write, not an fdatasync.
                sync_mode: match (stats.sync_mode, store.log().write_mode()) {
                    (crate::log::SyncMode::Fdatasync, crate::log::WriteMode::Dsync) => {
                        "dsync".to_owned()
                    }
                    (mode, _) => mode.to_string(),
                },
                group_entries: slot.probe.group_entries.snapshot(),
                commit_latency: slot.probe.commit_latency.snapshot(),
                waiters: slot.waiters.borrow().len(),
            });
        }
        snap
    }
}

/// A mesh channel to a peer is closed (the peer's executor ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the channel to a peer executor is closed")]
pub struct MeshClosed;

/// The device-facing reason for a storage failure (part of the device protocol).
fn storage_reason(e: &crate::store::Error) -> &'static str {
    use crate::store::Error as S;
    match e {
        S::Log(crate::log::Error::NoSpace { .. }) => "storage_full",
        S::Table { .. } => "table_full",
        S::Log(crate::log::Error::Invalid { .. } | crate::log::Error::TooLarge { .. }) => "invalid",
        S::Log(_) | S::Checkpoint(_) | S::CheckpointGap { .. } => "storage_unavailable",
    }
}
