//! The connection engine (`--engine ring`): one per executor, it drives every device WebSocket
//! ingest connection and every subscriber (`/v1/subscribe`) of its executor from the upgrade's
//! 101 to the close, on an io_uring of its
//! own ([`crate::rt::ring`]): one multishot `recv` per connection into a provided buffer ring
//! shared by all connections (an idle connection pins no buffer), frames parsed in place
//! (tungstenite's `FrameHeader::parse` for headers), the frame judged and appended by
//! [`crate::net::ingest::process_frame`] exactly as the glommio engine does, and the acks, error
//! frames, pings and closes of every connection written per loop turn and handed to the kernel
//! together (many sends per `io_uring_enter`). No task, lock or timer per connection: one
//! engine task per executor, a [`wheel::Wheel`] for every deadline, and a waker per connection
//! hooked on its ack-ledger signal that only records the connection as dirty.
//!
//! Like the glommio ingest it sends a device that declared an epoch its resume frame first
//! (issue 18; the frame is read before the connection is handed to the engine), deduplicates
//! such a device's heartbeats, and closes a connection whose token is revoked (1008
//! `token_revoked`, once everything read is acked): the executor's revocation signal hooks the
//! engine, which then asks every connection. A TLS session is not the engine's: it stays with the
//! glommio ingest on the executor that accepted it.
//!
//! A subscriber is a connection with a subscriber role ([`conn`]): the same framing, deadlines
//! (ping after one interval of silence, 1001 "idle timeout" after the second, 1008 at token
//! expiry or revocation) and writes, with `net::subscribe`'s sans-io pieces for what its frames
//! mean: a text frame is an op judged by `subscribe::on_text`; the connection's fan-out queue
//! signal is hooked to its waker, and a batch of answers, events and `{"missed":N}` notices is
//! taken (`subscribe::take_batch`) only while nothing of it is being sent, so a slow reader
//! fills the bounded queue, which counts overflow as missed, never this buffer. One turn renders
//! at most `ENGINE_SUB_ITEMS_PER_TURN_MAX` queue items over all its subscribers; the rest wait
//! for the next turn, after the executor's other tasks ran, so a deep fan-out backlog does not
//! hold the same turn's ingest acks back. Reading pauses
//! while `SUB_CONTROL_QUEUED_MAX` answers wait unread. An accepted op's interest change must be
//! applied on every executor before its `ok` (a broadcast over the control mesh that waits for
//! all of them): the engine spawns one short task per op rather than keeping a pending state
//! machine per connection, because ops are rare (a client's setup, not a per-event cost), the
//! broadcast is `Core::on_all`'s future already, and the task costs nothing while the
//! connection idles; while it runs the connection reads nothing more (ops are answered in
//! order) and is not freed (the close's `RemoveConn` must follow the op's change). Closing
//! likewise spawns one task for the `RemoveConn` broadcast. Subscribers stay on the executor
//! that accepted them (no hand-off: events come to them), and TLS subscribers stay on glommio.
//!
//! Plain HTTP request/response connections (queries, the /live and /console pages, metrics)
//! stay on glommio tasks: their cost is per request on short-lived or keep-alive connections,
//! not per heartbeat, and moving them would mean a request-head parser and a body writer on
//! the engine plus an async handler per request (the query handlers await shard reads over the
//! mesh), i.e. a task per request anyway. See perf/RESULTS.md ("Subscriptions on the ring
//! engine").
//!
//! It owns ingest connections after the upgrade only: admission, the 101's accept key and the
//! hand-off to the owning executor stay with the router and `net::ingest`; what frames mean,
//! when an ack is due (the [`crate::shard::acks::AckLedger`]) and storage are not its.
//!
//! Invariants (those of `net::ingest` and `net::ws`, kept here by construction): an ack goes out
//! only for `ack_ready`, which the ledger moves only over durable frames; a client's Close is
//! acted on only once every frame before it is durable and acked; a graceful close (client
//! close, shutdown, idle, token expiry) waits until nothing is in flight; every write completes
//! within the idle timeout or the connection is dropped; the bytes of a connection's large
//! frames (≥ `PARTIAL_FRAME_SMALL_BYTES`) are charged to the executor's partial-frame account
//! before they are read; a connection's descriptor is closed, and its table slot reused, only
//! once no ring operation refers to it.

