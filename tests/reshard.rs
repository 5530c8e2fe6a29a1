//! `geobeat migrate` and `geobeat reshard` through the real binary: a format-1 directory written
//! by the previous code (tests/fixtures/format1) is refused by `serve` with the migrate command,
//! migrated, and then serves every heartbeat it held; a directory resharded 2 → 3 → 1 while an
//! audit sink runs keeps every heartbeat and last location readable over HTTP and the audit
//! output exactly once; and the refusals (server running, sink behind, bad arguments) are one
//! line with exit code 2 and change nothing.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `geobeat <args>`; returns exit code, stdout, stderr.
fn geobeat(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run geobeat");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The fixture's heartbeats (the formula of tests/fixtures/format1/README.md), per device in
/// append order, as the HTTP API renders them.
fn fixture_heartbeats() -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut ids: Vec<String> = (0..40).map(|i| format!("fx-{i:03}")).collect();
    ids.push("ü-gerät/7".into());
    let base = 1_764_000_000_000i64;
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for round in 0..5i64 {
        for (i, id) in ids.iter().enumerate() {
            let n = round * 100 + i as i64;
            let mut v = serde_json::json!({
                "id": id,
                "lat": -45.0 + i as f64 + round as f64 * 0.125,
                "lon": 10.0 - i as f64 * 0.5 + round as f64 * 0.25,
                "ts": base + round * 1000 + i as i64,
                "received_at": base + round * 1000 + i as i64 + 7,
            });
            if i % 2 == 0 {
                v["alt"] = serde_json::json!(100.5 + round as f64);
            }
            if i % 3 == 0 {
                v["speed"] = serde_json::json!(3.25);
            }
            if i % 4 == 0 {
                v["heading"] = serde_json::json!(90.0);
            }
            if i % 5 == 0 {
                v["acc"] = serde_json::json!(4.0);
            }
            if i % 7 == 0 {
                v["attrs"] = serde_json::json!({ "n": n });
            }
            out.entry(id.clone()).or_default().push(v);
        }
    }
    out
}

#[test]
fn a_format_1_directory_is_refused_then_migrated_and_serves_every_heartbeat() {
    // serve on the format-1 fixture exits 2 with one line naming the exact migrate command;
    // migrate rewrites it (205 entries, the fixture's sink cursor moved to the new ends, so
    // `geobeat sinks` shows no lag); the server then returns every heartbeat of every device
    // (all fields, received_at included) and its last location, and takes new heartbeats.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1"),
        &data,
    );
    let shown = data.display().to_string();
    let log = dir.path().join("serve.log");
    let addr = free_addr().to_string();
    let (status, text) = serve_until_exit(
        &[
            "serve",
            "--listen",
            &addr,
            "--data-dir",
            &shown,
            "--shards",
            "2",
        ],
        &log,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{text}");
    let want = format!("`geobeat migrate --data-dir {shown}`");
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(text.contains(&want), "{text}");

    let (code, out, err) = geobeat(&["migrate", "--data-dir", &shown]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("is now format 2 with 2 shards (was format 1 with 2): 205 entries"),
        "{out}"
    );
    let meta = std::fs::read_to_string(data.join("geobeat.meta")).unwrap();
    assert!(meta.contains("\"format_version\": 2"), "{meta}");
    let (code, out, _) = geobeat(&["sinks", "--data-dir", &shown, "--json"]);
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows["sinks"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows.iter()
            .all(|r| r["sink"] == "archive" && r["lag_bytes"] == 0),
        "{out}"
    );
    let (code, out, _) = geobeat(&["migrate", "--data-dir", &shown]);
    assert_eq!(code, 0);
    assert!(out.contains("already format 2"), "{out}");

    let server = Server::start(&data, &[]);
    let ops = server.token(&["ops"]);
    for (id, hbs) in fixture_heartbeats() {
        let mut newest_first = hbs.clone();
        newest_first.reverse();
        assert_eq!(history_all(&server, &id, &ops), Some(newest_first), "{id}");
        assert_eq!(
            last_location(&server, &id, &ops).as_ref(),
            hbs.last(),
            "{id}"
        );
    }
    let gw = server.token(&["gateway", "fx-"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let ts = now_ms();
    ws.send(Message::text(format!(
        r#"{{"seq":1,"id":"fx-003","lat":5,"lon":6,"ts":{ts}}}"#
    )))
    .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    let last = last_location(&server, "fx-003", &ops).unwrap();
    assert_eq!(
        (last["ts"].as_i64(), last["lat"].as_f64()),
        (Some(ts), Some(5.0))
    );
    assert_eq!(history_all(&server, "fx-003", &ops).unwrap().len(), 6);
}

/// Every line of every audit file under `audit` (sealed and open).
fn audit_lines(audit: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(audit).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(f.path()).unwrap();
            out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
        }
    }
    out
}

