//! MQTT 3.1.1 / 5 device ingest (`--mqtt-listen`, docs/MQTT.md): the accept loop of the MQTT
//! listener, the `/mqtt` WebSocket connection kind ([`MqttWsKind`], MQTT over WebSocket on the
//! main listener), and one connection from CONNECT to close over either byte stream. It owns
//! the socket side: reading packets under the packet-size bound and the keep-alive deadline
//! (1.5 × the keep alive), decoding PUBLISH payloads (`geobeat/<id>`: the WebSocket JSON
//! heartbeat without `seq`, or an array; `owntracks/<user>/<device>`: OwnTracks JSON), storing
//! them like a WebSocket frame (grouped by owning shard, appended here or forwarded over the
//! mesh, settled through the executor's [`crate::shard::acks::AckLedger`]), writing what the
//! protocol state ([`crate::proto::mqtt::session`]) answers, and the take-over of a client id.
//! It does not define the wire format or the acknowledgement rules (`proto::mqtt`), nor spawn
//! anything but its connections and their writers. An MQTT connection stays on the executor
//! that accepted it (like `--routing forward`; handing the socket to its device's owner, as
//! `/v1/ingest` does, is future work).

//! Each PUBLISH is one ledger frame whose sequence number is the PUBLISH's own (every heartbeat
//! in it carries that number), so the ledger's "highest seq of the durable prefix" is exactly
//! "every PUBLISH up to here is durable" and a storage refusal names its PUBLISH.
//!
//! Invariants: a PUBACK / PUBREC with success is written only after the ledger settled the
//! PUBLISH (durable in strict mode) with no refusal; the reader stops reading (backpressure)
//! while [`MQTT_INFLIGHT_MAX`] PUBLISHes or [`CONN_FRAMES_IN_FLIGHT_MAX`] frames wait for the
//! store (never because of QoS 2 PUBLISHes waiting for a PUBREL: the PUBREL must be read); a
//! client id keeps one live connection in the process: a new CONNECT takes the old connection
//! over (MQTT §3.1.4; ended as soon as the look-up returns), on whichever executor it lives
//! (each id has a home executor, the owner of the shard it routes to, whose directory names
//! the id's connection; the control mesh carries the look-up and the take-over); on shutdown the connection stops reading, waits for what it received to become
//! durable and acknowledged, then closes (MQTT 5: DISCONNECT 0x8B).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::WebSocketStream;
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::http::parse::{self, Request};
use crate::limits::{
    CONN_FRAMES_IN_FLIGHT_MAX, DRAIN_BYTES_MAX, MQTT_IDLE_READ_BYTES, MQTT_INFLIGHT_MAX,
    MQTT_KEEP_ALIVE_GRACE_PERMILLE, MQTT_PACKET_BYTES_MAX, MQTT_READ_CHUNK_BYTES,
    REFUSALS_IN_FLIGHT_MAX, REFUSAL_READ_MAX, REPEAT_LOG_INTERVAL_MS, TOKEN_EXPIRY_WAIT_MAX,
    WS_READ_BUFFER_BYTES, WS_WRITE_BUFFER_BYTES_MAX,
};
use crate::metrics::ExecProbe;
use crate::net::auth::Refusal;
use crate::net::edge::{Edge, Kind};
use crate::net::slots::ConnSlot;
use crate::net::tls::{Acceptor, ClientCert};
use crate::net::ws::ByteStream;
use crate::proto::devices::owntracks;
use crate::proto::mqtt::codec::{self, CodecError, Packet, Version};
use crate::proto::mqtt::session::{
    self, reason, Admitted, ConnectRefusal, Publish, Refused, Session, Settled, Topic,
};
use crate::proto::{self, Ingest, IngestScope, Outcome, Reject, TsWindow};
use crate::ratelog::LogEvery;
use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::rt::{self, Signal, TcpListener};
use crate::shard::acks::ConnKey;
use crate::shard::mesh::Batch;
use crate::store::Dedupe;

/// The byte stream an MQTT connection runs over: a TCP socket, or a WebSocket carrying MQTT
/// (`/mqtt` on the main listener, [`crate::net::ws::ByteStream`]).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + 'static> Stream for S {}

/// Accepts MQTT connections until shutdown. Every socket counts against `--connections-max`
/// like any other; over the cap a CONNECT is answered "server unavailable" (and beyond the
/// refusals in flight, the socket is closed at once).
pub async fn accept_loop(edge: Rc<Edge>, listener: TcpListener) {
    accept_each(edge, listener, None).await
}

/// Accepts MQTT over TLS (`--mqtts-listen`) until shutdown: the same caps as the plain listener,
/// then the executor's handshake rate bound (over it, the socket is closed unread and counted),
/// then the handshake under its timeout; with `--tls-client-ca`, the CONNECT's token must belong
/// to the device (or gateway prefix) the client certificate names.
pub async fn accept_loop_tls(edge: Rc<Edge>, listener: TcpListener, tls: Rc<Acceptor>) {
    accept_each(edge, listener, Some(tls)).await
}