mod conn;
pub mod wheel;

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use crate::limits::{
    ENGINE_BUF_BYTES, ENGINE_BUF_COUNT, ENGINE_CQ_ENTRIES, ENGINE_SQ_ENTRIES,
    ENGINE_SUB_ITEMS_PER_TURN_MAX, ENGINE_WHEEL_TICK,
};
use crate::metrics::ExecProbe;
use crate::net::edge::{Edge, Handoff, Kind};
use crate::net::ingest::{Grant, IngestKind};
use crate::net::slots::ConnSlot;
use crate::net::subscribe::{self, SubscribeKind};
use crate::net::tls::Conn as NetConn;
use crate::node::ExecutorId;
use crate::rt;
use crate::rt::ring::{Cqe, Ring};

use conn::{Conn, Start};
use wheel::Wheel;

/// The device ingest connection kind served by the engine (`/v1/ingest` with `--engine ring`):
/// admitted like [`IngestKind`], then handed to the owning executor's engine.
pub struct RingIngestKind;

impl Kind for RingIngestKind {
    type Grant = Grant;

    fn admit(
        edge: &Edge,
        req: &crate::http::parse::Request<'_>,
    ) -> Result<Grant, crate::net::auth::Refusal> {
        IngestKind::admit(edge, req)
    }

    /// A plain socket goes to the engine (after the hand-off to its owner, if any); a TLS
    /// session, which the engine does not speak, is served by the glommio engine's ingest.
    async fn serve<S: NetConn>(
        edge: Rc<Edge>,
        stream: S,
        leftover: Vec<u8>,
        grant: Grant,
        slot: ConnSlot,
    ) {
        if stream.handoff_fd().is_none() {
            return IngestKind::serve(edge, stream, leftover, grant, slot).await;
        }
        let Some((stream, leftover, grant, slot)) =
            crate::net::ingest::hand_over_foreign(&edge, stream, leftover, grant, slot).await
        else {
            return;
        };
        let Some(fd) = stream.handoff_fd() else {
            return;
        };
        let Ok(resume) = crate::net::ingest::resume_of(&edge.core, &grant).await else {
            return;
        };
        // SAFETY: dup of a descriptor we own; the duplicate is owned by the OwnedFd.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        drop(stream);
        if dup < 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not take over an ingest socket");
            return;
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        start(&edge, fd, leftover, Start::Ingest(grant, resume), slot);
    }
}

/// The subscriber connection kind served by the engine (`/v1/subscribe` with `--engine ring`):
/// admitted like [`SubscribeKind`], then served by this executor's engine (subscribers stay
/// where they were accepted; events come to them).
pub struct RingSubscribeKind;

impl Kind for RingSubscribeKind {
    type Grant = subscribe::Grant;

    fn admit(
        edge: &Edge,
        req: &crate::http::parse::Request<'_>,
    ) -> Result<subscribe::Grant, crate::net::auth::Refusal> {
        SubscribeKind::admit(edge, req)
    }

    /// A plain socket goes to the engine; a TLS session stays with the glommio subscriber.
    async fn serve<S: NetConn>(
        edge: Rc<Edge>,
        stream: S,
        leftover: Vec<u8>,
        grant: subscribe::Grant,
        slot: ConnSlot,
    ) {
        let Some(fd) = stream.handoff_fd() else {
            return SubscribeKind::serve(edge, stream, leftover, grant, slot).await;
        };
        // SAFETY: dup of a descriptor we own; the duplicate is owned by the OwnedFd.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        drop(stream);
        if dup < 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not take over a subscriber socket");
            return;
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        start(&edge, fd, leftover, Start::Subscribe(grant), slot);
    }
}

/// Takes over a device connection handed over by executor `from` (the hand-off mesh), for the
/// engine of this executor.
pub fn adopt(edge: Rc<Edge>, from: ExecutorId, msg: Handoff) {
    ExecProbe::add(&edge.core.probe.received_from[from.0], 1);
    let slot = ConnSlot::take_over(&edge.core.shared);
    if msg.grant.epoch.is_none() {
        return start(
            &edge,
            msg.fd,
            msg.leftover,
            Start::Ingest(msg.grant, None),
            slot,
        );
    }
    // A device that declared an epoch hears its mark first (read from this executor's shard).
    rt::spawn(async move {
        if let Ok(resume) = crate::net::ingest::resume_of(&edge.core, &msg.grant).await {
            start(
                &edge,
                msg.fd,
                msg.leftover,
                Start::Ingest(msg.grant, resume),
                slot,
            );
        }
    });
}

/// A connection waiting for the engine to take it.
struct NewConn {
    fd: OwnedFd,
    leftover: Vec<u8>,
    /// What it is for (with the resume frame an ingest connection sends after the 101).
    start: Start,
    slot: ConnSlot,
}

