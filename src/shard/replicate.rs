//! The replication loop of one executor (`--durability replicated`, an `impl Core` block like
//! the commit loop): reads what its shards made durable, publishes it to JetStream in batches
//! (one per unit — a vshard range of one shard — per round, see `replicate`), and once every
//! batch of a round has its PubAck, moves each shard's replicated position and completes the
//! ack waiters below it. It owns the retry rule: a batch without an answer (timeout, no
//! responders) is resent unchanged (same `Nats-Msg-Id`, same expected subject sequence) until
//! it is stored. A batch refused for a wrong last subject sequence, or answered as a duplicate
//! (a resend whose first try landed, or a batch formed again after a lost connection), makes the
//! loop read that subject's tail from the stream and form the round again from there: the
//! entries the tail covers are skipped, so nothing is stored twice and nothing is skipped
//! unstored. While NATS is unreachable or slow nothing more is acked (the ack ledger's bounds
//! then pause the connections' readers): nothing is ever acked on a local fdatasync alone in
//! this mode.
//!
//! On start it reads, per unit of its shards, the last batch in the stream (its end position
//! and stream sequence) and resumes each shard from the highest `Geobeat-Replicated` it finds:
//! entries a unit already stored are skipped, so a restart publishes neither twice nor with a
//! gap.
//!
//! Ownership (`--node-id`, `replicate::placement`): a unit is published only while this node
//! holds its claim, at the claim's epoch (in `Nats-Msg-Id` and `Geobeat-Epoch`), starting from
//! the subject's tail as read after the claim (the new owner's fence). Entries of units it does
//! not hold, and entries appended before its claim, are passed over unpublished and the ack
//! waiters covering them are dropped, never acked (the devices resend through the owner). A
//! publish refused for a wrong last subject sequence whose re-read tail is another node's (or a
//! newer epoch) makes the loop step down for that unit (`geobeat_ownership_stepdowns_total`).
//!
//! Invariants: a shard's replicated position never passes its durable position, never goes
//! back, and everything below it that was acked is in the streams; a unit has at most one
//! batch in flight; nothing is acked for a unit this node does not hold.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits::{
    REPLICATE_BATCH_BYTES_MAX, REPLICATE_KEEPALIVE_INTERVAL, REPLICATE_PUBACK_TIMEOUT,
    REPLICATE_RETRY_BACKOFF, REPLICATE_ROUND_ENTRIES_MAX, STOP_POLL_INTERVAL,
};
use crate::log::{LogPos, ScanEnd};
use crate::replicate::batch::Builder;
use crate::replicate::conn::{Conn, Publish};
use crate::replicate::wire::{PubAck, ERR_WRONG_LAST_SEQUENCE};
use crate::replicate::{self, Plan};
use crate::route::vshard_of;
use crate::rt;
use crate::shard::core::{Core, StoreSlot};

/// What the stream holds of one unit.
#[derive(Debug, Clone, Copy, Default)]
struct Tail {
    /// Position just past the unit's last stored entry (0: none).
    end: u64,
    /// Stream sequence of its last batch (0: none): the next publish's expected last subject
    /// sequence.
    seq: u64,
    /// Ownership: the last batch (or fence) was published by another data directory, at
    /// `epoch` (its `Geobeat-Epoch`, 0 if none).
    foreign: bool,
    /// Ownership: the epoch of the last batch or fence (0: none or no ownership).
    epoch: u64,
}

/// Per unit of this executor's shards, what ownership means to the loop (only with
/// `--node-id`; see the module comment).
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    /// The epoch the loop synced the unit's tail at (0: not owned, nothing is published).
    epoch: u64,
    /// Entries of the unit below this log position were appended before this node's claim:
    /// never published (a device may have resent them through the previous owner), never
    /// acked.
    fresh_from: u64,
}

