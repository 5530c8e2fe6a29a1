//! Exactly once from the device (issue 18, items 1 and 2), end to end: the real server, a real
//! Python `websockets` device (tests/support/seq_device.py) that declares device-scoped sequence
//! numbers, is killed mid-send, and resends everything unacked on its next connection, over
//! many rounds with the server killed (SIGKILL) in between. Afterwards every heartbeat the
//! device numbered is in the history exactly once, the gap counter equals the numbers it skipped
//! on purpose, and the mark survives restarts; duplicates are counted exactly.
//!
//! Quick by default (CI); `GEOBEAT_SEQ_FULL=1` runs many more rounds and heartbeats.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn script() -> String {
    format!("{}/tests/support/seq_device.py", env!("CARGO_MANIFEST_DIR"))
}

fn full() -> bool {
    std::env::var("GEOBEAT_SEQ_FULL").is_ok_and(|v| v == "1")
}

/// Runs the device once; returns its exit code and JSON lines. With `kill_server_after`, the
/// server is killed (SIGKILL) that long after the device read its resume frame.
fn device(
    server: &mut Server,
    token: &str,
    state: &Path,
    args: &[&str],
    kill_server_after: Option<Duration>,
) -> (i32, Vec<Value>) {
    let mut child = Command::new("python3")
        .arg(script())
        .args(["--url", &server.ingest_url(), "--token", token])
        .args(["--state", &state.display().to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (with the websockets package)");
    let mut lines = Vec::new();
    let reader = BufReader::new(child.stdout.take().unwrap());
    for l in reader.lines() {
        let v: Value = serde_json::from_str(&l.unwrap()).expect("JSON line");
        let resumed = v.get("resume").is_some();
        lines.push(v);
        if let (true, Some(after)) = (resumed, kill_server_after) {
            std::thread::sleep(after);
            server.kill9();
        }
    }
    let st = child.wait().unwrap();
    (st.code().unwrap_or(-1), lines)
}

fn audit(server: &Server, id: &str, ops: &str) -> Value {
    let loc = last_location(server, id, ops).expect("device known");
    loc["audit"].clone()
}

#[test]
fn killed_devices_and_servers_store_every_heartbeat_exactly_once() {
    // Rounds alternate: the device dies after a few batches (abrupt exit, unacked heartbeats
    // left for the next run), or the server is SIGKILLed while the device sends. A final run
    // drains the outbox. Then the history (by device time, unique per sequence number) must hold
    // each generated number once, and the audit must report exactly the skipped numbers as gaps.
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let id = "seq-dev-1";
    let token = server.token(&["device", id]);
    let ops = server.token(&["ops"]);
    // The device's own storage, outside the server's data directory.
    let device_dir = tempfile::tempdir().unwrap();
    let state = device_dir.path().join("device-state.json");
    let (rounds, count) = if full() { (40, 2000) } else { (8, 300) };
    let mut server_kills = 0;
    for round in 0..rounds {
        let count_s = count.to_string();
        let mut args = vec!["--count", &count_s, "--batch", "25", "--skip-every", "97"];
        if round % 2 == 0 {
            // The device dies after a few batches.
            let n = ["2", "5", "9"][round % 3];
            args.extend(["--die-after-batches", n]);
            let (code, lines) = device(&mut server, &token, &state, &args, None);
            assert_eq!(code, 3, "round {round}: {lines:?}");
        } else {
            // The server is killed while the device sends.
            args.extend(["--pause-ms", "5"]);
            let after = Duration::from_millis(20 + 30 * (round as u64 % 4));
            let (code, lines) = device(&mut server, &token, &state, &args, Some(after));
            assert!(
                code == 4 || code == 0,
                "round {round}: exit {code}: {lines:?}"
            );
            server_kills += 1;
            server.restart();
        }
    }
    assert!(server_kills >= rounds / 2);
    // Drain: everything left unacked is resent and acked.
    let (code, lines) = device(&mut server, &token, &state, &["--count", "0"], None);
    assert_eq!(code, 0, "drain: {lines:?}");
    let st: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(st["unacked"].as_array().unwrap().is_empty());
    let generated = st["generated"].as_array().unwrap().len();
    let skipped = st["skipped"].as_array().unwrap().len() as u64;
    assert!(skipped > 0, "the scenario skips numbers on purpose");

    // Every generated heartbeat exactly once (ts = base + seq identifies it).
    let history = history_all(&server, id, &ops).expect("history");
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for h in &history {
        *counts.entry(h["ts"].as_i64().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(
        history.len(),
        generated,
        "every numbered heartbeat stored once"
    );

    let a = audit(&server, id, &ops);
    assert_eq!(
        a["gaps"], skipped,
        "gaps are exactly the skipped numbers: {a}"
    );
    // (Duplicates are counted in memory since the shard opened: the SIGKILLs reset them, so
    // their exact count is checked in `resume_frame_and_handshake_rules`.)
    let next = st["next"].as_u64().unwrap();
    assert_eq!(
        a["seq"],
        next - 1,
        "the mark is the highest number sent: {a}"
    );

    // The mark and the gaps survive a restart (rebuilt from the log), and a resend of an old
    // number after it is still a duplicate.
    server.kill9();
    server.restart();
    let b = audit(&server, id, &ops);
    assert_eq!(
        (&b["epoch"], &b["seq"], &b["gaps"]),
        (&a["epoch"], &a["seq"], &a["gaps"])
    );

    // A new epoch (the device lost its counter) starts over at 1 and is stored.
    let (code, lines) = device(
        &mut server,
        &token,
        &state,
        &["--epoch", "1", "--count", "50"],
        None,
    );
    assert_eq!(code, 0, "epoch 1: {lines:?}");
    let c = audit(&server, id, &ops);
    assert_eq!(
        (&c["epoch"], &c["seq"], &c["gaps"]),
        (&1.into(), &50.into(), &a["gaps"])
    );
    assert_eq!(
        history_all(&server, id, &ops).unwrap().len(),
        generated + 50
    );

    // Metrics aggregate the counters.
    let (st, metrics) = server.get("/metrics", None);
    assert_eq!(st, 200);
    let gauge = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum()
    };
    assert_eq!(gauge("geobeat_device_seq_gaps"), skipped);
    assert_eq!(gauge("geobeat_device_seq_devices"), 1);
}

#[test]
fn resume_frame_and_handshake_rules() {
    // The first frame of a connection with ?epoch= is the mark; an epoch with a gateway token
    // or a malformed epoch is refused before the upgrade; connections without it are unchanged.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let token = server.token(&["device", "r-1"]);
    let gw = server.token(&["gateway", "r-"]);
    let url = |q: &str| format!("ws://{}/v1/ingest?{q}", server.addr);
    // The socket, or the HTTP status of a refused upgrade (`None`: another failure).
    let connect = |q: &str, tok: &str| {
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(url(q)).unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {tok}").parse().unwrap());
        tungstenite::connect(req)
            .map(|(ws, _)| ws)
            .map_err(|e| match e {
                tungstenite::Error::Http(r) => Some(r.status().as_u16()),
                _ => None,
            })
    };
    let mut ws = connect("epoch=7", &token).unwrap();
    assert_eq!(
        next_json(&mut ws),
        serde_json::json!({"resume":{"epoch":7,"seq":0}})
    );
    let ts = now_ms();
    ws.send(Message::text(format!(
        r#"[{{"seq":5,"lat":1,"lon":2,"ts":{ts}}},{{"seq":6,"lat":1,"lon":2,"ts":{}}}]"#,
        ts + 1
    )))
    .unwrap();
    wait_ack(&mut ws, 6);
    drop(ws);
    let mut ws = connect("epoch=7", &token).unwrap();
    assert_eq!(
        next_json(&mut ws),
        serde_json::json!({"resume":{"epoch":7,"seq":6}})
    );
    // A resend of 6 and a new 7 in one frame: both acked, only 7 stored.
    ws.send(Message::text(format!(
        r#"[{{"seq":6,"lat":1,"lon":2,"ts":{}}},{{"seq":7,"lat":1,"lon":2,"ts":{}}}]"#,
        ts + 1,
        ts + 2
    )))
    .unwrap();
    wait_ack(&mut ws, 7);
    let ops = server.token(&["ops"]);
    assert_eq!(history_all(&server, "r-1", &ops).unwrap().len(), 3);
    let a = last_location(&server, "r-1", &ops).unwrap()["audit"].clone();
    // Numbers 1..=4 of epoch 7 were never sent: gaps.
    assert_eq!(
        a,
        serde_json::json!({"epoch":7,"seq":7,"gaps":4,"duplicates":1})
    );
    for (q, tok) in [("epoch=x", &token), ("epoch=-1", &token), ("epoch=1", &gw)] {
        assert_eq!(connect(q, tok).err(), Some(Some(400)), "{q}");
    }
    // Without an epoch: no resume frame, the first frame is the ack (old clients unchanged).
    let mut ws = connect("", &token).unwrap();
    ws.send(Message::text(hb_json(1, 1.0, 2.0, now_ms())))
        .unwrap();
    assert_eq!(next_json(&mut ws), serde_json::json!({"ack":1}));
}

/// Runs tests/support/seq_mqtt.py; its JSON lines.
fn mqtt_device(
    port: u16,
    token: &str,
    device: &str,
    epoch: u32,
    seqs: &str,
    base: i64,
) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(format!(
            "{}/tests/support/seq_mqtt.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([
            "--port",
            &port.to_string(),
            "--token",
            token,
            "--device",
            device,
        ])
        .args([
            "--epoch",
            &epoch.to_string(),
            "--seqs",
            seqs,
            "--base-ms",
            &base.to_string(),
        ])
        .output()
        .expect("python3 (with paho-mqtt)");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        out.status.success(),
        "seq_mqtt {seqs}: {lines:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

#[test]
fn mqtt5_devices_resume_and_are_stored_once() {
    // paho-mqtt over MQTT 5: CONNECT with the User Property epoch, PUBLISHes numbered with the
    // User Property seq. A reconnect learns its mark in the CONNACK; resends below it are
    // acknowledged and not stored, also after the server was SIGKILLed; a skipped number is a gap.
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let mqtt_arg = mqtt.to_string();
    let mut server = Server::start(dir.path(), &["--mqtt-listen", &mqtt_arg]);
    let id = "mq-seq-1";
    let token = server.token(&["device", id]);
    let ops = server.token(&["ops"]);
    let base = now_ms() - 60_000;
    let run = |seqs: &str| mqtt_device(mqtt.port(), &token, id, 5, seqs, base);
    let l = run("1-50");
    assert_eq!(l[0]["resume"], serde_json::json!({"epoch":5,"seq":0}));
    let l = run("41-60");
    assert_eq!(l[0]["resume"], serde_json::json!({"epoch":5,"seq":50}));
    server.kill9();
    server.restart();
    let l = run("55-64,66-70");
    assert_eq!(l[0]["resume"], serde_json::json!({"epoch":5,"seq":60}));
    let history = history_all(&server, id, &ops).unwrap();
    let mut ts: Vec<i64> = history
        .iter()
        .map(|h| h["ts"].as_i64().unwrap() - base)
        .collect();
    ts.sort();
    let want: Vec<i64> = (1..=70).filter(|n| *n != 65).collect();
    assert_eq!(ts, want, "each numbered PUBLISH stored once");
    let a = audit(&server, id, &ops);
    // Duplicates since the restart: 55..=60.
    assert_eq!(
        a,
        serde_json::json!({"epoch":5,"seq":70,"gaps":1,"duplicates":6})
    );
}

#[test]
fn osmand_resends_are_stored_once() {
    // An OsmAnd/Traccar resend (same device, same device timestamp) is answered 200 and not
    // stored again; a new timestamp is stored; the duplicate is counted in the device's audit.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let tok = server.token(&["device", "osm-1"]);
    let ops = server.token(&["ops"]);
    let ts = now_ms() / 1000;
    let get = |t: i64| {
        let path = format!("/v1/osmand?token={tok}&id=osm-1&timestamp={t}&lat=48.85&lon=2.35");
        http(server.addr, "GET", &path, None).unwrap().0
    };
    assert_eq!(get(ts), 200);
    assert_eq!(get(ts), 200, "the resend is answered like the original");
    assert_eq!(get(ts + 1), 200);
    assert_eq!(history_all(&server, "osm-1", &ops).unwrap().len(), 2);
    assert_eq!(
        last_location(&server, "osm-1", &ops).unwrap()["audit"],
        serde_json::json!({"gaps":0,"duplicates":1})
    );
}