/// What other tasks hand the engine of their executor (the engine task drains it every turn).
#[derive(Default)]
struct Inbox {
    /// The engine task runs.
    started: bool,
    /// Connections to take over.
    new: Vec<NewConn>,
    /// Connections something happened to (ack ledger, a finished forward), by packed key.
    dirty: Vec<u64>,
    /// The executor's revocation list changed since the last turn (`net::revoke`).
    revocations_changed: bool,
    /// Wakes the engine task.
    waker: Option<Waker>,
}

thread_local! {
    /// The inbox of this thread's (executor's) engine.
    static INBOX: RefCell<Inbox> = RefCell::new(Inbox::default());
}

/// Hands an upgraded connection (`fd`, the bytes read past its request head) to this
/// executor's engine, starting the engine on first use.
fn start(edge: &Rc<Edge>, fd: OwnedFd, leftover: Vec<u8>, start: Start, slot: ConnSlot) {
    let first = INBOX.with(|i| {
        let mut i = i.borrow_mut();
        i.new.push(NewConn {
            fd,
            leftover,
            start,
            slot,
        });
        if let Some(w) = i.waker.take() {
            w.wake();
        }
        !std::mem::replace(&mut i.started, true)
    });
    if first {
        rt::spawn(run(edge.clone()));
    }
}

/// Records connection `key` as dirty and wakes the engine.
fn mark_dirty(key: u64) {
    INBOX.with(|i| {
        let mut i = i.borrow_mut();
        i.dirty.push(key);
        if let Some(w) = i.waker.take() {
            w.wake();
        }
    });
}

// A connection's waker is its packed key; waking it marks the connection dirty. No allocation:
// the key is the waker's data pointer.
const _: () = assert!(usize::BITS == 64, "keys are packed into a pointer");

static CONN_WAKER: RawWakerVTable = RawWakerVTable::new(
    |data| RawWaker::new(data, &CONN_WAKER),
    |data| mark_dirty(data as u64),
    |data| mark_dirty(data as u64),
    |_| {},
);

/// The revocation signal's hook: records the change and wakes the engine.
static REVOKED_WAKER: RawWakerVTable = RawWakerVTable::new(
    |data| RawWaker::new(data, &REVOKED_WAKER),
    |_| revocations_changed(),
    |_| revocations_changed(),
    |_| {},
);

fn revocations_changed() {
    INBOX.with(|i| {
        let mut i = i.borrow_mut();
        i.revocations_changed = true;
        if let Some(w) = i.waker.take() {
            w.wake();
        }
    });
}

/// The waker that marks connection `key` dirty.
fn conn_waker(key: conn::Key) -> Waker {
    // SAFETY: the vtable's functions treat the data pointer as a plain integer, never deref it.
    unsafe { Waker::from_raw(RawWaker::new(key.pack() as *const (), &CONN_WAKER)) }
}

/// The engine task of one executor: turns until the executor ends.
async fn run(edge: Rc<Edge>) {
    let mut engine = match Engine::new(edge.clone()) {
        Ok(e) => e,
        Err(e) => {
            // Nothing to fall back on for connections already upgraded: close them.
            tracing::error!(error = %e, "the connection engine's io_uring could not be set up; closing its connections");
            loop {
                let new = INBOX.with(|i| std::mem::take(&mut i.borrow_mut().new));
                drop(new);
                std::future::poll_fn(|cx| {
                    INBOX.with(|i| {
                        let mut i = i.borrow_mut();
                        if i.new.is_empty() {
                            i.waker = Some(cx.waker().clone());
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    })
                })
                .await;
            }
        }
    };
    tracing::debug!(executor = edge.core.index.0, "connection engine started");
    // The executor's revocation signal wakes the engine (one hook, no waiter per connection).
    // SAFETY: the vtable's functions never touch the data pointer.
    crate::net::auth::revocations_changed()
        .set_hook(unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &REVOKED_WAKER)) });
    let stop = &edge.core.stop;
    let mut stop_wait = std::pin::pin!(stop.wait());
    let mut watchdog = rt::Watchdog::new();
    loop {
        engine.turn();
        std::future::poll_fn(|cx| engine.poll_idle(cx, stop_wait.as_mut(), &mut watchdog)).await;
    }
}

/// The first wheel tick (counted from `origin`) at or after `at`: a deadline never fires early.
fn tick_of(origin: Instant, at: Instant) -> u64 {
    let d = at.saturating_duration_since(origin);
    d.as_nanos().div_ceil(ENGINE_WHEEL_TICK.as_nanos()) as u64
}

