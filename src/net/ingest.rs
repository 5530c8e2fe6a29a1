//! The device side of `/v1/ingest`: one WebSocket connection from the 101 response to the close
//! frame. It owns the reader (frame limits, decoding, seq and error-budget checks, grouping the
//! accepted heartbeats by owning shard, appending locally or forwarding, and backpressure), and
//! the writer (error frames, coalesced `{"ack":N}` frames, pings, the close frame; first, on a
//! connection that declared a device-sequence `epoch`, the `{"resume":...}` frame of issue 18).
//!
//! It is a connection [`Kind`]: admitted with a device or gateway token; a device connection
//! accepted on an executor that does not own its shard is handed to the one that does.
//!
//! Invariants: an ack is written only for seqs whose frames are complete in the executor's
//! [`crate::shard::acks::AckLedger`] (durable);
//! the reader stops reading while too many frames await durability, so a slow shard slows its
//! devices instead of buffering; on shutdown (and when its token expires or is revoked) the
//! connection stops reading, waits for what it received to become durable, sends the final ack
//! and closes with 1001 (1008 `token_expired`, `token_revoked`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Instant;

use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures_lite::AsyncWriteExt;

use crate::auth::Scope;
use crate::http::parse::{self, Request};
use crate::limits::{
    CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_QUEUED_MAX, CONN_ERRORS_WINDOW_MS,
    CONN_FRAMES_IN_FLIGHT_MAX, INGEST_WS_WRITE_BUFFER_BYTES, WS_READ_BUFFER_BYTES,
    WS_WRITE_BUFFER_BYTES_MAX,
};
use crate::metrics::ExecProbe;
use crate::net::auth::{self, Need, Refusal};
use crate::net::edge::{DeviceGrant, Edge, Handoff, Kind};
use crate::net::slots::ConnSlot;
use crate::net::tls::{self, Conn};
use crate::net::ws::{
    self, Ctl, Data, Metered, ReadMeter, Sink, Source, WriteError, WsReader, WsWriter,
};
use crate::node::ExecutorId;
use crate::proto::{self, close, Ingest, IngestScope, Outcome};
use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::rt;
use crate::shard::acks::{ConnAcks, ConnKey};
use crate::shard::mesh::Batch;
use crate::store::Dedupe;

/// Close code for a normal closure (RFC 6455).
pub(crate) const CLOSE_NORMAL: u16 = 1000;
/// Close reason (with 1008) when the connection's token expires.
pub const TOKEN_EXPIRED: &str = "token_expired";

fn ws_config(frame_bytes_max: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = WS_READ_BUFFER_BYTES;
    c.write_buffer_size = INGEST_WS_WRITE_BUFFER_BYTES;
    c.max_write_buffer_size = WS_WRITE_BUFFER_BYTES_MAX;
    c.max_message_size = Some(frame_bytes_max);
    c.max_frame_size = Some(frame_bytes_max);
    c
}

/// What an admitted ingest upgrade grants.
pub type Grant = DeviceGrant;

/// The device ingest connection kind (`/v1/ingest`).
pub struct IngestKind;

impl Kind for IngestKind {
    type Grant = Grant;

    /// Checks the upgrade headers and the token: 4xx for a bad upgrade, 401 for a missing, bad,
    /// expired or wrong-scope token.
    fn admit(edge: &Edge, req: &Request<'_>) -> Result<Grant, Refusal> {
        let accept_key = parse::websocket_accept(req).map_err(|e| {
            let (status, body) = parse::json_error(e.status(), &e.to_string(), None);
            Refusal { status, body }
        })?;
        let claims = auth::check(&edge.core.shared, req, Need::Ingest)?;
        // Ownership: a device whose unit another node writes goes there before the upgrade.
        if let Scope::Device(id) = &claims.scope {
            let route = crate::net::owner::route(&edge.core.shared, id);
            if let Some(r) = crate::net::owner::ws_refusal(&route, req) {
                return Err(r);
            }
        }
        let epoch = declared_epoch(req, &claims.scope)?;
        Ok(Grant {
            accept_key,
            scope: claims.scope,
            expires_at_s: claims.expires_at_s,
            issue: claims.issue,
            epoch,
        })
    }

