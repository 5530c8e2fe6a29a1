//! One engine connection ([`Conn`]) and the engine's connection [`Table`]. A `Conn` owns its
//! socket, its parse state (the bytes of an unfinished frame, a fragmented message), its
//! output (frames queued, the bytes of the one send in flight) and its deadlines as plain
//! fields, and a role: a device ingest connection (its ack-ledger entry, sequence tracking,
//! forwards) or a subscriber (its fan-out queue, subscriptions, the op being applied); what a
//! frame means is `net::ingest`'s or `net::subscribe`'s. The engine calls it on completions, on
//! deadlines and when its ack-ledger or fan-out signal fired. It does not submit anything by itself except through the [`Ring`] the engine lends
//! it, and it never waits.
//!
//! Invariants: at most one receive and one send are in flight per connection, and `ops` counts
//! every operation not yet completed (the engine frees a connection only at zero, and only once
//! no subscriber op is being applied); bytes are parsed in stream order, each once; an ack is
//! written for the ledger's `ack_ready` only; a subscriber's queue is taken from only while
//! none of its bytes are being sent.

use std::cell::Cell;
use std::io::Cursor;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::limits::{
    CLOSE_STEP_BOUND, CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_QUEUED_MAX, CONN_ERRORS_WINDOW_MS,
    CONN_FRAMES_IN_FLIGHT_MAX, ENGINE_PAUSED_BYTES_MAX, ENGINE_WHEEL_TICK, FRAME_BYTES_MAX,
    IDLE_STRIKES_MAX, PARTIAL_FRAME_SMALL_BYTES, SUB_CONTROL_QUEUED_MAX, SUB_WRITE_BATCH_MAX,
    TOKEN_EXPIRY_WAIT_MAX, WS_WRITE_BUFFER_BYTES_MAX,
};
use crate::net::auth;
use crate::net::edge::Edge;
use crate::net::ingest::{self, Grant, Payload, Step, CLOSE_NORMAL, TOKEN_EXPIRED};
use crate::net::slots::ConnSlot;
use crate::net::subscribe::{self, Subs};
use crate::proto::{self, close, IngestScope};
use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::rt::ring::Ring;
use crate::rt::{self, now_s};
use crate::shard::acks::ConnKey;
use crate::shard::mesh::Batch;
use crate::store::Dedupe;
use crate::subscribe::Out;

/// Close code for a protocol error (RFC 6455).
const CLOSE_PROTOCOL: u16 = 1002;

/// Settings every connection of an executor shares.
pub struct Params {
    /// Silence after which a ping is sent (a second one closes: idle timeout).
    pub ping_after: Duration,
    /// Longest a send may stay pending (the idle timeout).
    pub stall: Duration,
    /// Largest message.
    pub frame_bytes_max: usize,
}

/// Names a connection in the engine's table: slot and generation (30 bits, so that a key and an
/// operation kind fit in one `user_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    slot: u32,
    generation: u32,
}

const GENERATION_MASK: u32 = (1 << 30) - 1;

impl Key {
    /// The key as one integer (a waker's data).
    pub fn pack(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.slot)
    }

    /// The key of [`Key::pack`].
    pub fn unpack(v: u64) -> Key {
        Key {
            slot: v as u32,
            generation: (v >> 32) as u32 & GENERATION_MASK,
        }
    }
}

/// The kind of a ring operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The connection's multishot receive.
    Recv = 1,
    /// Its send.
    Send = 2,
    /// A cancellation of either.
    Cancel = 3,
}

fn user_data(op: Op, key: Key) -> u64 {
    (op as u64) << 62 | key.pack()
}

/// The operation and connection a completion's `user_data` names.
pub fn decode(user_data: u64) -> (Op, Key) {
    let op = match user_data >> 62 {
        1 => Op::Recv,
        2 => Op::Send,
        3 => Op::Cancel,
        other => panic!("user_data with no operation kind: {other}"),
    };
    (op, Key::unpack(user_data & !(3 << 62)))
}

/// The engine's connections (a generational table; see [`crate::slab`] for the idea, which
/// has no room for an operation kind beside a full key in 64 bits).
pub struct Table<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Table<T> {
    /// Inserts the entry `make` builds for its key.
    pub fn insert(&mut self, make: impl FnOnce(Key) -> T) -> Key {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        let key = Key {
            slot,
            generation: entry.0,
        };
        entry.1 = Some(make(key));
        key
    }

    /// The live entry named `key`.
    pub fn get(&self, key: Key) -> Option<&T> {
        match self.entries.get(key.slot as usize) {
            Some((g, Some(c))) if *g == key.generation => Some(c),
            _ => None,
        }
    }

