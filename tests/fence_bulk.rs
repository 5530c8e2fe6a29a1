//! Bulk fence import (`POST /v1/geofences`) against the real binary: a large batch lands in one
//! request and is listed, reloaded after a restart and drives enter/exit events like PUT fences;
//! a bad entry anywhere refuses the whole batch with its index and the PUT route's reason; tokens
//! and body limits are checked before the body is read.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

fn post(server: &Server, token: Option<&str>, body: &Value) -> (u16, Value) {
    let (st, text) = http_body(server, "POST", "/v1/geofences", token, &body.to_string());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{st} {text:?}: {e}"));
    (st, v)
}

/// The listed fence names.
fn names(server: &Server, token: &str) -> Vec<String> {
    let (st, body) = server.get("/v1/geofences", Some(token));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["fences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// `n` small circles `bulk-00000`.. on a grid of distinct centres, as bulk entries.
fn circles(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let lon = -170.0 + (i % 300) as f64;
            let lat = -60.0 + (i / 300) as f64;
            json!({"name": format!("bulk-{i:05}"), "shape": {"center": [lon, lat], "radius_m": 1000}})
        })
        .collect()
}

/// The square lon 13..14, lat 52..53.
fn depot() -> Value {
    json!({"type": "Polygon", "coordinates": [[[13.0, 52.0], [14.0, 52.0], [14.0, 53.0], [13.0, 53.0], [13.0, 52.0]]]})
}

/// Subscribes (ops token) to fence `name`; returns the socket.
fn sub_fence(server: &Server, ops: &str, name: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let url = format!("ws://{}/v1/subscribe?token={ops}", server.addr);
    let (mut ws, _) = tungstenite::client(url, stream).unwrap();
    ws.send(Message::text(
        json!({"op": "subscribe", "sub": "s", "fence": name}).to_string(),
    ))
    .unwrap();
    assert_eq!(read_json(&mut ws), json!({"ok": "subscribe", "sub": "s"}));
    ws
}

