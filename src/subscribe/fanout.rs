//! Real-time fan-out of durable heartbeats to subscribers, one instance per executor. It owns
//! three things: (1) this executor's replica of the server-wide subscription interest
//! ([`super::interest`]), updated by rare broadcasts when a subscriber subscribes or leaves;
//! (2) the owner side: matching each heartbeat appended to a local shard against that replica,
//! rendering its event JSON once, holding it until its commit group is durable, then routing it
//! to the executor that holds the subscriber connection, in batches over the event mesh sent with
//! `try_send`; (3) the destination side: the subscriber connections held here, each with a
//! bounded queue drained by its WebSocket writer (`net::subscribe`). It does not parse client ops
//! or speak WebSocket (`net::subscribe`), and does not decide when commits happen (`shard`).
//!
//! Invariants: ingest never waits on a subscriber: every hand-off (pending queue, mesh channel,
//! connection queue) is bounded and, when full, drops the event and counts it for the subscriber
//! connection, so `received + missed == produced` per connection; an event leaves its owner
//! only once its heartbeat is durable; events of one owner reach a destination in log order,
//! so each device's events arrive in its shard's log order. With no subscription anywhere the
//! ingest path pays one `Cell` read per heartbeat.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use crate::fence::{FenceRegistry, FenceSet, Scratch};
use crate::limits::{
    FANOUT_BATCH_EVENTS_MAX, FANOUT_PENDING_EVENTS_MAX, SUB_QUEUE_BYTES_MAX, SUB_QUEUE_EVENTS_MAX,
};
use crate::log::LogPos;
use crate::record::Heartbeat;
use crate::rt::{self, mesh, Signal};
use crate::slab::{Key as ConnKey, Slab};
use crate::store::Appended;
use crate::subscribe::interest::{Interest, InterestOp, SubKey};
use crate::subscribe::render::{render_fence_event, render_heartbeat};

/// One subscription event on its way to the executor holding the subscriber connection.
pub struct EventItem {
    /// The subscriber connection (on the destination executor).
    pub conn: ConnKey,
    /// The subscription's id on that connection (events of a replaced or removed subscription
    /// are dropped on arrival).
    pub sub: u32,
    /// The event as a JSON object without its `"sub"` member, rendered once per heartbeat (or
    /// fence transition) and shared by every subscription it matches.
    pub text: std::sync::Arc<str>,
}

/// Owner → subscriber executor, on the event mesh (sent with `try_send`: ingest never waits).
#[derive(Default)]
pub struct EventBatch {
    /// Events, in the owner's log order.
    pub events: Vec<EventItem>,
    /// Events the owner dropped for these connections since its last batch that got through
    /// (channel full, or its pending queue full): the destination adds them to the
    /// connections' missed counts.
    pub missed: Vec<(ConnKey, u64)>,
}

/// An item of a subscriber connection's outgoing queue.
pub enum Out {
    /// An event for subscription `sub`: written as `{"sub":<sub>,` followed by `text` minus its
    /// opening brace.
    Event {
        /// The subscription name.
        sub: Rc<str>,
        /// The rendered event object (without `"sub"`).
        text: Arc<str>,
    },
    /// An answer to a client op (`ok` / `error`), never dropped.
    Control(String),
}

/// The destination side of one subscriber connection.
struct SubConn {
    /// Confirmed subscriptions: id -> name. Events for other ids are dropped on arrival.
    subs: Vec<(u32, Rc<str>)>,
    queue: VecDeque<Out>,
    /// Events and their bytes in `queue` (answers are not counted: the reader bounds them).
    events: usize,
    bytes: usize,
    /// Answers in `queue`.
    controls: usize,
    /// Events dropped since the writer last took the count.
    missed: u64,
    signal: Rc<Signal>,
}

/// Owner-side state per destination executor.
#[derive(Default)]
struct Outgoing {
    batch: Vec<EventItem>,
    /// Events dropped per destination connection, not yet reported.
    dropped: HashMap<ConnKey, u64>,
}

/// An event waiting for its heartbeat to become durable.
struct Pending {
    pos: LogPos,
    key: SubKey,
    text: Arc<str>,
}

