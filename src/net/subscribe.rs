//! The subscriber side of `GET /v1/subscribe`: one WebSocket connection from the 101 response to
//! the close frame. It owns the client ops (`subscribe` / `unsubscribe`, their validation and
//! every error reason of docs/PROTOCOL.md "Subscriptions and geofences"), the connection's
//! subscriptions and their broadcast to every executor's interest replica, and the writer that
//! drains the connection's bounded queue (answers, events, `{"missed":N}` notices, pings, close).
//! Matching and queueing events is `subscribe::fanout`'s. It is a connection [`Kind`]: admitted
//! with an ops or subscriber token while the subscriber cap has room.
//!
//! The rules live in sans-io pieces that both engines call: [`on_text`] judges a client op
//! (answering refusals, charging the error budget) and leaves an [`Apply`] to run,
//! [`take_batch`] turns the connection's queue into text frames, [`conn_closed`] gives back what
//! a connection held. The glommio tasks below wrap them in a reader and a writer task; the ring
//! engine (`net::engine`, `--engine ring`) drives plain-socket subscribers with them instead.
//!
//! Invariants: an `ok` is queued only once every executor applied the change, so every heartbeat
//! appended after the client read `ok` is matched; a subscriber token only ever receives devices
//! under its prefix; the reader pauses while answers pile up unread, and events never wait: a
//! full queue counts them as missed.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures_lite::AsyncWriteExt;
use serde_json::Value;

use crate::auth::Scope;
use crate::http::parse::{self, Request};
use crate::limits::{
    CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_WINDOW_MS, FRAME_BYTES_MAX, STOP_WRITE_GRACE,
    SUBS_PER_CONN_MAX, SUB_CONTROL_QUEUED_MAX, SUB_DEVICES_MAX, SUB_DEVICES_TOTAL_MAX,
    SUB_NAME_BYTES_MAX, SUB_SOCKET_SEND_BYTES, SUB_WRITE_BATCH_MAX, SUB_WS_WRITE_BUFFER_BYTES,
    WS_READ_BUFFER_BYTES, WS_WRITE_BUFFER_BYTES_MAX,
};
use crate::net::auth::{self, Need, Refusal};
use crate::net::edge::{Edge, Kind};
use crate::net::slots::{ConnSlot, SubscriberSlot};
use crate::net::tls::Conn;
use crate::net::ws::{self, Ctl, Data, Metered, Sink, Source, WriteError, WsReader, WsWriter};
use crate::proto::{self, close};
use crate::record::DeviceId;
use crate::rt;
use crate::shard::core::Core;
use crate::slab::Key as ConnKey;
use crate::spatial::BBox;
use crate::subscribe::render::write_event;
use crate::subscribe::{Filter, InterestOp, Out, SubKey, Target};

/// Close code for a normal closure (RFC 6455).
const CLOSE_NORMAL: u16 = 1000;

/// A verified WebSocket upgrade of `/v1/subscribe`, holding its subscriber slot.
pub struct Grant {
    /// `Sec-WebSocket-Accept` value for the 101 response.
    pub accept_key: String,
    /// A subscriber token's device-id prefix (`None`: an ops token, every device).
    pub prefix: Option<String>,
    /// When the token expires (Unix seconds): the connection is closed with 1008 then.
    pub expires_at_s: u64,
    /// When the token was issued and its id (revocation checks, log lines).
    pub issue: crate::auth::Issue,
    /// The connection's place under the subscriber cap.
    pub slot: SubscriberSlot,
}

/// The subscriber connection kind (`/v1/subscribe`).
pub struct SubscribeKind;

impl Kind for SubscribeKind {
    type Grant = Grant;

