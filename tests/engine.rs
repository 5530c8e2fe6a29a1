//! The ring connection engine (`--engine ring`, `net::engine`) with its own deadlines, in the
//! default test run (the whole ingest suites run against it in CI with `GEOBEAT_ENGINE=ring`):
//! the timing wheel pings a silent connection and closes it at the idle timeout, while a client
//! that answers pings stays connected and acked.

mod common;
use common::*;

use std::time::{Duration, Instant};
use tungstenite::Message;

#[test]
fn the_wheel_pings_silent_connections_and_closes_them_at_the_idle_timeout() {
    // Idle timeout 2 s (ping after 1 s of silence). Both devices send a heartbeat and get its
    // ack. The lively one keeps reading (tungstenite answers the pings it reads) and after 3.5 s
    // is still served: its next heartbeat is acked, and it saw a ping. The silent one neither
    // reads nor sends: when it finally reads, the server has pinged it and closed it with 1001
    // "idle timeout".
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--engine", "ring", "--idle-timeout-s", "2"]);
    let t = now_ms();
    let mut lively = ws_connect(&server, &server.token(&["device", "lively"])).unwrap();
    let mut silent = ws_connect(&server, &server.token(&["device", "silent"])).unwrap();
    for ws in [&mut lively, &mut silent] {
        ws.send(Message::text(hb_json(1, 1.0, 1.0, t))).unwrap();
        assert!(wait_ack(ws, 1).is_empty());
    }
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = lively.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    let start = Instant::now();
    let mut pinged = false;
    while start.elapsed() < Duration::from_millis(3500) {
        match lively.read() {
            Ok(Message::Ping(_)) => pinged = true,
            Ok(other) => panic!("unexpected frame {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("the lively connection failed: {e}"),
        }
    }
    assert!(pinged, "no ping in 3.5 s of silence from the server's side");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = lively.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    lively
        .send(Message::text(hb_json(2, 1.0, 1.0, now_ms())))
        .unwrap();
    assert!(wait_ack(&mut lively, 2).is_empty());
    assert_eq!(wait_close(&mut silent), (1001, "idle timeout".to_string()));
}