/// One executor's fan-out state (see the module comment).
pub struct Fanout {
    index: usize,
    interest: RefCell<Interest>,
    /// Any subscription at all (the one check the ingest path always makes).
    active: Cell<bool>,
    /// Per local shard store, events whose heartbeats are not yet durable, in log order.
    pending: Vec<RefCell<VecDeque<Pending>>>,
    outgoing: Vec<RefCell<Outgoing>>,
    events_tx: mesh::Senders<EventBatch>,
    conns: RefCell<Slab<SubConn>>,
    scratch: RefCell<Vec<SubKey>>,
    /// The server's geofences and this executor's current snapshot of them (swapped when the
    /// registry's version moves; polled once per appended group while fence subscriptions exist).
    registry: Arc<FenceRegistry>,
    fences: RefCell<Arc<FenceSet>>,
    fences_version: Cell<u64>,
    fence_scratch: RefCell<Scratch>,
    /// Events written to subscriber sockets by this executor.
    pub delivered: Cell<u64>,
    /// Events dropped for subscribers held by this executor.
    pub missed: Cell<u64>,
}

impl Fanout {
    /// The fan-out of executor `index` owning `stores` shard stores, with its event mesh senders.
    pub fn new(
        index: usize,
        executors: usize,
        stores: usize,
        events_tx: mesh::Senders<EventBatch>,
        registry: Arc<FenceRegistry>,
    ) -> Fanout {
        let (version, fences) = registry.snapshot();
        Fanout {
            registry,
            fences: RefCell::new(fences),
            fences_version: Cell::new(version),
            fence_scratch: RefCell::new(Scratch::new()),
            index,
            interest: RefCell::new(Interest::default()),
            active: Cell::new(false),
            pending: (0..stores).map(|_| RefCell::new(VecDeque::new())).collect(),
            outgoing: (0..executors)
                .map(|_| RefCell::new(Outgoing::default()))
                .collect(),
            events_tx,
            conns: RefCell::new(Slab::new()),
            scratch: RefCell::new(Vec::new()),
            delivered: Cell::new(0),
            missed: Cell::new(0),
        }
    }

    // ----- interest -----

    /// Whether any subscription exists anywhere (cheap; checked per heartbeat).
    pub fn active(&self) -> bool {
        self.active.get()
    }

    /// Applies an interest change broadcast by the executor holding the connection.
    pub fn apply(&self, op: &InterestOp) {
        let mut interest = self.interest.borrow_mut();
        interest.apply(op);
        self.active.set(!interest.subs.is_empty());
    }

    /// Subscriptions in this replica (for tests and stats).
    pub fn interest_len(&self) -> usize {
        self.interest.borrow().subs.len()
    }

    // ----- owner side -----

    /// Picks up a new geofence snapshot if the registry changed (one atomic load). Called once
    /// per appended group while fence subscriptions exist, so a heartbeat appended after a
    /// `PUT /v1/geofences/{name}` answered is checked against that fence.
    pub fn poll_fences(&self) {
        if self.interest.borrow().by_fence.is_empty() {
            return;
        }
        if self.registry.version() != self.fences_version.get() {
            let (version, set) = self.registry.snapshot();
            self.fences_version.set(version);
            *self.fences.borrow_mut() = set;
        }
    }

    /// Matches a heartbeat just appended to local store `local` and keeps its events until the
    /// heartbeat is durable: one event per matching device/bbox subscription, then one per
    /// fence transition per subscription of that fence. Call only when [`Fanout::active`].
    pub fn on_append(&self, local: usize, hb: &Heartbeat, appended: &Appended) {
        let interest = self.interest.borrow();
        let mut keys = self.scratch.borrow_mut();
        keys.clear();
        interest.matching(hb, &mut keys);
        if !keys.is_empty() {
            let text: Arc<str> = render_heartbeat(hb).into();
            for &key in keys.iter() {
                self.push_pending(local, appended.pos, key, &text);
            }
        }
        // Transitions happen only when the last location moves (a late heartbeat makes none).
        if interest.by_fence.is_empty() || !appended.became_last {
            return;
        }
        let fences = self.fences.borrow();
        let mut scratch = self.fence_scratch.borrow_mut();
        fences.transitions(
            appended.prev_last,
            (hb.lat, hb.lon),
            &mut scratch,
            |id, transition| {
                let name = fences.get(id).name.as_str();
                let Some(subs) = interest.by_fence.get(name) else {
                    return;
                };
                let mut text: Option<Arc<str>> = None;
                for (key, filter) in subs {
                    if !filter.admits(&hb.device_id) {
                        continue;
                    }
                    let text = text.get_or_insert_with(|| {
                        render_fence_event(name, &hb.device_id, transition, hb.ts_ms).into()
                    });
                    self.push_pending(local, appended.pos, *key, text);
                }
            },
        );
    }