/// One batch of a round.
struct Pending {
    unit: u16,
    subject: String,
    headers: Vec<(&'static str, String)>,
    batch: Builder,
    done: bool,
}

impl Core {
    fn plan(&self) -> &Arc<Plan> {
        self.shared
            .replication
            .as_ref()
            .expect("replication loop runs only with a plan")
    }

    /// Reads the tail of every unit of this executor's shards from the streams, and each
    /// shard's resume position.
    async fn resync(
        &self,
        conn: &mut Conn,
        tails: &mut HashMap<u16, Tail>,
    ) -> Result<(), replicate::Error> {
        let plan = self.plan().clone();
        for slot in &self.stores {
            let mut resume = 0u64;
            for u in plan.units() {
                if self.shared.router.shard_of_vshard(crate::route::VShard(u)) != slot.shard {
                    continue;
                }
                let tail = self.fetch_tail(conn, &plan, u).await?;
                resume = resume.max(tail.1);
                tails.insert(u, tail.0);
            }
            let st = &plan.status[slot.shard.0 as usize];
            let durable = slot.store.borrow().durable().0;
            // Only durable entries are ever published: a stream ahead of the local log means
            // this log went back (restored from an older backup, or lost its tail). Its new
            // entries would take positions the streams already name and be skipped as stored:
            // replicate nothing (acks wait) rather than ack what is not in the streams.
            if let Some((&u, t)) = tails
                .iter()
                .filter(|(&u, _)| {
                    self.shared.router.shard_of_vshard(crate::route::VShard(u)) == slot.shard
                })
                .find(|(_, t)| t.end > durable)
            {
                return Err(replicate::Error::LogBehind {
                    subject: plan.subject(u),
                    stream_end: t.end,
                    shard: slot.shard.0,
                    durable,
                });
            }
            st.replicated.fetch_max(resume, Ordering::AcqRel);
            tracing::info!(shard = %slot.shard, resume, durable, "replication resumes");
        }
        Ok(())
    }

