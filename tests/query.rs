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

#[test]
fn area_queries_by_bbox_and_radius_across_shards() {
    // Devices on both sides of the antimeridian and near a pole, spread over both shards:
    // a crossing bbox finds exactly the ones inside (sorted by id), a near query returns them
    // sorted by great-circle distance with distance_m, and bad parameters are 400s naming them.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let gw = server.token(&["gateway", "a-"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms();
    let fleet = [
        ("a-east", 0.0, 179.5),
        ("a-west", 0.5, -179.5),
        ("a-zero", 0.0, 0.0),
        ("a-pole", 89.9, 45.0),
        ("a-pole2", 89.9, -135.0),
    ];
    for (i, (id, lat, lon)) in fleet.iter().enumerate() {
        let f = format!(
            r#"{{"seq":{},"id":"{id}","lat":{lat},"lon":{lon},"ts":{t}}}"#,
            i + 1
        );
        ws.send(Message::text(f)).unwrap();
    }
    assert!(wait_ack(&mut ws, fleet.len() as u64).is_empty());
    let ids = |body: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (st, body) = server.get("/v1/devices?bbox=179,-1,-179,1", Some(&ops));
    assert_eq!(st, 200, "{body}");
    assert_eq!(ids(&body), vec!["a-east", "a-west"]);
    let (_, body) = server.get("/v1/devices?near=0,180&radius=200000", Some(&ops));
    assert_eq!(ids(&body), vec!["a-east", "a-west"]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        (v[0]["distance_m"].as_f64().unwrap() - 55_597.0).abs() < 50.0,
        "{body}"
    );
    // Around the pole: both polar devices are ~22 km apart, 180° of longitude between them.
    let (_, body) = server.get("/v1/devices?near=90,0&radius=20000", Some(&ops));
    assert_eq!(ids(&body), vec!["a-pole", "a-pole2"]);
    let (_, body) = server.get("/v1/devices?bbox=-180,-90,180,90&limit=2", Some(&ops));
    assert_eq!(ids(&body), vec!["a-east", "a-pole"]);
    for (q, param) in [
        ("bbox=1,2,3", "bbox"),
        ("bbox=0,10,1,5", "bbox"),
        ("near=0,0", "radius"),
        ("near=95,0&radius=10", "near"),
        ("near=0,0&radius=-1", "radius"),
        ("", "bbox"),
        ("bbox=0,0,1,1&limit=0", "limit"),
    ] {
        let (st, body) = server.get(&format!("/v1/devices?{q}"), Some(&ops));
        assert_eq!(st, 400, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["param"], param, "{q}");
    }
    assert_eq!(server.get("/v1/devices?bbox=0,0,1,1", None).0, 401);
}

#[test]
fn oversized_requests_get_the_matching_4xx() {
    // A URI over the limit is 414, a head over the limit 431, a declared body over the limit
    // 413 — each with a JSON body — and the server keeps serving.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let long_uri = format!(
        "GET /v1/devices/{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(5000)
    );
    let (st, body) = raw_http(server.addr, long_uri.as_bytes()).unwrap();
    assert_eq!(st, 414, "{body}");
    assert!(body.contains("\"error\""));
    let big_head = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "b".repeat(9000)
    );
    assert_eq!(raw_http(server.addr, big_head.as_bytes()).unwrap().0, 431);
    let big_body = "POST /v1/devices HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n";
    assert_eq!(raw_http(server.addr, big_body.as_bytes()).unwrap().0, 413);
    let smuggle = "POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(raw_http(server.addr, smuggle.as_bytes()).unwrap().0, 400);
    assert_eq!(server.get("/healthz", None).0, 200);
}