    fn push_pending(&self, local: usize, pos: LogPos, key: SubKey, text: &Arc<str>) {
        let mut pending = self.pending[local].borrow_mut();
        if pending.len() >= FANOUT_PENDING_EVENTS_MAX {
            drop(pending);
            self.dropped(key, 1);
            return;
        }
        pending.push_back(Pending {
            pos,
            key,
            text: text.clone(),
        });
    }

    /// Counts `n` events dropped for `key`'s connection.
    fn dropped(&self, key: SubKey, n: u64) {
        if key.exec as usize == self.index {
            self.add_missed(key.conn, n);
        } else {
            *self.outgoing[key.exec as usize]
                .borrow_mut()
                .dropped
                .entry(key.conn)
                .or_default() += n;
        }
    }

    /// Local store `local` is durable up to `durable`: routes the events it released and sends
    /// the batches.
    pub fn durable(&self, local: usize, durable: LogPos) {
        loop {
            let next = {
                let mut pending = self.pending[local].borrow_mut();
                match pending.front() {
                    Some(p) if p.pos < durable => pending.pop_front(),
                    _ => None,
                }
            };
            let Some(p) = next else { break };
            let dest = p.key.exec as usize;
            if dest == self.index {
                self.deliver(p.key.conn, p.key.id, p.text);
                continue;
            }
            let full = {
                let mut out = self.outgoing[dest].borrow_mut();
                out.batch.push(EventItem {
                    conn: p.key.conn,
                    sub: p.key.id,
                    text: p.text,
                });
                out.batch.len() >= FANOUT_BATCH_EVENTS_MAX
            };
            if full {
                self.send_batch(dest);
            }
        }
        self.flush();
    }

    /// Sends every destination's batch and unreported drop counts (the latter also run on a
    /// timer, so counts reach an idle subscriber).
    pub fn flush(&self) {
        for dest in (0..self.outgoing.len()).filter(|&d| d != self.index) {
            let due = {
                let out = self.outgoing[dest].borrow();
                !out.batch.is_empty() || !out.dropped.is_empty()
            };
            if due {
                self.send_batch(dest);
            }
        }
    }

    fn send_batch(&self, dest: usize) {
        let mut out = self.outgoing[dest].borrow_mut();
        let batch = EventBatch {
            events: std::mem::take(&mut out.batch),
            missed: out.dropped.drain().collect(),
        };
        if let Err(batch) = rt::mesh::try_send_to(&self.events_tx, dest, batch) {
            // The destination is behind: drop, count, and report with the next batch that fits.
            for e in &batch.events {
                *out.dropped.entry(e.conn).or_default() += 1;
            }
            for (conn, n) in batch.missed {
                *out.dropped.entry(conn).or_default() += n;
            }
            let mut events = batch.events;
            events.clear();
            out.batch = events;
        }
    }

    // ----- destination side -----

    /// A batch from another executor.
    pub fn on_batch(&self, batch: EventBatch) {
        for (conn, n) in batch.missed {
            self.add_missed(conn, n);
        }
        for e in batch.events {
            self.deliver(e.conn, e.sub, e.text);
        }
    }