    /// Serves a device connection on the executor that owns its shard (handing the socket over
    /// if that is another executor); gateways stay here, and so does a TLS connection (its
    /// session cannot move: its heartbeats cross the mesh instead, see [`crate::net::tls`]).
    async fn serve<S: Conn>(
        edge: Rc<Edge>,
        mut stream: S,
        leftover: Vec<u8>,
        grant: Grant,
        slot: ConnSlot,
    ) {
        let mtls = edge.core.shared.cfg.tls_client_ca.is_some();
        if let Err(e) = tls::ClientCert::of(&stream, mtls).check(&grant.scope) {
            // mTLS: the client certificate must name the token's device (docs/PROTOCOL.md).
            let (status, body) = parse::json_error(403, e.reason(), None);
            let _ = crate::net::edge::write_response(&mut stream, status, &body, true).await;
            return;
        }
        if let Some((stream, leftover, grant, slot)) =
            hand_over_foreign(&edge, stream, leftover, grant, slot).await
        {
            serve(edge, stream, leftover, grant, slot).await;
        }
    }
}

/// Hands a device connection accepted here to the executor that owns its shard, if that is
/// another one, routing migrates and the connection can move (a plain socket; a TLS session
/// stays) (`None`: handed over, or closed when the hand-off failed); otherwise gives everything
/// back to be served here.
pub async fn hand_over_foreign<S: Conn>(
    edge: &Edge,
    stream: S,
    leftover: Vec<u8>,
    grant: Grant,
    slot: ConnSlot,
) -> Option<(S, Vec<u8>, Grant, ConnSlot)> {
    let core = &edge.core;
    if let (Scope::Device(id), Some(fd)) = (&grant.scope, stream.handoff_fd()) {
        let owner = core.owner(core.shared.router.shard_of(id));
        if owner != core.index && core.shared.cfg.routing == crate::config::Routing::Migrate {
            // SAFETY: dup of a descriptor we own; the duplicate is owned by the OwnedFd.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup >= 0 {
                // SAFETY: `dup` is a fresh descriptor nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(dup) };
                let msg = Handoff {
                    fd,
                    leftover,
                    grant,
                };
                slot.hand_over(); // the adopting executor counts it from now on
                drop(stream);
                if edge.hand_off(owner, msg).await.is_err() {
                    tracing::warn!("could not hand a connection over; closing it");
                    drop(ConnSlot::take_over(&core.shared));
                }
                return None;
            }
        }
    }
    Some((stream, leftover, grant, slot))
}

/// The device-sequence epoch of an upgrade (`?epoch=E`, 0 ..= 2^32-1; issue 18): only with a
/// device token, since the marks are per device. 400 for anything else.
fn declared_epoch(req: &Request<'_>, scope: &Scope) -> Result<Option<u32>, Refusal> {
    let bad = |why: &str| {
        let (status, body) = parse::json_error(400, why, Some("epoch"));
        Refusal { status, body }
    };
    let mut buf = Vec::new();
    let Some(raw) = parse::query_param(req.query, "epoch", &mut buf)
        .map_err(|_| bad("epoch: bad percent-encoding"))?
    else {
        return Ok(None);
    };
    let epoch = raw
        .parse::<u32>()
        .map_err(|_| bad("epoch must be an integer in 0..=4294967295"))?;
    if !matches!(scope, Scope::Device(_)) {
        return Err(bad(
            "epoch (device-scoped sequence numbers) needs a device token",
        ));
    }
    Ok(Some(epoch))
}

/// The frame a connection of `grant` hears first: the resume frame if it declared an epoch
/// (`Ok(None)` if not); `Err(())` closes the connection (the mark could not be read). Both
/// engines call it.
pub(crate) async fn resume_of(
    core: &crate::shard::core::Core,
    grant: &Grant,
) -> Result<Option<String>, ()> {
    match (&grant.scope, grant.epoch) {
        (Scope::Device(id), Some(epoch)) => resume_frame(core, id, epoch).await.map(Some).ok_or(()),
        _ => Ok(None),
    }
}

