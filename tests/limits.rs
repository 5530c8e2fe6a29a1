//! Connection hygiene of the real binary over real sockets: the connection cap refuses extras
//! cleanly, slowloris handshakes are cut at the handshake timeout, silent connections are pinged
//! and closed at the idle timeout, and SIGTERM drains (acks everything received, closes with
//! 1001, exits 0) — while other clients keep being served.

mod common;
use common::*;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[test]
fn connections_past_the_cap_are_refused_with_503_and_served_again_once_freed() {
    // Three WebSockets fill a cap of 3; a fourth connection gets an HTTP 503 JSON answer and
    // is closed; after one closes, a new one is served.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--connections-max", "3"]);
    let tok = server.token(&["device", "cap"]);
    let mut held: Vec<Ws> = (0..3)
        .map(|i| ws_connect(&server, &tok).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let (st, body) = http(server.addr, "GET", "/healthz", None).unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("too many connections"));
    let mut closing = held.pop().unwrap();
    closing.close(None).unwrap();
    let _ = closing.read();
    drop(closing);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http(server.addr, "GET", "/healthz", None) {
            Ok((200, _)) => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("slot not freed: {other:?}"),
        }
    }
}

#[test]
fn slowloris_handshakes_are_cut_at_the_handshake_timeout() {
    // A client that sends half a request head and stalls is answered 408 and closed after the
    // handshake timeout; a normal client is served meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--handshake-timeout-ms", "300"]);
    let mut slow = std::net::TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = Instant::now();
    assert_eq!(server.get("/healthz", None).0, 200);
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    slow.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[test]
fn silent_connections_are_pinged_then_closed_at_the_idle_timeout() {
    // With a 2 s idle timeout the server pings after 1 s; a client that answers (tungstenite
    // replies to pings while reading) stays open past the timeout; a raw client that never
    // answers is closed with 1001.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--idle-timeout-s", "2"]);
    let tok = server.token(&["device", "idle"]);
    let mut live = ws_connect(&server, &tok).unwrap();
    let mut silent = std::net::TcpStream::connect(server.addr).unwrap();
    let req = format!(
        "GET /v1/ingest?token={tok} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    silent.write_all(req.as_bytes()).unwrap();
    let started = Instant::now();
    match live.read().unwrap() {
        Message::Ping(_) => {}
        other => panic!("expected a ping, got {other:?}"),
    }
    live.flush().unwrap(); // sends the pong
                           // The silent one: 101, a ping, then a close frame with 1001 after ~2 s.
    silent
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = silent.read(&mut buf) {
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    // Find the close frame (opcode 0x8) and its code.
    let body = &bytes[bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let close_at = body.iter().position(|&b| b == 0x88).expect("a close frame");
    let code = u16::from_be_bytes([body[close_at + 2], body[close_at + 3]]);
    assert_eq!(code, 1001);
    // The live one still works.
    live.send(Message::text(hb_json(1, 1.0, 1.0, now_ms())))
        .unwrap();
    assert!(wait_ack(&mut live, 1).is_empty());
}

#[test]
fn sigterm_acks_what_was_received_closes_with_1001_and_exits_zero() {
    // Heartbeats sent just before SIGTERM are made durable and acked before the close frame;
    // the process exits 0; after a restart they are readable.
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let tok = server.token(&["device", "term"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    for seq in 1..=50u64 {
        ws.send(Message::text(hb_json(
            seq,
            1.0 + seq as f64 / 100.0,
            2.0,
            t + seq as i64,
        )))
        .unwrap();
    }
    // Make sure the server has read them before the signal.
    assert!(wait_ack(&mut ws, 50).is_empty());
    ws.send(Message::text(hb_json(51, 5.0, 5.0, t + 51)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let mut acked = 0;
    let code = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if let Some(a) = v["ack"].as_u64() {
                    acked = a;
                }
            }
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, Some(1001));
    assert_eq!(acked, 51);
    assert!(server.sigterm().success());
    server.restart();
    let v: serde_json::Value =
        serde_json::from_str(&server.get("/v1/devices/term", Some(&ops)).1).unwrap();
    assert_eq!(v["ts"], t + 51);
}