    /// The live entry named `key`.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.entries.get_mut(key.slot as usize) {
            Some((g, Some(c))) if *g == key.generation => Some(c),
            _ => None,
        }
    }

    /// Removes the entry named `key` (which must be live); its slot gets a new generation.
    pub fn remove(&mut self, key: Key) -> T {
        let entry = &mut self.entries[key.slot as usize];
        assert_eq!(entry.0, key.generation, "removing a stale key");
        let value = entry.1.take().expect("removing a free slot");
        entry.0 = (entry.0 + 1) & GENERATION_MASK;
        self.free.push(key.slot);
        value
    }

    /// Keys of every live entry.
    pub fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| c.is_some())
            .map(|(slot, (generation, _))| Key {
                slot: slot as u32,
                generation: *generation,
            })
            .collect()
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Reading (until `close` is set) and writing.
    Open,
    /// The close frame is queued: it goes out, then the write side is shut down; ends once no
    /// operation is in flight, or at `until` by force.
    Closing { until: Instant, shut: bool },
    /// The socket is shut down both ways (a write failed or stalled): ends once no operation is
    /// in flight.
    Aborting,
    /// Nothing left: the engine frees it.
    Done,
}

/// A fragmented message being reassembled.
struct Message {
    text: bool,
    data: Vec<u8>,
}

/// What a new connection is for, with what its admission granted.
pub enum Start {
    /// A device ingest connection, with the resume frame to send first (issue 18).
    Ingest(Grant, Option<String>),
    /// A subscriber connection (`/v1/subscribe`).
    Subscribe(subscribe::Grant),
}

/// The state of an ingest connection that is not framing.
struct IngestRole {
    /// The connection's entry in the executor's ack ledger.
    acks: ConnKey,
    grant: Grant,
    seqs: proto::SeqTracker,
    forwards: Vec<(ShardId, Vec<(u64, Heartbeat)>)>,
    /// A frame's remote groups are being sent to their owners; set when done.
    forwarding: Option<Rc<Cell<bool>>>,
}

/// The state of a subscriber connection that is not framing: its queue in the executor's
/// fan-out (hooked to this connection's waker), its subscriptions, the op being applied.
pub struct SubRole {
    /// The connection's queue in the executor's fan-out.
    key: crate::slab::Key,
    grant: subscribe::Grant,
    subs: Subs,
    /// An op's interest change is being applied on every executor (one short task per op,
    /// see the module comment); set when its answer is queued.
    applying: Option<Rc<Cell<bool>>>,
}

/// What a connection is for.
enum Role {
    Ingest(IngestRole),
    /// Boxed: an idle device connection stays as small as it was.
    Subscribe(Box<SubRole>),
}

/// Scratch the engine lends every connection it services.
#[derive(Default)]
pub struct Scratch {
    /// The JSON of acks, error frames and events.
    pub text: String,
    /// Items taken from a subscriber's queue.
    pub items: Vec<Out>,
    /// Subscriber queue items this turn may still render.
    pub sub_items_left: usize,
    /// The connection serviced last left a batch for a later turn (the turn's budget is spent).
    pub deferred: bool,
}

/// One connection driven by the engine (see the module comment).
pub struct Conn {
    fd: OwnedFd,
    key: Key,
    role: Role,
    _slot: ConnSlot,
    /// Marks this connection dirty (hooked on its ledger signal; given to forward tasks).
    waker: Waker,
    /// Queued for service this turn.
    pub queued: bool,
    /// The wheel tick this connection's live wheel entry is for.
    pub wheel_at: Option<u64>,
    /// Ring operations in flight.
    pub ops: u32,
    phase: Phase,

    // Reading.
    /// The reader still reads (false once `close` is decided or the socket failed).
    reading: bool,
    recv_armed: bool,
    recv_cancelling: bool,
    /// Received bytes not parsed yet (an unfinished frame, or bytes held while paused).
    pending: Vec<u8>,
    /// `pending` must hold this many bytes before parsing can make progress.
    need: usize,
    message: Option<Message>,
    /// Partial-frame bytes charged for the current message.
    charged: usize,
    /// The frame at the front of `pending` is charged already.
    frame_charged: bool,
    /// A large frame waits for room in the executor's partial-frame account.
    waiting_room: bool,
    /// A client Close frame was read; it is acted on once everything before it is acked.
    close_held: Option<Vec<u8>>,
    /// The client's end of the stream was seen (EOF), or the socket failed (`Some(false)`).
    eof: Option<bool>,
    /// Reading paused for backpressure or a forward (silence then is not the client's).
    paused: bool,
    budget: proto::ErrorBudget,
    /// Silence is measured from here.
    idle_since: Instant,
    idle_strikes: u32,
    /// The token's expiry, if within reach.
    expiry: Option<Instant>,