async fn accept_each(edge: Rc<Edge>, listener: TcpListener, tls: Option<Rc<Acceptor>>) {
    let core = &edge.core;
    let max = core.shared.cfg.connections_max;
    let accept_log = LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            core.stop.wait().await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                let e = std::io::Error::from(e);
                if let Some(suppressed) = accept_log.check() {
                    tracing::warn!(error = %e, suppressed_since_last = suppressed, "MQTT accept failed; backing off");
                }
                rt::sleep(crate::limits::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if core.stopping() {
            return;
        }
        let (slot, open) = ConnSlot::open(&core.shared);
        if open > max + REFUSALS_IN_FLIGHT_MAX {
            continue; // a flood: close at once
        }
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let Some(tls) = &tls else {
            rt::spawn(serve(
                edge.clone(),
                stream,
                Vec::new(),
                peer,
                slot,
                open > max,
                ClientCert::Unchecked,
            ));
            continue;
        };
        if !tls.admit() {
            core.probe.tls_event("rate_refused", 1);
            continue;
        }
        let (edge, tls) = (edge.clone(), tls.clone());
        rt::spawn(async move {
            match tls.handshake(stream).await {
                Ok(s) => {
                    edge.core.probe.tls_event("handshake", 1);
                    let cert = ClientCert::of(&s, tls.mtls());
                    // A task of its own: this one is sized for the handshake's state, which a
                    // long-lived idle connection would otherwise keep allocated.
                    rt::spawn(serve(edge, s, Vec::new(), peer, slot, open > max, cert));
                }
                Err(why) => edge.core.probe.tls_event(why, 1),
            }
        });
    }
}

/// MQTT over WebSocket: `GET /mqtt` with `Sec-WebSocket-Protocol: mqtt` on the main listener
/// (for clients that can only reach HTTP ports). The token still travels in the CONNECT; the
/// upgrade itself needs none. Served while `--mqtt-listen` is on.
pub struct MqttWsKind;

impl Kind for MqttWsKind {
    /// The `Sec-WebSocket-Accept` value.
    type Grant = String;

    fn admit(edge: &Edge, req: &Request<'_>) -> Result<String, Refusal> {
        let refuse = |status: u16, message: &str| {
            let (status, body) = parse::json_error(status, message, None);
            Refusal { status, body }
        };
        if edge.core.shared.cfg.mqtt_listen.is_none() {
            return Err(refuse(404, "MQTT is off (--mqtt-listen off)"));
        }
        let accept =
            parse::websocket_accept(req).map_err(|e| refuse(e.status(), &e.to_string()))?;
        if !req.sec_websocket_protocol_mqtt {
            return Err(refuse(
                400,
                "MQTT over WebSocket needs Sec-WebSocket-Protocol: mqtt",
            ));
        }
        Ok(accept)
    }

    async fn serve<C: crate::net::tls::Conn>(
        edge: Rc<Edge>,
        mut stream: C,
        leftover: Vec<u8>,
        accept: String,
        slot: ConnSlot,
    ) {
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\nsec-websocket-protocol: mqtt\r\n\r\n"
        );
        let written = rt::timeout(
            edge.core.shared.cfg.handshake_timeout,
            stream.write_all(response.as_bytes()),
        )
        .await;
        if !matches!(written, Some(Ok(()))) {
            return;
        }
        let cert = ClientCert::of(&stream, edge.core.shared.cfg.tls_client_ca.is_some());
        let peer = stream.peer();
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = WS_READ_BUFFER_BYTES;
        config.write_buffer_size = 0;
        config.max_write_buffer_size = WS_WRITE_BUFFER_BYTES_MAX;
        // One message never needs to be larger than one packet.
        config.max_message_size = Some(MQTT_PACKET_BYTES_MAX);
        config.max_frame_size = Some(MQTT_PACKET_BYTES_MAX);
        let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config))
            .await;
        // The router already counted the socket against the cap; the client certificate (MQTT
        // over wss on `--tls-listen`) binds the CONNECT's token like on `--mqtts-listen`.
        serve(
            edge,
            ByteStream::new(ws),
            Vec::new(),
            peer,
            slot,
            false,
            cert,
        )
        .await;
    }
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Close {
    /// MQTT 5 DISCONNECT reason code to send first (`None`: send nothing).
    code: Option<u8>,
    /// Reason string / log text.
    why: &'static str,
    /// Wait until everything received is settled and acknowledged first (shutdown, token
    /// expiry); otherwise close at once.
    drain: bool,
}

/// The client ended the connection (DISCONNECT, end of stream, a broken socket).
const CLIENT_CLOSED: Close = Close {
    code: None,
    why: "client closed",
    drain: false,
};

/// What the reader and the writer of one connection share.
struct Conn {
    /// The acknowledgement state.
    session: RefCell<Session>,
    /// Answers the reader queued (PINGRESP, PUBCOMP, SUBACK, a duplicate's PUBREC).
    out: RefCell<Vec<u8>>,
    /// Set once the connection is to end.
    close: Cell<Option<Close>>,
    /// The writer ended (the reader stops).
    writer_gone: Cell<bool>,
    /// Wakes the writer and a paused reader (the ledger's signal of this connection).
    signal: Rc<Signal>,
    /// The token's claims (revocation checks).
    claims: crate::auth::Claims,
    /// The device-sequence epoch the CONNECT declared (issue 18), if any.
    epoch: Option<u32>,
    /// Ownership: the node that writes this device's unit now, once it moved away (the MQTT 5
    /// DISCONNECT 0x9C names it as Server Reference).
    server_reference: RefCell<Option<String>>,
}

impl Conn {
    /// Ends the connection (the first reason wins) and wakes both halves.
    fn end(&self, close: Close) {
        if self.close.get().is_none() {
            self.close.set(Some(close));
        }
        self.signal.notify();
    }
}