    /// Unit `u`'s tail and the `Geobeat-Replicated` of its last batch.
    async fn fetch_tail(
        &self,
        conn: &mut Conn,
        plan: &Plan,
        u: u16,
    ) -> Result<(Tail, u64), replicate::Error> {
        let stream = plan.stream_of(u);
        let req = serde_json::json!({ "last_by_subj": plan.subject(u) });
        match conn
            .api(&format!("$JS.API.STREAM.MSG.GET.{stream}"), &req)
            .await
        {
            Ok(v) => {
                let m = replicate::blocking::parse_stored(&v)?;
                let h = |name| {
                    replicate::wire::header(&m.headers, name)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                let epoch = h(replicate::placement::HDR_EPOCH);
                if plan.placement.is_some() {
                    // Units move between nodes: another data directory's last batch says only
                    // where the subject's sequence is (its positions are not this log's).
                    let theirs = replicate::wire::header(&m.headers, replicate::HDR_LOG)
                        .and_then(|v| v.parse::<i64>().ok());
                    if theirs.is_some_and(|t| t != plan.log_id) {
                        return Ok((
                            Tail {
                                end: 0,
                                seq: m.seq,
                                foreign: true,
                                epoch,
                            },
                            0,
                        ));
                    }
                } else {
                    plan.check_log(u, &m.headers)?;
                }
                Ok((
                    Tail {
                        end: h(replicate::HDR_END),
                        seq: m.seq,
                        foreign: false,
                        epoch,
                    },
                    h(replicate::HDR_REPLICATED),
                ))
            }
            Err(replicate::Error::Api {
                err_code: 10037, ..
            }) => Ok((Tail::default(), 0)),
            Err(e) => Err(e),
        }
    }

    /// Forms the next round from the durable entries not yet replicated: one batch per unit,
    /// at most [`REPLICATE_ROUND_ENTRIES_MAX`] entries and [`REPLICATE_BATCH_BYTES_MAX`] bytes
    /// per batch. Returns the batches and each shard's round end (local index, position).
    ///
    /// With ownership, entries of a unit this node does not hold (or appended before its claim)
    /// are passed over: their positions go to `skipped[local]`, so the waiters covering them
    /// are never acked.
    fn build_round(
        &self,
        tails: &HashMap<u16, Tail>,
        held: &HashMap<u16, Held>,
        skipped: &mut [VecDeque<u64>],
    ) -> (Vec<Pending>, Vec<(usize, LogPos)>) {
        let plan = self.plan();
        let mut batches: Vec<Pending> = Vec::new();
        let mut by_unit: HashMap<u16, usize> = HashMap::new();
        let mut ends = Vec::new();
        let mut entries = 0usize;
        for (local, slot) in self.stores.iter().enumerate() {
            let from = LogPos(plan.replicated(slot.shard.0 as usize));
            let store = slot.store.borrow();
            let durable = store.durable();
            if from >= durable {
                continue;
            }
            let log = store.log();
            let mut scan = log.scan_from(from, ScanEnd::Durable);
            let mut end = from;
            let mut full = false;
            for e in scan.by_ref() {
                if entries >= REPLICATE_ROUND_ENTRIES_MAX {
                    full = true;
                    end = e.pos;
                    break;
                }
                let unit = plan.unit_of(vshard_of(e.hb.device_id.as_str()));
                if let Some(p) = &plan.placement {
                    let h = held.get(&unit).copied().unwrap_or_default();
                    if h.epoch == 0 || p.epoch(unit) != h.epoch || e.pos.0 < h.fresh_from {
                        skipped[local].push_back(e.pos.0);
                        entries += 1;
                        end = e.end();
                        continue;
                    }
                }
                let tail = tails.get(&unit).copied().unwrap_or_default();
                if e.pos.0 < tail.end {
                    // Stored before a restart or by a batch this loop re-formed.
                    end = e.end();
                    continue;
                }
                let i = *by_unit.entry(unit).or_insert_with(|| {
                    batches.push(Pending {
                        unit,
                        subject: plan.subject(unit),
                        headers: Vec::new(),
                        batch: Builder::new(),
                        done: false,
                    });
                    batches.len() - 1
                });
                let b = &mut batches[i].batch;
                if b.count() > 0
                    && b.len_bytes() + 8 + e.len_bytes as usize > REPLICATE_BATCH_BYTES_MAX
                {
                    full = true;
                    end = e.pos;
                    break;
                }
                let (_, raw) = log.read_raw(e.pos).expect("a scanned entry reads back");
                b.push(e.pos, raw, e.end());
                entries += 1;
                end = e.end();
            }
            if !full {
                end = end.max(scan.next_pos()).min(durable);
            }
            if end > from {
                ends.push((local, end));
            }
            if full {
                break;
            }
        }
        for p in &mut batches {
            let tail = tails.get(&p.unit).copied().unwrap_or_default();
            let last = p.batch.last().expect("batches are never empty");
            let shard = self
                .shared
                .router
                .shard_of_vshard(crate::route::VShard(p.unit));
            let epoch = held.get(&p.unit).map_or(plan.epoch, |h| h.epoch);
            p.headers = vec![
                (replicate::HDR_MSG_ID, plan.msg_id_at(p.unit, epoch, last)),
                (
                    replicate::HDR_EXPECTED_LAST_SUBJECT_SEQ,
                    tail.seq.to_string(),
                ),
                (replicate::HDR_END, p.batch.end().0.to_string()),
                (
                    replicate::HDR_REPLICATED,
                    plan.replicated(shard.0 as usize).to_string(),
                ),
                (replicate::HDR_SHARD, shard.0.to_string()),
                (replicate::HDR_LOG, plan.log_id.to_string()),
            ];
            if let Some(pl) = &plan.placement {
                p.headers
                    .push((replicate::placement::HDR_EPOCH, epoch.to_string()));
                p.headers
                    .push((replicate::placement::HDR_NODE, pl.node_id.clone()));
            }
        }
        (batches, ends)
    }

    /// Publishes `batches` until each is stored. `Ok(false)`: a unit's tail moved under it (a
    /// wrong last subject sequence): re-form the round. `Err`: the connection failed.
    async fn ship(
        &self,
        conn: &mut Conn,
        batches: &mut [Pending],
        tails: &mut HashMap<u16, Tail>,
        held: &mut HashMap<u16, Held>,
    ) -> Result<bool, replicate::Error> {
        let plan = self.plan().clone();
        let mut acks = Vec::new();
        loop {
            let open: Vec<usize> = (0..batches.len()).filter(|&i| !batches[i].done).collect();
            if open.is_empty() {
                return Ok(true);
            }
            let pubs: Vec<Publish<'_>> = open
                .iter()
                .map(|&i| Publish {
                    subject: &batches[i].subject,
                    headers: &batches[i].headers,
                    payload: batches[i].batch.bytes(),
                })
                .collect();
            conn.publish_round(&pubs, REPLICATE_PUBACK_TIMEOUT, &mut acks)
                .await?;
            drop(pubs);
            let mut refetch = Vec::new();
            let mut retry = false;
            for (k, &i) in open.iter().enumerate() {
                let b = &mut batches[i];
                let st = &plan.status[self
                    .shared
                    .router
                    .shard_of_vshard(crate::route::VShard(b.unit))
                    .0 as usize];
                match &acks[k] {
                    Some(PubAck::Stored {
                        duplicate: true, ..
                    }) => {
                        // The id was stored before (a resend whose first try landed): the
                        // stored batch is this one only if the subject's tail says so. Re-read
                        // it and re-form the round from there (rare: a lost PubAck).
                        st.duplicates.fetch_add(1, Ordering::Relaxed);
                        refetch.push(b.unit);
                    }
                    Some(PubAck::Stored { seq, .. }) => {
                        b.done = true;
                        tails.insert(
                            b.unit,
                            Tail {
                                end: b.batch.end().0,
                                seq: *seq,
                                foreign: false,
                                epoch: held.get(&b.unit).map_or(0, |h| h.epoch),
                            },
                        );
                        st.batches.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(PubAck::Refused {
                        err_code,
                        description,
                    }) if *err_code == ERR_WRONG_LAST_SEQUENCE => {
                        tracing::info!(unit = b.unit, error = %description, "subject tail moved; re-reading it");
                        refetch.push(b.unit);
                    }
                    other => {
                        st.retries.fetch_add(1, Ordering::Relaxed);
                        retry = true;
                        if let Some(PubAck::Refused {
                            err_code,
                            description,
                        }) = other
                        {
                            tracing::warn!(unit = b.unit, err_code, error = %description, "publish refused; retrying");
                        }
                    }
                }
            }
            if !refetch.is_empty() {
                for u in refetch {
                    let (tail, _) = self.fetch_tail(conn, &plan, u).await?;
                    if let Some(p) = &plan.placement {
                        // Fenced: another node claimed the unit and its fence (or batch) is
                        // the subject's tail now. Stop writing it; what this node held of it
                        // is never acked (devices resend through the new owner).
                        let mine = held.get(&u).map_or(0, |h| h.epoch);
                        if tail.foreign || tail.epoch > mine {
                            p.step_down(u, mine);
                            held.insert(u, Held::default());
                        }
                    }
                    tails.insert(u, tail);
                }
                return Ok(false);
            }
            if retry {
                // Connected, yet the streams do not store (no leader, quorum lost, timeouts):
                // as unavailable for `/readyz` as an unreachable server.
                self.nats_down();
                rt::sleep(REPLICATE_RETRY_BACKOFF).await;
            } else {
                self.nats_up();
            }
        }
    }

    /// Ownership: brings `held` up to date with the placement table. A unit claimed since the
    /// last look gets its tail re-read (the fence is its last message) and starts at the log's
    /// written end: entries appended before the claim are not published.
    async fn sync_held(
        &self,
        conn: &mut Conn,
        held: &mut HashMap<u16, Held>,
        tails: &mut HashMap<u16, Tail>,
    ) -> Result<(), replicate::Error> {
        let plan = self.plan().clone();
        let p = plan
            .placement
            .as_ref()
            .expect("sync_held runs only with ownership");
        for slot in &self.stores {
            for u in plan.units() {
                if self.shared.router.shard_of_vshard(crate::route::VShard(u)) != slot.shard {
                    continue;
                }
                let now = p.epoch(u);
                let h = held.entry(u).or_default();
                if now == h.epoch {
                    continue;
                }
                if now == 0 {
                    *h = Held::default();
                    p.adopt(u, 0);
                    continue;
                }
                let fresh_from = slot.store.borrow().written().0;
                let (tail, _) = self.fetch_tail(conn, &plan, u).await?;
                tails.insert(u, tail);
                held.insert(
                    u,
                    Held {
                        epoch: now,
                        fresh_from,
                    },
                );
                // Devices of the unit are served from here on (`Placement::owner`): what they
                // append now lies at or after `fresh_from`.
                p.adopt(u, now);
                tracing::info!(
                    unit = u,
                    epoch = now,
                    tail = tail.seq,
                    fresh_from,
                    "writing a claimed unit"
                );
            }
        }
        Ok(())
    }

    /// [`Core::complete_below`] under ownership: a waiter whose group holds a skipped entry
    /// (a unit this node does not own) is dropped, never acked: its device resends through the
    /// owner. `skipped` is in position order.
    fn complete_below_owned(&self, slot: &StoreSlot, upto: LogPos, skipped: &mut VecDeque<u64>) {
        loop {
            let next = {
                let mut w = slot.waiters.borrow_mut();
                match w.front() {
                    Some(front) if front.pos < upto => w.pop_front(),
                    _ => None,
                }
            };
            let Some(w) = next else { break };
            let mut hit = false;
            while skipped.front().is_some_and(|&d| d <= w.pos.0) {
                skipped.pop_front();
                hit = true;
            }
            if !hit {
                debug_assert!(w.pos < slot.store.borrow().durable());
                self.complete(w.target);
            }
        }
        // A skipped entry no waiter covers (its group was acked on another path, or never
        // waited) is forgotten once no waiter is left that could hold it.
        if slot.waiters.borrow().is_empty() {
            skipped.clear();
        }
        debug_assert!(skipped.len() <= crate::limits::PLACEMENT_SKIPPED_MAX);
    }

    /// Notes for `/readyz` that this executor's shards have no working NATS connection.
    fn nats_down(&self) {
        let now = rt::now_ms();
        for slot in &self.stores {
            self.plan().status[slot.shard.0 as usize].unreachable(now);
        }
    }

    /// Notes a NATS round trip that worked.
    fn nats_up(&self) {
        for slot in &self.stores {
            self.plan().status[slot.shard.0 as usize].reachable();
        }
    }

    /// The replication loop (see the module comment). Spawned once per executor by `server`
    /// when `--durability replicated`.
    pub async fn replicate_loop(self: Rc<Self>) {
        let plan = self.plan().clone();
        let name = format!("geobeat-{}", self.index.0);
        let mut conn: Option<Conn> = None;
        let mut next_addr = self.index.0;
        let mut tails: HashMap<u16, Tail> = HashMap::new();
        let mut held: HashMap<u16, Held> = HashMap::new();
        let mut skipped: Vec<VecDeque<u64>> = self.stores.iter().map(|_| VecDeque::new()).collect();
        let mut synced = false;
        let mut last_io = Instant::now();
        let warn = crate::ratelog::LogEvery::new(Duration::from_secs(5));
        loop {
            if self.stopping()
                && self.shared.executors_drained.load(Ordering::Acquire) == self.shared.executors
            {
                return;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match Conn::connect(&plan.addrs, next_addr, &name).await {
                    Ok(c) => {
                        self.nats_up();
                        tracing::info!(
                            executor = self.index.0,
                            server = c.addr(),
                            "connected to NATS"
                        );
                        conn.insert(c)
                    }
                    Err(e) => {
                        self.nats_down();
                        if let Some(n) = warn.check() {
                            tracing::warn!(executor = self.index.0, error = %e, suppressed_since_last = n, "NATS unreachable; acks wait");
                        }
                        next_addr += 1;
                        rt::sleep(REPLICATE_RETRY_BACKOFF).await;
                        continue;
                    }
                },
            };
            if !synced {
                match self.resync(c, &mut tails).await {
                    Ok(()) => {
                        synced = true;
                        self.nats_up();
                    }
                    Err(e) => {
                        self.nats_down();
                        if let Some(n) = warn.check() {
                            tracing::error!(executor = self.index.0, error = %e, suppressed_since_last = n, "reading the stream tails failed; acks wait; retrying");
                        }
                        conn = None;
                        next_addr += 1;
                        rt::sleep(REPLICATE_RETRY_BACKOFF).await;
                        continue;
                    }
                }
            }
            if plan.placement.is_some() {
                if let Err(e) = self.sync_held(c, &mut held, &mut tails).await {
                    self.nats_down();
                    if let Some(n) = warn.check() {
                        tracing::warn!(executor = self.index.0, error = %e, suppressed_since_last = n, "reading a claimed unit's tail failed; reconnecting");
                    }
                    conn = None;
                    next_addr += 1;
                    rt::sleep(REPLICATE_RETRY_BACKOFF).await;
                    continue;
                }
            }
            let (mut batches, ends) = self.build_round(&tails, &held, &mut skipped);
            if ends.is_empty() {
                rt::timeout(
                    STOP_POLL_INTERVAL.max(Duration::from_millis(100)),
                    self.replicate_signal.wait(),
                )
                .await;
                if last_io.elapsed() >= REPLICATE_KEEPALIVE_INTERVAL {
                    last_io = Instant::now();
                    match c.ping().await {
                        Ok(_) => self.nats_up(),
                        Err(e) => {
                            self.nats_down();
                            tracing::warn!(executor = self.index.0, error = %e, "NATS connection lost; reconnecting");
                            conn = None;
                            next_addr += 1;
                        }
                    }
                }
                continue;
            }
            last_io = Instant::now();
            match self.ship(c, &mut batches, &mut tails, &mut held).await {
                Ok(true) => self.nats_up(),
                Ok(false) => continue,
                Err(e) => {
                    self.nats_down();
                    if let Some(n) = warn.check() {
                        tracing::warn!(executor = self.index.0, error = %e, suppressed_since_last = n, "NATS connection lost mid-round; reconnecting, the round is resent");
                    }
                    // The round is formed again: a batch that was stored before the failure is
                    // resent with the same message id and expected sequence, and JetStream
                    // answers it as a duplicate (or with a wrong last sequence, which re-reads
                    // the tail): never stored twice.
                    conn = None;
                    next_addr += 1;
                    continue;
                }
            }
            for (local, end) in ends {
                let slot = &self.stores[local];
                let st = &plan.status[slot.shard.0 as usize];
                let before = st.replicated.fetch_max(end.0, Ordering::AcqRel);
                debug_assert!(end.0 >= before, "replicated position went back");
                debug_assert!(end <= slot.store.borrow().durable());
                let _ = slot
                    .store
                    .borrow_mut()
                    .set_consumed(replicate::CONSUMER_NAME, end);
                if plan.placement.is_some() {
                    self.complete_below_owned(slot, end, &mut skipped[local]);
                } else {
                    self.complete_below(slot, end);
                }
            }
        }
    }
}
