//! One executor (one core): the shard stores it owns, their group-commit loop, the table of its
//! connections and their pending acks, and its ends of the channel meshes. It owns the rule that
//! turns "durable up to position P" into acks: every appended group registers a waiter at the
//! position of its last entry; when a commit makes the log durable past that position the waiter
//! completes its frame (locally, or by a reply to the executor that holds the connection).
//!
//! Invariants: an ack never covers a heartbeat that is not durable (Strict mode); all state here
//! is touched by this executor's thread only (`RefCell`, `Cell`, `Rc`), and no `RefCell` borrow is
//! held across an `.await`.

use crate::limits::{
    BATCH_POOL_MAX, REPEAT_LOG_INTERVAL_MS, RETENTION_CHECK_INTERVAL, SHUTDOWN_DRAIN_MAX,
    STOP_POLL_INTERVAL, SYNC_FILES_MAX,
};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datadir::DataDir;
use crate::log::{Commit, LogPos};
use crate::metrics::{ExecProbe, ExecSnapshot, ShardSnapshot, StoreProbe};
use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::rt::{self, mesh, Signal, SyncFile};
use crate::server::fanout::Fanout;
use crate::server::listen::Role;
use crate::server::msg::{Batch, ConnKey, EventBatch, ToOwner, ToSource};
use crate::server::Shared;
use crate::store::{RetentionStep, ShardStore, StoreConfig};

/// The three meshes (requests, replies, subscription events), cloned into every executor before
/// it starts.
#[derive(Clone)]
pub struct Meshes {
    requests: mesh::MeshBuilder<ToOwner, mesh::Full>,
    replies: mesh::MeshBuilder<ToSource, mesh::Full>,
    /// Subscription events, owner → executor holding the subscriber (`try_send` only).
    events: mesh::MeshBuilder<EventBatch, mesh::Full>,
}

impl Meshes {
    /// Meshes for `executors` peers with `capacity` messages per directed pair.
    pub fn new(executors: usize, capacity: usize) -> Meshes {
        Meshes {
            requests: rt::mesh::full(executors, capacity),
            replies: rt::mesh::full(executors, capacity),
            events: rt::mesh::full(executors, crate::limits::FANOUT_MESH_CAPACITY),
        }
    }
}