thread_local! {
    /// This executor's live MQTT connections by connection number (for take-over).
    static LIVE: RefCell<HashMap<u64, Rc<Conn>>> = RefCell::new(HashMap::new());
    /// The client-id directory of the ids homed on this executor: where each one's live
    /// connection is (executor, connection number).
    static DIRECTORY: RefCell<HashMap<String, (usize, u64)>> = RefCell::new(HashMap::new());
    /// Numbers connections of this executor (with the executor index: unique in the process).
    static NEXT_CONN: Cell<u64> = const { Cell::new(1) };
    /// Rate limit of the "connect refused" info line.
    static REFUSED_LOG: LogEvery =
        const { LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS)) };
}

/// On a client id's home executor: records its new connection `at`, returning the previous one.
fn directory_register(client: String, at: (usize, u64)) -> Option<(usize, u64)> {
    DIRECTORY.with(|d| d.borrow_mut().insert(client, at))
}

/// On a client id's home executor: forgets connection `at` if it is still the id's current one.
fn directory_unregister(client: &str, at: (usize, u64)) {
    DIRECTORY.with(|d| {
        let mut d = d.borrow_mut();
        if d.get(client) == Some(&at) {
            d.remove(client);
        }
    });
}

/// On the executor holding connection `number`: ends it, taken over (false if it is gone).
fn take_over_local(number: u64) -> bool {
    let conn = LIVE.with(|l| l.borrow().get(&number).cloned());
    match conn {
        Some(c) => {
            c.end(Close {
                code: Some(reason::TAKEN_OVER),
                why: "session taken over",
                drain: false,
            });
            true
        }
        None => false,
    }
}

/// On this executor: ends every live connection whose token the revocation list now refuses
/// (`net::revoke`'s watch calls it when the list changed).
pub fn end_revoked(shared: &crate::node::Shared) {
    LIVE.with(|l| {
        for c in l.borrow().values() {
            end_if_revoked(shared, c);
        }
    });
}

/// Ends `conn` if its token is revoked: like a token expiry, what was received is acknowledged
/// first; then MQTT 5 gets DISCONNECT 0x8C `token_revoked`, 3.1.1 a close.
fn end_if_revoked(shared: &crate::node::Shared, conn: &Conn) {
    let (scope, issue) = (&conn.claims.scope, &conn.claims.issue);
    if crate::net::auth::revoked_live(shared, scope, issue, "mqtt") {
        conn.end(Close {
            code: Some(reason::BAD_AUTH_METHOD),
            why: crate::net::auth::TOKEN_REVOKED,
            drain: true,
        });
    }
}

/// The executor keeping `client`'s directory entry: the owner of the shard the id routes to
/// (any fixed function of the id would do; this one needs no new state).
fn home_of(core: &crate::shard::core::Core, client: &str) -> crate::node::ExecutorId {
    core.owner(core.shared.router.shard_of(client))
}