#[test]
fn area_results_carry_the_fields_of_the_device_endpoint() {
    // An area row is the device's `GET /v1/devices/{id}` body (received_at and the optional
    // fields it was sent with) plus distance_m for near queries, across both shards.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let gw = server.token(&["gateway", "f-"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms();
    let frame = format!(
        r#"[{{"seq":1,"id":"f-full","lat":10.0,"lon":20.0,"ts":{t},"alt":34.5,"speed":3.5,"heading":271,"acc":4,"attrs":{{"fuel":0.5}}}},
            {{"seq":2,"id":"f-bare","lat":10.001,"lon":20.001,"ts":{t}}},
            {{"seq":3,"id":"f-two","lat":10.002,"lon":20.002,"ts":{t},"speed":1}}]"#
    );
    ws.send(Message::text(frame)).unwrap();
    assert!(wait_ack(&mut ws, 3).is_empty());
    for query in ["bbox=19,9,21,11", "near=10,20&radius=5000"] {
        let (st, body) = server.get(&format!("/v1/devices?{query}"), Some(&ops));
        assert_eq!(st, 200, "{body}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(rows.len(), 3, "{body}");
        for mut row in rows {
            let id = row["id"].as_str().unwrap().to_string();
            let near = query.starts_with("near");
            let distance = row.as_object_mut().unwrap().remove("distance_m");
            assert_eq!(distance.is_some(), near, "{query}: {body}");
            let single = last_location(&server, &id, &ops).expect("the device endpoint knows it");
            assert_eq!(
                row, single,
                "{query}: area row of {id} differs from its device body"
            );
        }
    }
    let (_, body) = server.get("/v1/devices?bbox=19,9,21,11", Some(&ops));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows[1]["id"], "f-full", "{body}");
    assert_eq!(rows[1]["received_at"].as_i64().map(|r| r >= t), Some(true));
    assert_eq!(rows[1]["heading"], 271.0);
    assert_eq!(rows[1]["attrs"]["fuel"], 0.5);
}

#[test]
fn an_area_row_whose_record_retention_deleted_keeps_every_field() {
    // Device `r-old` sends once (with speed), then other devices fill the 1 MiB segment so it
    // is sealed, and the 1 s retention deletes it. The area answer still lists `r-old` with every
    // field it sent, read from the last-location checkpoint (issue 13 §1), and agrees with the
    // device endpoint.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--shards",
            "1",
            "--segment-bytes",
            "1MiB",
            "--retention",
            "1s",
        ],
    );
    let gw = server.token(&["gateway", "r-"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms();
    ws.send(Message::text(format!(
        r#"{{"seq":1,"id":"r-old","lat":30.0,"lon":30.0,"ts":{t},"speed":2.5}}"#
    )))
    .unwrap();
    let mut seq = 1u64;
    // 8,000 entries of ~200 bytes: past one 1 MiB segment, in frames under the 64 KiB limit.
    for _ in 0..40 {
        let batch: Vec<String> = (0..200)
            .map(|i| {
                seq += 1;
                format!(
                    r#"{{"seq":{seq},"id":"r-fill-{i}","lat":-30.0,"lon":-30.0,"ts":{t},"attrs":{{"pad":"{}"}}}}"#,
                    "x".repeat(100)
                )
            })
            .collect();
        ws.send(Message::text(format!("[{}]", batch.join(","))))
            .unwrap();
    }
    assert!(wait_ack(&mut ws, seq).is_empty());
    // Retention deleted the first segment once the oldest segment file no longer starts at 0.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    fn has_first_segment(dir: &std::path::Path) -> bool {
        std::fs::read_dir(dir).unwrap().flatten().any(|e| {
            let p = e.path();
            if p.is_dir() {
                has_first_segment(&p)
            } else {
                e.file_name() == "00000000000000000000.seg"
            }
        })
    }
    while has_first_segment(dir.path()) {
        assert!(
            std::time::Instant::now() < deadline,
            "retention never deleted r-old's segment"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let (st, body) = server.get("/v1/devices?bbox=29,29,31,31", Some(&ops));
    assert_eq!(st, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    let row = rows[0].clone();
    assert_eq!(row["id"], "r-old");
    assert_eq!(
        (row["lat"].as_f64(), row["lon"].as_f64()),
        (Some(30.0), Some(30.0))
    );
    assert_eq!(row["ts"].as_i64(), Some(t));
    assert!(row["received_at"].as_i64().is_some_and(|r| r >= t), "{row}");
    assert_eq!(row["speed"].as_f64(), Some(2.5), "{row}");
    let single = last_location(&server, "r-old", &ops).expect("r-old still answers");
    assert_eq!(row, single, "area row and device body disagree");
}
