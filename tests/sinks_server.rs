//! The storage flusher wired into the real server: heartbeats acked over WebSocket reach an
//! audit-file sink configured in the TOML file, `/v1/sinks` shows the cursor catching up with the
//! durable position, and `/metrics` exposes the backlog per sink and shard. A sink that cannot be
//! reached is named by `/readyz` (still 200: ingest goes on) and logged with the cause.

mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn acked_heartbeats_reach_the_audit_sink_and_progress_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("geobeat.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"archive\"\nkind = \"audit\"\ndir = \"{}\"\npoll_interval_ms = 20\n",
            audit.display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", &config.display().to_string()]);
    let tok = server.token(&["gateway", "s-"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    for seq in 1..=100u64 {
        let f = format!(
            r#"{{"seq":{seq},"id":"s-{}","lat":1,"lon":2,"ts":{}}}"#,
            // s-0..s-15 route 8 and 8 to the two shards (CRC32C routing; s-0..s-6 all go to
            // shard 0, whose empty neighbour would then show a lag of one segment header).
            seq % 16,
            t + seq as i64
        );
        ws.send(Message::text(f)).unwrap();
    }
    assert!(wait_ack(&mut ws, 100).is_empty());
    // Every acked heartbeat appears exactly once in the audit files, with shard and pos.
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let mut lines = Vec::new();
        for shard in std::fs::read_dir(&audit).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                lines.extend(text.lines().map(String::from));
            }
        }
        if lines.len() >= 100 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut ts: Vec<i64> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["shard"].is_u64() && v["pos"].is_u64(), "{l}");
            v["ts"].as_i64().unwrap()
        })
        .collect();
    ts.sort();
    assert_eq!(ts, (1..=100).map(|s| t + s).collect::<Vec<_>>());
    // The sink's cursor reaches the durable position; the backlog metric is exported.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, body) = server.get("/v1/sinks", Some(&ops));
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["sinks"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "one row per shard: {body}");
        if rows
            .iter()
            .all(|r| r["lag_bytes"] == 0 && r["name"] == "archive")
        {
            break;
        }
        assert!(Instant::now() < deadline, "sink did not catch up: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = server.get("/metrics", None);
    assert!(
        metrics.contains("geobeat_sink_backlog_bytes{sink=\"archive\",shard=\"0\"} 0"),
        "{metrics}"
    );
    assert_eq!(server.get("/v1/sinks", None).0, 401);
}

#[test]
fn an_unreachable_sink_is_named_by_readyz_and_ingest_goes_on() {
    // A PostgreSQL sink pointing at a port nobody listens on, next to a working audit sink: the
    // server starts, /readyz stays 200 but names the failing sink (and only it) under
    // `sinks_failing`, /healthz is unchanged, heartbeats are still acknowledged and reach the
    // audit sink, and the error (in /v1/sinks and the log) carries the cause, not just the
    // client's "error connecting to server".
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("geobeat.toml");
    let port = free_addr().port();
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"archive\"\nkind = \"audit\"\ndir = \"{}\"\npoll_interval_ms = 20\n\
             [[sinks]]\nname = \"db\"\nkind = \"postgres\"\n\
             url = \"host=127.0.0.1 port={port} user=geobeat dbname=fleet connect_timeout=2\"\n",
            audit.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let server = Server::start_logged(
        &dir.path().join("data"),
        &["--config", &config.display().to_string()],
        &log,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (st, body) = server.get("/readyz", None);
        assert_eq!(st, 200, "{body}");
        if body.contains("sinks_failing") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named the sink: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok", "{body}");
    let failing = v["sinks_failing"].as_array().unwrap();
    assert_eq!(failing.len(), 1, "{body}");
    assert_eq!(failing[0]["sink"], "db", "{body}");
    assert_eq!(failing[0]["kind"], "postgres", "{body}");
    assert_eq!(failing[0]["shards"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(
        server.get("/healthz", None),
        (200, r#"{"status":"ok"}"#.into())
    );
    // Ingest goes on and the working sink gets the heartbeats.
    let tok = server.token(&["gateway", "u-"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    for seq in 1..=20u64 {
        let f = format!(
            r#"{{"seq":{seq},"id":"u-{seq}","lat":1,"lon":2,"ts":{}}}"#,
            t + seq as i64
        );
        ws.send(Message::text(f)).unwrap();
    }
    assert!(wait_ack(&mut ws, 20).is_empty());
    let ops = server.token(&["ops"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = server.get("/v1/sinks", Some(&ops));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["sinks"].as_array().unwrap();
        let archive_done = rows
            .iter()
            .filter(|r| r["name"] == "archive")
            .all(|r| r["lag_bytes"] == 0 && r["rows_total"].as_u64().is_some());
        let db_errors: Vec<&str> = rows
            .iter()
            .filter(|r| r["name"] == "db")
            .filter_map(|r| r["last_error"].as_str())
            .collect();
        if archive_done && db_errors.len() == 2 {
            for e in db_errors {
                assert!(e.contains("Connection refused"), "{e}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("sink cannot be reached") && l.contains("Connection refused")),
        "{text}"
    );
}