/// Serves one accepted socket: reads the CONNECT, admits it (or answers the refusal), then runs
/// the connection to its end. `busy`: over the connection cap, refuse the CONNECT. `cert`: the
/// client certificate the token's device must match (mTLS, see [`crate::net::tls`]).
async fn serve<S: Stream>(
    edge: Rc<Edge>,
    mut stream: S,
    leftover: Vec<u8>,
    peer: Option<SocketAddr>,
    slot: ConnSlot,
    busy: bool,
    cert: ClientCert,
) {
    let _slot = slot;
    let core = &edge.core;
    let cfg = &core.shared.cfg;
    let probe = &core.probe;
    let mut buf = leftover;
    let deadline = Instant::now() + cfg.handshake_timeout;
    let number = NEXT_CONN.with(|c| {
        let n = c.get();
        c.set(n + 1);
        n
    });
    // The first packet must be a CONNECT, within the handshake timeout.
    let (admitted, used) = loop {
        match codec::decode(&buf, None, MQTT_PACKET_BYTES_MAX) {
            Ok(Some((Packet::Connect(c), used))) => {
                let verdict = if busy || core.stopping() {
                    Err(ConnectRefusal {
                        version: c.version,
                        code: match c.version {
                            Version::V311 => session::return_code::SERVER_UNAVAILABLE,
                            Version::V5 => reason::SERVER_BUSY,
                        },
                        reason: "server_busy",
                    })
                } else {
                    session::admit(
                        &c,
                        &core.shared.secret,
                        rt::now_s(),
                        cfg.idle_timeout.as_secs(),
                        || format!("geobeat-{}-{number}", core.index.0),
                    )
                    .and_then(|a| crate::net::auth::admit_mqtt(&core.shared, a))
                    .and_then(|a| match cert.check(&a.claims.scope) {
                        Ok(()) => Ok(a),
                        Err(e) => Err(ConnectRefusal {
                            version: c.version,
                            code: match c.version {
                                Version::V311 => session::return_code::NOT_AUTHORIZED,
                                Version::V5 => reason::NOT_AUTHORIZED,
                            },
                            reason: match e {
                                crate::net::tls::IdentityError::Missing => "client_cert_missing",
                                crate::net::tls::IdentityError::Mismatch => "client_cert_mismatch",
                            },
                        }),
                    })
                };
                match verdict {
                    Ok(a) => break (a, used),
                    Err(r) => {
                        probe.mqtt_event("connect_refused", 1);
                        log_refused(peer, r.reason);
                        let mut out = Vec::new();
                        session::connack_refused(&r, &mut out);
                        finish(&mut stream, &out).await;
                        return;
                    }
                }
            }
            Ok(Some(_)) => {
                // MQTT §3.1: the first packet must be CONNECT; anything else closes.
                probe.mqtt_event("protocol_error", 1);
                return;
            }
            Err(CodecError::BadLevel { .. }) => {
                // An unsupported protocol level: CONNACK 0x01 in the 3.1.1 layout (§3.1.2.2).
                probe.mqtt_event("connect_refused", 1);
                let r = ConnectRefusal {
                    version: Version::V311,
                    code: session::return_code::BAD_VERSION,
                    reason: "unsupported_version",
                };
                let mut out = Vec::new();
                session::connack_refused(&r, &mut out);
                finish(&mut stream, &out).await;
                return;
            }
            Err(_) => {
                probe.mqtt_event("protocol_error", 1);
                return;
            }
            Ok(None) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let len = buf.len();
        buf.resize(len + MQTT_IDLE_READ_BYTES, 0);
        match rt::timeout(left, stream.read(&mut buf[len..])).await {
            Some(Ok(n)) if n > 0 => buf.truncate(len + n),
            _ => return,
        }
    };
    buf.drain(..used);
    // Ownership: a device whose unit another node writes is sent there (net::owner).
    if let crate::auth::Scope::Device(id) = &admitted.claims.scope {
        let route = crate::net::owner::route(&core.shared, id);
        if let Some(out) = crate::net::owner::mqtt_connack(&route, admitted.version) {
            probe.mqtt_event("connect_redirected", 1);
            finish(&mut stream, &out).await;
            return;
        }
    }
    // Issue 18: a device that declared an epoch learns its durable mark in the CONNACK.
    let resume = match (&admitted.claims.scope, admitted.epoch) {
        (crate::auth::Scope::Device(id), Some(epoch)) => {
            let Some(mark) = core.durable_mark(id).await else {
                return;
            };
            Some(mark.map_or((epoch, 0), |m| (m.epoch, m.seq)))
        }
        _ => None,
    };
    let mut connack = Vec::new();
    session::connack_accepted(&admitted, resume, &mut connack);
    run(edge.clone(), stream, buf, admitted, connack, number).await;
}

/// Writes `out` (a refusal), shuts our side down and reads what the client still sends for a
/// moment: closing with unread input makes the kernel send a reset that can destroy the answer.
async fn finish<S: Stream>(stream: &mut S, out: &[u8]) {
    let _ = rt::timeout(REFUSAL_READ_MAX, stream.write_all(out)).await;
    // Shuts our side down (TCP: FIN; WebSocket: the close frame).
    let _ = rt::timeout(REFUSAL_READ_MAX, stream.close()).await;
    // On the heap: this future's state must not carry the buffer while the connection lives.
    let mut sink = vec![0u8; 2048];
    let mut left = DRAIN_BYTES_MAX;
    let drain = async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    };
    let _ = rt::timeout(REFUSAL_READ_MAX, drain).await;
}

/// Logs a refused CONNECT at info, one line per interval per executor (never the token).
fn log_refused(peer: Option<SocketAddr>, why: &'static str) {
    REFUSED_LOG.with(|every| {
        if let Some(suppressed) = every.check() {
            let peer = peer.map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(
                peer,
                reason = why,
                suppressed_since_last = suppressed,
                "MQTT connect refused"
            );
        }
    });
}

/// Runs an admitted connection: registers it (taking over a live one with the same client id),
/// sends its CONNACK, runs the reader here and the writer in a task of its own, and unregisters
/// it. The CONNACK goes out only once the connection is registered: a client holding it is
/// findable, so a later connection with its id always takes it over (never the other way round,
/// which happened when the CONNACK went first and the two registrations crossed executors).
async fn run<S: Stream>(
    edge: Rc<Edge>,
    mut stream: S,
    leftover: Vec<u8>,
    admitted: Admitted,
    connack: Vec<u8>,
    number: u64,
) {
    let core = &edge.core;
    let probe = &core.probe;
    let key = core.acks.open();
    let signal = core
        .acks
        .with(key, |c| c.signal.clone())
        .expect("just opened");
    let conn = Rc::new(Conn {
        session: RefCell::new(Session::new(admitted.version)),
        out: RefCell::new(Vec::new()),
        close: Cell::new(None),
        writer_gone: Cell::new(false),
        signal: signal.clone(),
        claims: admitted.claims.clone(),
        epoch: admitted.epoch,
        server_reference: RefCell::new(None),
    });
    LIVE.with(|l| l.borrow_mut().insert(number, conn.clone()));
    // A revocation that arrived since the CONNECT was admitted.
    end_if_revoked(&core.shared, &conn);
    // MQTT §3.1.4: a new connection with a client id takes over the live one, wherever the
    // kernel put it: the id's home executor knows where that is.
    let me = (core.index.0, number);
    let home = home_of(core, &admitted.client_id);
    let client = admitted.client_id.clone();
    let previous = core
        .run_on(home, move |_| directory_register(client, me))
        .await
        .flatten();
    if let Some((exec, old)) = previous.filter(|p| *p != me) {
        let ended = core
            .run_on(crate::node::ExecutorId(exec), move |_| take_over_local(old))
            .await;
        if ended == Some(true) {
            probe.mqtt_event("takeover", 1);
        }
    }
    let write = rt::timeout(core.shared.cfg.idle_timeout, stream.write_all(&connack)).await;
    drop(connack);
    if matches!(write, Some(Ok(()))) {
        probe.mqtt_event("connect", 1);
        serve_registered(&edge, key, &conn, stream, leftover, &admitted).await;
    }
    core.acks.close(key);
    LIVE.with(|l| l.borrow_mut().remove(&number));
    let client = admitted.client_id.clone();
    let _ = core
        .run_on(home, move |_| directory_unregister(&client, me))
        .await;
}

