//! Shared harness for the integration tests: starts the real `geobeat` binary on a free port
//! with its own data directory, mints tokens through the real `geobeat token` command, and
//! speaks plain HTTP/1.1 and WebSocket (tungstenite) to it over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use tungstenite::Message;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_geobeat")
}

/// The environment that switches the MQTT listener off for a server a test starts (its default
/// address, 127.0.0.1:1883, cannot serve several test servers at once); a `--mqtt-listen` flag
/// still wins.
pub const MQTT_OFF: (&str, &str) = ("GEOBEAT_MQTT_LISTEN", "off");

/// A free TCP port on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running server.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub args: Vec<String>,
}

/// `geobeat serve` arguments for a free port and `dir` (2 shards unless `extra` says otherwise).
fn serve_args(dir: &Path, extra: &[&str]) -> (SocketAddr, Vec<String>) {
    let addr = free_addr();
    let mut args: Vec<String> = vec![
        "serve".into(),
        // Every test directory starts empty; restarts keep the flag (it is idempotent).
        "--init".into(),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    if !extra.contains(&"--shards") {
        args.extend(["--shards".into(), "2".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    (addr, args)
}

impl Server {
    /// Starts `geobeat serve` on a free port with `dir` as its data directory, waits for
    /// `/healthz` to answer 200.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let (addr, args) = serve_args(dir, extra);
        let child = Command::new(bin())
            .args(&args)
            // The MQTT listener's default port (1883) would be shared by every server a test
            // binary starts at once; tests/mqtt.rs passes `--mqtt-listen`, which wins.
            .env(MQTT_OFF.0, MQTT_OFF.1)
            .env(
                "RUST_LOG",
                std::env::var("GB_TEST_LOG").unwrap_or("geobeat=warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn geobeat");
        let mut s = Server {
            child,
            addr,
            dir: dir.to_path_buf(),
            args,
        };
        s.wait_healthy();
        s
    }

    /// Restarts with the same arguments (same port and directory).
    pub fn restart(&mut self) {
        let child = Command::new(bin())
            .args(&self.args)
            .env(MQTT_OFF.0, MQTT_OFF.1)
            .env(
                "RUST_LOG",
                std::env::var("GB_TEST_LOG").unwrap_or("geobeat=warn".into()),
            )
            .spawn()
            .unwrap();
        self.child = child;
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("geobeat exited early: {st}");
            }
            if let Ok((200, _)) = http(self.addr, "GET", "/healthz", None) {
                return;
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mints a token with the real CLI: `geobeat token <kind...> --data-dir <dir>`.
    pub fn token(&self, kind: &[&str]) -> String {
        token_in(&self.dir, kind)
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET with an optional bearer token.
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http(self.addr, "GET", path, token).expect("http")
    }

    /// WebSocket URL of the ingest endpoint.
    pub fn ingest_url(&self) -> String {
        format!("ws://{}/v1/ingest", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Mints a token for the data directory `dir`.
pub fn token_in(dir: &Path, kind: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("token")
        .args(kind)
        .args(["--data-dir", &dir.display().to_string()])
        .output()
        .expect("run geobeat token");
    assert!(
        out.status.success(),
        "geobeat token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert_eq!(s.lines().count(), 1, "token prints one line");
    s.trim().to_string()
}

/// One HTTP/1.1 request with `connection: close`; returns status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    raw_http(
        addr,
        format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n")
            .as_bytes(),
    )
}

/// One HTTP/1.1 request with a JSON body (`connection: close`); returns status and body.
pub fn http_body(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_http(server.addr, req.as_bytes()).unwrap()
}

/// Sends raw bytes, reads the whole response; returns status and body.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket client with `Authorization: Bearer <token>`.
#[allow(clippy::result_large_err)]
pub fn ws_connect(server: &Server, token: &str) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = server.ingest_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tungstenite::connect(req)?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    Ok(ws)
}

/// Reads text frames until one parses as JSON; returns it.
pub fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.read().expect("read frame") {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str()).expect("server sends JSON")
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads until an ack covering `seq` arrives; returns every error frame seen on the way.
pub fn wait_ack(ws: &mut Ws, seq: u64) -> Vec<serde_json::Value> {
    let mut errors = Vec::new();
    loop {
        let v = next_json(ws);
        if let Some(a) = v.get("ack").and_then(|a| a.as_u64()) {
            if a >= seq {
                return errors;
            }
        } else {
            errors.push(v);
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
pub fn wait_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Current time in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A heartbeat JSON object.
pub fn hb_json(seq: u64, lat: f64, lon: f64, ts: i64) -> String {
    format!(r#"{{"seq":{seq},"lat":{lat},"lon":{lon},"ts":{ts}}}"#)
}

// ----- Helpers added for the reliability suites (crash, torn storage, disk full, hostile,
// security). Existing helpers above are unchanged. -----

/// Spawns `geobeat` with `args`, appending its stdout (the tracing log) and stderr (fatal errors)
/// to `log`.
pub fn spawn_logged(args: &[String], log: &Path) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open server log");
    let out = file.try_clone().expect("clone log handle");
    Command::new(bin())
        .args(args)
        .env(MQTT_OFF.0, MQTT_OFF.1)
        .env(
            "RUST_LOG",
            std::env::var("GB_TEST_LOG").unwrap_or("geobeat=info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(file)
        .spawn()
        .expect("spawn geobeat")
}

impl Server {
    /// Like [`Server::start`], but the server's log (at `info` unless `GB_TEST_LOG` says
    /// otherwise) goes to the file `log` instead of the test's terminal.
    /// The port lies outside the kernel's ephemeral range, so that clients retrying while the
    /// server is down can never self-connect to it (a socket connecting to 127.0.0.1:P from the
    /// ephemeral port P connects to itself and then holds the port, and the restart fails with
    /// "Address already in use").
    pub fn start_logged(dir: &Path, extra: &[&str], log: &Path) -> Server {
        let (_, mut args) = serve_args(dir, extra);
        let addr = free_addr_outside_ephemeral();
        let listen = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
        args[listen] = addr.to_string();
        let child = spawn_logged(&args, log);
        let mut s = Server {
            child,
            addr,
            dir: dir.to_path_buf(),
            args,
        };
        s.wait_healthy_or_log(log);
        s
    }

    /// Restarts with the same arguments, appending the log to `log`.
    pub fn restart_logged(&mut self, log: &Path) {
        self.child = spawn_logged(&self.args, log);
        self.wait_healthy_or_log(log);
    }

    /// Waits for `/healthz`; on failure panics with the end of the server log.
    fn wait_healthy_or_log(&mut self, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("geobeat exited early: {st}\n{}", log_tail(log, 40));
            }
            if let Ok((200, _)) = http(self.addr, "GET", "/healthz", None) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not become healthy\n{}",
                log_tail(log, 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mints a token in-process from the data directory's secret (fast; many tokens).
    pub fn token_fast(&self, scope: geobeat::auth::Scope) -> String {
        let secret = geobeat::auth::Secret::load(&self.dir.join("secret")).expect("secret");
        let exp = (now_ms() / 1000) as u64 + 3600;
        geobeat::auth::mint(&secret, &scope, exp)
    }
}

/// A free TCP port on 127.0.0.1 below the kernel's ephemeral port range.
pub fn free_addr_outside_ephemeral() -> SocketAddr {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if low <= 2048 {
        return free_addr();
    }
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(1024.max(low / 2)..low);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
    free_addr()
}

/// The last `lines` lines of a log file (for failure messages).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One page of `GET /v1/devices/{id}/history` with a raw query string (e.g. `limit=10`).
pub fn history_page(server: &Server, id: &str, query: &str, token: &str) -> (u16, String) {
    let mut enc = String::new();
    geobeat::http::parse::percent_encode(id, &mut enc);
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    server.get(&format!("/v1/devices/{enc}/history{q}"), Some(token))
}

/// A device's whole history, newest first by device time, paging with `to` (device times must be
/// unique per device for the paging to be exact). `None` when the server answers 404.
pub fn history_all(server: &Server, id: &str, token: &str) -> Option<Vec<serde_json::Value>> {
    const PAGE: usize = 10_000;
    let mut out: Vec<serde_json::Value> = Vec::new();
    let mut to = i64::MAX;
    loop {
        let (st, body) = history_page(server, id, &format!("to={to}&limit={PAGE}"), token);
        if st == 404 && out.is_empty() {
            return None;
        }
        assert_eq!(st, 200, "history of {id}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("history is JSON");
        let page = v.as_array().expect("history is an array").clone();
        let n = page.len();
        let Some(oldest) = page.last().map(|h| h["ts"].as_i64().expect("ts")) else {
            return Some(out);
        };
        out.extend(page);
        if n < PAGE || oldest == i64::MIN {
            return Some(out);
        }
        to = oldest - 1;
    }
}

/// The last location as JSON, `None` on 404.
pub fn last_location(server: &Server, id: &str, token: &str) -> Option<serde_json::Value> {
    let mut enc = String::new();
    geobeat::http::parse::percent_encode(id, &mut enc);
    let (st, body) = server.get(&format!("/v1/devices/{enc}"), Some(token));
    match st {
        200 => Some(serde_json::from_str(&body).expect("last location is JSON")),
        404 => None,
        other => panic!("last location of {id}: {other} {body}"),
    }
}

/// The raw HTTP text of a WebSocket upgrade of `/v1/ingest` (with `extra` header lines, each
/// ending in `\r\n`).
pub fn upgrade_request(query: &str, extra: &str) -> String {
    format!(
        "GET /v1/ingest{query} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// A WebSocket client over an already connected stream (e.g. one with custom socket options).
#[allow(clippy::result_large_err)]
pub fn ws_over(
    stream: TcpStream,
    server: &Server,
    token: &str,
) -> Result<tungstenite::WebSocket<TcpStream>, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = server.ingest_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err(tungstenite::Error::Io(
            std::io::ErrorKind::WouldBlock.into(),
        )),
    }
}

/// Sends a WebSocket message on a raw socket as the client would: one masked frame with the
/// given first byte (FIN + opcode), zero mask (so the payload is sent as is).
pub fn raw_ws_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Reads the next text frame as JSON, or `None` when the connection closed (close frame, EOF,
/// reset) or nothing arrived within the socket's read timeout.
pub fn try_next_json<S: Read + Write>(
    ws: &mut tungstenite::WebSocket<S>,
) -> Option<serde_json::Value> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Runs `geobeat` with `args` (stderr to `log`) and waits up to 20 s for it to exit on its own;
/// returns its status (`None` if it was still running and had to be killed) and its stderr.
pub fn serve_until_exit(args: &[&str], log: &Path) -> (Option<ExitStatus>, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let status = wait_exit(spawn_logged(&args, log), Duration::from_secs(20));
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

/// Waits up to `limit` for `child` to exit on its own; `None` if it had to be killed.
pub fn wait_exit(mut child: Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
