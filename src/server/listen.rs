//! Accepting and dispatching sockets. It owns the accept loop (connection cap, EMFILE backoff),
//! reading one bounded HTTP request head under the handshake timeout, authenticating WebSocket
//! upgrades before answering them (401 JSON otherwise), and the choice of where a device
//! connection lives: on the executor that owns its device's shard (the socket is handed over
//! once, then never crosses cores again) or, for gateways, here with per-frame forwarding.
//!
//! Slow clients cannot hold the cap: a request (head and body) must arrive within a deadline,
//! bodies are read only for the endpoints that take one and only from ops, and plain HTTP
//! sockets may hold only part of the cap: the rest is kept for sockets that send an
//! authenticated WebSocket upgrade at once.
//!
//! Invariant: every accepted socket counts once in `Shared::connections_open` until it closes,
//! whichever executor ends up holding it, and once in `Shared::connections_http` until it closes
//! or is upgraded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::auth::Scope;
use crate::http::parse::{self, Parsed, Request};
use crate::limits::{
    ACCEPT_BACKOFF, CONN_RESERVED_HEAD_MS, CONN_RESERVED_SHARE_DIVISOR, DRAIN_BYTES_MAX,
    HTTP_BODY_BYTES_PER_S_MIN, HTTP_HEAD_BYTES_MAX, HTTP_REQUESTS_PER_CONN_MAX,
    REFUSALS_IN_FLIGHT_MAX, REFUSAL_READ_MAX, REPEAT_LOG_INTERVAL_MS,
};
use crate::ratelog::LogEvery;
use crate::rt::{self, TcpListener, TcpStream};
use crate::server::exec::now_s;
use crate::server::exec::Exec;
use crate::server::msg::{Adopt, ToOwner};

/// A verified WebSocket upgrade of `/v1/ingest`.
#[derive(Debug, Clone)]
pub struct Upgrade {
    /// `Sec-WebSocket-Accept` value for the 101 response.
    pub accept_key: String,
    /// What the connection's token allows.
    pub scope: Scope,
    /// When the token expires (Unix seconds): the connection is closed then.
    pub expires_at_s: u64,
}

/// Counts a connection in `connections_open` and releases it on drop.
pub struct ConnSlot(std::sync::Arc<crate::server::Shared>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let open = self.0.connections_open.fetch_sub(1, Ordering::AcqRel) - 1;
        tracing::debug!(open, "connection closed");
    }
}

/// Counts a socket in `connections_http` (not an authenticated WebSocket connection) and
/// releases it on drop, which happens when the socket closes or is upgraded.
pub struct HttpSlot(std::sync::Arc<crate::server::Shared>);