    /// Checks the upgrade headers, then an ops or subscriber token (401 otherwise), then the
    /// subscriber cap (503).
    fn admit(edge: &Edge, req: &Request<'_>) -> Result<Grant, Refusal> {
        let refuse = |status: u16, message: &str| {
            let (status, body) = parse::json_error(status, message, None);
            Refusal { status, body }
        };
        let accept_key =
            parse::websocket_accept(req).map_err(|e| refuse(e.status(), &e.to_string()))?;
        let shared = &edge.core.shared;
        let claims = auth::check(shared, req, Need::Subscribe)?;
        let prefix = match claims.scope {
            Scope::Subscriber(p) => Some(p),
            _ => None,
        };
        let slot =
            SubscriberSlot::acquire(shared).ok_or_else(|| refuse(503, "too many subscribers"))?;
        Ok(Grant {
            accept_key,
            prefix,
            expires_at_s: claims.expires_at_s,
            issue: claims.issue,
            slot,
        })
    }

    async fn serve<S: Conn>(
        edge: Rc<Edge>,
        stream: S,
        leftover: Vec<u8>,
        grant: Grant,
        slot: ConnSlot,
    ) {
        // Subscribers stay on the executor that accepted them; events come to them.
        serve(edge, stream, leftover, grant, slot).await
    }
}

fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = WS_READ_BUFFER_BYTES;
    c.write_buffer_size = SUB_WS_WRITE_BUFFER_BYTES;
    c.max_write_buffer_size = WS_WRITE_BUFFER_BYTES_MAX;
    c.max_message_size = Some(FRAME_BYTES_MAX);
    c.max_frame_size = Some(FRAME_BYTES_MAX);
    c
}

/// Bounds what a stalled subscriber pins in the kernel.
fn limit_send_buffer<S: Conn>(stream: &S) {
    limit_send_buffer_fd(stream.socket_fd());
}

/// Bounds what a stalled subscriber on socket `fd` (which the caller owns) pins in the kernel.
pub fn limit_send_buffer_fd(fd: std::os::fd::RawFd) {
    let bytes = SUB_SOCKET_SEND_BYTES as libc::c_int;
    // SAFETY: setsockopt on a socket the caller owns, with a correctly sized int option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// This connection's subscriptions, as the reader knows them.
pub struct Subs {
    /// name -> (id, device ids it holds in the server-wide count).
    by_name: HashMap<String, (u32, usize)>,
    next_id: u32,
}

impl Subs {
    /// No subscription yet.
    pub fn new() -> Subs {
        Subs {
            by_name: HashMap::new(),
            next_id: 1,
        }
    }
}

impl Default for Subs {
    fn default() -> Self {
        Subs::new()
    }
}

impl Grant {
    /// The token's scope (revocation checks).
    pub fn scope(&self) -> Scope {
        match &self.prefix {
            Some(p) => Scope::Subscriber(p.clone()),
            None => Scope::Ops,
        }
    }
}

/// The close a binary frame from a subscriber gets.
pub const BINARY_REFUSED: (u16, &str) = (close::POLICY, "binary frames are not accepted here");

/// The close reason of a subscriber whose token expired (1008).
pub const TOKEN_EXPIRED: &str = "token expired";

/// What one client text frame leads to (see [`on_text`]).
pub enum Step {
    /// Answered (an error frame is queued) or nothing to do.
    Done,
    /// A valid op whose interest change every executor must apply before its answer
    /// ([`Apply::run`]); the reader reads nothing more until then.
    Apply(Apply),
    /// Too many errors: close with this code and reason.
    Close(u16, &'static str),
}

/// Judges one client text frame (sans-io: the glommio reader and the connection engine both call
/// it): parses and checks the op against this connection and the server, queueing its error
/// answer (charged to `budget`) when it is refused.
pub fn on_text(
    core: &Core,
    key: ConnKey,
    subs: &mut Subs,
    prefix: Option<&str>,
    budget: &mut proto::ErrorBudget,
    text: &str,
) -> Step {
    match parse_op(text, prefix).and_then(|op| plan_op(core, key, subs, op)) {
        Ok(apply) => Step::Apply(apply),
        Err(e) => {
            core.fanout.push_control(key, e.to_json());
            let now = rt::now_ms().max(0) as u64;
            match budget.charge(now) {
                Ok(()) => Step::Done,
                Err(a) => Step::Close(a.close_code(), a.reason()),
            }
        }
    }
}

/// An accepted op's remaining work: its interest change, applied on every executor, then (for
/// `subscribe`) its confirmation and `ok`.
pub struct Apply {
    op: InterestOp,
    /// `(id, name, replaced id, ok)`: confirmed once every executor applied `op`.
    then: Option<(u32, String, Option<u32>, String)>,
    key: ConnKey,
}

impl Apply {
    /// Broadcasts the change and returns once every executor applied it and the answer is
    /// queued.
    pub async fn run(self, core: &Core) {
        broadcast(core, self.op).await;
        if let Some((id, sub, replaces, ok)) = self.then {
            core.fanout.confirm(self.key, id, &sub, replaces, ok);
        }
    }
}

/// Serves one upgraded subscriber connection to its end.
async fn serve<S: Conn>(
    edge: Rc<Edge>,
    mut stream: S,
    leftover: Vec<u8>,
    upgrade: Grant,
    slot: ConnSlot,
) {
    let _slot = slot;
    let core = &edge.core;
    limit_send_buffer(&stream);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        upgrade.accept_key
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let (stream, meter) = Metered::new(stream, leftover, &edge.partial_frames);
    let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config())).await;
    let (sink, source) = ws::split(ws, meter);
    let key = core.fanout.conn_open();
    let signal = core.fanout.signal(key).expect("just opened");
    let ctl = Rc::new(Ctl::default());
    let writer = rt::spawn_joinable(write_loop(
        core.clone(),
        key,
        sink,
        ctl.clone(),
        signal.clone(),
    ));
    let mut subs = Subs::new();
    read_loop(core, key, source, &ctl, &signal, &upgrade, &mut subs).await;
    if ctl.close.get().is_none() {
        ctl.close.set(Some((CLOSE_NORMAL, "")));
    }
    signal.notify();
    let _ = writer.await;
    if let Some(op) = conn_closed(core, key, subs) {
        broadcast(core, op).await;
    }
}