    // Writing.
    /// Frames queued, not yet handed to a send.
    out: Vec<u8>,
    /// The bytes of the send in flight (or being resent after a short send).
    sending: Vec<u8>,
    sent: usize,
    send_in_flight: bool,
    /// A cancellation of the send in flight was requested (the connection is aborting).
    send_cancelling: bool,
    send_since: Option<Instant>,
    acked: u64,
    ping_due: bool,
    /// Close with this once allowed (set when reading ends).
    close: Option<(u16, &'static str)>,
}

impl Conn {
    /// A new connection on `fd` (upgraded; the 101 is queued as its first bytes out).
    pub fn new(
        edge: &Rc<Edge>,
        key: Key,
        fd: OwnedFd,
        start: Start,
        slot: ConnSlot,
        waker: Waker,
        now: Instant,
    ) -> Conn {
        let core = &edge.core;
        // io_uring waits for readiness itself; a non-blocking socket only adds EAGAIN rounds.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ");
        let (role, expires_at_s, resume) = match start {
            Start::Ingest(mut grant, resume) => {
                let acks = core.acks.open();
                core.acks
                    .with(acks, |c| c.signal.set_hook(waker.clone()))
                    .expect("just opened");
                out.extend_from_slice(grant.accept_key.as_bytes());
                // The accept key is not needed again (idle memory).
                grant.accept_key = String::new();
                let expires_at_s = grant.expires_at_s;
                let role = IngestRole {
                    acks,
                    grant,
                    seqs: proto::SeqTracker::new(),
                    forwards: Vec::new(),
                    forwarding: None,
                };
                (Role::Ingest(role), expires_at_s, resume)
            }
            Start::Subscribe(mut grant) => {
                subscribe::limit_send_buffer_fd(fd.as_raw_fd());
                let key = core.fanout.conn_open();
                core.fanout
                    .signal(key)
                    .expect("just opened")
                    .set_hook(waker.clone());
                out.extend_from_slice(grant.accept_key.as_bytes());
                grant.accept_key = String::new();
                let expires_at_s = grant.expires_at_s;
                let role = SubRole {
                    key,
                    grant,
                    subs: Subs::new(),
                    applying: None,
                };
                (Role::Subscribe(Box::new(role)), expires_at_s, None)
            }
        };
        out.extend_from_slice(b"\r\n\r\n");
        let expires_in = Duration::from_secs(expires_at_s.saturating_sub(now_s()));
        let expiry = (expires_in <= TOKEN_EXPIRY_WAIT_MAX).then(|| now + expires_in);
        let mut c = Conn {
            fd,
            key,
            role,
            _slot: slot,
            waker,
            queued: false,
            wheel_at: None,
            ops: 0,
            phase: Phase::Open,
            reading: true,
            recv_armed: false,
            recv_cancelling: false,
            pending: Vec::new(),
            need: 0,
            message: None,
            charged: 0,
            frame_charged: false,
            waiting_room: false,
            close_held: None,
            eof: None,
            paused: false,
            budget: proto::ErrorBudget::new(CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_WINDOW_MS),
            idle_since: now,
            idle_strikes: 0,
            expiry,
            out,
            sending: Vec::new(),
            sent: 0,
            send_in_flight: false,
            send_cancelling: false,
            send_since: None,
            acked: 0,
            ping_due: false,
            close: None,
        };
        if let Some(text) = resume {
            // Issue 18: a device that declared an epoch hears its durable mark first.
            push_frame(&mut c.out, 0x1, text.as_bytes());
        }
        if let Role::Ingest(i) = &c.role {
            if IngestScope::from_scope(&i.grant.scope).is_none() {
                c.end_read(edge, (close::POLICY, "token scope does not allow ingest"));
            }
        }
        c
    }

    /// Shutdown: stop reading; close with 1001 once everything read is acked.
    pub fn stop(&mut self) {
        if self.phase == Phase::Open && self.reading {
            self.reading = false;
            self.close = Some((close::GOING_AWAY, "server shutting down"));
            self.close_held = None;
            self.pending = Vec::new();
        }
    }

    /// The close reason of an expired token (each kind keeps its documented one).
    fn expired_reason(&self) -> &'static str {
        match self.role {
            Role::Ingest(_) => TOKEN_EXPIRED,
            Role::Subscribe(_) => subscribe::TOKEN_EXPIRED,
        }
    }

    /// The largest message this connection takes: the configured one for ingest, the fixed
    /// `FRAME_BYTES_MAX` for a subscriber's ops (as the glommio subscriber's).
    fn frame_bytes_max(&self, params: &Params) -> usize {
        match self.role {
            Role::Ingest(_) => params.frame_bytes_max,
            Role::Subscribe(_) => FRAME_BYTES_MAX,
        }
    }

    /// Work of this connection outside the ring that must end before it is freed (a
    /// subscriber's op being applied on every executor).
    fn busy(&self) -> bool {
        matches!(&self.role, Role::Subscribe(s) if s.applying.is_some())
    }

    /// Ends reading if this connection's token is revoked now (the executor's revocation list
    /// changed, or the connection just opened): closes 1008 `token_revoked` once everything read
    /// is acked, as the glommio engine does. Logs the close (rate limited).
    pub fn end_if_revoked(&mut self, edge: &Edge) {
        let revoked = match &self.role {
            Role::Ingest(i) => {
                auth::revoked_live(&edge.core.shared, &i.grant.scope, &i.grant.issue, "ingest")
            }
            Role::Subscribe(s) => auth::revoked_live(
                &edge.core.shared,
                &s.grant.scope(),
                &s.grant.issue,
                "subscribe",
            ),
        };
        if self.reading && revoked {
            self.end_read(edge, (close::POLICY, auth::TOKEN_REVOKED));
        }
    }

