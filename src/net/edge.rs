//! [`Edge`]: one executor's network edge (its shard core plus what only connections need: the
//! frame decoder, the partial-frame account, the hand-off mesh), the [`Kind`] trait connection
//! kinds implement, and [`Handoff`], the one message that moves a socket between executors. It
//! owns no connection logic.
//!
//! Invariant: a device socket is handed over at most once, and its connection slot travels with
//! it (released by whichever executor ends up holding it).

use std::cell::RefCell;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use crate::auth::Scope;
use crate::http::parse::Request;
use crate::metrics::ExecProbe;
use crate::net::auth::Refusal;
use crate::net::slots::ConnSlot;
use crate::net::tls::Conn;
use crate::net::ws::read::PartialFrames;
use crate::node::ExecutorId;
use crate::rt;
use crate::shard::core::{Core, MeshClosed};

/// One executor's network edge: its shard core plus what only connections need.
pub struct Edge {
    /// The shard core (stores, acks, meshes, fan-out, stop).
    pub core: Rc<Core>,
    /// The executor's frame decoder (decoding is synchronous; its slots are consumed before any
    /// await).
    pub decoder: RefCell<crate::proto::Decoder>,
    /// Bytes of partial WebSocket frames held by this executor's connections (bounded).
    pub partial_frames: Rc<PartialFrames>,
    /// Senders of the hand-off mesh.
    handoff: rt::mesh::Senders<Handoff>,
}

impl Edge {
    /// The edge of `core`'s executor, with its hand-off mesh senders.
    pub fn new(core: Rc<Core>, handoff: rt::mesh::Senders<Handoff>) -> Edge {
        Edge {
            core,
            decoder: RefCell::new(crate::proto::Decoder::new()),
            partial_frames: PartialFrames::new(),
            handoff,
        }
    }

    /// Hands a device connection to executor `to` (waiting for room: backpressure).
    pub async fn hand_off(&self, to: ExecutorId, msg: Handoff) -> Result<(), MeshClosed> {
        ExecProbe::add(&self.core.probe.sent_to[to.0], 1);
        self.handoff
            .send_to(to.0, msg)
            .await
            .map_err(|_| MeshClosed)
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Devices and the HTTP API (and `/metrics` unless it has its own listener).
    Main,
    /// Only `/metrics` (`--metrics-listen`).
    Metrics,
    /// Only the OsmAnd protocol, at any path (`--osmand-listen`), for apps whose server URL is
    /// just `http://host:port`.
    Osmand,
}

/// A device connection handed to the executor that owns its device's shard, so its heartbeats
/// never cross cores again.
pub struct Handoff {
    /// The socket (a duplicate of the accepting executor's descriptor).
    pub fd: OwnedFd,
    /// Bytes already read past the HTTP request head.
    pub leftover: Vec<u8>,
    /// The verified WebSocket upgrade request.
    pub grant: DeviceGrant,
}

/// A verified WebSocket upgrade of `/v1/ingest` (the ingest kind's grant; defined here because
/// it travels in a [`Handoff`]).
#[derive(Debug, Clone)]
pub struct DeviceGrant {
    /// `Sec-WebSocket-Accept` value for the 101 response.
    pub accept_key: String,
    /// What the connection's token allows.
    pub scope: Scope,
    /// When the token expires (Unix seconds): the connection is closed then.
    pub expires_at_s: u64,
    /// When the token was issued and its id (revocation checks, log lines).
    pub issue: crate::auth::Issue,
    /// The device-sequence epoch the device declared (`?epoch=E`, issue 18): its frame `seq`s
    /// are then device-scoped and deduplicated. `None`: per-connection seqs (at least once).
    pub epoch: Option<u32>,
}

/// A connection kind reached by a WebSocket upgrade: how its request is admitted and how the
/// connection is served. The router calls [`Kind::admit`] with the request head (nothing has
/// been answered yet), answers a refusal itself, and otherwise frees the head and calls
/// [`Kind::serve`].
pub trait Kind {
    /// What an admitted request grants the connection (its token's scope, accept key, ...).
    type Grant;

    /// Checks the upgrade headers, the token and any cap of the kind.
    fn admit(edge: &Edge, req: &Request<'_>) -> Result<Self::Grant, Refusal>;

    /// Serves the connection to its end; `leftover` are the bytes read past the head. `stream`
    /// is a TCP socket or a TLS session (monomorphised: the plain path pays nothing for TLS).
    fn serve<S: Conn>(
        edge: Rc<Edge>,
        stream: S,
        leftover: Vec<u8>,
        grant: Self::Grant,
        slot: ConnSlot,
    ) -> impl Future<Output = ()>;
}

/// Writes a complete HTTP/1.1 response with a JSON (or given) body.
pub async fn write_response<S: Conn>(
    stream: &mut S,
    status: u16,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    write_response_typed(stream, status, "application/json", body, close).await
}

/// Writes a complete HTTP/1.1 response with the given content type.
pub async fn write_response_typed<S: Conn>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    // Head and body in one buffer, one write: a client that reads the head (e.g. a refused
    // WebSocket upgrade) finds the body with it, and small answers cost one send.
    let response = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{}{}\r\n{body}",
        crate::http::parse::status_text(status),
        body.len(),
        if close { "connection: close\r\n" } else { "" },
        // RFC 6455 4.4: say which WebSocket version we speak.
        if status == 426 { "sec-websocket-version: 13\r\n" } else { "" }
    );
    futures_lite::AsyncWriteExt::write_all(stream, response.as_bytes()).await?;
    futures_lite::AsyncWriteExt::flush(stream).await
}