/// Serves a registered connection whose CONNACK is out: the reader here, the writer in a task
/// of its own, until it ends.
async fn serve_registered<S: Stream>(
    edge: &Rc<Edge>,
    key: ConnKey,
    conn: &Rc<Conn>,
    stream: S,
    leftover: Vec<u8>,
    admitted: &Admitted,
) {
    let core = &edge.core;
    let probe = &core.probe;
    gauge_open(probe, 1);
    let (mut reader, writer) = futures_lite::io::split(stream);
    let writer = rt::spawn_joinable(write_loop(edge.clone(), key, conn.clone(), writer));
    read_loop(edge, key, conn, &mut reader, leftover, admitted).await;
    conn.end(CLIENT_CLOSED);
    let _ = writer.await;
    if conn.close.get() != Some(CLIENT_CLOSED) {
        // The server ended it (our side is shut down by now): read and drop what the client
        // still sends for a moment, since closing with unread input makes the kernel send a
        // reset that can destroy the last acknowledgements and the DISCONNECT.
        // On the heap: this future's state must not carry the buffer while the connection lives.
        let mut sink = vec![0u8; 2048];
        let mut left = DRAIN_BYTES_MAX;
        let drain = async {
            while left > 0 {
                match reader.read(&mut sink).await {
                    Ok(n) if n > 0 => left = left.saturating_sub(n),
                    _ => break,
                }
            }
        };
        let _ = rt::timeout(REFUSAL_READ_MAX, drain).await;
    }
    gauge_open(probe, -1);
}

/// Moves the MQTT connection gauge by `delta`.
fn gauge_open(probe: &ExecProbe, delta: i64) {
    let c = &probe.mqtt_connections_open;
    c.set(c.get().saturating_add_signed(delta));
}

/// What the reader waits for besides bytes.
enum Wake {
    /// Bytes (or EOF / an error: `Ok(0)` / `Err`).
    Read(std::io::Result<usize>),
    /// The keep-alive or token deadline passed.
    Deadline,
    /// The executor is stopping.
    Stop,
    /// The connection's signal fired (writer gone, taken over).
    Signal,
}

/// Reads and handles packets until the connection is to end (then `conn.close` says how).
async fn read_loop<S: Stream>(
    edge: &Edge,
    key: ConnKey,
    conn: &Conn,
    reader: &mut ReadHalf<S>,
    mut buf: Vec<u8>,
    admitted: &Admitted,
) {
    let core = &edge.core;
    let probe = &core.probe;
    let version = admitted.version;
    let Some(scope) = IngestScope::from_scope(&admitted.claims.scope) else {
        unreachable!("admit refuses scopes that may not ingest");
    };
    // MQTT §3.1.2.10: no packet for 1.5 times the keep alive closes the connection.
    let keep_alive =
        Duration::from_millis(u64::from(admitted.keep_alive_s) * MQTT_KEEP_ALIVE_GRACE_PERMILLE);
    // The token's expiry ends the connection (far-future expiries never arm a timer).
    let expires_in = Duration::from_secs(admitted.claims.expires_at_s.saturating_sub(rt::now_s()))
        .min(TOKEN_EXPIRY_WAIT_MAX);
    let expires_at = Instant::now() + expires_in;
    let mut last_packet = Instant::now();
    let mut forwards: Vec<(ShardId, Vec<(u64, Heartbeat)>)> = Vec::new();
    let mut scratch = Heartbeat::default();
    loop {
        if conn.close.get().is_some() || conn.writer_gone.get() {
            return;
        }
        // Backpressure: stop reading while too much is unsettled.
        let wait = conn.signal.wait();
        let Some(frames) = core.acks.with(key, |c| c.frames_in_flight()) else {
            return;
        };
        if frames >= CONN_FRAMES_IN_FLIGHT_MAX
            || conn.session.borrow().unsettled() >= MQTT_INFLIGHT_MAX
        {
            futures_lite::future::or(wait, async {
                core.stop.wait().await;
            })
            .await;
            if core.stopping() {
                conn.end(shutting_down());
                return;
            }
            // The server stopped reading, not the client: the keep-alive clock restarts.
            last_packet = Instant::now();
            continue;
        }
        drop(wait);
        let step = match codec::decode(&buf, Some(version), MQTT_PACKET_BYTES_MAX) {
            Err(e) => {
                probe.mqtt_event("protocol_error", 1);
                let code = match e {
                    CodecError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
                    _ => reason::MALFORMED,
                };
                tracing::debug!(error = %e, "MQTT packet refused; closing");
                conn.end(Close {
                    code: Some(code),
                    why: if code == reason::PACKET_TOO_LARGE {
                        "packet too large"
                    } else {
                        "malformed packet"
                    },
                    drain: false,
                });
                return;
            }
            Ok(Some((packet, used))) => {
                last_packet = Instant::now();
                let step = handle(edge, key, conn, scope, &packet, &mut forwards, &mut scratch);
                buf.drain(..used);
                if buf.is_empty() && buf.capacity() > MQTT_READ_CHUNK_BYTES {
                    // After a large packet: an idle connection keeps a small buffer.
                    buf.shrink_to(MQTT_IDLE_READ_BYTES);
                }
                step
            }
            Ok(None) => {
                let deadline = (last_packet + keep_alive).min(expires_at);
                let left = deadline.saturating_duration_since(Instant::now());
                // Read straight into the buffer: a small read while idle (a heartbeat PUBLISH
                // is ~100 bytes), a full chunk inside a larger packet.
                let len = buf.len();
                let want = if len == 0 {
                    MQTT_IDLE_READ_BYTES
                } else {
                    MQTT_READ_CHUNK_BYTES
                };
                buf.resize(len + want, 0);
                let signal = conn.signal.wait();
                let wake = futures_lite::future::or(
                    async { Wake::Read(reader.read(&mut buf[len..]).await) },
                    futures_lite::future::or(
                        async {
                            rt::sleep(left).await;
                            Wake::Deadline
                        },
                        futures_lite::future::or(
                            async {
                                core.stop.wait().await;
                                Wake::Stop
                            },
                            async {
                                signal.await;
                                Wake::Signal
                            },
                        ),
                    ),
                )
                .await;
                if !matches!(wake, Wake::Read(Ok(n)) if n > 0) {
                    buf.truncate(len);
                }
                match wake {
                    Wake::Read(Ok(n)) if n > 0 => {
                        buf.truncate(len + n);
                        continue;
                    }
                    // EOF or a reset: the client is gone (what it sent is still stored).
                    Wake::Read(_) => return,
                    Wake::Deadline if Instant::now() >= expires_at => {
                        conn.end(Close {
                            code: Some(reason::NOT_AUTHORIZED),
                            why: "token_expired",
                            drain: true,
                        });
                        return;
                    }
                    Wake::Deadline => {
                        probe.mqtt_event("keepalive_expired", 1);
                        conn.end(Close {
                            code: Some(reason::KEEP_ALIVE_TIMEOUT),
                            why: "keep alive timeout",
                            drain: false,
                        });
                        return;
                    }
                    Wake::Stop => {
                        conn.end(shutting_down());
                        return;
                    }
                    Wake::Signal => continue,
                }
            }
        };
        match step {
            Step::Done => {}
            Step::End(close) => {
                conn.end(close);
                return;
            }
            Step::Forward(frame, dedupe) => {
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
                            "data mesh closed; MQTT heartbeats not stored and not acked"
                        );
                    }
                }
            }
        }
    }
}