fn read_json(ws: &mut tungstenite::WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("read frame") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Sends device `id` to `(lat, lon)` and then to the far south, and returns the two fence
/// events the subscriber `sub` gets as `(event, fence)`.
fn enter_then_exit(
    server: &Server,
    sub: &mut tungstenite::WebSocket<TcpStream>,
    id: &str,
    lat: f64,
    lon: f64,
    t: i64,
) -> Vec<(String, String)> {
    let mut dev = ws_connect(server, &server.token(&["device", id])).unwrap();
    dev.send(Message::text(hb_json(1, lat, lon, t))).unwrap();
    dev.send(Message::text(hb_json(2, -85.0, 0.0, t + 1)))
        .unwrap();
    assert!(wait_ack(&mut dev, 2).is_empty());
    (0..2)
        .map(|_| {
            let f = read_json(sub);
            assert_eq!(f["id"], id, "{f}");
            (
                f["event"].as_str().unwrap().to_string(),
                f["fence"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_large_batch_lands_in_one_request_drives_events_and_survives_a_restart() {
    // Imports 2,000 circles plus a polygon in one POST (200, created 2001, replaced 0) and lists
    // them all; a second batch replacing the polygon by a circle and adding one fence reports
    // created 1, replaced 1 and GET shows the new shape. A subscriber of an imported fence gets
    // enter then exit for a device moving in and out (as for a PUT fence). After SIGTERM and a
    // restart every imported fence is listed again and still emits enter/exit.
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let mut fences = circles(2000);
    fences.insert(1000, json!({"name": "depot", "shape": depot()}));
    let (st, v) = post(&server, Some(&ops), &json!({ "fences": fences }));
    assert_eq!(
        (st, v.clone()),
        (200, json!({"created": 2001, "replaced": 0}))
    );
    let mut want: Vec<String> = fences
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(names(&server, &ops), want);

    let mut sub = sub_fence(&server, &ops, "depot");
    let got = enter_then_exit(&server, &mut sub, "bulk-dev-1", 52.5, 13.5, now_ms());
    let ev = |e: &str| (e.to_string(), "depot".to_string());
    assert_eq!(got, [ev("enter"), ev("exit")]);

    let second = json!({"fences": [
        {"name": "depot", "shape": {"center": [13.5, 52.5], "radius_m": 2000}},
        {"name": "extra", "shape": depot()},
    ]});
    let (st, v) = post(&server, Some(&ops), &second);
    assert_eq!((st, v), (200, json!({"created": 1, "replaced": 1})));
    let (st, body) = server.get("/v1/geofences/depot", Some(&ops));
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["shape"],
        json!({"center": [13.5, 52.5], "radius_m": 2000.0})
    );
    want.push("extra".into());
    want.sort();

    drop(sub);
    assert!(server.sigterm().success());
    server.restart();
    assert_eq!(names(&server, &ops), want);
    let mut sub = sub_fence(&server, &ops, "bulk-00301");
    // bulk-00301 is centred at lon -169, lat -59 (radius 1 km).
    let got = enter_then_exit(&server, &mut sub, "bulk-dev-2", -59.0, -169.0, now_ms());
    let ev = |e: &str| (e.to_string(), "bulk-00301".to_string());
    assert_eq!(got, [ev("enter"), ev("exit")]);
}

#[test]
fn a_bad_entry_refuses_the_whole_batch_with_its_index() {
    // With one fence stored, batches of 500 good circles with one bad entry at index 250 (a
    // bad radius, a bad name, an unknown shape member, a name used twice) are each 400 with
    // index 250, the param at fault and the PUT route's reason (and, for the shape, the very
    // message PUT gives); too many entries, a non-batch body and a batch past FENCES_MAX are
    // 400 too; after all of them only the first fence is stored.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let (st, _) = http_body(
        &server,
        "PUT",
        "/v1/geofences/first",
        Some(&ops),
        &depot().to_string(),
    );
    assert_eq!(st, 200);
    let bad_radius = json!({"center": [1, 2], "radius_m": -1});
    let (st, put_err) = http_body(
        &server,
        "PUT",
        "/v1/geofences/x",
        Some(&ops),
        &bad_radius.to_string(),
    );
    assert_eq!(st, 400);
    let put_err: Value = serde_json::from_str(&put_err).unwrap();
    let cases = [
        (
            json!({"name": "x", "shape": bad_radius}),
            "shape",
            "bad_radius",
        ),
        (json!({"name": "a b", "shape": depot()}), "name", "bad_name"),
        (
            json!({"name": "x", "shape": {"center": [1, 2], "radius_m": 5, "properties": {}}}),
            "shape",
            "bad_geojson",
        ),
        (
            json!({"name": "bulk-00007", "shape": depot()}),
            "name",
            "duplicate_name",
        ),
        (json!({"name": "x"}), "fences", "bad_batch"),
    ];
    for (bad, param, reason) in cases {
        let mut fences = circles(500);
        fences[250] = bad.clone();
        let (st, v) = post(&server, Some(&ops), &json!({ "fences": fences }));
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(
            (&v["index"], &v["param"], &v["reason"]),
            (&json!(250), &json!(param), &json!(reason)),
            "{bad}: {v}"
        );
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        if reason == "bad_radius" {
            assert_eq!(v["error"], put_err["error"], "same message as PUT");
        }
    }
    let limit = geobeat::limits::FENCE_BULK_ENTRIES_MAX;
    let (st, v) = post(
        &server,
        Some(&ops),
        &json!({ "fences": circles(limit + 1) }),
    );
    assert_eq!((st, &v["reason"]), (400, &json!("too_many_entries")), "{v}");
    assert!(v.get("index").is_none(), "{v}");
    for body in ["", "not json", "[]", r#"{"fences":{}}"#] {
        let (st, text) = http_body(&server, "POST", "/v1/geofences", Some(&ops), body);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (st, &v["reason"]),
            (400, &json!("bad_batch")),
            "{body:?}: {v}"
        );
    }
    assert_eq!(names(&server, &ops), ["first"]);
    let (st, body) = server.get("/v1/geofences/first", Some(&ops));
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["shape"]["type"],
        "Polygon"
    );
}

#[test]
fn tokens_and_body_limits_are_checked_before_the_body_is_read() {
    // No token, a subscriber token and a device token are 401 (nothing stored). A declared
    // body one byte over FENCE_BULK_BODY_BYTES_MAX, with an ops token, is answered 413 from the
    // head alone: the server replies and closes while the client has sent no body byte. A
    // declared 1 MB body (over the general 64 KiB limit) without a token is 401, also before
    // the body. A body over 1 MiB (the PUT limit) but within the bulk limit is accepted.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let batch = json!({"fences": circles(3)});
    for token in [
        None,
        Some(server.token(&["subscriber", "x-"])),
        Some(server.token(&["device", "x-1"])),
    ] {
        assert_eq!(post(&server, token.as_deref(), &batch).0, 401, "{token:?}");
    }
    assert!(names(&server, &ops).is_empty());

    for (declared, auth, status) in [
        (
            geobeat::limits::FENCE_BULK_BODY_BYTES_MAX + 1,
            format!("authorization: Bearer {ops}\r\n"),
            413,
        ),
        (1_000_000, String::new(), 401),
    ] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST /v1/geofences HTTP/1.1\r\nhost: x\r\n{auth}content-length: {declared}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "declared {declared}: {text}"
        );
    }

    let big = circles(geobeat::limits::FENCE_BULK_ENTRIES_MAX);
    // Pretty-printed (as a hand-written import file might be) to pass the 1 MiB PUT limit.
    let body = serde_json::to_string_pretty(&json!({ "fences": big })).unwrap();
    assert!(
        body.len() > geobeat::limits::FENCE_BODY_BYTES_MAX,
        "{}",
        body.len()
    );
    let (st, text) = http_body(&server, "POST", "/v1/geofences", Some(&ops), &body);
    assert_eq!(st, 200, "{text}");
    assert_eq!(
        names(&server, &ops).len(),
        geobeat::limits::FENCE_BULK_ENTRIES_MAX
    );
}