/// One executor's engine (see the module comment).
struct Engine {
    edge: Rc<Edge>,
    ring: Ring,
    conns: conn::Table<Conn>,
    wheel: Wheel<conn::Key>,
    /// Tick 0 of the wheel.
    origin: Instant,
    /// Scratch: completions of this turn, wheel entries fired, dirty keys.
    cqes: Vec<Cqe>,
    fired: Vec<(u64, conn::Key)>,
    dirty: Vec<u64>,
    /// Connections to service at the end of this turn (deduplicated by their `queued` flag).
    touched: Vec<conn::Key>,
    /// Subscribers whose batch waits for the next turn (this turn's budget was spent).
    deferred: Vec<conn::Key>,
    /// Shutdown was seen (every connection told).
    stop_seen: bool,
    /// The executor's shared settings for connections.
    params: conn::Params,
    /// Scratch for the JSON of acks, error frames and events, and a subscriber's batch.
    scratch: conn::Scratch,
}

impl Engine {
    fn new(edge: Rc<Edge>) -> std::io::Result<Engine> {
        let ring = Ring::new(
            ENGINE_SQ_ENTRIES,
            ENGINE_CQ_ENTRIES,
            ENGINE_BUF_COUNT,
            ENGINE_BUF_BYTES,
        )?;
        let cfg = &edge.core.shared.cfg;
        let params = conn::Params {
            ping_after: cfg.ping_interval(),
            stall: cfg.idle_timeout,
            frame_bytes_max: cfg.frame_bytes_max,
        };
        Ok(Engine {
            edge,
            ring,
            conns: conn::Table::default(),
            wheel: Wheel::new(0),
            origin: Instant::now(),
            cqes: Vec::with_capacity(ENGINE_CQ_ENTRIES as usize),
            fired: Vec::new(),
            dirty: Vec::new(),
            touched: Vec::new(),
            stop_seen: false,
            params,
            scratch: conn::Scratch {
                text: String::with_capacity(256),
                items: Vec::with_capacity(crate::limits::SUB_WRITE_BATCH_MAX),
                sub_items_left: 0,
                deferred: false,
            },
            deferred: Vec::new(),
        })
    }

