//! The HTTP query API against the real binary: history equals what was ingested (newest first by
//! device time, late heartbeats in their place, bounds inclusive, limits), and the error answers
//! (401, 400 naming the parameter, 404, 405).

mod common;
use common::*;

fn ts_of(body: &str) -> Vec<i64> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| h["ts"].as_i64().unwrap())
        .collect()
}

#[test]
fn history_returns_what_was_ingested_newest_first_with_bounds_and_limits() {
    // 30 heartbeats sent in shuffled device-time order through a gateway (two devices, so both
    // shards and the forwarding path are used) come back per device, newest first, exactly once.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let gw = server.token(&["gateway", "h-"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let base = now_ms() - 3_600_000;
    let order: Vec<i64> = (0..30).map(|i| (i * 7) % 30).collect();
    let mut seq = 0;
    for &k in &order {
        for id in ["h-a", "h-b"] {
            seq += 1;
            let f = format!(
                r#"{{"seq":{seq},"id":"{id}","lat":{},"lon":1,"ts":{}}}"#,
                k as f64 / 10.0,
                base + k * 1000
            );
            ws.send(Message::text(f)).unwrap();
        }
    }
    assert!(wait_ack(&mut ws, seq).is_empty());
    let all: Vec<i64> = (0..30).rev().map(|k| base + k * 1000).collect();
    for id in ["h-a", "h-b"] {
        let (st, body) = server.get(&format!("/v1/devices/{id}/history"), Some(&ops));
        assert_eq!(st, 200, "{body}");
        assert_eq!(ts_of(&body), all);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["id"], id);
        assert_eq!(v[0]["lat"], 2.9);
    }
    let (_, body) = server.get(
        &format!(
            "/v1/devices/h-a/history?from={}&to={}",
            base + 5000,
            base + 9000
        ),
        Some(&ops),
    );
    assert_eq!(
        ts_of(&body),
        vec![
            base + 9000,
            base + 8000,
            base + 7000,
            base + 6000,
            base + 5000
        ]
    );
    let (_, body) = server.get("/v1/devices/h-a/history?limit=4", Some(&ops));
    assert_eq!(ts_of(&body), all[..4].to_vec());
}

#[test]
fn query_errors_are_json_with_the_right_status() {
    // 401 without a token or with a device token, 400 naming the bad parameter, 404 for an
    // unknown device or path, 405 for a wrong method.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let dev = server.token(&["device", "q-1"]);
    let mut ws = ws_connect(&server, &dev).unwrap();
    ws.send(Message::text(hb_json(1, 1.0, 1.0, now_ms())))
        .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());

    assert_eq!(server.get("/v1/devices/q-1/history", None).0, 401);
    assert_eq!(server.get("/v1/devices/q-1/history", Some(&dev)).0, 401);
    for (q, param) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("from=abc", "from"),
        ("to=1.5", "to"),
    ] {
        let (st, body) = server.get(&format!("/v1/devices/q-1/history?{q}"), Some(&ops));
        assert_eq!(st, 400, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["param"], param, "{q}");
    }
    assert_eq!(
        server
            .get("/v1/devices/q-1/history?limit=10000", Some(&ops))
            .0,
        200
    );
    let (st, body) = server.get("/v1/devices/nobody/history", Some(&ops));
    assert_eq!((st, body.contains("\"param\":\"id\"")), (404, true));
    assert_eq!(server.get("/v1/devices/q-1/elsewhere", Some(&ops)).0, 404);
    assert_eq!(
        http(server.addr, "DELETE", "/v1/devices/q-1/history", Some(&ops))
            .unwrap()
            .0,
        405
    );
}
