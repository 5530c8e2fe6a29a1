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

impl Server {
    /// Starts `geobeat serve` on a free port with `dir` as its data directory, waits for
    /// `/healthz` to answer 200.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let addr = free_addr();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if !extra.contains(&"--shards") {
            args.extend(["--shards".into(), "2".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(bin())
            .args(&args)
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
