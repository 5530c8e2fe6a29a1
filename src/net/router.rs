//! Accepting and dispatching sockets. It owns the accept loop (connection cap, EMFILE backoff),
//! reading one bounded HTTP request head under the handshake timeout, handing WebSocket upgrades
//! to their connection [`Kind`] (admitted before anything is answered; the refusal, a 4xx JSON,
//! is sent here), and reading and answering plain HTTP requests ([`crate::net::http`]). Where a
//! connection then lives is its kind's business.
//!
//! Slow clients cannot hold the cap: a request (head and body) must arrive within a deadline,
//! bodies are read only for the endpoints that take one and only from ops (or, bounded by
//! `DEVICE_HTTP_BODY_BYTES_MAX`, from devices on the phone apps' endpoints), and plain HTTP
//! sockets may hold only part of the cap: the rest is kept for sockets that send an
//! authenticated WebSocket upgrade at once.
//!
//! Invariant: every accepted socket counts once in `Shared::connections_open` until it closes,
//! whichever executor ends up holding it, and once in `Shared::connections_http` until it closes
//! or is upgraded.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;

use crate::config::Engine;
use crate::http::parse::{self, Parsed};
use crate::limits::{
    ACCEPT_BACKOFF, CONN_RESERVED_HEAD_MS, DRAIN_BYTES_MAX, HTTP_BODY_BYTES_PER_S_MIN,
    HTTP_HEAD_BYTES_MAX, HTTP_REQUESTS_PER_CONN_MAX, REFUSALS_IN_FLIGHT_MAX, REFUSAL_READ_MAX,
    REPEAT_LOG_INTERVAL_MS,
};
pub use crate::net::edge::{write_response, write_response_typed};
use crate::net::edge::{Edge, Kind, Role};
use crate::net::engine::{RingIngestKind, RingSubscribeKind};
use crate::net::ingest::IngestKind;
use crate::net::mqtt::MqttWsKind;
use crate::net::slots::{ConnSlot, HttpSlot};
use crate::net::subscribe::SubscribeKind;
use crate::net::tls::{Acceptor, Conn};
use crate::ratelog::LogEvery;
use crate::rt::{self, TcpListener, TcpStream};

/// Accepts until shutdown.
pub async fn accept_loop(edge: Rc<Edge>, listener: TcpListener, role: Role) {
    accept_each(edge, listener, role, None).await
}

/// Accepts TLS connections (`--tls-listen`: wss:// and https) until shutdown: the same caps as
/// the plain listener, then the executor's handshake rate bound (over it, the socket is closed
/// unread and counted), then the handshake under its timeout, then the same HTTP routing.
pub async fn accept_loop_tls(edge: Rc<Edge>, listener: TcpListener, tls: Rc<Acceptor>) {
    accept_each(edge, listener, Role::Main, Some(tls)).await
}

async fn accept_each(edge: Rc<Edge>, listener: TcpListener, role: Role, tls: Option<Rc<Acceptor>>) {
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
                // EMFILE/ENFILE/ENOMEM/ECONNABORTED: back off, never spin, never exit; and log
                // one line per interval, not one per attempt (176 lines/s under EMFILE).
                if let Some(suppressed) = accept_log.check() {
                    tracing::warn!(error = %e, suppressed_since_last = suppressed, "accept failed; backing off");
                }
                rt::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if core.stopping() {
            return;
        }
        let (slot, open) = ConnSlot::open(&core.shared);
        tracing::debug!(open, executor = core.index.0, "accepted");
        if open > max + REFUSALS_IN_FLIGHT_MAX {
            // A flood: close at once rather than hold more descriptors.
            drop(stream);
            drop(slot);
            continue;
        }
        if let Some(tls) = &tls {
            // Over the cap a TLS socket is closed at once: a 503 would cost a handshake.
            if open > max || !tls.admit() {
                let event = if open > max {
                    "cap_refused"
                } else {
                    "rate_refused"
                };
                core.probe.tls_event(event, 1);
                continue;
            }
        } else if open > max {
            rt::spawn(refuse_over_cap(stream, slot));
            continue;
        }
        // Plain HTTP and slow heads may hold only part of the cap; a socket beyond that share
        // must authenticate an upgrade at once (the metrics listener has no devices to keep room
        // for).
        let (http, over_share) = HttpSlot::acquire(&core.shared);
        let reserved = over_share && role == Role::Main;
        let _ = stream.set_nodelay(true);
        match &tls {
            None => rt::spawn(handle(edge.clone(), stream, slot, http, reserved, role)),
            Some(tls) => {
                let (edge, tls) = (edge.clone(), tls.clone());
                rt::spawn(async move {
                    match tls.handshake(stream).await {
                        Ok(s) => {
                            edge.core.probe.tls_event("handshake", 1);
                            handle(edge, s, slot, http, reserved, role).await
                        }
                        Err(why) => edge.core.probe.tls_event(why, 1),
                    }
                })
            }
        }
    }
}