/// The resume frame of a connection that declared `epoch`: the device's durable high-water mark
/// from the shard that owns it (`(epoch, 0)` for a device with none yet); `None` closes.
async fn resume_frame(core: &crate::shard::core::Core, id: &str, epoch: u32) -> Option<String> {
    let mark = core.durable_mark(id).await?;
    let (e, n) = mark.map_or((epoch, 0), |m| (m.epoch, m.seq));
    let mut text = String::new();
    proto::ack::write_resume(&mut text, e, n);
    Some(text)
}

/// Takes over a connection handed over by executor `from` (from the hand-off mesh).
pub fn adopt(edge: Rc<Edge>, from: ExecutorId, msg: Handoff) {
    use std::os::fd::IntoRawFd;
    ExecProbe::add(&edge.core.probe.received_from[from.0], 1);
    let slot = ConnSlot::take_over(&edge.core.shared);
    // SAFETY: the descriptor is a connected TCP socket whose ownership travels in `Handoff`.
    let stream = unsafe { rt::stream_from_fd(msg.fd.into_raw_fd()) };
    rt::spawn(serve(edge, stream, msg.leftover, msg.grant, slot));
}

/// Serves one upgraded ingest connection to its end.
async fn serve<S: Conn>(
    edge: Rc<Edge>,
    mut stream: S,
    leftover: Vec<u8>,
    grant: Grant,
    slot: ConnSlot,
) {
    let _slot = slot;
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        grant.accept_key
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let core = &edge.core;
    let cfg = &core.shared.cfg;
    let (stream, meter) = Metered::new(stream, leftover, &edge.partial_frames);
    // The bytes past the head go through the meter too (see `ws::read`).
    let ws = WebSocketStream::from_raw_socket(
        stream,
        Role::Server,
        Some(ws_config(cfg.frame_bytes_max)),
    )
    .await;
    let gate = meter.clone();
    let (sink, source) = ws::split(ws, meter);
    // Issue 18: a device that declared an epoch hears its mark first.
    let Ok(resume) = resume_of(core, &grant).await else {
        return;
    };
    let key = core.acks.open();
    let signal = core
        .acks
        .with(key, |c| c.signal.clone())
        .expect("just opened");
    // A client's Close waits until everything read before it is acked (see `write_frames`).
    gate.gate_close(signal.clone());
    let ctl = Rc::new(Ctl::default());
    let writer = rt::spawn_joinable(write_loop(
        edge.clone(),
        key,
        resume,
        sink,
        ctl.clone(),
        signal.clone(),
        gate,
    ));
    read_loop(&edge, key, source, &ctl, &signal, &grant).await;
    if ctl.close.get().is_none() {
        ctl.close.set(Some((CLOSE_NORMAL, "")));
    }
    signal.notify();
    let _ = writer.await;
    core.acks.close(key);
}