/// A valid near-circle polygon of exactly `n` positions around `(lon, 0)`.
fn many_positions(n: usize, lon: f64) -> Value {
    let mut ring: Vec<[f64; 2]> = (0..n - 1)
        .map(|i| {
            let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
            [lon + a.cos(), a.sin()]
        })
        .collect();
    ring.push(ring[0]);
    json!({"type": "Polygon", "coordinates": [ring]})
}

#[test]
fn rings_that_are_not_simple_and_fences_over_the_vertex_budget_are_refused() {
    // Issue 20 §5. PUT and the bulk import refuse a figure eight (self_intersecting), a hole
    // outside the exterior (hole_outside) and nested holes (holes_overlap) with a 400 naming the
    // edges. Fences filling FENCE_VERTICES_TOTAL_MAX positions are stored; one more position by
    // PUT or bulk is 400 too_many_vertices_total naming the limit; a fences file over the budget
    // stops the server at start with one line naming the file and the limit.
    use geobeat::limits::{FENCE_VERTICES_MAX, FENCE_VERTICES_TOTAL_MAX};
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let sq = json!([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]);
    let cases = [
        (
            json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}),
            "self_intersecting",
        ),
        (
            json!({"type": "Polygon", "coordinates": [sq, [[20, 20], [21, 20], [21, 21], [20, 20]]]}),
            "hole_outside",
        ),
        (
            json!({"type": "Polygon", "coordinates": [sq, [[5, 5], [12, 5], [12, 6], [5, 5]]]}),
            "hole_outside",
        ),
        (
            json!({"type": "Polygon", "coordinates": [sq, [[1, 1], [5, 1], [5, 5], [1, 5], [1, 1]],
                [[2, 2], [3, 2], [3, 3], [2, 2]]]}),
            "holes_overlap",
        ),
    ];
    for (shape, reason) in &cases {
        let (st, text) = http_body(
            &server,
            "PUT",
            "/v1/geofences/bad",
            Some(&ops),
            &shape.to_string(),
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (st, &v["reason"], &v["param"]),
            (400, &json!(reason), &json!("body")),
            "{v}"
        );
        assert!(v["error"].as_str().unwrap().contains("ring"), "{v}");
        let mut fences = circles(5);
        fences[3] = json!({"name": "bad", "shape": shape});
        let (st, v) = post(&server, Some(&ops), &json!({ "fences": fences }));
        assert_eq!(
            (st, &v["reason"], &v["index"]),
            (400, &json!(reason), &json!(3)),
            "{v}"
        );
    }
    assert!(names(&server, &ops).is_empty());

    let full = FENCE_VERTICES_TOTAL_MAX / FENCE_VERTICES_MAX;
    let fences: Vec<Value> = (0..full)
        .map(|i| json!({"name": format!("big-{i:03}"), "shape": many_positions(FENCE_VERTICES_MAX, i as f64 * 0.001)}))
        .collect();
    // 40 MB of positions: a debug server takes longer than http_body's 10 s to store them.
    let body = json!({ "fences": fences }).to_string();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    write!(
        s,
        "POST /v1/geofences HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ops}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (st, text) = http_body(
        &server,
        "PUT",
        "/v1/geofences/one-more",
        Some(&ops),
        &many_positions(4, 50.0).to_string(),
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (st, &v["reason"], &v["param"]),
        (400, &json!("too_many_vertices_total"), &json!("body")),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("FENCE_VERTICES_TOTAL_MAX"),
        "{v}"
    );
    let (st, v) = post(
        &server,
        Some(&ops),
        &json!({"fences": [{"name": "one-more", "shape": many_positions(4, 50.0)}]}),
    );
    assert_eq!(
        (st, &v["reason"]),
        (400, &json!("too_many_vertices_total")),
        "{v}"
    );
    // A circle costs no positions.
    let (st, _) = http_body(
        &server,
        "PUT",
        "/v1/geofences/c",
        Some(&ops),
        r#"{"center":[1,2],"radius_m":5}"#,
    );
    assert_eq!(st, 200);
    assert_eq!(server.sigterm().code(), Some(0));

    // One fence more in the file than the budget allows: the server refuses to start.
    let path = dir.path().join(geobeat::fence::FENCES_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let extra = json!({"name": "zz", "shape": many_positions(4, 50.0)});
    std::fs::write(&path, text.replacen("\n]}", &format!(",\n{extra}\n]}}"), 1)).unwrap();
    let out = std::process::Command::new(bin())
        .args(&server.args)
        .env(MQTT_OFF.0, MQTT_OFF.1)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("geofences.json") && stderr.contains("FENCE_VERTICES_TOTAL_MAX"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