/// Gives back what a closed subscriber connection held: its queue and signal, its device ids
/// in the server-wide count. Returns the change every executor's interest replica still has
/// to apply (none when it held no subscription, or at shutdown).
pub fn conn_closed(core: &Core, key: ConnKey, subs: Subs) -> Option<InterestOp> {
    core.fanout.conn_close(key);
    let devices: usize = subs.by_name.values().map(|(_, n)| n).sum();
    core.shared
        .sub_devices_total
        .fetch_sub(devices, Ordering::AcqRel);
    (!subs.by_name.is_empty() && !core.stopping()).then_some(InterestOp::RemoveConn {
        exec: core.index.0 as u32,
        conn: key,
    })
}

/// Applies an interest change on every executor (here directly, elsewhere over the control
/// mesh) and returns once all have.
pub async fn broadcast(core: &Core, op: InterestOp) {
    let op = Arc::new(op);
    core.on_all(move |c: &Core| c.fanout.apply(&op)).await;
}

async fn read_loop<S: Conn>(
    core: &Core,
    key: ConnKey,
    source: Source<S>,
    ctl: &Ctl,
    writer: &rt::Signal,
    upgrade: &Grant,
    subs: &mut Subs,
) {
    let mut budget = proto::ErrorBudget::new(CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_WINDOW_MS);
    let scope = upgrade.scope();
    let changed = auth::revocations_changed();
    let revoked = || auth::revoked_live(&core.shared, &scope, &upgrade.issue, "subscribe");
    let mut reader = WsReader::new(
        &core.stop,
        core.shared.cfg.ping_interval(),
        source,
        ctl,
        writer,
    )
    .end_at_expiry(upgrade.expires_at_s, TOKEN_EXPIRED)
    .end_if_revoked(&changed, &revoked, auth::TOKEN_REVOKED);
    loop {
        // Backpressure: a client that sends ops but never reads the answers is paused.
        loop {
            let Some(queued) = core.fanout.controls_queued(key) else {
                return;
            };
            if ctl.writer_gone.get() {
                return;
            }
            if queued < SUB_CONTROL_QUEUED_MAX {
                break;
            }
            writer.wait().await;
        }
        let text = match reader.next().await {
            None => return,
            Some(Data::Binary(_)) => {
                ctl.close.set(Some(BINARY_REFUSED));
                return;
            }
            Some(Data::Text(t)) => t,
        };
        let prefix = upgrade.prefix.as_deref();
        match on_text(core, key, subs, prefix, &mut budget, text.as_str()) {
            Step::Done => {}
            Step::Apply(apply) => apply.run(core).await,
            Step::Close(code, reason) => {
                ctl.close.set(Some((code, reason)));
                return;
            }
        }
    }
}