async fn read_loop<S: Conn>(
    edge: &Edge,
    key: ConnKey,
    source: Source<S>,
    ctl: &Ctl,
    writer: &rt::Signal,
    grant: &Grant,
) {
    let core = &edge.core;
    let Some(scope) = IngestScope::from_scope(&grant.scope) else {
        ctl.close
            .set(Some((close::POLICY, "token scope does not allow ingest")));
        return;
    };
    let dedupe = grant.epoch.map_or(Dedupe::Off, Dedupe::Seq);
    let mut seqs = proto::SeqTracker::new();
    let mut budget = proto::ErrorBudget::new(CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_WINDOW_MS);
    let mut forwards: Vec<(ShardId, Vec<(u64, Heartbeat)>)> = Vec::new();
    // At expiry (or revocation) the reader stops; the writer sends the acks of what was read,
    // then closes.
    let changed = auth::revocations_changed();
    let revoked = || auth::revoked_live(&core.shared, &grant.scope, &grant.issue, "ingest");
    let mut reader = WsReader::new(
        &core.stop,
        core.shared.cfg.ping_interval(),
        source,
        ctl,
        writer,
    )
    .end_at_expiry(grant.expires_at_s, TOKEN_EXPIRED)
    .end_if_revoked(&changed, &revoked, auth::TOKEN_REVOKED);
    loop {
        // Backpressure: stop reading while this connection has too much in flight.
        loop {
            let Some((frames, errors, signal)) = core.acks.with(key, |c: &mut ConnAcks| {
                (c.frames_in_flight(), c.errors.len(), c.signal.clone())
            }) else {
                return;
            };
            if ctl.writer_gone.get() {
                return;
            }
            if frames < CONN_FRAMES_IN_FLIGHT_MAX && errors < CONN_ERRORS_QUEUED_MAX {
                break;
            }
            signal.wait().await;
        }
        let Some(data) = reader.next().await else {
            return;
        };
        // Ownership: this node stopped writing the device's unit (another node claimed it):
        // close at once, unacked; the device reconnects and is redirected to the owner.
        if let Scope::Device(id) = &grant.scope {
            if crate::net::owner::route(&core.shared, id) != crate::net::owner::Route::Here {
                ctl.close.set(Some((
                    crate::net::owner::WS_CLOSE_TRY_AGAIN,
                    crate::net::owner::NOT_OWNER,
                )));
                return;
            }
        }
        let payload = match &data {
            Data::Text(t) => Payload::Text(t.as_str()),
            Data::Binary(b) => Payload::Binary(b),
        };
        match process_frame(
            edge,
            key,
            payload,
            scope,
            dedupe,
            &mut seqs,
            &mut budget,
            &mut forwards,
        ) {
            Step::Done => {}
            Step::Close(code, reason) => {
                ctl.close.set(Some((code, reason)));
                return;
            }
            Step::Forward(frame) => {
                for (shard, items) in forwards.drain(..) {
                    let batch = Batch {
                        conn: key,
                        frame,
                        items,
                        failed: Vec::new(),
                        dedupe,
                    };
                    // Waits for room in the owner's channel: a slow owner slows this reader.
                    if core.forward(shard, batch).await.is_err() {
                        tracing::error!(
                            owner = %core.owner(shard),
                            "data mesh closed; heartbeats not stored and not acked"
                        );
                    }
                }
            }
        }
    }
}

