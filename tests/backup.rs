//! `geobeat backup` and `geobeat restore` against the real binary.
//!
//! - A backup taken while devices stream heartbeats into a running server (1 MiB segments, so
//!   sealed segments are hard-linked and the open one is cut), restored into a fresh directory
//!   and served: every heartbeat whose ack a client had received before the backup started is in
//!   the restored history, with its position; nothing appears that was never sent or twice; the
//!   last location is not older than any of them; tokens of the original secret work; the
//!   geofence and the audit sink's cursors came along.
//! - The refusals: a target that exists, a directory that is not a data directory, a missing
//!   `--to`, a target inside the data directory, restoring into a non-empty directory, from
//!   something that is not a backup, and from a damaged backup: each exits 2 with one line naming
//!   the problem and the fix, and writes nothing.

mod common;
use common::*;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geobeat::auth::Scope;

/// Device connections streaming during the backup.
const DEVICES: usize = 12;
/// Heartbeats per frame.
const FRAME_HEARTBEATS: usize = 40;
/// Frames a client keeps unacknowledged before it waits for an ack.
const WINDOW_FRAMES: usize = 4;
/// Longest time the load may take to make every shard roll over to a second segment.
const FILL_WAIT: Duration = Duration::from_secs(30);
/// Longest time retention may take to write a checkpoint (it runs every 5 s).
const RETENTION_WAIT: Duration = Duration::from_secs(30);

/// The position of a device's heartbeat, deterministic from its device time (thousandths, which
/// JSON round-trips exactly).
fn position(ts: i64) -> (f64, f64) {
    (
        ((ts % 170_000) - 85_000) as f64 / 1000.0,
        ((ts % 350_000) - 175_000) as f64 / 1000.0,
    )
}

/// One device's record: what was sent, and the device times whose ack arrived (in ack order).
#[derive(Default)]
struct DevLog {
    sent: HashSet<i64>,
    acked: Vec<i64>,
}

/// Streams heartbeats for one device until `stop`; every ack's covered device times are pushed
/// to `log.acked` as soon as the ack is read. Panics on an error frame or a broken connection.
fn stream(
    server_url: String,
    token: String,
    t0: i64,
    log: Arc<Mutex<DevLog>>,
    stop: Arc<AtomicBool>,
    acked_total: Arc<AtomicU64>,
) {
    use tungstenite::client::IntoClientRequest;
    let mut req = server_url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).expect("connect");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    let mut seq = 0u64;
    let mut ts = t0;
    // (last seq of the frame, its device times), oldest first.
    let mut in_flight: std::collections::VecDeque<(u64, Vec<i64>)> = Default::default();
    while !stop.load(Ordering::Acquire) || !in_flight.is_empty() {
        if !stop.load(Ordering::Acquire) {
            let mut text = String::from("[");
            let mut times = Vec::with_capacity(FRAME_HEARTBEATS);
            for k in 0..FRAME_HEARTBEATS {
                seq += 1;
                ts += 1;
                let (lat, lon) = position(ts);
                if k > 0 {
                    text.push(',');
                }
                text.push_str(&hb_json(seq, lat, lon, ts));
                times.push(ts);
            }
            text.push(']');
            log.lock().unwrap().sent.extend(times.iter().copied());
            ws.send(Message::text(text)).expect("send");
            in_flight.push_back((seq, times));
            if in_flight.len() < WINDOW_FRAMES {
                continue;
            }
        }
        let v = next_json(&mut ws);
        let a = v["ack"]
            .as_u64()
            .unwrap_or_else(|| panic!("unexpected frame {v}"));
        let mut done = Vec::new();
        while in_flight.front().is_some_and(|f| f.0 <= a) {
            done.extend(in_flight.pop_front().unwrap().1);
        }
        acked_total.fetch_add(done.len() as u64, Ordering::Relaxed);
        log.lock().unwrap().acked.extend(done);
    }
    let _ = ws.close(None);
}

/// Runs `geobeat <args>` to completion.
fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("GEOBEAT_DATA_DIR")
        .output()
        .expect("run geobeat")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that `out` is a refusal: exit code 2, nothing on stdout, one line on stderr that
/// contains every one of `needles`, and no panic.
fn assert_refused(out: &Output, needles: &[&str]) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    assert!(stdout.is_empty(), "stdout {stdout:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
}