    /// Ends reading (at most once), to close with `code` and `reason`.
    fn end_read(&mut self, edge: &Edge, close: (u16, &'static str)) {
        if !self.reading {
            return;
        }
        self.reading = false;
        self.close = Some(close);
        self.close_held = None;
        self.pending = Vec::new();
        self.message = None;
        self.release_charge(edge);
    }

    fn release_charge(&mut self, edge: &Edge) {
        let n = std::mem::take(&mut self.charged);
        self.frame_charged = false;
        if n > 0 {
            edge.partial_frames.release(n);
        }
    }

    /// Whether frames may be parsed now: reading, and not paused by backpressure (too many
    /// frames in flight or errors queued), a forward, a large frame waiting for room, or a
    /// held Close.
    fn can_parse(&mut self, edge: &Edge) -> bool {
        if !self.reading || self.waiting_room || self.close_held.is_some() {
            return false;
        }
        let busy = match &self.role {
            Role::Ingest(i) => {
                i.forwarding.is_some()
                    || edge
                        .core
                        .acks
                        .with(i.acks, |c| {
                            c.frames_in_flight() >= CONN_FRAMES_IN_FLIGHT_MAX
                                || c.errors.len() >= CONN_ERRORS_QUEUED_MAX
                        })
                        .unwrap_or(true)
            }
            // A client that sends ops but never reads the answers is paused; so is one
            // whose op is being applied (ops are answered in order).
            Role::Subscribe(s) => {
                s.applying.is_some()
                    || edge
                        .core
                        .fanout
                        .controls_queued(s.key)
                        .is_none_or(|q| q >= SUB_CONTROL_QUEUED_MAX)
            }
        };
        self.paused |= busy;
        !busy
    }

    /// New bytes from the socket (or the bytes read past the request head).
    pub fn on_bytes(&mut self, edge: &Rc<Edge>, params: &Params, data: &mut [u8], now: Instant) {
        if !self.reading || self.phase != Phase::Open {
            return; // reading ended: what the client sends now is not read
        }
        if self.pending.is_empty() && self.can_parse(edge) {
            let used = self.parse(edge, params, data, now);
            if used < data.len() && self.reading {
                self.pending.extend_from_slice(&data[used..]);
            }
        } else {
            self.pending.extend_from_slice(data);
            self.parse_pending(edge, params, now);
        }
    }

    /// Parses what waits in `pending`, if it can make progress.
    fn parse_pending(&mut self, edge: &Rc<Edge>, params: &Params, now: Instant) {
        if self.pending.is_empty() || self.pending.len() < self.need || !self.can_parse(edge) {
            return;
        }
        let mut p = std::mem::take(&mut self.pending);
        let used = self.parse(edge, params, &mut p, now);
        if self.reading {
            p.drain(..used);
            if p.is_empty() && p.capacity() > crate::limits::ENGINE_BUF_BYTES {
                p = Vec::new(); // a large frame's buffer does not stay with an idle connection
            }
            self.pending = p;
        }
    }

    /// Parses whole frames from `data` (unmasking in place) and acts on each; returns how many
    /// bytes were consumed. Stops at an unfinished frame, a pause, or the end of reading.
    fn parse(&mut self, edge: &Rc<Edge>, params: &Params, data: &mut [u8], now: Instant) -> usize {
        let mut at = 0;
        self.need = 0;
        while at < data.len() && self.reading {
            if at > 0 && !self.can_parse(edge) {
                break;
            }
            let mut cursor = Cursor::new(&data[at..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => {
                    self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"));
                    break;
                }
            };
            let header_len = cursor.position() as usize;
            if len > self.frame_bytes_max(params) as u64 {
                self.end_read(edge, (close::TOO_BIG, "frame too large"));
                break;
            }
            let len = len as usize;
            if !self.frame_charged
                && (PARTIAL_FRAME_SMALL_BYTES..=FRAME_BYTES_MAX).contains(&len)
                && data.len() - at < header_len + len
            {
                // A large frame that is not complete yet: its bytes are held only if the
                // executor's account has room (see `net::ws::read`).
                if !edge.partial_frames.try_charge(len) {
                    self.waiting_room = true;
                    break;
                }
                self.frame_charged = true;
                self.charged += len;
            }
            if data.len() - at < header_len + len {
                self.need = header_len + len;
                break;
            }
            let start = at + header_len;
            at = start + len;
            self.frame_charged = false;
            let payload = &mut data[start..at];
            self.frame(edge, params, header, payload, now);
        }
        at
    }

    /// Acts on one whole frame (the checks and their order are tungstenite's).
    fn frame(
        &mut self,
        edge: &Rc<Edge>,
        params: &Params,
        header: FrameHeader,
        payload: &mut [u8],
        now: Instant,
    ) {
        let Some(mask) = header.mask else {
            return self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"));
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"));
        }
        unmask(payload, mask);
        match header.opcode {
            OpCode::Control(ctl) => {
                if !header.is_final || payload.len() > 125 {
                    return self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"));
                }
                match ctl {
                    Control::Close => self.close_held = Some(payload.to_vec()),
                    Control::Ping => {
                        self.activity(edge, now);
                        push_frame(&mut self.out, 0xA, payload);
                    }
                    Control::Pong => self.activity(edge, now),
                    Control::Reserved(_) => self.end_read(edge, (CLOSE_PROTOCOL, "protocol error")),
                }
            }
            OpCode::Data(Data::Continue) => {
                let max = self.frame_bytes_max(params);
                let Some(m) = self.message.as_mut() else {
                    return self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"));
                };
                if m.data.len() + payload.len() > max {
                    return self.end_read(edge, (close::TOO_BIG, "frame too large"));
                }
                m.data.extend_from_slice(payload);
                if header.is_final {
                    let m = self.message.take().expect("checked above");
                    self.message_done(edge, m.text, &m.data, now);
                }
            }
            OpCode::Data(_) if self.message.is_some() => {
                self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"))
            }
            OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                let text = d == Data::Text;
                if header.is_final {
                    self.message_done(edge, text, payload, now);
                } else {
                    self.message = Some(Message {
                        text,
                        data: payload.to_vec(),
                    });
                }
            }
            OpCode::Data(Data::Reserved(_)) => {
                self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"))
            }
        }
    }

    /// A message (or ping or pong) arrived: the client is alive; its frames hold no memory now.
    fn activity(&mut self, edge: &Edge, now: Instant) {
        self.idle_strikes = 0;
        self.idle_since = now;
        self.release_charge(edge);
    }

    /// A whole data message: judged and appended by `net::ingest`, as the glommio engine does.
    fn message_done(&mut self, edge: &Rc<Edge>, text: bool, payload: &[u8], now: Instant) {
        self.activity(edge, now);
        let payload = if text {
            match std::str::from_utf8(payload) {
                Ok(t) => Payload::Text(t),
                Err(_) => {
                    return self.end_read(
                        edge,
                        (close::INVALID_PAYLOAD, "invalid UTF-8 in text frame"),
                    )
                }
            }
        } else {
            Payload::Binary(payload)
        };
        let step = match &mut self.role {
            Role::Ingest(i) => {
                let scope = IngestScope::from_scope(&i.grant.scope).expect("checked at open");
                ingest::process_frame(
                    edge,
                    i.acks,
                    payload,
                    scope,
                    dedupe(&i.grant),
                    &mut i.seqs,
                    &mut self.budget,
                    &mut i.forwards,
                )
            }
            Role::Subscribe(s) => {
                let Payload::Text(text) = payload else {
                    return self.end_read(edge, subscribe::BINARY_REFUSED);
                };
                let prefix = s.grant.prefix.as_deref();
                match subscribe::on_text(
                    &edge.core,
                    s.key,
                    &mut s.subs,
                    prefix,
                    &mut self.budget,
                    text,
                ) {
                    subscribe::Step::Done => Step::Done,
                    subscribe::Step::Close(code, reason) => Step::Close(code, reason),
                    subscribe::Step::Apply(apply) => {
                        // One short task per op: the broadcast waits for every executor.
                        let done = Rc::new(Cell::new(false));
                        s.applying = Some(done.clone());
                        self.paused = true;
                        let (core, waker) = (edge.core.clone(), self.waker.clone());
                        rt::spawn(async move {
                            apply.run(&core).await;
                            done.set(true);
                            waker.wake();
                        });
                        Step::Done
                    }
                }
            }
        };
        match step {
            Step::Done => {}
            Step::Close(code, reason) => self.end_read(edge, (code, reason)),
            Step::Forward(frame) => self.forward(edge, frame),
        }
    }

    /// Sends the frame's remote groups to their owners from a task of their own (waiting for
    /// room in the mesh), pausing this connection's parsing until it is done.
    fn forward(&mut self, edge: &Rc<Edge>, frame: u64) {
        let Role::Ingest(i) = &mut self.role else {
            unreachable!("only ingest frames are forwarded");
        };
        let groups = std::mem::take(&mut i.forwards);
        let done = Rc::new(Cell::new(false));
        i.forwarding = Some(done.clone());
        self.paused = true;
        let (edge, conn, waker) = (edge.clone(), i.acks, self.waker.clone());
        let dedupe = dedupe(&i.grant);
        rt::spawn(async move {
            let core = &edge.core;
            for (shard, items) in groups {
                let batch = Batch {
                    conn,
                    frame,
                    items,
                    failed: Vec::new(),
                    dedupe,
                };
                if core.forward(shard, batch).await.is_err() {
                    tracing::error!(
                        owner = %core.owner(shard),
                        "data mesh closed; heartbeats not stored and not acked"
                    );
                }
            }
            done.set(true);
            waker.wake();
        });
    }

    /// The completion of the multishot receive (after its bytes, if any, were taken).
    pub fn on_recv_result(&mut self, result: i32, more: bool) {
        if !more {
            self.recv_armed = false;
            self.recv_cancelling = false;
            self.ops -= 1;
        }
        if result == 0 {
            self.eof.get_or_insert(true);
        } else if result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED {
            self.eof.get_or_insert(false);
        }
    }

    /// The completion of the send.
    pub fn on_send_done(&mut self, result: i32, now: Instant) {
        self.ops -= 1;
        self.send_in_flight = false;
        self.send_cancelling = false;
        if result < 0 {
            self.abort();
            return;
        }
        self.sent += result as usize;
        self.send_since = Some(now); // progress restarts the stall bound
        if self.sent >= self.sending.len() {
            self.sending.clear();
            self.sent = 0;
            self.send_since = None;
        }
    }

    /// The socket is dropped without a close frame (a write failed or stalled).
    fn abort(&mut self) {
        if matches!(self.phase, Phase::Aborting | Phase::Done) {
            return;
        }
        self.phase = Phase::Aborting;
        self.reading = false;
        // SAFETY: shutdown on a descriptor we own; pending operations on it then complete.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// A wheel entry of this connection fired.
    pub fn on_deadline(&mut self, params: &Params, now: Instant) {
        match self.phase {
            Phase::Open => {
                if self.send_in_flight && self.send_since.is_some_and(|s| now >= s + params.stall) {
                    tracing::debug!("a connection's writes stalled; closing it");
                    return self.abort();
                }
                if !self.reading || self.paused {
                    return;
                }
                if self.expiry.is_some_and(|e| now >= e) {
                    self.reading = false;
                    self.close = Some((close::POLICY, self.expired_reason()));
                    self.close_held = None;
                    self.pending = Vec::new();
                    return;
                }
                if now >= self.idle_since + params.ping_after {
                    self.idle_strikes += 1;
                    if self.idle_strikes >= IDLE_STRIKES_MAX {
                        self.reading = false;
                        self.close = Some((close::GOING_AWAY, "idle timeout"));
                        self.close_held = None;
                        self.pending = Vec::new();
                    } else {
                        self.ping_due = true;
                        self.idle_since = now;
                    }
                }
                // A large frame waiting for room asks again.
                self.waiting_room = false;
            }
            Phase::Closing { until, .. } if now >= until => self.abort(),
            _ => {}
        }
    }

    /// The next deadline this connection has, if any.
    pub fn next_deadline(&self, params: &Params) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match self.phase {
            Phase::Open => {
                if self.reading && !self.paused {
                    at(self.idle_since + params.ping_after);
                    if let Some(e) = self.expiry {
                        at(e);
                    }
                    if self.waiting_room {
                        at(Instant::now() + ENGINE_WHEEL_TICK);
                    }
                }
                if let (true, Some(s)) = (self.send_in_flight, self.send_since) {
                    at(s + params.stall);
                }
            }
            Phase::Closing { until, .. } => at(until),
            Phase::Aborting | Phase::Done => {}
        }
        next
    }

    /// Brings the connection up to date: parses what may be parsed, writes error frames, the
    /// ack, a ping, a due close frame, arms or cancels the receive, starts a send, and moves
    /// the close along.
    pub fn service(
        &mut self,
        edge: &Rc<Edge>,
        params: &Params,
        ring: &mut Ring,
        scratch: &mut Scratch,
        now: Instant,
    ) {
        match &mut self.role {
            Role::Ingest(i) if i.forwarding.as_ref().is_some_and(|d| d.get()) => {
                i.forwarding = None
            }
            Role::Subscribe(s) if s.applying.as_ref().is_some_and(|d| d.get()) => s.applying = None,
            _ => {}
        }
        if self.phase == Phase::Open {
            self.service_open(edge, params, ring, scratch, now);
        }
        if self.phase != Phase::Done {
            self.arm(ring);
            if matches!(self.phase, Phase::Open | Phase::Closing { .. }) {
                if self.out.len() > WS_WRITE_BUFFER_BYTES_MAX {
                    tracing::debug!("a connection's writes are too far behind; closing it");
                    self.abort();
                } else {
                    self.start_send(ring, now);
                }
            }
        }
        match self.phase {
            Phase::Closing { until, shut: false }
                if !self.send_in_flight && self.out.is_empty() && self.sending.is_empty() =>
            {
                // The close frame is out: shut our side down, as the glommio writer's close does.
                // SAFETY: shutdown on a descriptor we own.
                unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
                self.phase = Phase::Closing { until, shut: true };
                self.arm(ring);
            }
            _ => {}
        }
        if matches!(
            self.phase,
            Phase::Closing { shut: true, .. } | Phase::Aborting
        ) && self.ops == 0
            && !self.busy()
        {
            self.phase = Phase::Done;
        }
    }

    fn service_open(
        &mut self,
        edge: &Rc<Edge>,
        params: &Params,
        ring: &mut Ring,
        scratch: &mut Scratch,
        now: Instant,
    ) {
        let _ = ring;
        if self.paused && self.reading && self.can_parse_quiet(edge) {
            // Silence is counted again from now (a pause is not the client's).
            self.paused = false;
            self.idle_since = now;
        }
        self.parse_pending(edge, params, now);
        if let (Some(clean), true) = (self.eof, self.reading) {
            // Whatever frames were complete are read; the stream ends: tungstenite's answers.
            if self.can_parse_quiet(edge) {
                if clean {
                    self.end_read(edge, (CLOSE_PROTOCOL, "protocol error"));
                } else {
                    self.end_read(edge, (CLOSE_NORMAL, ""));
                }
            }
        }
        let Some((in_flight, drained)) = self.write_role(edge, scratch) else {
            return self.abort();
        };
        if std::mem::take(&mut self.ping_due) {
            push_frame(&mut self.out, 0x9, &[]);
        }
        if drained {
            // Room in the error queue: frames held back by it may go on.
            self.parse_pending(edge, params, now);
        }
        if in_flight == 0 {
            if let Some(payload) = self.close_held.take() {
                // Everything before the client's Close is durable and acked (above): answer it.
                self.reading = false;
                self.pending = Vec::new();
                self.release_charge(edge);
                match close_reply(&payload) {
                    Ok(reply) => {
                        push_frame(&mut self.out, 0x8, &reply);
                        self.phase = Phase::Closing {
                            until: now + CLOSE_STEP_BOUND,
                            shut: false,
                        };
                        return;
                    }
                    Err(c) => self.close = Some(c),
                }
            }
        }
        if let Some((code, reason)) = self.close {
            let graceful = code == close::GOING_AWAY
                || code == CLOSE_NORMAL
                || (code, reason) == (close::POLICY, self.expired_reason())
                || (code, reason) == (close::POLICY, auth::TOKEN_REVOKED);
            if !graceful || in_flight == 0 {
                crate::net::ws::write::log_refusal_close(code, reason);
                let mut p = Vec::with_capacity(2 + reason.len());
                p.extend_from_slice(&code.to_be_bytes());
                p.extend_from_slice(reason.as_bytes());
                push_frame(&mut self.out, 0x8, &p);
                self.phase = Phase::Closing {
                    until: now + CLOSE_STEP_BOUND,
                    shut: false,
                };
            }
        }
    }

    /// Queues what the connection's role has to say: an ingest connection's error frames and
    /// ack; a subscriber's answers, events and `{"missed":N}` notices (a batch taken only while
    /// nothing is being sent, so its queue, not this buffer, is what fills up while the client
    /// reads slowly). Returns the frames still in flight (for a graceful close: a subscriber's
    /// op being applied counts) and whether room was made for reading, or `None` when its
    /// executor state is gone.
    fn write_role(&mut self, edge: &Edge, scratch: &mut Scratch) -> Option<(usize, bool)> {
        match &mut self.role {
            Role::Ingest(i) => {
                let (ack_ready, in_flight, drained) = edge.core.acks.with(i.acks, |c| {
                    let drained = !c.errors.is_empty();
                    for (seq, reason) in c.errors.drain(..) {
                        proto::ack::write_error(&mut scratch.text, seq.map(proto::Seq), reason);
                        push_frame(&mut self.out, 0x1, scratch.text.as_bytes());
                    }
                    (c.ack_ready, c.frames_in_flight(), drained)
                })?;
                if ack_ready > self.acked {
                    proto::ack::write_ack(&mut scratch.text, proto::Seq(ack_ready));
                    push_frame(&mut self.out, 0x1, scratch.text.as_bytes());
                    self.acked = ack_ready;
                }
                Some((in_flight, drained))
            }
            Role::Subscribe(s) => {
                let in_flight = usize::from(s.applying.is_some());
                let closing = self.close.is_some() || self.close_held.is_some();
                if closing || self.send_in_flight || !self.sending.is_empty() {
                    return Some((in_flight, false));
                }
                if scratch.sub_items_left < SUB_WRITE_BATCH_MAX {
                    scratch.deferred = true;
                    return Some((in_flight, false));
                }
                let out = &mut self.out;
                let core = &edge.core;
                let batch = subscribe::take_batch(
                    core,
                    s.key,
                    &mut scratch.items,
                    &mut scratch.text,
                    |t| push_frame(out, 0x1, t.as_bytes()),
                )?;
                let d = &core.fanout.delivered;
                d.set(d.get() + batch.delivered);
                scratch.sub_items_left -= batch.took;
                Some((in_flight, batch.controls))
            }
        }
    }

    /// [`Self::can_parse`] without marking a pause.
    fn can_parse_quiet(&mut self, edge: &Edge) -> bool {
        let paused = self.paused;
        let ok = self.can_parse(edge);
        self.paused = paused;
        ok
    }

    /// Arms the receive while the connection wants bytes; cancels it otherwise.
    fn arm(&mut self, ring: &mut Ring) {
        let want = self.phase == Phase::Open
            && self.reading
            && self.eof.is_none()
            && !self.waiting_room
            && self.close_held.is_none()
            && self.pending.len() <= ENGINE_PAUSED_BYTES_MAX;
        if want && !self.recv_armed {
            ring.recv_multishot(self.fd.as_raw_fd(), user_data(Op::Recv, self.key));
            self.recv_armed = true;
            self.ops += 1;
        } else if !want && self.recv_armed && !self.recv_cancelling {
            ring.cancel(
                user_data(Op::Recv, self.key),
                user_data(Op::Cancel, self.key),
            );
            self.recv_cancelling = true;
            self.ops += 1;
        }
        if self.phase == Phase::Aborting && self.send_in_flight && !self.send_cancelling {
            // The shutdown normally fails it at once; the cancel covers a send the kernel
            // still holds.
            ring.cancel(
                user_data(Op::Send, self.key),
                user_data(Op::Cancel, self.key),
            );
            self.send_cancelling = true;
            self.ops += 1;
        }
    }

    /// Starts a send of everything queued, unless one is in flight.
    fn start_send(&mut self, ring: &mut Ring, now: Instant) {
        if self.send_in_flight {
            return;
        }
        if self.sending.is_empty() {
            if self.out.is_empty() {
                return;
            }
            std::mem::swap(&mut self.out, &mut self.sending);
            self.sent = 0;
        }
        let rest = &self.sending[self.sent..];
        // SAFETY: `sending` is neither touched nor dropped until this send completes: it is
        // swapped only when empty and not in flight, and the connection (its owner) is freed
        // only when no operation is in flight.
        unsafe {
            ring.send(
                self.fd.as_raw_fd(),
                rest.as_ptr(),
                rest.len(),
                user_data(Op::Send, self.key),
            )
        };
        self.send_in_flight = true;
        self.send_since.get_or_insert(now);
        self.ops += 1;
    }

    /// Whether the engine may free it.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Gives back what the connection holds in the executor: its ledger entry, its charges.
    pub fn finish(mut self, edge: &Edge) {
        assert_eq!(self.ops, 0, "a connection freed with operations in flight");
        assert!(!self.busy(), "a connection freed with an op being applied");
        self.release_charge(edge);
        match self.role {
            Role::Ingest(i) => edge.core.acks.close(i.acks),
            Role::Subscribe(s) => {
                if let Some(op) = subscribe::conn_closed(&edge.core, s.key, s.subs) {
                    // Every executor's replica forgets its subscriptions (a broadcast: a task).
                    let core = edge.core.clone();
                    rt::spawn(async move { subscribe::broadcast(&core, op).await });
                }
            }
        }
    }
}

/// How an ingest connection's heartbeats are deduplicated (issue 18: device-scoped sequences
/// once it declared an epoch).
fn dedupe(grant: &Grant) -> Dedupe {
    grant.epoch.map_or(Dedupe::Off, Dedupe::Seq)
}

/// The reply to a client's Close payload (tungstenite's: the same code and reason, 1002 for a
/// code that may not be sent, none for none), or the close a bad payload gets instead.
fn close_reply(payload: &[u8]) -> Result<Vec<u8>, (u16, &'static str)> {
    match payload.len() {
        0 => Ok(Vec::new()),
        1 => Err((CLOSE_PROTOCOL, "protocol error")),
        _ => {
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err((close::INVALID_PAYLOAD, "invalid UTF-8 in text frame"));
            }
            let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
            if code.is_allowed() {
                Ok(payload.to_vec())
            } else {
                let mut p = 1002u16.to_be_bytes().to_vec();
                p.extend_from_slice(b"Protocol violation");
                Ok(p)
            }
        }
    }
}

