//! The data directory removed while the server runs (issue 20 §1): a synced file in a deleted
//! directory is durable nowhere a restart would look, so the server must stop acknowledging.
//!
//! The test starts the real binary, gets one heartbeat acked, `rm -rf`s the data directory, and
//! checks that no later heartbeat is acked (the first one waits forever, the next ones are refused
//! with `storage_unavailable`), that `/readyz` answers 503 naming the shard while `/healthz` stays
//! 200, and that the log says why.

mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn removed_data_dir_stops_acknowledgements() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let log = tmp.path().join("server.log");
    let server = Server::start_logged(&dir, &["--shards", "1"], &log);
    let tok = server.token(&["device", "gone-1"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let ts = now_ms();
    ws.send(Message::text(hb_json(1, 52.5, 13.4, ts))).unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());

    std::fs::remove_dir_all(&dir).unwrap();

    // Seq 2 lands in the mapping, but its commit finds the directory gone: never acked.
    ws.send(Message::text(hb_json(2, 52.5, 13.4, ts + 1)))
        .unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert!(
                    v.get("ack").is_none(),
                    "acked after the data dir was removed: {v}"
                );
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("connection failed: {e}"),
        }
    }
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }

    // Later heartbeats are refused with a reason, and never acked.
    ws.send(Message::text(hb_json(3, 52.5, 13.4, ts + 2)))
        .unwrap();
    let v = match ws.read() {
        Ok(Message::Text(t)) => serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap(),
        other => panic!(
            "no answer to seq 3 ({other:?}); log:\n{}",
            log_tail(&log, 30)
        ),
    };
    assert_eq!(v["seq"], 3, "{v}");
    assert_eq!(v["error"], "storage_unavailable", "{v}");

    let (code, body) = server.get("/readyz", None);
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "storage_unavailable", "{body}");
    assert_eq!(body["shards"][0]["shard"], 0, "{body}");
    assert!(
        body["shards"][0]["error"]
            .as_str()
            .unwrap()
            .contains("removed or replaced"),
        "{body}"
    );
    assert_eq!(server.get("/healthz", None).0, 200);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("shard directory removed or replaced"),
        "log does not say why: {}",
        log_tail(&log, 20)
    );
}