/// The names of the segment files in a shard directory.
fn segment_count(shard: &Path) -> usize {
    std::fs::read_dir(shard)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_backup_under_load_restores_every_heartbeat_acked_before_it() {
    // 12 devices stream as fast as the server acks into 2 shards with 1 MiB segments (an audit
    // sink gives the shards cursor files, a geofence is stored). Once every shard has a sealed
    // segment, each device's acked device times are snapshotted and `geobeat backup` runs while
    // the load continues. The backup is restored into a new directory and served: each snapshot
    // heartbeat must be in its device's history with its position, nothing unsent or duplicated
    // may appear, and the last location must be at least as new as the newest snapshot one.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let config = dir.path().join("geobeat.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"archive\"\nkind = \"audit\"\ndir = \"{}\"\n",
            dir.path().join("audit").display()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let server = Server::start_logged(
        &data,
        &["--segment-bytes", "1MiB", "--config", &config_arg],
        &log,
    );
    let ops = server.token(&["ops"]);
    let (st, body) = http_body(
        &server,
        "PUT",
        "/v1/geofences/depot",
        Some(&ops),
        r#"{"center":[13.4,52.5],"radius_m":500}"#,
    );
    assert!(st == 200 || st == 201, "PUT geofence: {st} {body}");

    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicU64::new(0));
    let (devs, threads) = start_clients(&server, "bk", DEVICES, &stop, &acked_total);

    // Load until every shard has sealed a segment (so the backup links some and cuts one).
    let started = Instant::now();
    let shards = [data.join("shard-0000"), data.join("shard-0001")];
    while !shards.iter().all(|s| segment_count(s) >= 2) {
        assert!(
            started.elapsed() < FILL_WAIT,
            "the load did not fill a segment per shard in {FILL_WAIT:?} ({} acked)\n{}",
            acked_total.load(Ordering::Relaxed),
            log_tail(&log, 20)
        );
        assert!(threads.iter().all(|t| !t.is_finished()), "a client died");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Everything acked so far: the backup must hold all of it.
    let before: Vec<Vec<i64>> = devs
        .iter()
        .map(|(_, d)| d.lock().unwrap().acked.clone())
        .collect();
    let acked_before: usize = before.iter().map(Vec::len).sum();
    let backup = dir.path().join("backup");
    let out = run(&[
        "backup",
        "--data-dir",
        data.to_str().unwrap(),
        "--to",
        backup.to_str().unwrap(),
    ]);
    let acked_at_backup_end = acked_total.load(Ordering::Relaxed);
    assert!(
        out.status.success(),
        "backup failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let summary = text(&out.stdout);
    assert!(summary.starts_with("geobeat backup: "), "{summary}");
    assert_eq!(summary.lines().count(), 1, "{summary}");
    // The load went on during the backup (it ran against a live, writing server).
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().expect("client thread");
    }
    let acked_after = acked_total.load(Ordering::Relaxed);
    assert!(
        acked_after > acked_before as u64,
        "no heartbeat was acked after the backup started"
    );
    eprintln!(
        "backup: {acked_before} acked before, {acked_at_backup_end} when it ended, \
         {acked_after} in all; {summary}"
    );

    // The manifest: sealed segments linked (same file system), the open ones copied and cut.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(backup.join("geobeat-backup.json")).unwrap())
            .unwrap();
    let segs: Vec<&serde_json::Value> = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["segments"].as_array().unwrap())
        .collect();
    assert!(segs.iter().any(|g| g["linked"] == true), "{manifest}");
    assert!(segs.iter().any(|g| g["linked"] == false), "{manifest}");
    let entries: u64 = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["entries"].as_u64().unwrap())
        .sum();
    assert!(entries >= acked_before as u64, "{entries} < {acked_before}");

    // Restore into a new directory and serve it (no sink configured: only the cursors are
    // checked, with `geobeat sinks`).
    let restored = dir.path().join("restored");
    let out = run(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data-dir",
        restored.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "restore failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).starts_with("geobeat restore: "));
    let sinks = run(&["sinks", "--data-dir", restored.to_str().unwrap(), "--json"]);
    assert!(sinks.status.success(), "{}", text(&sinks.stderr));
    assert!(
        text(&sinks.stdout).contains("\"archive\""),
        "{}",
        text(&sinks.stdout)
    );
    drop(server);

    let log2 = dir.path().join("restored.log");
    let server = Server::start_logged(&restored, &[], &log2);
    // The secret came along: the original ops token works.
    let (st, body) = server.get("/v1/geofences/depot", Some(&ops));
    assert_eq!(st, 200, "geofence after restore: {body}");
    for ((id, dev), before) in devs.iter().zip(&before) {
        let dev = dev.lock().unwrap();
        let hist = history_all(&server, id, &ops).unwrap_or_default();
        let mut seen = HashSet::new();
        let mut positions: HashMap<i64, (f64, f64)> = HashMap::new();
        for h in &hist {
            let ts = h["ts"].as_i64().expect("ts");
            assert!(seen.insert(ts), "{id}: device time {ts} twice");
            assert!(dev.sent.contains(&ts), "{id}: {h} was never sent");
            positions.insert(ts, (h["lat"].as_f64().unwrap(), h["lon"].as_f64().unwrap()));
        }
        let lost: Vec<i64> = before
            .iter()
            .copied()
            .filter(|ts| !seen.contains(ts))
            .collect();
        assert!(
            lost.is_empty(),
            "{id}: {} heartbeats acked before the backup are missing (first {:?}); {} restored",
            lost.len(),
            lost.first(),
            hist.len()
        );
        for ts in before {
            assert_eq!(positions[ts], position(*ts), "{id}: position of {ts}");
        }
        if let Some(newest) = before.iter().max() {
            let last = last_location(&server, id, &ops).expect("last location");
            assert!(last["ts"].as_i64().unwrap() >= *newest, "{id}: last {last}");
        }
    }
}