/// Sends `rounds` heartbeats for each of `devices` ids over one gateway connection, ts from
/// `ts0` on (unique per heartbeat); returns (id, ts) of each, and waits for the acks.
fn send(server: &Server, devices: &[String], ts0: i64, rounds: i64) -> Vec<(String, i64)> {
    let gw = server.token(&["gateway", "r-"]);
    let mut ws = ws_connect(server, &gw).unwrap();
    let mut sent = Vec::new();
    let mut seq = 0u64;
    for r in 0..rounds {
        for (i, id) in devices.iter().enumerate() {
            seq += 1;
            let ts = ts0 + r * 1000 + i as i64;
            let lat = (i as f64) * 0.5 - 20.0;
            ws.send(Message::text(format!(
                r#"{{"seq":{seq},"id":"{id}","lat":{lat},"lon":{},"ts":{ts},"speed":1.5}}"#,
                r as f64
            )))
            .unwrap();
            sent.push((id.clone(), ts));
        }
    }
    assert!(wait_ack(&mut ws, seq).is_empty());
    sent
}

/// Waits until the audit sink holds `n` lines and reports no lag on any shard.
fn wait_sink(server: &Server, audit: &Path, n: usize) {
    let ops = server.token(&["ops"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = audit_lines(audit).len();
        let (_, body) = server.get("/v1/sinks", Some(&ops));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let caught_up = v["sinks"]
            .as_array()
            .is_some_and(|rows| rows.iter().all(|r| r["lag_bytes"] == 0));
        if lines >= n && caught_up {
            assert_eq!(lines, n);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sink at {lines}/{n} lines: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data directory's root files other than the meta file and the layout, with contents.
fn root_files(data: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n != "geobeat.meta")
        .map(|n| (n.clone(), std::fs::read(data.join(&n)).unwrap()))
        .collect()
}

#[test]
fn reshard_2_3_1_keeps_every_heartbeat_last_location_and_audit_line() {
    // A 2-shard directory with an audit sink takes heartbeats, is resharded to 3, takes more, is
    // resharded to 1, takes more. Afterwards every device's whole history and last location are
    // served, the secret and geofences.json are byte-identical, and the audit files hold every
    // heartbeat exactly once (the open hour's file is continued, not deleted or duplicated).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
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
    let cfg = config.display().to_string();
    let shown = data.display().to_string();
    let devices: Vec<String> = (0..40).map(|i| format!("r-{i}")).collect();
    let t0 = now_ms() - 3_600_000;
    let mut sent = Vec::new();

    let mut server = Server::start(&data, &["--config", &cfg]);
    let ops = server.token(&["ops"]);
    let fence = r#"{"center":[13.4,52.5],"radius_m":500}"#;
    assert_eq!(
        http_body(&server, "PUT", "/v1/geofences/depot", Some(&ops), fence).0,
        200
    );
    sent.extend(send(&server, &devices[..30], t0, 3));
    wait_sink(&server, &audit, sent.len());
    assert!(server.sigterm().success());
    let files = root_files(&data);
    assert!(files.contains_key("secret") && files.contains_key("geofences.json"));

    for (n, more) in [(3u32, 10_000i64), (1, 20_000)] {
        let (code, out, err) =
            geobeat(&["reshard", "--data-dir", &shown, "--shards", &n.to_string()]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("format 2 with {n} shards")), "{out}");
        assert!(out.contains(&format!("{} entries", sent.len())), "{out}");
        assert!(
            out.contains("1 sink cursor(s) moved to the new ends (archive)"),
            "{out}"
        );
        assert_eq!(root_files(&data), files);
        server.restart();
        sent.extend(send(&server, &devices, t0 + more, 2));
        wait_sink(&server, &audit, sent.len());
        assert!(server.sigterm().success());
    }
    let meta = std::fs::read_to_string(data.join("geobeat.meta")).unwrap();
    assert!(meta.contains("\"shard_count\": 1"), "{meta}");

    server.restart();
    let mut by_id: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (id, ts) in &sent {
        by_id.entry(id).or_default().push(*ts);
    }
    for (id, ts) in &by_id {
        let hist = history_all(&server, id, &ops).unwrap();
        let mut got: Vec<i64> = hist.iter().map(|h| h["ts"].as_i64().unwrap()).collect();
        got.reverse();
        assert_eq!(&got, ts, "{id}");
        assert!(hist.iter().all(|h| h["speed"] == 1.5), "{id}");
        let last = last_location(&server, id, &ops).unwrap();
        assert_eq!(last["ts"].as_i64(), ts.last().copied(), "{id}");
    }
    let (st, body) = server.get("/v1/geofences/depot", Some(&ops));
    assert_eq!(st, 200, "{body}");
    let lines = audit_lines(&audit);
    let got: BTreeSet<(String, i64)> = lines
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["ts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(lines.len(), sent.len(), "no audit line twice");
    // (shard, pos) — the PostgreSQL sink's key — never repeats across layouts.
    let keys: BTreeSet<(u64, u64)> = lines
        .iter()
        .map(|l| (l["shard"].as_u64().unwrap(), l["pos"].as_u64().unwrap()))
        .collect();
    assert_eq!(keys.len(), lines.len(), "(shard, pos) repeated");
    assert_eq!(got, sent.iter().cloned().collect::<BTreeSet<_>>());
}

#[test]
fn refusals_are_one_line_exit_2_and_change_nothing() {
    // reshard while the server runs, reshard with a sink cursor behind its shard's end, a bad
    // shard count and a directory that is not a data directory: each exits 2 with one line that
    // names the problem and the fix, and the data directory keeps its layout.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shown = data.display().to_string();
    let mut server = Server::start(&data, &[]);
    let devices: Vec<String> = (0..10).map(|i| format!("r-{i}")).collect();
    send(&server, &devices, now_ms(), 2);
    let meta = std::fs::read_to_string(data.join("geobeat.meta")).unwrap();

    let (code, _, err) = geobeat(&["reshard", "--data-dir", &shown, "--shards", "3"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("in use by a running geobeat server"), "{err}");
    assert!(err.contains("stop the server"), "{err}");
    assert!(server.sigterm().success());

    // A sink that exported nothing of shard 1.
    let cursor = geobeat::flusher::cursor::Cursor::start();
    geobeat::flusher::cursor::write_cursor(
        &geobeat::flusher::cursor::cursor_path(&data.join("shard-0001"), "laggard"),
        &cursor,
    )
    .unwrap();
    let (code, _, err) = geobeat(&["reshard", "--data-dir", &shown, "--shards", "3"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("sink \"laggard\" has not exported shard"),
        "{err}"
    );
    assert!(err.contains("shows lag 0"), "{err}");
    assert_eq!(
        std::fs::read_to_string(data.join("geobeat.meta")).unwrap(),
        meta
    );
    assert!(!data.join("reshard.staging").exists());

    let (code, _, err) = geobeat(&["reshard", "--data-dir", &shown, "--shards", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = geobeat(&["reshard", "--data-dir", &shown]);
    assert_eq!(code, 2, "{err}");
    let nowhere = dir.path().join("nowhere").display().to_string();
    let (code, _, err) = geobeat(&["reshard", "--data-dir", &nowhere, "--shards", "2"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not a geobeat data directory"), "{err}");
    assert_eq!(
        std::fs::read_to_string(data.join("geobeat.meta")).unwrap(),
        meta
    );

    // Retiring the laggard lets the reshard run.
    std::fs::remove_file(data.join("shard-0001/cursors/laggard.cursor")).unwrap();
    let (code, out, err) = geobeat(&["reshard", "--data-dir", &shown, "--shards", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("20 entries"), "{out}");
}