fn shutting_down() -> Close {
    Close {
        code: Some(reason::SHUTTING_DOWN),
        why: "server shutting down",
        drain: true,
    }
}

/// What the reader does after a packet.
enum Step {
    /// Carry on.
    Done,
    /// End the connection.
    End(Close),
    /// Send the groups left in `forwards` to their owners, as parts of this frame, deduplicated so.
    Forward(u64, Dedupe),
}

/// Handles one packet synchronously (the decoder's borrow never spans an await).
fn handle(
    edge: &Edge,
    key: ConnKey,
    conn: &Conn,
    scope: IngestScope<'_>,
    packet: &Packet<'_>,
    forwards: &mut Vec<(ShardId, Vec<(u64, Heartbeat)>)>,
    scratch: &mut Heartbeat,
) -> Step {
    let probe = &edge.core.probe;
    let protocol_error = |why| {
        probe.mqtt_event("protocol_error", 1);
        Step::End(Close {
            code: Some(reason::PROTOCOL_ERROR),
            why,
            drain: false,
        })
    };
    let step = match packet {
        Packet::Publish(p) if conn.session.borrow().over_inflight(p.qos) => {
            probe.mqtt_event("protocol_error", 1);
            return Step::End(Close {
                code: Some(reason::RECEIVE_MAXIMUM_EXCEEDED),
                why: "too many QoS 1/2 PUBLISHes unacknowledged",
                drain: false,
            });
        }
        Packet::Publish(p) => match moved_away(edge, conn) {
            Some(close) => {
                probe.mqtt_event("closed_not_owner", 1);
                return Step::End(close);
            }
            None => publish(edge, key, conn, scope, p, forwards, scratch),
        },
        Packet::PubRel(a) => {
            conn.session
                .borrow_mut()
                .pubrel(a.packet_id, &mut conn.out.borrow_mut());
            Step::Done
        }
        Packet::PingReq => {
            codec::encode(
                &Packet::PingResp,
                conn.session.borrow().version(),
                &mut conn.out.borrow_mut(),
            );
            Step::Done
        }
        Packet::Subscribe(s) => {
            probe.mqtt_event("subscribe_refused", 1);
            conn.session.borrow().suback_refused(
                s.packet_id,
                s.filters.count(),
                &mut conn.out.borrow_mut(),
            );
            Step::Done
        }
        Packet::Unsubscribe(s) => {
            conn.session.borrow().unsuback(
                s.packet_id,
                s.filters.count(),
                &mut conn.out.borrow_mut(),
            );
            Step::Done
        }
        // The server sends no PUBLISH, so it expects no PUBACK/PUBREC/PUBCOMP; MQTT 5 AUTH
        // (enhanced authentication) is not offered. Both end the connection.
        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::Auth(_) => {
            return protocol_error("unexpected packet")
        }
        Packet::Connect(_) => return protocol_error("second CONNECT"),
        Packet::Disconnect(_) => return Step::End(CLIENT_CLOSED),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            return protocol_error("server-only packet")
        }
    };
    if !conn.out.borrow().is_empty() {
        conn.signal.notify();
    }
    step
}