/// Answers a connection over the cap with 503 JSON. The request is read first (briefly): closing
/// a socket with unread input makes the kernel send a reset, which would destroy the answer.
async fn refuse_over_cap(mut stream: TcpStream, _slot: ConnSlot) {
    let mut buf = Vec::with_capacity(512);
    let _ = read_head(&mut stream, &mut buf, Instant::now() + REFUSAL_READ_MAX).await;
    let body = r#"{"error":"too many connections"}"#;
    answer_and_close(&mut stream, 503, body).await;
}

/// Sends a final answer and closes gracefully: our side is shut down first and what the client
/// still sends is read and dropped for a moment, because closing a socket with unread input makes
/// the kernel send a reset that can destroy the answer before the client reads it.
async fn answer_and_close<S: Conn>(stream: &mut S, status: u16, body: &str) {
    let _ = rt::timeout(REFUSAL_READ_MAX, write_response(stream, status, body, true)).await;
    let _ = stream.shutdown_write().await;
    let mut sink = [0u8; 2048];
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

/// Why no complete request head was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadError {
    /// The client went away (EOF, a read error), or never sent a byte before the deadline:
    /// close without answering.
    Gone,
    /// The head is malformed (400, 405, ...), too large (431) or incomplete at the deadline
    /// (408): answer with this status, then close.
    Refuse(u16),
}

