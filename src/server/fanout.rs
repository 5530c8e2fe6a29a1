//! Real-time fan-out of durable heartbeats to subscribers, one instance per executor. It owns
//! three things: (1) this executor's replica of the server-wide subscription interest (every
//! executor holds the same index: device id -> subscriptions, a coarse grid of bboxes, fence
//! name -> subscriptions), updated by rare broadcasts when a subscriber subscribes or leaves;
//! (2) the owner side: matching each heartbeat appended to a local shard against that replica,
//! rendering its event JSON once, holding it until its commit group is durable, then routing it
//! to the executor that holds the subscriber connection, in batches over the event mesh sent with
//! `try_send`; (3) the destination side: the subscriber connections held here, each with a
//! bounded queue drained by its WebSocket writer (`subscribe`). It does not parse client ops or
//! speak WebSocket (`subscribe`), and does not decide when commits happen (`exec`).
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

use crate::fence::{FenceRegistry, FenceSet, Scratch, Transition};
use crate::limits::{
    FANOUT_BATCH_EVENTS_MAX, FANOUT_GRID_CELLS_PER_BOX_MAX, FANOUT_MISSED_FLUSH_INTERVAL,
    FANOUT_PENDING_EVENTS_MAX, SUB_QUEUE_BYTES_MAX, SUB_QUEUE_EVENTS_MAX,
};
use crate::log::LogPos;
use crate::record::Heartbeat;
use crate::rt::{self, mesh, Signal};
use crate::server::msg::{ConnKey, EventBatch, EventItem};
use crate::spatial::BBox;
use crate::store::Appended;

/// Edge of a coarse interest-grid cell, degrees.
const GRID_CELL_DEG: f64 = 10.0;
const GRID_COLS: usize = (360.0 / GRID_CELL_DEG) as usize;
const GRID_ROWS: usize = (180.0 / GRID_CELL_DEG) as usize;

/// One subscription, server-wide: the executor holding its connection, the connection, and the
/// subscription's id on that connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubKey {
    /// Executor holding the subscriber connection.
    pub exec: u32,
    /// The connection on that executor.
    pub conn: ConnKey,
    /// The subscription's id on the connection (unique per connection for its life).
    pub id: u32,
}

/// What a subscription selects.
#[derive(Debug, Clone)]
pub enum Target {
    /// Heartbeats of these devices (sorted, no duplicates).
    Devices(Vec<Box<str>>),
    /// Heartbeats located in this box.
    BBox(BBox),
    /// Enter/exit transitions of this fence (by name: fence ids change between snapshots).
    Fence(Box<str>),
}

/// A subscription's filter, as replicated to every executor.
#[derive(Debug, Clone)]
pub struct Filter {
    /// What it selects.
    pub target: Target,
    /// A subscriber token's device-id prefix (`None` for ops tokens): bbox and fence
    /// subscriptions only ever match devices under it (device lists are checked at subscribe).
    pub prefix: Option<Box<str>>,
}

impl Filter {
    fn admits(&self, device_id: &str) -> bool {
        self.prefix
            .as_deref()
            .is_none_or(|p| device_id.starts_with(p))
    }
}

/// A change of the interest, broadcast to every executor.
#[derive(Debug)]
pub enum InterestOp {
    /// Adds `key` (removing `replaces` first: a subscription replaced under the same name).
    Put {
        /// The new subscription.
        key: SubKey,
        /// Its filter.
        filter: Arc<Filter>,
        /// The subscription it replaces, if any.
        replaces: Option<SubKey>,
    },
    /// Removes one subscription.
    Remove(SubKey),
    /// Removes every subscription of a connection (it closed).
    RemoveConn {
        /// Executor holding the connection.
        exec: u32,
        /// The connection.
        conn: ConnKey,
    },
}

/// A subscription with its filter, as listed in the bbox cells and the fence index.
type Listed = (SubKey, Arc<Filter>);