/// Who is told when a group becomes durable.
enum Target {
    /// A connection on this executor.
    Local {
        conn: ConnKey,
        frame: u64,
        failed: Vec<(u64, &'static str)>,
    },
    /// A connection on another executor: the batch goes back in a reply.
    Remote { peer: usize, batch: Batch },
}

struct Waiter {
    /// Position of the group's last entry: durable once `durable() > pos`.
    pos: LogPos,
    target: Target,
}

/// One logical shard owned by this executor.
pub struct StoreSlot {
    /// The logical shard.
    pub shard: ShardId,
    /// Its log and last-location table.
    pub store: RefCell<ShardStore>,
    /// Groups waiting for durability, in position order.
    waiters: RefCell<VecDeque<Waiter>>,
    /// Segment files opened for fdatasync, by segment base position.
    sync_files: RefCell<Vec<(u64, Rc<SyncFile>)>>,
    /// Entries appended since the last commit started.
    pending_entries: Cell<usize>,
    /// When the first of those was appended.
    pending_since: Cell<Option<Instant>>,
    /// Rate limit of the "append refused" warning: when it was last logged and how many
    /// refusals were not logged since (a full disk refuses every heartbeat; one line per
    /// heartbeat would flood the log at fleet scale).
    refusal_log: crate::ratelog::LogEvery,
    /// Commit counters.
    pub probe: StoreProbe,
}

/// A frame waiting for its groups to become durable.
struct FrameWait {
    frame: u64,
    /// When the frame was read (ack latency starts here).
    received: Instant,
    /// Highest accepted seq in the frame (0 if none).
    seq_max: u64,
    /// Groups not yet durable.
    groups: u32,
}

/// What the ingest side of a connection shares with the executor.
pub struct ConnState {
    generation: u32,
    live: bool,
    frames: VecDeque<FrameWait>,
    next_frame: u64,
    /// Highest seq that may be acked (the completed prefix of frames).
    pub ack_ready: u64,
    /// Error frames to send: `(seq, reason)`.
    pub errors: VecDeque<(Option<u64>, &'static str)>,
    /// Wakes the connection's writer (and a paused reader).
    pub signal: Rc<Signal>,
}

impl ConnState {
    /// Frames still waiting for durability.
    pub fn frames_in_flight(&self) -> usize {
        self.frames.len()
    }
}

/// Per-executor state, shared by its tasks through `Rc`.
pub struct Exec {
    /// This executor's index.
    pub index: usize,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Owned shards; local index = logical shard / executors.
    pub stores: Vec<StoreSlot>,
    conns: RefCell<Vec<ConnState>>,
    free_slots: RefCell<Vec<u32>>,
    /// Wakes the commit loop after appends.
    commit_signal: Rc<Signal>,
    /// Request mesh senders (to owners).
    pub requests: mesh::Senders<ToOwner>,
    replies: mesh::Senders<ToSource>,
    outbox: Vec<RefCell<VecDeque<ToSource>>>,
    outbox_signal: Vec<Rc<Signal>>,
    batch_pool: RefCell<Vec<Vec<(u64, Heartbeat)>>>,
    /// The executor's frame decoder (decoding is synchronous; slots are consumed before awaits).
    pub decoder: RefCell<crate::proto::Decoder>,
    /// Fired once when shutdown begins.
    pub stop_signal: Rc<Signal>,
    /// Connections open on this executor.
    pub conns_open: Cell<usize>,
    /// This executor's counters.
    pub probe: ExecProbe,
    /// Subscription fan-out: interest replica, pending events, subscriber connections.
    pub fanout: Fanout,
    /// Bytes of partial WebSocket frames held by this executor's connections (bounded).
    pub partial_frames: Rc<crate::server::ws_read::PartialFrames>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds since the Unix epoch (the server receive time).
pub fn received_now_ms() -> i64 {
    now_ms()
}

/// Wall-clock seconds since the Unix epoch (token expiry checks).
pub fn now_s() -> u64 {
    (now_ms() / 1000).max(0) as u64
}

impl Exec {
    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// The slot of a logical shard this executor owns.
    pub fn slot(&self, shard: ShardId) -> &StoreSlot {
        let (exec, local) = self.shared.owner(shard);
        assert_eq!(
            exec, self.index,
            "shard {shard} is not owned by executor {}",
            self.index
        );
        &self.stores[local]
    }

    // ----- connections -----

    /// Registers a new connection.
    pub fn conn_open(&self) -> ConnKey {
        let mut conns = self.conns.borrow_mut();
        let slot = match self.free_slots.borrow_mut().pop() {
            Some(s) => s,
            None => {
                conns.push(ConnState {
                    generation: 0,
                    live: false,
                    frames: VecDeque::new(),
                    next_frame: 0,
                    ack_ready: 0,
                    errors: VecDeque::new(),
                    signal: Signal::new(),
                });
                (conns.len() - 1) as u32
            }
        };
        let c = &mut conns[slot as usize];
        assert!(!c.live);
        c.generation = c.generation.wrapping_add(1);
        c.live = true;
        c.frames.clear();
        c.next_frame = 0;
        c.ack_ready = 0;
        c.errors.clear();
        c.signal = Signal::new();
        self.conns_open.set(self.conns_open.get() + 1);
        ConnKey {
            slot,
            generation: c.generation,
        }
    }

    /// Unregisters a connection; completions still in flight for it are dropped on arrival.
    pub fn conn_close(&self, key: ConnKey) {
        let mut conns = self.conns.borrow_mut();
        let c = &mut conns[key.slot as usize];
        if c.live && c.generation == key.generation {
            c.live = false;
            c.frames.clear();
            c.errors.clear();
            self.free_slots.borrow_mut().push(key.slot);
            self.conns_open.set(self.conns_open.get() - 1);
        }
    }