/// A frame's payload.
pub(crate) enum Payload<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// What the reader does after a frame was processed.
pub(crate) enum Step {
    /// Nothing more (everything was local, or rejected).
    Done,
    /// Close the connection.
    Close(u16, &'static str),
    /// Send the groups left in `forwards` to their owners, as parts of this frame.
    Forward(u64),
}

/// Decodes one frame with the executor's decoder, checks seqs and the error budget, queues error
/// frames, and appends every group owned by this executor. Groups owned elsewhere are left in
/// `forwards`. Synchronous: the decoder's borrow never spans an await. The connection engine
/// (`net::engine`) calls it too, so both engines judge frames alike.
// One more argument than clippy's default since issue 18's `dedupe` (kept a plain parameter so
// the hook stays small beside the other changes to this file).
#[allow(clippy::too_many_arguments)]
pub(crate) fn process_frame(
    edge: &Edge,
    key: ConnKey,
    payload: Payload<'_>,
    scope: IngestScope<'_>,
    dedupe: Dedupe,
    seqs: &mut proto::SeqTracker,
    budget: &mut proto::ErrorBudget,
    forwards: &mut Vec<(ShardId, Vec<(u64, Heartbeat)>)>,
) -> Step {
    let core = &edge.core;
    let cfg = &core.shared.cfg;
    let received = Instant::now();
    let probe = &core.probe;
    ExecProbe::add(&probe.frames_in, 1);
    ExecProbe::add(
        &probe.bytes_in,
        match payload {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        } as u64,
    );
    let mut ingest = Ingest::new(scope, rt::now_ms());
    ingest.heartbeats_max = cfg.frame_heartbeats_max;
    let mut decoder = edge.decoder.borrow_mut();
    let decoded = match payload {
        Payload::Text(t) => decoder.decode_text(t, &ingest),
        Payload::Binary(b) => decoder.decode_binary(b, &ingest),
    };
    let slots = match decoded {
        Ok(slots) => slots,
        Err(e) => {
            if let Some(code) = e.close_code() {
                return Step::Close(code, e.reason());
            }
            probe.reject(e.reason());
            core.acks.with(key, |c| {
                c.errors.push_back((None, e.reason()));
                c.signal.notify();
            });
            return match budget.charge(now_ms_u64()) {
                Ok(()) => Step::Done,
                Err(a) => Step::Close(a.close_code(), a.reason()),
            };
        }
    };
    // Seq order over the whole frame, accepted and rejected alike; rejections become error
    // frames; accepted heartbeats are grouped by owning shard.
    let router = &core.shared.router;
    let mut seq_max = 0u64;
    let mut first_shard = None;
    let mut one_shard = true;
    let mut abuse = None;
    let mut rejected = 0usize;
    let mut accepted = 0u64;
    core.acks.with(key, |c| {
        for slot in slots.iter() {
            if let Some(seq) = slot.seq() {
                if let Err(a) = seqs.check(seq) {
                    abuse = Some(a);
                    return;
                }
            }
            match slot.outcome() {
                Outcome::Accepted { seq, heartbeat } => {
                    seq_max = seq.0;
                    accepted += 1;
                    let shard = router.shard_of(&heartbeat.device_id);
                    match first_shard {
                        None => first_shard = Some(shard),
                        Some(f) if f != shard => one_shard = false,
                        Some(_) => {}
                    }
                }
                Outcome::Rejected { seq, reason } => {
                    rejected += 1;
                    probe.reject(reason.reason());
                    c.errors.push_back((seq.map(|s| s.0), reason.reason()));
                }
            }
        }
        if rejected > 0 {
            c.signal.notify();
        }
    });
    ExecProbe::add(&probe.accepted, accepted);
    if let Some(a) = abuse {
        return Step::Close(a.close_code(), a.reason());
    }
    for _ in 0..rejected {
        if let Err(a) = budget.charge(now_ms_u64()) {
            return Step::Close(a.close_code(), a.reason());
        }
    }
    let Some(first_shard) = first_shard else {
        return Step::Done;
    };
    let latency = &probe.ack_latency;
    if one_shard && core.owner(first_shard) == core.index {
        // The common case on a device connection that lives on its owner: append straight from
        // the decoder's slots, no copy.
        let frame = core.acks.frame_begin(key, seq_max, 1, received, latency);
        core.append_local(
            first_shard,
            key,
            frame,
            dedupe,
            slots.iter().filter_map(accepted_pair),
        );
        return Step::Done;
    }
    // Group by shard; local groups are appended at once, remote ones left for the caller.
    forwards.clear();
    for slot in slots.iter_mut() {
        let Some(seq) = slot.seq() else { continue };
        let Some(hb) = slot.accepted_mut() else {
            continue;
        };
        let shard = router.shard_of(&hb.device_id);
        let idx = match forwards.iter().position(|(s, _)| *s == shard) {
            Some(i) => i,
            None => {
                forwards.push((shard, core.take_batch_vec()));
                forwards.len() - 1
            }
        };
        forwards[idx].1.push((seq.0, std::mem::take(hb)));
    }
    drop(decoder);
    let frame = core
        .acks
        .frame_begin(key, seq_max, forwards.len() as u32, received, latency);
    let mut i = 0;
    while i < forwards.len() {
        if core.owner(forwards[i].0) == core.index {
            let (shard, items) = forwards.swap_remove(i);
            core.append_local(
                shard,
                key,
                frame,
                dedupe,
                items.iter().map(|(s, h)| (*s, h)),
            );
            core.recycle(items);
        } else {
            i += 1;
        }
    }
    if forwards.is_empty() {
        Step::Done
    } else {
        Step::Forward(frame)
    }
}

fn accepted_pair(slot: &proto::Slot) -> Option<(u64, &Heartbeat)> {
    match slot.outcome() {
        Outcome::Accepted { seq, heartbeat } => Some((seq.0, heartbeat)),
        Outcome::Rejected { .. } => None,
    }
}

fn now_ms_u64() -> u64 {
    rt::now_ms().max(0) as u64
}

/// Runs the writer, then tells the reader it is gone (whatever ended it).
async fn write_loop<S: Conn>(
    edge: Rc<Edge>,
    key: ConnKey,
    resume: Option<String>,
    sink: Sink<S>,
    ctl: Rc<Ctl>,
    signal: Rc<rt::Signal>,
    gate: Rc<ReadMeter>,
) {
    let res = write_frames(&edge, key, resume, sink, &ctl, &signal, &gate).await;
    // Never leave the reader behind a held Close.
    gate.release_close();
    if let Err(e) = res {
        tracing::debug!(error = %e, "a connection's writes stalled or failed; closing it");
    }
    ctl.writer_ended(&signal);
}

/// Writes error frames, coalesced acks, pings and the close frame. Every write must finish within
/// the idle timeout: a client that stops reading (or vanished without FIN) would otherwise hold
/// the connection, its slot and its buffers forever.
async fn write_frames<S: Conn>(
    edge: &Edge,
    key: ConnKey,
    resume: Option<String>,
    sink: Sink<S>,
    ctl: &Ctl,
    signal: &rt::Signal,
    gate: &ReadMeter,
) -> Result<(), WriteError> {
    let core = &edge.core;
    let mut out = WsWriter::new(sink, core.shared.cfg.idle_timeout);
    if let Some(text) = resume {
        out.feed(Message::text(text)).await?;
        out.flush().await?;
    }
    let mut acked = 0u64;
    let mut text = String::with_capacity(64);
    loop {
        let Some((errors, ack_ready, in_flight)) = core.acks.with(key, |c| {
            let errors: Vec<_> = c.errors.drain(..).collect();
            if !errors.is_empty() {
                // Draining the queue makes room: wake the reader if it paused on a full error
                // queue (nothing else would: with every frame settled, no completion is left
                // to wake it, and the connection would never be read again).
                c.signal.notify();
            }
            (errors, c.ack_ready, c.frames_in_flight())
        }) else {
            return Ok(());
        };
        // Taken with `in_flight`: a Close held after this snapshot may follow frames it does not
        // count yet (the wake below brings the loop back for it).
        let close_held = gate.close_held();
        // Created after the snapshot above (nothing runs in between), so it misses no change
        // made while the writes below wait, and is not woken by the notify above.
        let wait = signal.wait();
        let mut wrote = false;
        for (seq, reason) in errors {
            proto::ack::write_error(&mut text, seq.map(proto::Seq), reason);
            out.feed(Message::text(text.as_str())).await?;
            wrote = true;
        }
        if ack_ready > acked {
            proto::ack::write_ack(&mut text, proto::Seq(ack_ready));
            out.feed(Message::text(text.as_str())).await?;
            acked = ack_ready;
            wrote = true;
        }
        if ctl.ping.replace(false) {
            out.feed(Message::Ping(Default::default())).await?;
            wrote = true;
        }
        if wrote {
            out.flush().await?;
        }
        if close_held && in_flight == 0 {
            // The client closed after its last heartbeat: all of them are acked (above) now, so
            // its Close may reach tungstenite, which answers it; the reader then ends normally.
            gate.release_close();
        }
        if let Some((code, reason)) = ctl.close.get() {
            // A graceful close (shutdown, idle, client close, token expiry) first waits until
            // everything received is durable and acked (the ack above covered every completed
            // frame); abuse and protocol errors close at once.
            let graceful = code == close::GOING_AWAY
                || code == CLOSE_NORMAL
                || (code, reason) == (close::POLICY, TOKEN_EXPIRED)
                || (code, reason) == (close::POLICY, auth::TOKEN_REVOKED);
            if !graceful || in_flight == 0 {
                out.close(code, reason).await;
                return Ok(());
            }
        }
        wait.await;
    }
}