/// A refused client op: `{"error":reason,"sub":..,"detail":..}`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpError {
    /// Stable reason (docs/PROTOCOL.md).
    pub reason: &'static str,
    /// The subscription name, when the op named a valid one.
    pub sub: Option<String>,
    /// Human-readable explanation.
    pub detail: String,
}

impl OpError {
    fn new(reason: &'static str, sub: Option<&str>, detail: impl Into<String>) -> OpError {
        OpError {
            reason,
            sub: sub.map(Into::into),
            detail: detail.into(),
        }
    }

    /// The error frame's JSON text.
    pub fn to_json(&self) -> String {
        let mut m = serde_json::Map::new();
        m.insert("error".into(), Value::from(self.reason));
        if let Some(s) = &self.sub {
            m.insert("sub".into(), Value::from(s.as_str()));
        }
        m.insert("detail".into(), Value::from(self.detail.as_str()));
        Value::Object(m).to_string()
    }
}

/// A parsed, validated client op.
#[derive(Debug, Clone)]
pub enum Op {
    /// Add or replace subscription `sub`.
    Subscribe {
        /// The name.
        sub: String,
        /// The filter (with the token's prefix).
        filter: Filter,
    },
    /// Remove subscription `sub`.
    Unsubscribe {
        /// The name.
        sub: String,
    },
}