/// Reads until `buf` holds a complete request head, bounded in size and by `deadline`: the time
/// the request's first byte was seen, or why there is no head.
async fn read_head<S: Conn>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Instant, HeadError> {
    let mut first_byte = (!buf.is_empty()).then(Instant::now);
    loop {
        match parse::parse_head(buf) {
            Ok(Parsed::Complete(_)) => return Ok(first_byte.unwrap_or_else(Instant::now)),
            Ok(Parsed::Partial) => {}
            Err(e) => return Err(HeadError::Refuse(e.status())),
        }
        if buf.len() >= HTTP_HEAD_BYTES_MAX {
            return Err(HeadError::Refuse(431));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 2048];
        let room = (HTTP_HEAD_BYTES_MAX - buf.len()).min(chunk.len());
        match rt::timeout(left, stream.read(&mut chunk[..room])).await {
            None if buf.is_empty() => return Err(HeadError::Gone),
            None => return Err(HeadError::Refuse(408)),
            Some(Ok(0)) | Some(Err(_)) => return Err(HeadError::Gone),
            Some(Ok(n)) => {
                first_byte.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// Serves one socket's HTTP requests until it is upgraded or closed. `http` counts it as a
/// plain HTTP socket until then; a `reserved` socket (admitted beyond the share of the cap plain
/// HTTP may hold) has [`CONN_RESERVED_HEAD_MS`] to send its head, which must be a WebSocket
/// upgrade (503 otherwise).
async fn handle<S: Conn>(
    edge: Rc<Edge>,
    mut stream: S,
    slot: ConnSlot,
    http: HttpSlot,
    reserved: bool,
    role: Role,
) {
    let mut buf = Vec::with_capacity(1024);
    let handshake_timeout = edge.core.shared.cfg.handshake_timeout;
    let head_timeout = if reserved {
        handshake_timeout.min(Duration::from_millis(CONN_RESERVED_HEAD_MS))
    } else {
        handshake_timeout
    };
    for served in 1..=HTTP_REQUESTS_PER_CONN_MAX {
        let first_byte = match read_head(&mut stream, &mut buf, Instant::now() + head_timeout).await
        {
            Ok(t) => t,
            Err(HeadError::Gone) => return,
            Err(HeadError::Refuse(status)) => {
                let (_, body) = parse::json_error(status, parse::status_text(status), None);
                answer_and_close(&mut stream, status, &body).await;
                return;
            }
        };
        let req = match parse::parse_head(&buf) {
            Ok(Parsed::Complete(r)) => r,
            _ => unreachable!("read_head returned a complete head"),
        };
        let head_len = req.head_bytes;
        // A WebSocket upgrade (or a non-GET, which the kind refuses properly) goes to its
        // connection kind, in a task of its own: this task's future is sized for the largest
        // plain-HTTP answer (and, over TLS, the handshake), and a long-lived connection served
        // inside it would keep that allocation (about 4 KiB per idle connection, perf/RESULTS.md
        // "Edge figures"). A new kind is one line here.
        let upgrading = role == Role::Main && (req.upgrade.is_some() || req.method != "GET");
        match req.path {
            "/v1/ingest" if upgrading && edge.core.shared.cfg.engine == Engine::Ring => {
                rt::spawn(open::<RingIngestKind, S>(edge, stream, buf, slot, http));
                return;
            }
            "/v1/ingest" if upgrading => {
                rt::spawn(open::<IngestKind, S>(edge, stream, buf, slot, http));
                return;
            }
            "/v1/subscribe" if upgrading && edge.core.shared.cfg.engine == Engine::Ring => {
                rt::spawn(open::<RingSubscribeKind, S>(edge, stream, buf, slot, http));
                return;
            }
            "/v1/subscribe" if upgrading => {
                rt::spawn(open::<SubscribeKind, S>(edge, stream, buf, slot, http));
                return;
            }
            "/mqtt" if upgrading => {
                rt::spawn(open::<MqttWsKind, S>(edge, stream, buf, slot, http));
                return;
            }
            _ => {}
        }
        if reserved {
            // The rest of the cap is kept for devices (see `HttpSlot::acquire`).
            let (st, body) = parse::json_error(503, "too many connections", None);
            answer_and_close(&mut stream, st, &body).await;
            return;
        }
        // Plain HTTP. Bodies are bounded (the parser refused larger ones), taken only by the
        // endpoints that need one and only from ops (checked before a byte of the body is read),
        // and read in full before answering, so pipelined requests stay in step. The whole
        // request, head and body, must arrive within the handshake timeout plus time for the
        // body at the slowest rate served, counted from its first byte.
        let body_len = req.content_length.unwrap_or(0) as usize;
        // The last request a connection may make is answered with `connection: close`.
        let keep_alive = req.keep_alive() && served < HTTP_REQUESTS_PER_CONN_MAX;
        if req.chunked {
            let (st, body) =
                parse::json_error(411, "chunked request bodies are not supported", None);
            answer_and_close(&mut stream, st, &body).await;
            return;
        }
        if body_len > 0 {
            // A phone app's request (OsmAnd, OwnTracks) carries its location in a small body,
            // read once its device or gateway token checked out.
            let device_app = crate::net::http::is_device_app(role, req.path);
            if !device_app
                && (role != Role::Main || !crate::net::http::takes_body(req.method, req.path))
            {
                let (st, body) =
                    parse::json_error(413, "this endpoint takes no request body", None);
                answer_and_close(&mut stream, st, &body).await;
                return;
            }
            if device_app && body_len > crate::limits::DEVICE_HTTP_BODY_BYTES_MAX {
                let (st, body) = parse::json_error(413, "request body too large", None);
                answer_and_close(&mut stream, st, &body).await;
                return;
            }
            // Otherwise only ops may make the server read and buffer a body
            // (PUT /v1/geofences/{name}, POST /v1/geofences).
            let shared = &edge.core.shared;
            let checked = if device_app {
                crate::net::auth::check_device(shared, &req).map(drop)
            } else {
                crate::net::auth::check(shared, &req, crate::net::auth::Need::Read(None)).map(drop)
            };
            if let Err(r) = checked {
                log_refused(&stream, req.path, r.status, &r.body);
                answer_and_close(&mut stream, r.status, &r.body).await;
                return;
            }
        }
        if body_len > crate::limits::HTTP_BODY_BYTES_MAX {
            // One allocation for a large body (up to 64 MiB) rather than repeated doubling.
            buf.reserve((head_len + body_len).saturating_sub(buf.len()));
        }
        let body_time = Duration::from_millis(body_len as u64 * 1000 / HTTP_BODY_BYTES_PER_S_MIN);
        let deadline = first_byte + handshake_timeout + body_time;
        while buf.len() < head_len + body_len {
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            match rt::timeout(left, stream.read(&mut chunk)).await {
                Some(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Some(_) => return,
                None => {
                    let (st, body) =
                        parse::json_error(408, "request body not received in time", None);
                    answer_and_close(&mut stream, st, &body).await;
                    return;
                }
            }
        }
        let req = match parse::parse_head(&buf) {
            Ok(Parsed::Complete(r)) => r,
            _ => unreachable!("the head was complete before"),
        };
        let resp =
            crate::net::http::respond(&edge, &req, &buf[head_len..head_len + body_len], role).await;
        log_refused(&stream, req.path, resp.status, &resp.body);
        if resp.status == 307 {
            // A history request of a device another cluster node writes (net::owner): the
            // redirect with its `Location`, then close.
            if let Some(location) = crate::net::owner::location_of(&resp.body) {
                let response = crate::net::owner::redirect_response(&location, &resp.body);
                let _ =
                    futures_lite::AsyncWriteExt::write_all(&mut stream, response.as_bytes()).await;
                let _ = futures_lite::AsyncWriteExt::flush(&mut stream).await;
                return;
            }
        }
        if write_response_typed(
            &mut stream,
            resp.status,
            resp.content_type,
            &resp.body,
            !keep_alive,
        )
        .await
        .is_err()
        {
            return;
        }
        if !keep_alive {
            if stream.is_tls() {
                // TLS: close_notify, so the client sees a clean end (not a truncation).
                let _ = rt::timeout(REFUSAL_READ_MAX, stream.shutdown_write()).await;
            }
            return;
        }
        buf.drain(..head_len + body_len);
        if buf.capacity() > 2 * crate::limits::HTTP_BODY_BYTES_MAX {
            // After a large fence body: do not keep a megabyte per idle keep-alive connection.
            buf.shrink_to(HTTP_HEAD_BYTES_MAX);
        }
    }
}

thread_local! {
    /// Rate limit of the "request refused" info line, per executor thread.
    static REFUSED_LOG: LogEvery =
        const { LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS)) };
}

/// Logs a refused token (a 401) at info, one line per interval per executor with the number
/// suppressed. The line names the peer, the path and the answer sent (which never echoes the
/// token; the path carries no query string), never the token itself. See: issue 13 §4.
fn log_refused<S: Conn>(stream: &S, path: &str, status: u16, answer: &str) {
    if status != 401 {
        return;
    }
    REFUSED_LOG.with(|every| {
        if let Some(suppressed) = every.check() {
            let peer = stream.peer().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(
                peer,
                path,
                answer,
                suppressed_since_last = suppressed,
                "request refused: 401"
            );
        }
    });
}

/// Hands an upgrade request (the complete head in `buf`) to connection kind `K`: admitted, the
/// head buffer is freed (idle memory budget) and the connection served; refused, the refusal is
/// answered and the socket closed.
async fn open<K: Kind, S: Conn>(
    edge: Rc<Edge>,
    mut stream: S,
    buf: Vec<u8>,
    slot: ConnSlot,
    http: HttpSlot,
) {
    let admitted = match parse::parse_head(&buf) {
        Ok(Parsed::Complete(req)) => match K::admit(&edge, &req) {
            Ok(grant) => Ok((grant, buf[req.head_bytes..].to_vec())),
            Err(r) => Err((req.path.to_owned(), r)),
        },
        _ => unreachable!("the router read a complete head"),
    };
    drop(buf);
    match admitted {
        Ok((grant, leftover)) => {
            drop(http);
            K::serve(edge, stream, leftover, grant, slot).await
        }
        Err((_, r)) if r.status == 307 => {
            // Ownership: the device's unit is written by another node (net::owner).
            if let Some(location) = crate::net::owner::location_of(&r.body) {
                let response = crate::net::owner::redirect_response(&location, &r.body);
                let _ = rt::timeout(REFUSAL_READ_MAX, async {
                    let _ =
                        futures_lite::AsyncWriteExt::write_all(&mut stream, response.as_bytes())
                            .await;
                    let _ = futures_lite::AsyncWriteExt::flush(&mut stream).await;
                })
                .await;
                let _ = stream.shutdown_write().await;
            }
        }
        Err((path, r)) => {
            log_refused(&stream, &path, r.status, &r.body);
            answer_and_close(&mut stream, r.status, &r.body).await;
        }
    }
}