/// One executor's replica of the server-wide interest.
#[derive(Default)]
struct Interest {
    subs: HashMap<SubKey, Arc<Filter>>,
    by_conn: HashMap<(u32, ConnKey), Vec<SubKey>>,
    /// Looked up per heartbeat while any subscription exists: ahash, not SipHash.
    by_device: HashMap<Box<str>, Vec<SubKey>, ahash::RandomState>,
    /// Coarse cells (allocated with the first bbox), each listing the boxes overlapping it.
    cells: Vec<Vec<Listed>>,
    /// Boxes too large for the cells.
    wide: Vec<Listed>,
    boxes: usize,
    by_fence: HashMap<Box<str>, Vec<Listed>, ahash::RandomState>,
}

fn grid_col(lon: f64) -> usize {
    (((lon + 180.0) / GRID_CELL_DEG).floor().max(0.0) as usize).min(GRID_COLS - 1)
}

fn grid_row(lat: f64) -> usize {
    (((lat + 90.0) / GRID_CELL_DEG).floor().max(0.0) as usize).min(GRID_ROWS - 1)
}

/// The cells a box overlaps (`None` when more than [`FANOUT_GRID_CELLS_PER_BOX_MAX`]).
fn box_cells(b: &BBox) -> Option<Vec<usize>> {
    let ranges: &[(f64, f64)] = if b.min_lon <= b.max_lon {
        &[(b.min_lon, b.max_lon)]
    } else {
        &[(b.min_lon, 180.0), (-180.0, b.max_lon)]
    };
    let (r0, r1) = (grid_row(b.min_lat), grid_row(b.max_lat));
    let mut out = Vec::new();
    for &(lo, hi) in ranges {
        let (c0, c1) = (grid_col(lo), grid_col(hi));
        if out.len() + (c1 - c0 + 1) * (r1 - r0 + 1) > FANOUT_GRID_CELLS_PER_BOX_MAX {
            return None;
        }
        for r in r0..=r1 {
            for c in c0..=c1 {
                out.push(r * GRID_COLS + c);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

impl Interest {
    fn apply(&mut self, op: &InterestOp) {
        match op {
            InterestOp::Put {
                key,
                filter,
                replaces,
            } => {
                if let Some(old) = replaces {
                    self.remove(*old);
                }
                self.insert(*key, filter.clone());
            }
            InterestOp::Remove(key) => self.remove(*key),
            InterestOp::RemoveConn { exec, conn } => {
                for key in self.by_conn.remove(&(*exec, *conn)).unwrap_or_default() {
                    self.remove(key);
                }
            }
        }
    }

    fn insert(&mut self, key: SubKey, filter: Arc<Filter>) {
        if self.subs.contains_key(&key) {
            self.remove(key);
        }
        self.by_conn
            .entry((key.exec, key.conn))
            .or_default()
            .push(key);
        match &filter.target {
            Target::Devices(ids) => {
                for id in ids {
                    self.by_device.entry(id.clone()).or_default().push(key);
                }
            }
            Target::BBox(b) => {
                self.boxes += 1;
                match box_cells(b) {
                    Some(cells) => {
                        if self.cells.is_empty() {
                            self.cells = (0..GRID_COLS * GRID_ROWS).map(|_| Vec::new()).collect();
                        }
                        for c in cells {
                            self.cells[c].push((key, filter.clone()));
                        }
                    }
                    None => self.wide.push((key, filter.clone())),
                }
            }
            Target::Fence(name) => {
                self.by_fence
                    .entry(name.clone())
                    .or_default()
                    .push((key, filter.clone()));
            }
        }
        self.subs.insert(key, filter);
    }

    fn remove(&mut self, key: SubKey) {
        let Some(filter) = self.subs.remove(&key) else {
            return;
        };
        if let Some(list) = self.by_conn.get_mut(&(key.exec, key.conn)) {
            list.retain(|k| *k != key);
            if list.is_empty() {
                self.by_conn.remove(&(key.exec, key.conn));
            }
        }
        match &filter.target {
            Target::Devices(ids) => {
                for id in ids {
                    if let Some(list) = self.by_device.get_mut(id) {
                        list.retain(|k| *k != key);
                        if list.is_empty() {
                            self.by_device.remove(id);
                        }
                    }
                }
            }
            Target::BBox(b) => {
                self.boxes -= 1;
                match box_cells(b) {
                    Some(cells) => {
                        for c in cells {
                            self.cells[c].retain(|(k, _)| *k != key);
                        }
                    }
                    None => self.wide.retain(|(k, _)| *k != key),
                }
                if self.boxes == 0 {
                    self.cells = Vec::new();
                }
            }
            Target::Fence(name) => {
                if let Some(list) = self.by_fence.get_mut(name) {
                    list.retain(|(k, _)| *k != key);
                    if list.is_empty() {
                        self.by_fence.remove(name);
                    }
                }
            }
        }
    }

    /// Appends the device and bbox subscriptions `hb` matches to `out` (each at most once).
    fn matching(&self, hb: &Heartbeat, out: &mut Vec<SubKey>) {
        if let Some(keys) = self.by_device.get(hb.device_id.as_str()) {
            out.extend_from_slice(keys);
        }
        if self.boxes == 0 {
            return;
        }
        let hit = |(k, f): &Listed| match &f.target {
            Target::BBox(b) if b.contains(hb.lat, hb.lon) && f.admits(&hb.device_id) => Some(*k),
            _ => None,
        };
        if !self.cells.is_empty() {
            let cell = grid_row(hb.lat) * GRID_COLS + grid_col(hb.lon);
            out.extend(self.cells[cell].iter().filter_map(hit));
        }
        out.extend(self.wide.iter().filter_map(hit));
    }
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
    generation: u32,
    live: bool,
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
    conns: RefCell<Vec<SubConn>>,
    free_slots: RefCell<Vec<u32>>,
    conns_open: Cell<usize>,
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

/// The JSON object of a heartbeat event without `"sub"`: exactly the body of
/// `GET /v1/devices/{id}`.
pub fn render_heartbeat(hb: &Heartbeat) -> String {
    serde_json::to_string(&crate::server::http::LastLocationBody::from_heartbeat(hb))
        .expect("serializable")
}

/// The JSON object of a fence event without `"sub"`:
/// `{"fence":..,"id":..,"event":"enter"|"exit","ts":<device ts ms>}`.
pub fn render_fence_event(fence: &str, device_id: &str, t: Transition, ts_ms: i64) -> String {
    serde_json::json!({"fence": fence, "id": device_id, "event": t.as_str(), "ts": ts_ms})
        .to_string()
}

/// Writes the frame text of an event: `{"sub":"<sub>",` + the rest of `text`.
pub fn write_event(out: &mut String, sub: &str, text: &str) {
    debug_assert!(text.starts_with('{') && text.len() > 2);
    out.clear();
    out.push_str(r#"{"sub":"#);
    // Subscription names are [A-Za-z0-9._-]: nothing to escape.
    out.push('"');
    out.push_str(sub);
    out.push_str("\",");
    out.push_str(&text[1..]);
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
            conns: RefCell::new(Vec::new()),
            free_slots: RefCell::new(Vec::new()),
            conns_open: Cell::new(0),
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
        if let Some(c) = live(&mut conns, conn) {
            c.missed += n;
            self.missed.set(self.missed.get() + n);
            c.signal.notify();
        }
    }

    /// Queues an event for a local subscriber connection (or counts it as missed).
    fn deliver(&self, conn: ConnKey, sub: u32, text: Arc<str>) {
        let mut conns = self.conns.borrow_mut();
        let Some(c) = live(&mut conns, conn) else {
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
        let mut conns = self.conns.borrow_mut();
        let slot = match self.free_slots.borrow_mut().pop() {
            Some(s) => s,
            None => {
                conns.push(SubConn {
                    generation: 0,
                    live: false,
                    subs: Vec::new(),
                    queue: VecDeque::new(),
                    events: 0,
                    bytes: 0,
                    controls: 0,
                    missed: 0,
                    signal: Signal::new(),
                });
                (conns.len() - 1) as u32
            }
        };
        let c = &mut conns[slot as usize];
        assert!(!c.live);
        c.generation = c.generation.wrapping_add(1);
        c.live = true;
        c.signal = Signal::new();
        self.conns_open.set(self.conns_open.get() + 1);
        ConnKey {
            slot,
            generation: c.generation,
        }
    }

    /// Unregisters a subscriber connection (events still on their way are dropped on arrival).
    pub fn conn_close(&self, key: ConnKey) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = live(&mut conns, key) {
            c.live = false;
            c.subs.clear();
            c.queue.clear();
            (c.events, c.bytes, c.controls, c.missed) = (0, 0, 0, 0);
            self.free_slots.borrow_mut().push(key.slot);
            self.conns_open.set(self.conns_open.get() - 1);
        }
    }

    /// Subscriber connections held here.
    pub fn conns_open(&self) -> usize {
        self.conns_open.get()
    }

    /// The connection's wake-up signal (new items for the writer; room for the reader).
    pub fn signal(&self, key: ConnKey) -> Option<Rc<Signal>> {
        live(&mut self.conns.borrow_mut(), key).map(|c| c.signal.clone())
    }

    /// Queues an answer to a client op.
    pub fn push_control(&self, key: ConnKey, text: String) {
        if let Some(c) = live(&mut self.conns.borrow_mut(), key) {
            c.controls += 1;
            c.queue.push_back(Out::Control(text));
            c.signal.notify();
        }
    }

    /// Answers queued and not yet taken by the writer.
    pub fn controls_queued(&self, key: ConnKey) -> Option<usize> {
        live(&mut self.conns.borrow_mut(), key).map(|c| c.controls)
    }

    /// Confirms subscription `id` as `name` (replacing `replaces`) and queues `ok`, all at once:
    /// events for it queue after the answer, events of the replaced one before it.
    pub fn confirm(&self, key: ConnKey, id: u32, name: &str, replaces: Option<u32>, ok: String) {
        if let Some(c) = live(&mut self.conns.borrow_mut(), key) {
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
        if let Some(c) = live(&mut self.conns.borrow_mut(), key) {
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
        let c = live(&mut conns, key)?;
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

fn live(conns: &mut [SubConn], key: ConnKey) -> Option<&mut SubConn> {
    conns
        .get_mut(key.slot as usize)
        .filter(|c| c.live && c.generation == key.generation)
}

/// Receives event batches from `peer` until the mesh closes. Never waits on anything else, so
/// owners' `try_send` only ever fails when this executor is truly behind.
pub async fn recv_loop(
    exec: Rc<crate::server::exec::Exec>,
    rx: Rc<mesh::Receivers<EventBatch>>,
    peer: usize,
) {
    while let Ok(Some(batch)) = rx.recv_from(peer).await {
        exec.fanout.on_batch(batch);
    }
}

/// Retries unreported drop counts periodically until shutdown.
pub async fn flush_loop(exec: Rc<crate::server::exec::Exec>) {
    loop {
        rt::timeout(FANOUT_MISSED_FLUSH_INTERVAL, exec.stop_signal.wait()).await;
        if exec.stopping() {
            return;
        }
        exec.fanout.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conn: u32, id: u32) -> SubKey {
        SubKey {
            exec: 0,
            conn: ConnKey {
                slot: conn,
                generation: 1,
            },
            id,
        }
    }

    fn hb(id: &str, lat: f64, lon: f64) -> Heartbeat {
        Heartbeat {
            device_id: id.into(),
            lat,
            lon,
            ..Default::default()
        }
    }

    fn bbox(filter_prefix: Option<&str>, b: [f64; 4]) -> Arc<Filter> {
        Arc::new(Filter {
            target: Target::BBox(BBox::new(b[0], b[1], b[2], b[3]).unwrap()),
            prefix: filter_prefix.map(Into::into),
        })
    }

    #[test]
    fn interest_matches_devices_boxes_and_prefixes_and_forgets_removed_subs() {
        // Device, small-box, world-box, antimeridian-box and prefixed-box subscriptions are each
        // matched exactly when they should be; removing one subscription and then a whole
        // connection leaves an empty index.
        let mut i = Interest::default();
        let devices = Arc::new(Filter {
            target: Target::Devices(vec!["a".into(), "b".into()]),
            prefix: None,
        });
        let put = |i: &mut Interest, k, f: &Arc<Filter>| {
            i.apply(&InterestOp::Put {
                key: k,
                filter: f.clone(),
                replaces: None,
            })
        };
        put(&mut i, key(1, 1), &devices);
        put(&mut i, key(1, 2), &bbox(None, [13.0, 52.0, 14.0, 53.0]));
        put(&mut i, key(2, 1), &bbox(None, [-180.0, -90.0, 180.0, 90.0]));
        put(&mut i, key(2, 2), &bbox(None, [170.0, -10.0, -170.0, 10.0]));
        put(
            &mut i,
            key(3, 1),
            &bbox(Some("x-"), [13.0, 52.0, 14.0, 53.0]),
        );
        let m = |i: &Interest, h: &Heartbeat| {
            let mut out = Vec::new();
            i.matching(h, &mut out);
            out.sort_by_key(|k| (k.conn.slot, k.id));
            out
        };
        assert_eq!(
            m(&i, &hb("a", 52.5, 13.5)),
            vec![key(1, 1), key(1, 2), key(2, 1)]
        );
        assert_eq!(
            m(&i, &hb("x-1", 52.5, 13.5)),
            vec![key(1, 2), key(2, 1), key(3, 1)]
        );
        assert_eq!(m(&i, &hb("c", 0.0, 179.0)), vec![key(2, 1), key(2, 2)]);
        assert_eq!(m(&i, &hb("c", 0.0, -175.0)), vec![key(2, 1), key(2, 2)]);
        assert_eq!(m(&i, &hb("c", 20.0, -175.0)), vec![key(2, 1)]);
        assert_eq!(m(&i, &hb("b", 90.0, 180.0)), vec![key(1, 1), key(2, 1)]);
        i.apply(&InterestOp::Remove(key(2, 1)));
        assert_eq!(m(&i, &hb("c", 20.0, -175.0)), vec![]);
        for conn in [1, 2, 3] {
            i.apply(&InterestOp::RemoveConn {
                exec: 0,
                conn: key(conn, 0).conn,
            });
        }
        assert!(i.subs.is_empty() && i.by_device.is_empty() && i.by_conn.is_empty());
        assert_eq!(i.boxes, 0);
        assert!(i.cells.is_empty() && i.wide.is_empty());
    }

    #[test]
    fn replacing_a_subscription_removes_the_old_filter() {
        // A Put that replaces an older key leaves only the new filter matching.
        let mut i = Interest::default();
        i.apply(&InterestOp::Put {
            key: key(1, 1),
            filter: bbox(None, [0.0, 0.0, 1.0, 1.0]),
            replaces: None,
        });
        i.apply(&InterestOp::Put {
            key: key(1, 2),
            filter: bbox(None, [5.0, 5.0, 6.0, 6.0]),
            replaces: Some(key(1, 1)),
        });
        let mut out = Vec::new();
        i.matching(&hb("a", 0.5, 0.5), &mut out);
        assert!(out.is_empty());
        i.matching(&hb("a", 5.5, 5.5), &mut out);
        assert_eq!(out, vec![key(1, 2)]);
        assert_eq!(i.subs.len(), 1);
    }

    #[test]
    fn event_text_is_the_device_body_with_sub_first() {
        // The written event is the GET /v1/devices/{id} body with "sub" added in front.
        let h = Heartbeat {
            device_id: "t\"1".into(),
            lat: 1.5,
            lon: 2.5,
            ts_ms: 7,
            received_ms: 8,
            speed_mps: Some(3.0),
            attrs: br#"{"k":1}"#.to_vec(),
            ..Default::default()
        };
        let mut s = String::new();
        write_event(&mut s, "s1", &render_heartbeat(&h));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"sub":"s1","id":"t\"1","lat":1.5,"lon":2.5,"ts":7,"received_at":8,"speed":3.0,"attrs":{"k":1}})
        );
        assert!(s.starts_with(r#"{"sub":"s1","id""#));
    }
}