/// Whether `name` is a valid subscription name: 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn valid_sub_name(name: &str) -> bool {
    (1..=SUB_NAME_BYTES_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses and validates one client op (everything that does not need server state).
pub fn parse_op(text: &str, prefix: Option<&str>) -> Result<Op, OpError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| OpError::new("bad_json", None, format!("not JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(OpError::new("bad_json", None, "expected a JSON object"));
    };
    let sub = match obj.get("sub") {
        Some(Value::String(s)) if valid_sub_name(s) => Some(s.as_str()),
        _ => None,
    };
    let op = match obj.get("op") {
        Some(Value::String(op)) if op == "subscribe" || op == "unsubscribe" => op.as_str(),
        Some(_) => {
            return Err(OpError::new(
                "bad_op",
                sub,
                r#""op" must be "subscribe" or "unsubscribe""#,
            ))
        }
        None => return Err(OpError::new("bad_op", sub, r#"missing "op""#)),
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "op" | "sub" | "devices" | "bbox" | "fence"))
    {
        return Err(OpError::new("bad_op", sub, format!("unknown member {k:?}")));
    }
    let Some(sub) = sub else {
        return Err(OpError::new(
            "bad_sub",
            None,
            r#""sub" must be 1..=64 bytes of [A-Za-z0-9._-]"#,
        ));
    };
    let targets = ["devices", "bbox", "fence"]
        .iter()
        .filter(|k| obj.contains_key(**k))
        .count();
    if op == "unsubscribe" {
        if targets > 0 {
            return Err(OpError::new(
                "bad_op",
                Some(sub),
                r#"unsubscribe takes only "sub""#,
            ));
        }
        return Ok(Op::Unsubscribe { sub: sub.into() });
    }
    if targets != 1 {
        return Err(OpError::new(
            "bad_op",
            Some(sub),
            r#"subscribe needs exactly one of "devices", "bbox", "fence""#,
        ));
    }
    let target = if let Some(d) = obj.get("devices") {
        Target::Devices(parse_devices(d, sub, prefix)?)
    } else if let Some(b) = obj.get("bbox") {
        Target::BBox(parse_bbox(b, sub)?)
    } else {
        match obj.get("fence") {
            Some(Value::String(f)) if valid_sub_name(f) => Target::Fence(f.as_str().into()),
            _ => {
                return Err(OpError::new(
                    "unknown_fence",
                    Some(sub),
                    r#""fence" must name a geofence (1..=64 bytes of [A-Za-z0-9._-])"#,
                ))
            }
        }
    };
    Ok(Op::Subscribe {
        sub: sub.into(),
        filter: Filter {
            target,
            prefix: prefix.map(Into::into),
        },
    })
}

fn parse_devices(v: &Value, sub: &str, prefix: Option<&str>) -> Result<Vec<DeviceId>, OpError> {
    let bad = |detail: &str| OpError::new("bad_devices", Some(sub), detail);
    let Value::Array(items) = v else {
        return Err(bad(r#""devices" must be an array of device ids"#));
    };
    if items.is_empty() {
        return Err(bad(r#""devices" must not be empty"#));
    }
    if items.len() > SUB_DEVICES_MAX {
        return Err(OpError::new(
            "too_many_devices",
            Some(sub),
            format!("at most {SUB_DEVICES_MAX} devices per subscription"),
        ));
    }
    let mut ids: Vec<DeviceId> = Vec::with_capacity(items.len());
    for item in items {
        let Value::String(id) = item else {
            return Err(bad(r#""devices" must be an array of device ids"#));
        };
        let device = match DeviceId::parse(id) {
            Ok(d) => d,
            Err(e) => return Err(bad(&format!("invalid device id {id:?}: {}", e.reason()))),
        };
        if let Some(p) = prefix {
            if !id.starts_with(p) {
                return Err(OpError::new(
                    "forbidden",
                    Some(sub),
                    format!("device {id:?} is outside this token's prefix {p:?}"),
                ));
            }
        }
        ids.push(device);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn parse_bbox(v: &Value, sub: &str) -> Result<BBox, OpError> {
    let bad = |detail: &str| OpError::new("bad_bbox", Some(sub), detail);
    let shape = r#""bbox" must be [minLon,minLat,maxLon,maxLat]"#;
    let Value::Array(items) = v else {
        return Err(bad(shape));
    };
    let nums: Vec<f64> = items.iter().filter_map(Value::as_f64).collect();
    if items.len() != 4 || nums.len() != 4 {
        return Err(bad(shape));
    }
    BBox::new(nums[0], nums[1], nums[2], nums[3]).map_err(bad)
}

/// Checks a valid op against this connection and the server and books it (the connection's
/// names, the server-wide device count); what is left is its [`Apply`].
fn plan_op(core: &Core, key: ConnKey, subs: &mut Subs, op: Op) -> Result<Apply, OpError> {
    match op {
        Op::Unsubscribe { sub } => {
            let Some((id, devices)) = subs.by_name.remove(&sub) else {
                return Err(OpError::new(
                    "unknown_sub",
                    Some(&sub),
                    "no subscription of that name on this connection",
                ));
            };
            core.shared
                .sub_devices_total
                .fetch_sub(devices, Ordering::AcqRel);
            // No event for it is queued from here on; then every replica forgets it.
            core.fanout.unconfirm(key, id, ok_json("unsubscribe", &sub));
            Ok(Apply {
                op: InterestOp::Remove(sub_key(core, key, id)),
                then: None,
                key,
            })
        }
        Op::Subscribe { sub, filter } => {
            let old = subs.by_name.get(&sub).copied();
            if old.is_none() && subs.by_name.len() >= SUBS_PER_CONN_MAX {
                return Err(OpError::new(
                    "too_many_subs",
                    Some(&sub),
                    format!("at most {SUBS_PER_CONN_MAX} subscriptions per connection"),
                ));
            }
            if let Target::Fence(name) = &filter.target {
                if core.shared.fences.snapshot().1.id(name).is_none() {
                    return Err(OpError::new(
                        "unknown_fence",
                        Some(&sub),
                        format!("no geofence named {name:?}"),
                    ));
                }
            }
            let devices = match &filter.target {
                Target::Devices(ids) => ids.len(),
                _ => 0,
            };
            let total = &core.shared.sub_devices_total;
            let before = total.fetch_add(devices, Ordering::AcqRel);
            let released = old.map_or(0, |(_, n)| n);
            if devices > 0 && before + devices > SUB_DEVICES_TOTAL_MAX + released {
                total.fetch_sub(devices, Ordering::AcqRel);
                return Err(OpError::new(
                    "too_many_devices",
                    Some(&sub),
                    format!(
                        "the server holds at most {SUB_DEVICES_TOTAL_MAX} subscribed device ids"
                    ),
                ));
            }
            total.fetch_sub(released, Ordering::AcqRel);
            let id = subs.next_id;
            subs.next_id += 1;
            subs.by_name.insert(sub.clone(), (id, devices));
            let ok = ok_json("subscribe", &sub);
            Ok(Apply {
                op: InterestOp::Put {
                    key: sub_key(core, key, id),
                    filter: Arc::new(filter),
                    replaces: old.map(|(old_id, _)| sub_key(core, key, old_id)),
                },
                then: Some((id, sub, old.map(|o| o.0), ok)),
                key,
            })
        }
    }
}

fn sub_key(core: &Core, conn: ConnKey, id: u32) -> SubKey {
    SubKey {
        exec: core.index.0 as u32,
        conn,
        id,
    }
}

fn ok_json(op: &str, sub: &str) -> String {
    serde_json::json!({"ok": op, "sub": sub}).to_string()
}

/// What one [`take_batch`] took and wrote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batch {
    /// Queue items taken (a full batch means more may wait).
    pub took: usize,
    /// Answers among them (the reader may be paused on unread answers).
    pub controls: bool,
    /// Events among them.
    pub delivered: u64,
}

/// Takes up to [`SUB_WRITE_BATCH_MAX`] items from the connection's queue and hands each text
/// frame to `emit` in order: answers as they are, a `{"missed":N}` notice before the first event
/// after a loss (or alone, when nothing else is queued, so it is said at once), then each event
/// rendered. Sans-io: the glommio writer and the connection engine both call it. `None` once
/// the connection is closed. `items` and `text` are scratch.
pub fn take_batch(
    core: &Core,
    key: ConnKey,
    items: &mut Vec<Out>,
    text: &mut String,
    emit: impl FnMut(&str),
) -> Option<Batch> {
    items.clear();
    let missed = core.fanout.take(key, SUB_WRITE_BATCH_MAX, items)?;
    Some(render_batch(items, missed, text, emit))
}

/// Renders taken `items` (drained) and the `missed` count to report first into text frames
/// handed to `emit` in order (see [`take_batch`]).
fn render_batch(
    items: &mut Vec<Out>,
    mut missed: u64,
    text: &mut String,
    mut emit: impl FnMut(&str),
) -> Batch {
    let mut batch = Batch {
        took: items.len(),
        controls: false,
        delivered: 0,
    };
    for item in items.drain(..) {
        match item {
            Out::Control(t) => {
                batch.controls = true;
                emit(&t);
            }
            Out::Event { sub, text: ev } => {
                if missed > 0 {
                    emit(&missed_json(missed));
                    missed = 0;
                }
                write_event(text, &sub, &ev);
                emit(text.as_str());
                batch.delivered += 1;
            }
        }
    }
    if missed > 0 {
        emit(&missed_json(missed));
    }
    batch
}

fn missed_json(missed: u64) -> String {
    format!(r#"{{"missed":{missed}}}"#)
}

/// Runs the writer, then tells the reader it is gone.
async fn write_loop<S: Conn>(
    core: Rc<Core>,
    key: ConnKey,
    sink: Sink<S>,
    ctl: Rc<Ctl>,
    signal: Rc<rt::Signal>,
) {
    if let Err(e) = write_frames(&core, key, sink, &ctl, &signal).await {
        tracing::debug!(error = %e, "a subscriber's writes stalled or failed; closing it");
    }
    ctl.writer_ended(&signal);
}

/// Writes answers, `{"missed":N}` notices, events, pings and the close frame. Every write must
/// finish within the idle timeout: a client that stops reading for that long is closed (until
/// then its queue overflows into the missed count). Once shutdown began, writes get at most
/// [`STOP_WRITE_GRACE`].
async fn write_frames<S: Conn>(
    core: &Core,
    key: ConnKey,
    sink: Sink<S>,
    ctl: &Ctl,
    signal: &rt::Signal,
) -> Result<(), WriteError> {
    let mut out = WsWriter::new(sink, core.shared.cfg.idle_timeout)
        .stop_bounded(&core.stop, STOP_WRITE_GRACE);
    let mut items = Vec::with_capacity(SUB_WRITE_BATCH_MAX);
    let mut frames: Vec<String> = Vec::with_capacity(SUB_WRITE_BATCH_MAX + 1);
    let mut text = String::with_capacity(256);
    loop {
        let wait = signal.wait();
        if let Some((code, reason)) = ctl.close.get() {
            out.close(code, reason).await;
            return Ok(());
        }
        frames.clear();
        let Some(batch) = take_batch(core, key, &mut items, &mut text, |t| {
            frames.push(t.to_owned())
        }) else {
            return Ok(());
        };
        let mut wrote = !frames.is_empty();
        for t in frames.drain(..) {
            out.feed(Message::text(t)).await?;
        }
        if ctl.ping.replace(false) {
            out.feed(Message::Ping(Default::default())).await?;
            wrote = true;
        }
        if wrote {
            out.flush().await?;
        }
        let d = &core.fanout.delivered;
        d.set(d.get() + batch.delivered);
        if batch.controls {
            // The reader may be paused on unread answers.
            signal.notify();
        }
        let took = batch.took;
        if took == SUB_WRITE_BATCH_MAX {
            continue;
        }
        wait.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(items: Vec<Out>, missed: u64) -> (Vec<String>, Batch) {
        let mut items = items;
        let (mut text, mut frames) = (String::new(), Vec::new());
        let batch = render_batch(&mut items, missed, &mut text, |t| frames.push(t.to_owned()));
        assert!(items.is_empty(), "every item taken is written");
        (frames, batch)
    }

    fn event(sub: &str, n: u32) -> Out {
        Out::Event {
            sub: sub.into(),
            text: format!(r#"{{"n":{n}}}"#).into(),
        }
    }

    #[test]
    fn a_batch_says_what_was_missed_before_the_next_event_or_alone() {
        // Answers go out as they are and in order; the missed count comes right before the
        // first event after the loss (not before an answer), and only once.
        let (frames, batch) = render(
            vec![Out::Control("a".into()), event("s", 1), event("s", 2)],
            3,
        );
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0], "a");
        assert_eq!(frames[1], r#"{"missed":3}"#);
        assert!(frames[2].contains(r#""n":1"#) && frames[2].contains(r#""s""#));
        assert!(frames[3].contains(r#""n":2"#));
        assert_eq!(
            batch,
            Batch {
                took: 3,
                controls: true,
                delivered: 2
            }
        );
        // Nothing to deliver: the notice goes out at once, alone.
        let (frames, batch) = render(vec![Out::Control("b".into())], 5);
        assert_eq!(frames, vec!["b".to_string(), r#"{"missed":5}"#.to_string()]);
        assert_eq!((batch.took, batch.delivered), (1, 0));
        // Events only, nothing missed: no notice, no answer flagged.
        let (frames, batch) = render(vec![event("t", 7)], 0);
        assert_eq!(frames.len(), 1);
        assert!(!batch.controls);
        let (frames, batch) = render(Vec::new(), 0);
        assert!(frames.is_empty());
        assert_eq!(batch.took, 0);
    }

    fn reason(text: &str, prefix: Option<&str>) -> &'static str {
        parse_op(text, prefix).unwrap_err().reason
    }

    #[test]
    fn parse_op_names_every_reason() {
        // Each malformed op gets its documented reason; valid ops parse to the right filter.
        assert_eq!(reason("nope", None), "bad_json");
        assert_eq!(reason("[1]", None), "bad_json");
        assert_eq!(reason(r#"{"sub":"s"}"#, None), "bad_op");
        assert_eq!(reason(r#"{"op":"x","sub":"s"}"#, None), "bad_op");
        assert_eq!(
            reason(
                r#"{"op":"subscribe","sub":"s","bbox":[0,0,1,1],"x":1}"#,
                None
            ),
            "bad_op"
        );
        assert_eq!(reason(r#"{"op":"subscribe","sub":"s"}"#, None), "bad_op");
        assert_eq!(
            reason(
                r#"{"op":"subscribe","sub":"s","bbox":[0,0,1,1],"fence":"f"}"#,
                None
            ),
            "bad_op"
        );
        assert_eq!(
            reason(r#"{"op":"unsubscribe","sub":"s","fence":"f"}"#, None),
            "bad_op"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"a b","bbox":[0,0,1,1]}"#, None),
            "bad_sub"
        );
        assert_eq!(reason(r#"{"op":"unsubscribe"}"#, None), "bad_sub");
        let long = "x".repeat(65);
        assert_eq!(
            reason(&format!(r#"{{"op":"unsubscribe","sub":"{long}"}}"#), None),
            "bad_sub"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","devices":[]}"#, None),
            "bad_devices"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","devices":"a"}"#, None),
            "bad_devices"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","devices":[1]}"#, None),
            "bad_devices"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","devices":[""]}"#, None),
            "bad_devices"
        );
        let many: Vec<String> = (0..=SUB_DEVICES_MAX).map(|i| format!("\"d{i}\"")).collect();
        assert_eq!(
            reason(
                &format!(
                    r#"{{"op":"subscribe","sub":"s","devices":[{}]}}"#,
                    many.join(",")
                ),
                None
            ),
            "too_many_devices"
        );
        assert_eq!(
            reason(
                r#"{"op":"subscribe","sub":"s","devices":["b-1"]}"#,
                Some("a-")
            ),
            "forbidden"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","bbox":[0,0,1]}"#, None),
            "bad_bbox"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","bbox":[0,2,1,1]}"#, None),
            "bad_bbox"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","bbox":[0,0,1,"x"]}"#, None),
            "bad_bbox"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","bbox":[0,0,181,1]}"#, None),
            "bad_bbox"
        );
        assert_eq!(
            reason(r#"{"op":"subscribe","sub":"s","fence":7}"#, None),
            "unknown_fence"
        );
        match parse_op(
            r#"{"op":"subscribe","sub":"s.1","devices":["a-2","a-1","a-2"]}"#,
            Some("a-"),
        )
        .unwrap()
        {
            Op::Subscribe { sub, filter } => {
                assert_eq!(sub, "s.1");
                assert_eq!(filter.prefix.as_deref(), Some("a-"));
                match filter.target {
                    Target::Devices(ids) => assert_eq!(
                        ids,
                        vec![
                            DeviceId::parse("a-1").unwrap(),
                            DeviceId::parse("a-2").unwrap()
                        ]
                    ),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        let e = parse_op(r#"{"op":"subscribe","sub":"s1","bbox":[0,0]}"#, None).unwrap_err();
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"], "bad_bbox");
        assert_eq!(v["sub"], "s1");
        assert!(v["detail"].as_str().unwrap().contains("bbox"));
    }
}