/// Appends a server frame (final, unmasked) with `opcode` and `payload` to `out`.
fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Removes a client frame's mask in place (RFC 6455 §5.3), eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_role_does_not_grow_ingest_connections() {
        // The subscriber role is boxed: an idle device connection pays one enum tag at most
        // beside its ingest state (issue 15's memory target counts every byte of it).
        let role = std::mem::size_of::<Role>();
        let ingest = std::mem::size_of::<IngestRole>();
        assert!(role <= ingest + 8, "role {role} B, ingest state {ingest} B");
    }

    #[test]
    fn unmasking_matches_the_byte_by_byte_rule() {
        // Every length from 0 to 40 (whole words and remainders): the wide unmask equals
        // `b ^ mask[i % 4]` per byte.
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let mut wide = data.clone();
            unmask(&mut wide, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(wide, slow, "len {len}");
        }
    }

    #[test]
    fn keys_and_operations_survive_user_data() {
        // Slots and 30-bit generations of every size round-trip with each operation kind.
        for (slot, generation) in [(0, 0), (1, 7), (u32::MAX, GENERATION_MASK)] {
            let key = Key { slot, generation };
            assert_eq!(Key::unpack(key.pack()), key);
            for op in [Op::Recv, Op::Send, Op::Cancel] {
                assert_eq!(decode(user_data(op, key)), (op, key));
            }
        }
    }

    #[test]
    fn server_frames_use_the_shortest_length_form_and_close_replies_follow_tungstenite() {
        let mut out = Vec::new();
        push_frame(&mut out, 0x1, b"{\"ack\":1}");
        assert_eq!(&out[..2], &[0x81, 9]);
        for (len, header) in [(126usize, 4usize), (65535, 4), (65536, 10)] {
            out.clear();
            push_frame(&mut out, 0x2, &vec![0; len]);
            assert_eq!(out.len(), header + len);
        }
        assert_eq!(close_reply(&[]), Ok(vec![]));
        assert_eq!(close_reply(&[3]), Err((1002, "protocol error")));
        assert_eq!(
            close_reply(&[0x03, 0xe8, b'b', b'y']),
            Ok(vec![0x03, 0xe8, b'b', b'y'])
        );
        assert_eq!(
            &close_reply(&[0x03, 0xed]).unwrap()[..2],
            &[0x03, 0xea],
            "1005 is refused"
        );
        assert!(
            close_reply(&[0x03, 0xe8, 0xff]).is_err(),
            "reason not UTF-8"
        );
    }

    #[test]
    fn the_table_reuses_slots_under_new_generations() {
        // A removed entry's key finds nothing, also once its slot is reused by a new entry,
        // whose key differs only in generation; keys lists the live entries.
        let mut t: Table<&str> = Table::default();
        let a = t.insert(|_| "a");
        let b = t.insert(|_| "b");
        assert_eq!(t.remove(a), "a");
        assert!(t.get(a).is_none());
        let c = t.insert(|k| {
            assert_eq!(k.slot, a.slot);
            "c"
        });
        assert_ne!(c, a);
        assert!(t.get_mut(a).is_none());
        assert_eq!((t.get(b), t.get(c)), (Some(&"b"), Some(&"c")));
        assert_eq!(t.keys(), vec![c, b]);
    }
}