/// Ownership: the close of a device connection whose unit this node no longer writes (another
/// node claimed it, or it is being placed), as the WebSocket path closes with 1013 `not_owner`:
/// the PUBLISH that found it is neither stored nor acknowledged; MQTT 5 gets DISCONNECT 0x9C
/// (Use another server) with the owner as Server Reference (0x88 Server unavailable while the
/// unit has no writer), 3.1.1 a plain close; the device reconnects and is redirected. `None`:
/// still served here (always without ownership, and for gateway tokens, which are not
/// redirected).
fn moved_away(edge: &Edge, conn: &Conn) -> Option<Close> {
    let crate::auth::Scope::Device(id) = &conn.claims.scope else {
        return None;
    };
    let code = match crate::net::owner::route(&edge.core.shared, id) {
        crate::net::owner::Route::Here => return None,
        crate::net::owner::Route::Elsewhere { addr, .. } => {
            *conn.server_reference.borrow_mut() = Some(addr);
            crate::net::owner::MQTT5_USE_ANOTHER_SERVER
        }
        crate::net::owner::Route::Pending => crate::net::owner::MQTT5_SERVER_UNAVAILABLE,
    };
    Some(Close {
        code: Some(code),
        why: crate::net::owner::NOT_OWNER,
        drain: false,
    })
}

/// Checks a topic's device id against the token: the resolved id, or the refusal.
fn topic_device(scope: IngestScope<'_>, device: &str, out: &mut String) -> Result<(), Refused> {
    proto::resolve_device_id(scope, Some(device), out).map_err(|r| match r {
        Reject::IdMismatch | Reject::IdOutsidePrefix => Refused::not_authorized(r.reason()),
        other => Refused {
            code: reason::TOPIC_NAME_INVALID,
            reason: other.reason(),
        },
    })
}