impl HttpSlot {
    /// Counts one more socket; also returns whether it is over the share of the cap that such
    /// sockets may hold (`connections_max` minus the reserved share), so it may only upgrade.
    fn acquire(shared: &std::sync::Arc<crate::server::Shared>) -> (HttpSlot, bool) {
        let open = shared.connections_http.fetch_add(1, Ordering::AcqRel) + 1;
        let max = shared.cfg.connections_max;
        let share = max - max / CONN_RESERVED_SHARE_DIVISOR;
        (HttpSlot(shared.clone()), open > share)
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.0.connections_http.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Devices and the HTTP API (and `/metrics` unless it has its own listener).
    Main,
    /// Only `/metrics` (`--metrics-listen`).
    Metrics,
}

/// Accepts until shutdown.
pub async fn accept_loop(exec: Rc<Exec>, listener: TcpListener, role: Role) {
    let max = exec.shared.cfg.connections_max;
    let accept_log = LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            exec.stop_signal.wait().await;
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
        if exec.stopping() {
            return;
        }
        let open = exec.shared.connections_open.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::debug!(open, executor = exec.index, "accepted");
        let slot = ConnSlot(exec.shared.clone());
        if open > max + REFUSALS_IN_FLIGHT_MAX {
            // A flood: close at once rather than hold more descriptors.
            drop(stream);
            drop(slot);
            continue;
        }
        if open > max {
            rt::spawn(refuse_over_cap(stream, slot));
            continue;
        }
        // Plain HTTP and slow heads may hold only part of the cap; a socket beyond that share
        // must authenticate an upgrade at once (the metrics listener has no devices to keep room
        // for).
        let (http, over_share) = HttpSlot::acquire(&exec.shared);
        let reserved = over_share && role == Role::Main;
        let _ = stream.set_nodelay(true);
        rt::spawn(handle(exec.clone(), stream, slot, http, reserved, role));
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
async fn answer_and_close(stream: &mut TcpStream, status: u16, body: &str) {
    let _ = rt::timeout(REFUSAL_READ_MAX, write_response(stream, status, body, true)).await;
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
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

/// Writes a complete HTTP/1.1 response with a JSON (or given) body.
pub async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    write_response_typed(stream, status, "application/json", body, close).await
}

/// Writes a complete HTTP/1.1 response with the given content type.
pub async fn write_response_typed(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    // Head and body in one buffer, one write: a client that reads the head (e.g. a refused
    // WebSocket upgrade) finds the body with it, and small answers cost one send.
    let response = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{}{}\r\n{body}",
        parse::status_text(status),
        body.len(),
        if close { "connection: close\r\n" } else { "" },
        // RFC 6455 4.4: say which WebSocket version we speak.
        if status == 426 { "sec-websocket-version: 13\r\n" } else { "" }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await
}

/// Reads until `buf` holds a complete request head, bounded in size and by `deadline`. `Ok` with
/// the time the request's first byte was seen when complete, `Err(Some(status))` to answer with
/// an error, `Err(None)` to just close (EOF, or a connection that never sent a byte before the
/// deadline).
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Instant, Option<u16>> {
    let mut first_byte = (!buf.is_empty()).then(Instant::now);
    loop {
        match parse::parse_head(buf) {
            Ok(Parsed::Complete(_)) => return Ok(first_byte.unwrap_or_else(Instant::now)),
            Ok(Parsed::Partial) => {}
            Err(e) => return Err(Some(e.status())),
        }
        if buf.len() >= HTTP_HEAD_BYTES_MAX {
            return Err(Some(431));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 2048];
        let room = (HTTP_HEAD_BYTES_MAX - buf.len()).min(chunk.len());
        match rt::timeout(left, stream.read(&mut chunk[..room])).await {
            None => return Err(if buf.is_empty() { None } else { Some(408) }),
            Some(Ok(0)) | Some(Err(_)) => return Err(None),
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
async fn handle(
    exec: Rc<Exec>,
    mut stream: TcpStream,
    slot: ConnSlot,
    http: HttpSlot,
    reserved: bool,
    role: Role,
) {
    let mut buf = Vec::with_capacity(1024);
    let handshake_timeout = exec.shared.cfg.handshake_timeout;
    let head_timeout = if reserved {
        handshake_timeout.min(Duration::from_millis(CONN_RESERVED_HEAD_MS))
    } else {
        handshake_timeout
    };
    for served in 1..=HTTP_REQUESTS_PER_CONN_MAX {
        let first_byte = match read_head(&mut stream, &mut buf, Instant::now() + head_timeout).await
        {
            Ok(t) => t,
            Err(status) => {
                if let Some(status) = status {
                    let (_, body) = parse::json_error(status, parse::status_text(status), None);
                    answer_and_close(&mut stream, status, &body).await;
                }
                return;
            }
        };
        let req = match parse::parse_head(&buf) {
            Ok(Parsed::Complete(r)) => r,
            _ => unreachable!("read_head returned a complete head"),
        };
        let head_len = req.head_bytes;
        let ingest_upgrade = role == Role::Main
            && req.path == "/v1/ingest"
            && (req.upgrade.is_some() || req.method != "GET");
        let subscribe_upgrade = role == Role::Main
            && req.path == "/v1/subscribe"
            && (req.upgrade.is_some() || req.method != "GET");
        if reserved && !ingest_upgrade && !subscribe_upgrade {
            // The rest of the cap is kept for devices (see `HttpSlot::acquire`).
            let (st, body) = parse::json_error(503, "too many connections", None);
            answer_and_close(&mut stream, st, &body).await;
            return;
        }
        if ingest_upgrade {
            let upgrade = match authorize_upgrade(&exec, &req) {
                Ok(u) => u,
                Err((status, body)) => {
                    log_refused(&stream, req.path, status, &body);
                    answer_and_close(&mut stream, status, &body).await;
                    return;
                }
            };
            let leftover = buf[head_len..].to_vec();
            // The head buffer is not needed for the connection's life (idle memory budget).
            drop(buf);
            drop(http);
            return place_ingest(exec, stream, leftover, upgrade, slot).await;
        }
        if subscribe_upgrade {
            let (upgrade, sub_slot) = match authorize_subscribe(&exec, &req) {
                Ok(u) => u,
                Err((status, body)) => {
                    log_refused(&stream, req.path, status, &body);
                    answer_and_close(&mut stream, status, &body).await;
                    return;
                }
            };
            let leftover = buf[head_len..].to_vec();
            drop(buf);
            drop(http);
            // Subscribers stay on the executor that accepted them; events come to them.
            return crate::server::subscribe::serve(
                exec, stream, leftover, upgrade, slot, sub_slot,
            )
            .await;
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
            if role != Role::Main || !crate::server::http::takes_body(req.method, req.path) {
                let (st, body) =
                    parse::json_error(413, "this endpoint takes no request body", None);
                answer_and_close(&mut stream, st, &body).await;
                return;
            }
            // Only ops may make the server read and buffer a body (PUT /v1/geofences/{name},
            // POST /v1/geofences).
            if let Err(resp) = crate::server::http::require_ops(&exec, &req) {
                log_refused(&stream, req.path, resp.status, &resp.body);
                answer_and_close(&mut stream, resp.status, &resp.body).await;
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
            crate::server::http::respond(&exec, &req, &buf[head_len..head_len + body_len], role)
                .await;
        log_refused(&stream, req.path, resp.status, &resp.body);
        if write_response_typed(
            &mut stream,
            resp.status,
            resp.content_type,
            &resp.body,
            !keep_alive,
        )
        .await
        .is_err()
            || !keep_alive
        {
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
fn log_refused(stream: &TcpStream, path: &str, status: u16, answer: &str) {
    if status != 401 {
        return;
    }
    REFUSED_LOG.with(|every| {
        if let Some(suppressed) = every.check() {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
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

/// Checks the upgrade headers and the token: 4xx for a bad upgrade, 401 for a missing, bad,
/// expired or wrong-scope token.
fn authorize_upgrade(exec: &Exec, req: &Request<'_>) -> Result<Upgrade, (u16, String)> {
    let accept_key = parse::websocket_accept(req)
        .map_err(|e| parse::json_error(e.status(), &e.to_string(), None))?;
    let mut scratch = Vec::new();
    let token = match parse::bearer_token(req, &mut scratch) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(parse::json_error(401, "missing token", Some("token"))),
        Err(_) => return Err(parse::json_error(401, "malformed token", Some("token"))),
    };
    let claims = crate::auth::verify(&exec.shared.secret, token, now_s())
        .map_err(|e| parse::json_error(401, &e.to_string(), Some("token")))?;
    match claims.scope {
        Scope::Device(_) | Scope::Gateway(_) => Ok(Upgrade {
            accept_key,
            scope: claims.scope,
            expires_at_s: claims.expires_at_s,
        }),
        _ => Err(parse::json_error(
            401,
            "token scope does not allow ingest",
            Some("token"),
        )),
    }
}

/// Checks a `/v1/subscribe` upgrade: the upgrade headers, then an ops or subscriber token (401
/// otherwise), then the subscriber cap (503).
fn authorize_subscribe(
    exec: &Exec,
    req: &Request<'_>,
) -> Result<
    (
        crate::server::subscribe::SubUpgrade,
        crate::server::subscribe::SubscriberSlot,
    ),
    (u16, String),
> {
    let accept_key = parse::websocket_accept(req)
        .map_err(|e| parse::json_error(e.status(), &e.to_string(), None))?;
    let mut scratch = Vec::new();
    let token = match parse::bearer_token(req, &mut scratch) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(parse::json_error(401, "missing token", Some("token"))),
        Err(_) => return Err(parse::json_error(401, "malformed token", Some("token"))),
    };
    let claims = crate::auth::verify(&exec.shared.secret, token, now_s())
        .map_err(|e| parse::json_error(401, &e.to_string(), Some("token")))?;
    let prefix = match claims.scope {
        Scope::Ops => None,
        Scope::Subscriber(p) => Some(p),
        _ => {
            return Err(parse::json_error(
                401,
                "token scope does not allow subscribing (use an ops or subscriber token)",
                Some("token"),
            ))
        }
    };
    let Some(sub_slot) = crate::server::subscribe::SubscriberSlot::acquire(&exec.shared) else {
        return Err(parse::json_error(503, "too many subscribers", None));
    };
    Ok((
        crate::server::subscribe::SubUpgrade {
            accept_key,
            prefix,
            expires_at_s: claims.expires_at_s,
        },
        sub_slot,
    ))
}

/// Serves a device connection on the executor that owns its shard (handing the socket over if
/// that is another executor); gateways stay here.
async fn place_ingest(
    exec: Rc<Exec>,
    stream: TcpStream,
    leftover: Vec<u8>,
    upgrade: Upgrade,
    slot: ConnSlot,
) {
    if let Scope::Device(id) = &upgrade.scope {
        let (owner, _) = exec.shared.owner(exec.shared.router.shard_of(id));
        if owner != exec.index && exec.shared.cfg.routing == crate::config::Routing::Migrate {
            // SAFETY: dup of a descriptor we own; the duplicate is owned by the OwnedFd.
            let dup = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if dup >= 0 {
                // SAFETY: `dup` is a fresh descriptor nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(dup) };
                let adopt = Adopt {
                    fd,
                    leftover,
                    upgrade,
                };
                std::mem::forget(slot); // the adopting executor counts it from now on
                drop(stream);
                if exec
                    .send(owner, ToOwner::Adopt(Box::new(adopt)))
                    .await
                    .is_err()
                {
                    tracing::warn!("could not hand a connection over; closing it");
                    exec.shared.connections_open.fetch_sub(1, Ordering::AcqRel);
                }
                return;
            }
        }
    }
    crate::server::ingest::serve(exec, stream, leftover, upgrade, slot).await;
}

/// Takes over a connection handed over by another executor.
pub fn adopt(exec: Rc<Exec>, adopt: Adopt) {
    use std::os::fd::IntoRawFd;
    let slot = ConnSlot(exec.shared.clone());
    // SAFETY: the descriptor is a connected TCP socket whose ownership travels in `Adopt`.
    let stream = unsafe { rt::stream_from_fd(adopt.fd.into_raw_fd()) };
    rt::spawn(crate::server::ingest::serve(
        exec,
        stream,
        adopt.leftover,
        adopt.upgrade,
        slot,
    ));
}