    fn add_missed(&self, conn: ConnKey, n: u64) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(conn) {
            c.missed += n;
            self.missed.set(self.missed.get() + n);
            c.signal.notify();
        }
    }

    /// Queues an event for a local subscriber connection (or counts it as missed).
    fn deliver(&self, conn: ConnKey, sub: u32, text: Arc<str>) {
        let mut conns = self.conns.borrow_mut();
        let Some(c) = conns.get_mut(conn) else {
            return;
        };
        // Not (or no longer) a confirmed subscription: it was not asked for.
        let Some(name) = c
            .subs
            .iter()
            .find(|(id, _)| *id == sub)
            .map(|s| s.1.clone())
        else {
            return;
        };
        let bytes = text.len() + name.len() + 8;
        if c.events >= SUB_QUEUE_EVENTS_MAX || c.bytes + bytes > SUB_QUEUE_BYTES_MAX {
            c.missed += 1;
            self.missed.set(self.missed.get() + 1);
        } else {
            c.events += 1;
            c.bytes += bytes;
            c.queue.push_back(Out::Event { sub: name, text });
        }
        c.signal.notify();
    }

    /// Registers a subscriber connection held here.
    pub fn conn_open(&self) -> ConnKey {
        self.conns.borrow_mut().insert_with(
            || SubConn {
                subs: Vec::new(),
                queue: VecDeque::new(),
                events: 0,
                bytes: 0,
                controls: 0,
                missed: 0,
                signal: Signal::new(),
            },
            |c| {
                c.subs.clear();
                c.queue.clear();
                (c.events, c.bytes, c.controls, c.missed) = (0, 0, 0, 0);
                // A fresh signal: tasks of the slot's previous tenant may still hold the old one.
                c.signal = Signal::new();
            },
        )
    }

    /// Unregisters a subscriber connection (events still on their way are dropped on arrival).
    pub fn conn_close(&self, key: ConnKey) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(key) {
            // Its queued events are freed now, not when the slot is reused.
            c.subs.clear();
            c.queue.clear();
            conns.remove(key);
        }
    }

    /// Subscriber connections held here.
    pub fn conns_open(&self) -> usize {
        self.conns.borrow().len()
    }

    /// The connection's wake-up signal (new items for the writer; room for the reader).
    pub fn signal(&self, key: ConnKey) -> Option<Rc<Signal>> {
        self.conns
            .borrow_mut()
            .get_mut(key)
            .map(|c| c.signal.clone())
    }

    /// Queues an answer to a client op.
    pub fn push_control(&self, key: ConnKey, text: String) {
        if let Some(c) = self.conns.borrow_mut().get_mut(key) {
            c.controls += 1;
            c.queue.push_back(Out::Control(text));
            c.signal.notify();
        }
    }

    /// Answers queued and not yet taken by the writer.
    pub fn controls_queued(&self, key: ConnKey) -> Option<usize> {
        self.conns.borrow_mut().get_mut(key).map(|c| c.controls)
    }

    /// Confirms subscription `id` as `name` (replacing `replaces`) and queues `ok`, all at once:
    /// events for it queue after the answer, events of the replaced one before it.
    pub fn confirm(&self, key: ConnKey, id: u32, name: &str, replaces: Option<u32>, ok: String) {
        if let Some(c) = self.conns.borrow_mut().get_mut(key) {
            if let Some(old) = replaces {
                c.subs.retain(|(i, _)| *i != old);
            }
            c.subs.push((id, name.into()));
            c.controls += 1;
            c.queue.push_back(Out::Control(ok));
            c.signal.notify();
        }
    }

    /// Drops subscription `id` (no event for it is queued after this) and queues `ok`.
    pub fn unconfirm(&self, key: ConnKey, id: u32, ok: String) {
        if let Some(c) = self.conns.borrow_mut().get_mut(key) {
            c.subs.retain(|(i, _)| *i != id);
            c.controls += 1;
            c.queue.push_back(Out::Control(ok));
            c.signal.notify();
        }
    }

    /// Moves up to `max` queued items into `out` and returns the missed count to report first
    /// (reset to zero); `None` once the connection is closed.
    pub fn take(&self, key: ConnKey, max: usize, out: &mut Vec<Out>) -> Option<u64> {
        let mut conns = self.conns.borrow_mut();
        let c = conns.get_mut(key)?;
        while out.len() < max {
            let Some(item) = c.queue.pop_front() else {
                break;
            };
            match &item {
                Out::Event { sub, text } => {
                    c.events -= 1;
                    c.bytes -= text.len() + sub.len() + 8;
                }
                Out::Control(_) => c.controls -= 1,
            }
            out.push(item);
        }
        Some(std::mem::take(&mut c.missed))
    }
}