/// Decodes, checks and stores one PUBLISH (see the module comment).
fn publish(
    edge: &Edge,
    key: ConnKey,
    conn: &Conn,
    scope: IngestScope<'_>,
    p: &codec::Publish<'_>,
    forwards: &mut Vec<(ShardId, Vec<(u64, Heartbeat)>)>,
    scratch: &mut Heartbeat,
) -> Step {
    let core = &edge.core;
    let probe = &core.probe;
    let cfg = &core.shared.cfg;
    let received = Instant::now();
    let received_ms = rt::now_ms();
    probe.mqtt_event("publish", 1);
    ExecProbe::add(&probe.bytes_in, p.payload.len() as u64);
    forwards.clear();
    let mut decoder = edge.decoder.borrow_mut();
    // Every accepted heartbeat goes into `forwards`, grouped by shard (seq filled in below).
    let group = |hb: Heartbeat, forwards: &mut Vec<(ShardId, Vec<(u64, Heartbeat)>)>| {
        let shard = core.shared.router.shard_of(&hb.device_id);
        let i = match forwards.iter().position(|(s, _)| *s == shard) {
            Some(i) => i,
            None => {
                forwards.push((shard, core.take_batch_vec()));
                forwards.len() - 1
            }
        };
        forwards[i].1.push((0, hb));
    };
    // Issue 18: on a connection that declared an epoch, a PUBLISH with the User Property `seq`
    // numbers its heartbeats from it (device-scoped, stored once); without it, at least once.
    let mut dedupe = Dedupe::Off;
    let mut device = std::mem::take(&mut scratch.device_id);
    let verdict: Result<(), Refused> = (|| {
        if let (Some(epoch), Some(seq)) = (conn.epoch, codec::Props(p.props).user("seq")) {
            match seq.parse::<u64>() {
                Ok(first) if (1..=crate::limits::SEQ_MAX).contains(&first) => {
                    dedupe = Dedupe::SeqFrom { epoch, first };
                }
                _ => return Err(Refused::payload("seq_out_of_range")),
            }
        }
        match session::topic(p.topic)? {
            Topic::Geobeat { device: id } => {
                topic_device(scope, id, &mut device)?;
                if p.payload.iter().all(u8::is_ascii_whitespace) {
                    return Ok(()); // nothing to store (a retained-message clear)
                }
                let text =
                    std::str::from_utf8(p.payload).map_err(|_| Refused::payload("invalid_utf8"))?;
                let mut ingest = Ingest::new(IngestScope::Device(&device), received_ms);
                ingest.heartbeats_max = cfg.frame_heartbeats_max;
                let slots = decoder
                    .decode_text_seqless(text, &ingest)
                    .map_err(|e| Refused::payload(e.reason()))?;
                // A PUBLISH is stored whole or not at all: one refused element refuses it.
                for slot in slots.iter() {
                    if let Outcome::Rejected { reason: r, .. } = slot.outcome() {
                        probe.reject(r.reason());
                        return Err(match r {
                            Reject::IdMismatch | Reject::IdOutsidePrefix => {
                                Refused::not_authorized(r.reason())
                            }
                            _ => Refused::payload(r.reason()),
                        });
                    }
                }
                for slot in slots.iter_mut() {
                    if let Some(hb) = slot.accepted_mut() {
                        group(std::mem::take(hb), forwards);
                    }
                }
                Ok(())
            }
            Topic::OwnTracksOther { user } => topic_device(scope, user, &mut device),
            Topic::OwnTracks { user, .. } => {
                topic_device(scope, user, &mut device)?;
                let window = TsWindow::default();
                match owntracks::parse(p.payload, &device, received_ms, &window, scratch) {
                    Ok(owntracks::Parsed::Location) => {
                        group(std::mem::take(scratch), forwards);
                        Ok(())
                    }
                    Ok(owntracks::Parsed::Ignored) => Ok(()),
                    Err(e) => {
                        probe.reject(e.reason());
                        Err(Refused::payload(e.reason()))
                    }
                }
            }
        }
    })();
    drop(decoder);
    scratch.device_id = device;
    if let Err(r) = &verdict {
        tracing::debug!(topic = p.topic, reason = r.reason, "MQTT PUBLISH refused");
        for (_, items) in forwards.drain(..) {
            core.recycle(items);
        }
    }
    // MQTT 3.1.1 cannot refuse in an ack: the connection will close when the writer reaches
    // this PUBLISH, so nothing after it is read (it would be stored, never acknowledged).
    let stop_reading = verdict.is_err()
        && p.qos != codec::QoS::AtMostOnce
        && conn.session.borrow().version() == Version::V311;
    let publish = conn.session.borrow_mut().publish(
        p.qos,
        p.packet_id,
        verdict.err(),
        &mut conn.out.borrow_mut(),
    );
    let seq = match publish {
        Publish::Duplicate => {
            for (_, items) in forwards.drain(..) {
                core.recycle(items);
            }
            return Step::Done;
        }
        Publish::Store(seq) => seq,
    };
    let accepted: usize = forwards.iter().map(|(_, v)| v.len()).sum();
    ExecProbe::add(&probe.accepted, accepted as u64);
    let frame = core.acks.frame_begin(
        key,
        seq,
        forwards.len() as u32,
        received,
        &probe.ack_latency,
    );
    let mut i = 0;
    while i < forwards.len() {
        for item in forwards[i].1.iter_mut() {
            item.0 = seq;
        }
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
    if stop_reading {
        // Refused: nothing was appended or forwarded. The writer answers what came before,
        // then closes at this PUBLISH.
        debug_assert!(forwards.is_empty());
        return Step::End(Close {
            code: None,
            why: "publish refused",
            drain: true,
        });
    }
    if forwards.is_empty() {
        Step::Done
    } else {
        Step::Forward(frame, dedupe)
    }
}

/// Runs the writer, then tells the reader it is gone (whatever ended it).
async fn write_loop<S: Stream>(edge: Rc<Edge>, key: ConnKey, conn: Rc<Conn>, mut w: WriteHalf<S>) {
    if let Err(e) = write_packets(&edge, key, &conn, &mut w).await {
        tracing::debug!(error = %e, "an MQTT connection's writes stalled or failed; closing it");
    }
    let _ = rt::timeout(REFUSAL_READ_MAX, w.close()).await;
    conn.writer_gone.set(true);
    conn.signal.notify();
}

/// Writes the answers: the reader's, and the acknowledgements of every PUBLISH the ledger
/// settled, in order; then the close. Every write must finish within the idle timeout.
async fn write_packets<S: Stream>(
    edge: &Edge,
    key: ConnKey,
    conn: &Conn,
    w: &mut WriteHalf<S>,
) -> std::io::Result<()> {
    let core = &edge.core;
    let probe = &core.probe;
    let stall = core.shared.cfg.idle_timeout;
    let mut out = Vec::with_capacity(256);
    loop {
        let Some((errors, ack_ready, in_flight)) = core.acks.with(key, |c| {
            let errors: Vec<_> = c.errors.drain(..).collect();
            if !errors.is_empty() {
                c.signal.notify(); // room in the error queue for a paused reader
            }
            (errors, c.ack_ready, c.frames_in_flight())
        }) else {
            return Ok(());
        };
        // Created after the snapshot (nothing runs in between): it misses no later change.
        let wait = conn.signal.wait();
        let (settled, tally, unsettled) = {
            let mut s = conn.session.borrow_mut();
            for (seq, why) in errors {
                if let Some(seq) = seq {
                    s.refuse(seq, Refused::storage(why));
                }
            }
            out.append(&mut conn.out.borrow_mut());
            let settled = s.settle(ack_ready, &mut out);
            (settled, s.take_tally(), s.unsettled())
        };
        probe.mqtt_event("puback_refused", tally.refused_acked);
        probe.mqtt_event("qos0_refused", tally.refused_qos0);
        let version = conn.session.borrow().version();
        if let Settled::Close(why) = settled {
            // MQTT 3.1.1 cannot say "refused" in a PUBACK: close without acknowledging.
            probe.mqtt_event("closed_on_refusal", 1);
            tracing::debug!(reason = why.reason, "MQTT 3.1.1 PUBLISH refused; closing");
            write(w, &out, stall).await?;
            return Ok(());
        }
        let close = conn.close.get();
        if let Some(c) = close {
            if !c.drain || (in_flight == 0 && unsettled == 0) {
                if let Some(code) = c.code {
                    let reference = conn.server_reference.borrow();
                    session::disconnect_to(version, code, c.why, reference.as_deref(), &mut out);
                }
                write(w, &out, stall).await?;
                return Ok(());
            }
        }
        if !out.is_empty() {
            write(w, &out, stall).await?;
            out.clear();
        }
        wait.await;
    }
}

/// Writes `bytes` within `stall`.
async fn write<S: Stream>(
    w: &mut WriteHalf<S>,
    bytes: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    match rt::timeout(stall, async {
        w.write_all(bytes).await?;
        w.flush().await
    })
    .await
    {
        Some(r) => r,
        None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write stalled",
        )),
    }
}