    /// The last tick at or before `now`.
    fn tick_passed(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.origin);
        (d.as_nanos() / ENGINE_WHEEL_TICK.as_nanos()) as u64
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.origin + ENGINE_WHEEL_TICK * tick as u32
    }

    /// One turn: completions, new connections, dirty connections, deadlines, shutdown; then
    /// every connection touched writes what it has, and the ring gets one submit.
    fn turn(&mut self) {
        let now = Instant::now();
        // Completions first: they free buffers and may make room for reading. No eventfd
        // signals while awake: this loop reaps until it sleeps.
        self.ring.quiet();
        self.cqes.clear();
        self.ring.reap(&mut self.cqes);
        let cqes = std::mem::take(&mut self.cqes);
        for c in &cqes {
            self.on_cqe(c, now);
        }
        self.cqes = cqes;
        self.ring.publish_buffers();

        let (new, dirty, revoked) = INBOX.with(|i| {
            let mut i = i.borrow_mut();
            (
                std::mem::take(&mut i.new),
                std::mem::replace(&mut i.dirty, std::mem::take(&mut self.dirty)),
                std::mem::take(&mut i.revocations_changed),
            )
        });
        if revoked {
            // Every connection asks whether its token is revoked now (a list change is rare).
            for key in self.conns.keys() {
                if let Some(c) = self.conns.get_mut(key) {
                    c.end_if_revoked(&self.edge);
                }
                self.touch(key);
            }
        }
        for n in new {
            self.open(n, now);
        }
        for key in std::mem::take(&mut self.deferred) {
            self.touch(key);
        }
        for &packed in &dirty {
            let key = conn::Key::unpack(packed);
            if self.conns.get(key).is_some() {
                self.touch(key);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();

        let now_tick = self.tick_passed(now);
        self.fired.clear();
        self.wheel
            .advance(now_tick.max(self.wheel.now()), &mut self.fired);
        let fired = std::mem::take(&mut self.fired);
        for &(tick, key) in &fired {
            if let Some(c) = self.conns.get_mut(key) {
                if c.wheel_at == Some(tick) {
                    c.wheel_at = None;
                    c.on_deadline(&self.params, now);
                    self.touch(key);
                }
            }
        }
        self.fired = fired;

        if !self.stop_seen && self.edge.core.stop.stopping() {
            self.stop_seen = true;
            for key in self.conns.keys() {
                if let Some(c) = self.conns.get_mut(key) {
                    c.stop();
                }
                self.touch(key);
            }
        }

        // Service every touched connection: parse what waits, write, arm, close, finish.
        self.scratch.sub_items_left = ENGINE_SUB_ITEMS_PER_TURN_MAX;
        while let Some(key) = self.touched.pop() {
            self.service(key, now);
        }
        if let Err(e) = self.ring.submit() {
            tracing::error!(error = %e, "the connection engine could not submit to its io_uring");
        }
    }

    /// Queues `key` for service at the end of the turn (once).
    fn touch(&mut self, key: conn::Key) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.queued {
                c.queued = true;
                self.touched.push(key);
            }
        }
    }

    fn open(&mut self, n: NewConn, now: Instant) {
        let NewConn {
            fd,
            mut leftover,
            start,
            slot,
        } = n;
        let edge = &self.edge;
        let key = self
            .conns
            .insert(|key| Conn::new(edge, key, fd, start, slot, conn_waker(key), now));
        let c = self.conns.get_mut(key).expect("just inserted");
        // Revoked between admission and now: the list's change may have been seen already.
        c.end_if_revoked(&self.edge);
        if self.stop_seen {
            c.stop();
        }
        // The bytes read past the request head come first (they may hold whole frames).
        if !leftover.is_empty() {
            c.on_bytes(&self.edge, &self.params, &mut leftover, now);
        }
        self.touch(key);
    }

    fn on_cqe(&mut self, cqe: &Cqe, now: Instant) {
        let (op, key) = conn::decode(cqe.user_data);
        let Some(c) = self.conns.get_mut(key) else {
            // Every operation completes before its connection's slot is freed.
            panic!("a completion for no connection: {cqe:?}");
        };
        match op {
            conn::Op::Recv => {
                if let Some(bid) = cqe.buffer() {
                    let n = cqe.result.max(0) as usize;
                    let data = self.ring.buffer_mut(bid, n);
                    c.on_bytes(&self.edge, &self.params, data, now);
                    self.ring.recycle(bid);
                }
                c.on_recv_result(cqe.result, cqe.more());
            }
            conn::Op::Send => c.on_send_done(cqe.result, now),
            conn::Op::Cancel => c.ops -= 1,
        }
        self.touch(key);
    }

    fn service(&mut self, key: conn::Key, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.queued = false;
        self.scratch.deferred = false;
        c.service(
            &self.edge,
            &self.params,
            &mut self.ring,
            &mut self.scratch,
            now,
        );
        if self.scratch.deferred {
            self.deferred.push(key);
        }
        if c.finished() {
            let c = self.conns.remove(key);
            c.finish(&self.edge);
            return;
        }
        if let Some(at) = c.next_deadline(&self.params) {
            let tick = tick_of(self.origin, at);
            if c.wheel_at.is_none_or(|w| tick < w) {
                c.wheel_at = Some(tick);
                self.wheel.insert(tick, key);
            }
        }
    }

    /// Ready when there is work; otherwise registers for every source of it: the inbox, the
    /// ring's eventfd (through glommio), the next wheel deadline, the executor's stop signal.
    fn poll_idle(
        &mut self,
        cx: &mut Context<'_>,
        stop: std::pin::Pin<&mut rt::SignalWait<'_>>,
        watchdog: &mut rt::Watchdog,
    ) -> Poll<()> {
        let pending_inbox = INBOX.with(|i| {
            let mut i = i.borrow_mut();
            if i.new.is_empty() && i.dirty.is_empty() && !i.revocations_changed {
                match &i.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => i.waker = Some(cx.waker().clone()),
                }
                false
            } else {
                true
            }
        });
        if pending_inbox || !self.touched.is_empty() {
            return Poll::Ready(());
        }
        if self.ring.poll_wake(cx).is_ready() {
            return Poll::Ready(());
        }
        if !self.stop_seen && std::future::Future::poll(stop, cx).is_ready() {
            return Poll::Ready(());
        }
        if let Some(tick) = self.wheel.next_due() {
            let due = self.instant_of(tick);
            let now = Instant::now();
            if watchdog.poll_elapsed(cx, now, due.saturating_duration_since(now)) {
                return Poll::Ready(());
            }
        }
        if !self.deferred.is_empty() {
            // Subscriber batches wait for the next turn: after the executor's other tasks
            // (the commit path, the event mesh) had theirs, not at once.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

/// How long the engine may leave a deadline unattended beyond its tick (for docs and tests).
pub const DEADLINE_SLACK: Duration = ENGINE_WHEEL_TICK;