#[test]
fn backup_and_restore_refuse_bad_input_with_one_line() {
    // Each refusal exits 2 with one line on stderr naming the problem and the fix, and leaves
    // nothing behind; a damaged backup is refused before anything is installed. Along the way
    // a backup with the default (64 MiB) segments restores and serves its one heartbeat.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let token = server.token_fast(Scope::Device("err-1".into()));
    let mut ws = ws_connect(&server, &token).unwrap();
    ws.send(Message::text(hb_json(1, 1.5, 2.5, now_ms())))
        .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    drop(ws);
    let d = data.to_str().unwrap();

    // --to missing: clap's usage error.
    let out = run(&["backup", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--to"), "{}", text(&out.stderr));

    // Not a data directory.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let to = dir.path().join("b0");
    let out = run(&[
        "backup",
        "--data-dir",
        empty.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_refused(&out, &["not a geobeat data directory", "--data-dir"]);
    assert!(!to.exists());

    // Target exists and is not empty.
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"x").unwrap();
    let out = run(&["backup", "--data-dir", d, "--to", full.to_str().unwrap()]);
    assert_refused(&out, &["not an empty directory", "--to"]);
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);

    // Target inside the data directory.
    let inside = data.join("snap");
    let out = run(&["backup", "--data-dir", d, "--to", inside.to_str().unwrap()]);
    assert_refused(&out, &["inside the data directory", "--to"]);
    assert!(!inside.exists());

    // A good backup (of the live server), then the restore refusals.
    let good = dir.path().join("good");
    let out = run(&["backup", "--data-dir", d, "--to", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // With the default 64 MiB segments only the written start of the open one is copied; the
    // restore writes it whole and the server serves the heartbeat from it.
    let ok = dir.path().join("ok");
    let out = run(&[
        "restore",
        "--from",
        good.to_str().unwrap(),
        "--data-dir",
        ok.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(server);
    let server = Server::start(&ok, &[]);
    let ops = server.token(&["ops"]);
    let last = last_location(&server, "err-1", &ops).expect("err-1 after restore");
    assert_eq!(
        (last["lat"].as_f64(), last["lon"].as_f64()),
        (Some(1.5), Some(2.5))
    );
    drop(server);

    let out = run(&[
        "restore",
        "--from",
        good.to_str().unwrap(),
        "--data-dir",
        full.to_str().unwrap(),
    ]);
    assert_refused(&out, &["not empty", "new or empty directory"]);
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);

    let target = dir.path().join("target");
    let out = run(&[
        "restore",
        "--from",
        empty.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert_refused(&out, &["geobeat-backup.json", "--from"]);
    let out = run(&[
        "restore",
        "--from",
        dir.path().join("nope").to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert_refused(&out, &["not a directory", "--from"]);
    let out = run(&["restore", "--data-dir", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--from"),
        "{}",
        text(&out.stderr)
    );

    // A damaged backup: one flipped byte in a copied segment.
    let seg = std::fs::read_dir(good.join("shard-0000"))
        .unwrap()
        .chain(std::fs::read_dir(good.join("shard-0001")).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment in the backup");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[4096 + 40] ^= 0x01;
    // The sealed segments may be hard links to the live ones: replace the file, not its bytes.
    std::fs::remove_file(&seg).unwrap();
    std::fs::write(&seg, &bytes).unwrap();
    let out = run(&[
        "restore",
        "--from",
        good.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert_refused(&out, &["failed verification", "nothing restored"]);
    assert!(!target.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("restoring")));
}

/// Whether a backup's manifest names a checkpoint for any shard.
fn has_checkpoint(backup: &Path) -> bool {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(backup.join("geobeat-backup.json")).unwrap())
            .unwrap();
    m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["checkpoint_covered"].is_u64())
}

/// Starts `n` streaming device clients against `server`; returns their ids, logs and threads.
type Clients = (
    Vec<(String, Arc<Mutex<DevLog>>)>,
    Vec<std::thread::JoinHandle<()>>,
);

fn start_clients(
    server: &Server,
    prefix: &str,
    n: usize,
    stop: &Arc<AtomicBool>,
    acked_total: &Arc<AtomicU64>,
) -> Clients {
    let t0 = now_ms() - 86_400_000;
    let mut devs = Vec::new();
    let mut threads = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i:02}");
        let dev = Arc::new(Mutex::new(DevLog::default()));
        let token = server.token_fast(Scope::Device(id.clone()));
        let (url, d, s, a) = (
            server.ingest_url(),
            dev.clone(),
            stop.clone(),
            acked_total.clone(),
        );
        threads.push(std::thread::spawn(move || stream(url, token, t0, d, s, a)));
        devs.push((id, dev));
    }
    (devs, threads)
}

#[test]
fn backups_taken_while_retention_deletes_segments_restore_consistently() {
    // Retention 1 s with 1 MiB segments under load: every 5 s the server writes a checkpoint
    // and deletes the segments below it, while backups run back to back until two of them hold
    // a checkpoint. Every backup must verify and restore (checkpoint and segments agree, or the
    // shard was taken again); the last one, served, must give every device a last
    // location at least as new as its newest heartbeat acked before that backup started, with
    // that heartbeat's position.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let server = Server::start_logged(
        &data,
        &["--segment-bytes", "1MiB", "--retention", "1s"],
        &log,
    );
    let ops = server.token(&["ops"]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicU64::new(0));
    let (devs, threads) = start_clients(&server, "rt", 6, &stop, &acked_total);

    let started = Instant::now();
    let mut backups = Vec::new();
    let mut last_before: Vec<i64> = Vec::new();
    let mut retries = 0usize;
    // Back to back until two backups hold a checkpoint (retention runs every 5 s).
    let mut with_checkpoint = 0;
    while with_checkpoint < 2 {
        assert!(
            started.elapsed() < RETENTION_WAIT,
            "no checkpoint in {} backups within {RETENTION_WAIT:?}\n{}",
            backups.len(),
            log_tail(&log, 20)
        );
        assert!(threads.iter().all(|t| !t.is_finished()), "a client died");
        last_before = devs
            .iter()
            .map(|(_, d)| d.lock().unwrap().acked.last().copied().unwrap_or(i64::MIN))
            .collect();
        let to = dir.path().join(format!("b{}", backups.len()));
        let out = run(&[
            "backup",
            "--data-dir",
            data.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "backup: {}", text(&out.stderr));
        if text(&out.stdout).contains("repeated") {
            retries += 1;
        }
        if has_checkpoint(&to) {
            with_checkpoint += 1;
        }
        backups.push(to);
    }
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().expect("client thread");
    }
    let live_first: Vec<usize> = ["shard-0000", "shard-0001"]
        .iter()
        .map(|s| segment_count(&data.join(s)))
        .collect();
    eprintln!(
        "{} backups ({retries} with a shard taken again), {} acked; live segments {live_first:?}",
        backups.len(),
        acked_total.load(Ordering::Relaxed)
    );

    for (i, b) in backups.iter().enumerate() {
        let target = dir.path().join(format!("r{i}"));
        let out = run(&[
            "restore",
            "--from",
            b.to_str().unwrap(),
            "--data-dir",
            target.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "restore of {i}: {}",
            text(&out.stderr)
        );
    }
    drop(server);

    let restored = dir.path().join(format!("r{}", backups.len() - 1));
    let server = Server::start_logged(&restored, &[], &dir.path().join("restored.log"));
    for ((id, _), newest) in devs.iter().zip(&last_before) {
        if *newest == i64::MIN {
            continue;
        }
        let last = last_location(&server, id, &ops).expect("last location");
        let ts = last["ts"].as_i64().unwrap();
        assert!(ts >= *newest, "{id}: last {last}, acked before {newest}");
        assert_eq!(
            (last["lat"].as_f64().unwrap(), last["lon"].as_f64().unwrap()),
            position(ts),
            "{id}"
        );
    }
}