    /// Runs `f` on a live connection's state.
    pub fn with_conn<R>(&self, key: ConnKey, f: impl FnOnce(&mut ConnState) -> R) -> Option<R> {
        let mut conns = self.conns.borrow_mut();
        let c = conns.get_mut(key.slot as usize)?;
        (c.live && c.generation == key.generation).then(|| f(c))
    }

    /// Starts a frame with `groups` destination groups; returns its number. A frame with zero
    /// groups (everything rejected) completes at once.
    pub fn frame_begin(&self, key: ConnKey, seq_max: u64, groups: u32, received: Instant) -> u64 {
        let frame = self
            .with_conn(key, |c| {
                let frame = c.next_frame;
                c.next_frame += 1;
                c.frames.push_back(FrameWait {
                    frame,
                    received,
                    seq_max,
                    groups,
                });
                frame
            })
            .expect("frame_begin on a live connection");
        if groups == 0 {
            self.settle(key);
        }
        frame
    }

    /// Marks one group of `frame` durable (after reporting `failed` seqs as errors).
    fn group_done(&self, key: ConnKey, frame: u64, failed: &[(u64, &'static str)]) {
        self.with_conn(key, |c| {
            for &(seq, reason) in failed {
                c.errors.push_back((Some(seq), reason));
            }
            if !failed.is_empty() {
                // Errors of a frame behind an unfinished one go out now, not with its ack.
                c.signal.notify();
            }
            let Some(front) = c.frames.front() else {
                return;
            };
            let idx = frame.wrapping_sub(front.frame) as usize;
            if let Some(f) = c.frames.get_mut(idx) {
                assert!(f.frame == frame && f.groups > 0);
                f.groups -= 1;
            }
        });
        self.settle(key);
    }

    /// Pops the completed prefix of frames and wakes the writer (and a paused reader) if anything
    /// changed.
    fn settle(&self, key: ConnKey) {
        let probe = &self.probe;
        self.with_conn(key, |c| {
            let before = (c.ack_ready, c.errors.len(), c.frames.len());
            let mut now = None;
            while c.frames.front().is_some_and(|f| f.groups == 0) {
                let f = c.frames.pop_front().expect("front exists");
                c.ack_ready = c.ack_ready.max(f.seq_max);
                let now = *now.get_or_insert_with(Instant::now);
                probe
                    .ack_latency
                    .observe(now.duration_since(f.received).as_secs_f64());
            }
            // Any change wakes the writer and a reader paused on backpressure (popped frames
            // make room even when the ack does not move, e.g. a frame refused whole).
            if (c.ack_ready, c.errors.len(), c.frames.len()) != before {
                c.signal.notify();
            }
        });
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
    fn append_group<'a>(
        &self,
        slot: &StoreSlot,
        items: impl Iterator<Item = (u64, &'a Heartbeat)>,
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
        for (seq, hb) in items {
            let result = match fanout {
                None => store.append(hb),
                Some(local) => store.append_tracked(hb).map(|a| {
                    self.fanout.on_append(local, hb, &a);
                    a.pos
                }),
            };
            match result {
                Ok(pos) => {
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
        match pos {
            Some(pos) if !relaxed && slot.store.borrow().durable() <= pos => {
                slot.waiters.borrow_mut().push_back(Waiter { pos, target });
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
        items: impl Iterator<Item = (u64, &'a Heartbeat)>,
    ) {
        let slot = self.slot(shard);
        let mut failed = Vec::new();
        let pos = self.append_group(slot, items, &mut failed);
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

    fn append_remote(&self, peer: usize, shard: ShardId, mut batch: Batch) {
        let slot = self.slot(shard);
        let mut failed = std::mem::take(&mut batch.failed);
        let pos = self.append_group(slot, batch.items.iter().map(|(s, h)| (*s, h)), &mut failed);
        batch.failed = failed;
        self.register(slot, pos, Target::Remote { peer, batch });
    }

    fn complete(&self, target: Target) {
        match target {
            Target::Local {
                conn,
                frame,
                failed,
            } => self.group_done(conn, frame, &failed),
            Target::Remote { peer, batch } => {
                self.outbox[peer]
                    .borrow_mut()
                    .push_back(ToSource::Done(batch));
                self.outbox_signal[peer].notify();
            }
        }
    }

    fn on_reply(&self, reply: ToSource) {
        match reply {
            ToSource::Done(batch) => {
                self.group_done(batch.conn, batch.frame, &batch.failed);
                self.recycle(batch.items);
            }
        }
    }

    // ----- commit -----

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
        slot.probe
            .group_entries
            .observe(slot.pending_entries.get() as f64);
        slot.pending_entries.set(0);
        slot.pending_since.set(None);
        let begun = slot.store.borrow_mut().commit_begin();
        let durable = match begun {
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
        slot.probe
            .commit_latency
            .observe(started.elapsed().as_secs_f64());
        self.shared.feeds[slot.shard.0 as usize].publish_durable(durable);
        // Subscription events of this group go out now that it is durable.
        self.fanout
            .durable(self.shared.owner(slot.shard).1, durable);
        loop {
            let next = {
                let mut w = slot.waiters.borrow_mut();
                match w.front() {
                    Some(front) if front.pos < durable => w.pop_front(),
                    _ => None,
                }
            };
            match next {
                Some(w) => self.complete(w.target),
                None => break,
            }
        }
    }

    async fn commit_loop(self: Rc<Self>) {
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

    // ----- retention -----

    /// Periodically hands every sink's consumed position to the log, deletes segments past
    /// retention that every consumer has passed, and warns while a sink's backlog is over budget.
    async fn retention_loop(self: Rc<Self>) {
        let cfg = &self.shared.cfg;
        let mut warned = vec![false; self.stores.len()];
        loop {
            rt::timeout(RETENTION_CHECK_INTERVAL, self.stop_signal.wait()).await;
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
        let step = slot
            .store
            .borrow()
            .retention_begin(std::time::SystemTime::now(), retention);
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

    // ----- mesh tasks -----

    async fn request_loop(self: Rc<Self>, rx: Rc<mesh::Receivers<ToOwner>>, peer: usize) {
        while let Ok(Some(msg)) = rx.recv_from(peer).await {
            ExecProbe::add(&self.probe.received_from[peer], 1);
            match msg {
                ToOwner::Append { shard, batch } => self.append_remote(peer, shard, batch),
                ToOwner::Query { shard, job } => job(&self.slot(shard).store.borrow()),
                ToOwner::Run(job) => job(&self),
                ToOwner::Adopt(adopt) => crate::server::listen::adopt(self.clone(), *adopt),
            }
        }
    }

    async fn reply_recv_loop(self: Rc<Self>, rx: Rc<mesh::Receivers<ToSource>>, peer: usize) {
        while let Ok(Some(msg)) = rx.recv_from(peer).await {
            self.on_reply(msg);
        }
    }

    async fn reply_send_loop(self: Rc<Self>, peer: usize) {
        loop {
            let next = self.outbox[peer].borrow_mut().pop_front();
            match next {
                Some(msg) => {
                    if self.replies.send_to(peer, msg).await.is_err() {
                        return;
                    }
                }
                None => self.outbox_signal[peer].wait().await,
            }
        }
    }

    /// Runs `job` against the store of `shard`, wherever it lives, and returns its answer.
    pub async fn query<T: Send + 'static>(
        &self,
        shard: ShardId,
        job: impl FnOnce(&ShardStore) -> T + Send + 'static,
    ) -> Option<T> {
        let (owner, _) = self.shared.owner(shard);
        if owner == self.index {
            return Some(job(&self.slot(shard).store.borrow()));
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let job: crate::server::msg::StoreJob = Box::new(move |store| {
            let _ = tx.send(job(store));
        });
        self.send(owner, ToOwner::Query { shard, job }).await.ok()?;
        rx.await.ok()
    }

    /// Sends a request to another executor (waiting for room: backpressure), counting it.
    pub async fn send(&self, to: usize, msg: ToOwner) -> Result<(), ()> {
        ExecProbe::add(&self.probe.sent_to[to], 1);
        self.requests.send_to(to, msg).await.map_err(|_| ())
    }

    /// Runs `job` on every executor (here directly, elsewhere over the mesh) and collects the
    /// answers in executor order; executors that cannot answer are left out.
    pub async fn on_all<T: Send + 'static>(
        &self,
        job: impl Fn(&Exec) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(self.shared.executors);
        for i in 0..self.shared.executors {
            if i == self.index {
                out.push(job(self));
                continue;
            }
            let (tx, rx) = futures_channel::oneshot::channel();
            let job = job.clone();
            let run: crate::server::msg::ExecJob = Box::new(move |exec: &Exec| {
                let _ = tx.send(job(exec));
            });
            if self.send(i, ToOwner::Run(run)).await.is_ok() {
                if let Ok(v) = rx.await {
                    out.push(v);
                }
            }
        }
        out
    }

    /// Whether a geofence named `name` exists (checked when a client subscribes to it).
    pub fn fence_exists(&self, name: &str) -> bool {
        self.shared.fences.snapshot().1.id(name).is_some()
    }

    /// This executor's metrics snapshot.
    pub fn snapshot(&self) -> ExecSnapshot {
        let mut snap = self.probe.snapshot(self.index, self.conns_open.get());
        snap.subscribers_open = self.fanout.conns_open();
        snap.events_delivered = self.fanout.delivered.get();
        snap.events_missed = self.fanout.missed.get();
        for slot in &self.stores {
            let store = slot.store.borrow();
            let stats = store.stats();
            snap.shards.push(ShardSnapshot {
                shard: slot.shard.0,
                executor: self.index,
                log_bytes: stats.bytes,
                segments: stats.segments,
                entries: stats.entries,
                written: stats.written.0,
                durable: stats.durable.0,
                devices: store.table().len(),
                table_bytes: store.table().heap_bytes(),
                sync_mode: stats.sync_mode.to_string(),
                group_entries: slot.probe.group_entries.snapshot(),
                commit_latency: slot.probe.commit_latency.snapshot(),
                waiters: slot.waiters.borrow().len(),
            });
        }
        snap
    }
}

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

/// The body of one executor: recover its shards, join the meshes, serve until shutdown.
pub async fn executor_main(
    index: usize,
    shared: Arc<Shared>,
    datadir: Arc<DataDir>,
    meshes: Meshes,
    stop_flag: Arc<AtomicBool>,
) -> Result<(), std::io::Error> {
    let mut stores = Vec::new();
    let mut open_error = None;
    for k in (index..shared.shard_count as usize).step_by(shared.executors) {
        let shard = ShardId(k as u32);
        let mut cfg = StoreConfig::new(datadir.shard_dir(shard), shard);
        cfg.segment_bytes = shared.cfg.segment_bytes;
        let started = Instant::now();
        let (store, report) = match ShardStore::open(&cfg) {
            Ok(opened) => opened,
            Err(e) => {
                open_error = Some(std::io::Error::other(format!("opening shard {shard}: {e}")));
                break;
            }
        };
        tracing::info!(shard = %shard, executor = index, elapsed_ms = started.elapsed().as_millis() as u64, report = ?report, "shard recovered");
        let mut store = store;
        if !shared.cfg.sinks.is_empty() {
            if let Err(e) = store.register_consumer(crate::flusher::CONSUMER_NAME) {
                open_error = Some(std::io::Error::other(format!("shard {shard}: {e}")));
                break;
            }
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
        });
    }
    // glommio can lose the wake-up that completes a mesh join; keep this executor awake.
    let nudge = rt::Nudge::start();
    let (requests, request_rx) = meshes
        .requests
        .join()
        .await
        .map_err(|_| std::io::Error::other("joining request mesh"))?;
    let (replies, reply_rx) = meshes
        .replies
        .join()
        .await
        .map_err(|_| std::io::Error::other("joining reply mesh"))?;
    let (events_tx, events_rx) = meshes
        .events
        .join()
        .await
        .map_err(|_| std::io::Error::other("joining event mesh"))?;
    drop(nudge);
    if let Some(e) = open_error {
        // The meshes are joined (peers would wait for us forever otherwise); now stop everyone.
        tracing::error!(executor = index, error = %e, "a shard could not be opened; stopping");
        stop_flag.store(true, Ordering::Release);
        shared.stopping.store(true, Ordering::Release);
        shared.executors_drained.fetch_add(1, Ordering::AcqRel);
        return Err(e);
    }
    let peers = shared.executors;
    let fanout = Fanout::new(index, peers, stores.len(), events_tx, shared.fences.clone());
    let exec = Rc::new(Exec {
        index,
        shared: shared.clone(),
        stores,
        conns: RefCell::new(Vec::new()),
        free_slots: RefCell::new(Vec::new()),
        commit_signal: Signal::new(),
        requests,
        replies,
        outbox: (0..peers).map(|_| RefCell::new(VecDeque::new())).collect(),
        outbox_signal: (0..peers).map(|_| Signal::new()).collect(),
        batch_pool: RefCell::new(Vec::new()),
        decoder: RefCell::new(crate::proto::Decoder::new()),
        stop_signal: Signal::new(),
        conns_open: Cell::new(0),
        probe: ExecProbe::new(peers),
        fanout,
        partial_frames: crate::server::ws_read::PartialFrames::new(),
    });
    let request_rx = Rc::new(request_rx);
    let reply_rx = Rc::new(reply_rx);
    let events_rx = Rc::new(events_rx);
    rt::spawn(crate::server::fanout::flush_loop(exec.clone()));
    for peer in (0..peers).filter(|&p| p != index) {
        rt::spawn(crate::server::fanout::recv_loop(
            exec.clone(),
            events_rx.clone(),
            peer,
        ));
        rt::spawn(exec.clone().request_loop(request_rx.clone(), peer));
        rt::spawn(exec.clone().reply_recv_loop(reply_rx.clone(), peer));
        rt::spawn(exec.clone().reply_send_loop(peer));
    }
    let commit = rt::spawn_joinable(exec.clone().commit_loop());
    rt::spawn(exec.clone().retention_loop());

    let listener = rt::bind(
        *shared
            .local_addr
            .get()
            .expect("address resolved before executors start"),
    )?;
    if shared.executors_ready.fetch_add(1, Ordering::AcqRel) + 1 == shared.executors {
        crate::server::announce_listening(&shared);
    }
    rt::spawn(crate::server::listen::accept_loop(
        exec.clone(),
        listener,
        Role::Main,
    ));
    if let (0, Some(addr)) = (index, shared.cfg.metrics_listen) {
        let metrics = rt::bind(addr)?;
        tracing::info!(%addr, "serving /metrics on its own listener");
        rt::spawn(crate::server::listen::accept_loop(
            exec.clone(),
            metrics,
            Role::Metrics,
        ));
    }

    // Watch for shutdown.
    while !stop_flag.load(Ordering::Acquire) {
        rt::sleep(STOP_POLL_INTERVAL).await;
    }
    shared.stopping.store(true, Ordering::Release);
    exec.stop_signal.notify();
    tracing::info!(executor = index, "draining");
    let drain_deadline = Instant::now() + SHUTDOWN_DRAIN_MAX;
    while (exec.conns_open.get() > 0 || exec.fanout.conns_open() > 0)
        && Instant::now() < drain_deadline
    {
        rt::sleep(Duration::from_millis(5)).await;
    }
    shared.executors_drained.fetch_add(1, Ordering::AcqRel);
    // Keep committing for peers until every executor drained.
    while shared.executors_drained.load(Ordering::Acquire) < shared.executors
        && Instant::now() < drain_deadline
    {
        rt::sleep(Duration::from_millis(5)).await;
    }
    shared
        .executors_drained
        .store(shared.executors, Ordering::Release);
    commit.await;
    for slot in &exec.stores {
        match slot.store.borrow_mut().sync_blocking() {
            Ok(durable) => shared.feeds[slot.shard.0 as usize].publish_durable(durable),
            Err(e) => tracing::error!(shard = %slot.shard, error = %e, "final sync failed"),
        }
    }
    Ok(())
}
