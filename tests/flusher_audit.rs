//! The flusher's audit-file sink end to end (custom harness: `cargo test --test flusher_audit`).
//! Heartbeats are written through the real `ShardStore`; a child process running the real
//! flusher with a plain and a zstd audit sink is SIGKILLed mid-drain several times, then a final
//! flusher finishes in this process. Every line of every file must parse, carry the right fields,
//! and every durable heartbeat must appear exactly once per sink, in files named for the rotation
//! window of `received_at` (or later, for stragglers); a second crash test kills it many times
//! while files end by time and by size, and checks `geobeat sinks --json` against the files
//! on disk. Another test checks retention: `consumed`
//! holds segments back until every sink has read them, a new sink starts at the oldest retained
//! entry, and a sink whose data was deleted reports the gap and carries on.

mod flusher_support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flusher_support::*;
use geobeat::config::Rotation;
use geobeat::datadir::DataDir;
use geobeat::flusher::cursor::{
    cursor_path, parse_file_start, read_cursor, write_cursor, Cursor, FileStart,
};
use geobeat::flusher::{self, CONSUMER_NAME};
use geobeat::route::ShardId;

/// All lines of a sink's files: (shard dir, file name, parsed line).
fn read_audit(root: &Path) -> Vec<(String, String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut shard_dirs: Vec<_> = std::fs::read_dir(root).unwrap().flatten().collect();
    shard_dirs.sort_by_key(|e| e.file_name());
    for sd in shard_dirs {
        let mut files: Vec<_> = std::fs::read_dir(sd.path()).unwrap().flatten().collect();
        files.sort_by_key(|e| e.file_name());
        for f in files {
            let name = f.file_name().into_string().unwrap();
            let raw = std::fs::read(f.path()).unwrap();
            let text = if name.contains(".zst") {
                zstd::stream::decode_all(&raw[..]).expect("zstd frames decode")
            } else {
                raw
            };
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line)
                    .unwrap_or_else(|e| panic!("{name}: unparsable line: {e}"));
                out.push((sd.file_name().into_string().unwrap(), name.clone(), v));
            }
        }
    }
    out
}

/// Checks one sink's files against the logs: exactly once, right content, right files (for a
/// rotation window of `window_ms`).
fn verify_audit(root: &Path, data: &Path, window_ms: i64) {
    let want = expected(data);
    let lines = read_audit(root);
    let got = multiplicity(lines.iter().map(|(_, _, v)| {
        (
            v["shard"].as_u64().unwrap() as u32,
            v["pos"].as_u64().unwrap(),
        )
    }));
    assert_exactly_once(&root.display().to_string(), &got, &want);
    let by_key: HashMap<(u32, u64), &Expected> =
        want.iter().map(|e| ((e.shard, e.pos), e)).collect();
    for (dir, file, v) in &lines {
        let e = by_key[&(
            v["shard"].as_u64().unwrap() as u32,
            v["pos"].as_u64().unwrap(),
        )];
        assert_eq!(dir, &format!("shard-{:04}", e.shard));
        assert_eq!(v["id"], e.id.as_str());
        assert_eq!(v["seq"].as_u64(), Some(e.seq));
        assert_eq!(v["ts"].as_i64(), Some(e.ts));
        assert_eq!(v["received_at"].as_i64(), Some(e.received_at));
        assert_eq!(v["lat"].as_f64(), Some(e.lat));
        assert_eq!(v["lon"].as_f64(), Some(e.lon));
        for k in ["alt", "speed", "heading", "acc", "attrs"] {
            assert!(v.get(k).is_some(), "field {k} present");
        }
        // Received before the end of the window the file is named in (a straggler may be from
        // before the name).
        let stem = &file[..file.find('.').unwrap()];
        let end = match parse_file_start(stem).expect("time-named file") {
            FileStart::Second(s) => ((s * 1000).div_euclid(window_ms) + 1) * window_ms,
            FileStart::Hour(h) => (h + 1) * 3_600_000,
        };
        assert!(e.received_at < end, "{file}: {v}");
    }
    // Within a shard, lines are in log order across files.
    let mut last: HashMap<String, u64> = HashMap::new();
    for (dir, _, v) in &lines {
        let pos = v["pos"].as_u64().unwrap();
        let prev = last.insert(dir.clone(), pos);
        assert!(prev.is_none_or(|p| p < pos), "{dir}: log order");
    }
}

fn cursor_sum(data: &Path, sink: &str) -> u64 {
    let dd = DataDir::open_or_create(data, 1).unwrap();
    (0..dd.shard_count())
        .filter_map(|k| {
            read_cursor(&cursor_path(&dd.shard_dir(ShardId(k)), sink))
                .ok()
                .flatten()
        })
        .map(|c| c.pos)
        .sum()
}

fn sigkill_mid_drain_exactly_once() {
    // 100,000 heartbeats over 5 hours of receive time in 2 shards; a child with a plain and a
    // zstd audit sink (batches of 700 lines, one fsync each; default one-minute windows) is
    // killed at 20%, 45% and 70% of the log drained; then the flusher finishes in this process.
    // Both sinks' files hold every heartbeat exactly once, in log order, in the right files.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (plain, zst) = (dir.path().join("plain"), dir.path().join("zst"));
    let total = 100_000;
    let log_bytes: u64 = {
        let mut stores = open_stores(&data, 2);
        append(&mut stores, 0..total, total, 5);
        stores
            .iter_mut()
            .map(|s| s.sync_blocking().unwrap().0)
            .sum()
    };
    let sinks = vec![
        audit_sink("plain", &plain, false),
        audit_sink("zst", &zst, true),
    ];
    for pct in [20, 45, 70] {
        let child = spawn_child(&data, &sinks);
        wait_for("the child to drain", Duration::from_secs(40), || {
            cursor_sum(&data, "plain").min(cursor_sum(&data, "zst")) >= log_bytes * pct / 100
        });
        kill(child);
        // Killed mid-batch: open files may end past their cursors, torn; reconcile compares
        // what the cursors cover and finds nothing missing or doubled (issue 18).
        assert_reconciled(
            &data,
            &[
                "--audit-dir",
                plain.to_str().unwrap(),
                "--audit-sink",
                "plain",
            ],
        );
        assert_reconciled(
            &data,
            &["--audit-dir", zst.to_str().unwrap(), "--audit-sink", "zst"],
        );
    }
    let status = drain_in_process(&data, sinks);
    assert!(status
        .iter()
        .all(|s| s.lag_bytes == 0 && s.skipped_bytes == 0));
    verify_audit(&plain, &data, 60_000);
    verify_audit(&zst, &data, 60_000);
    assert_reconciled(
        &data,
        &[
            "--audit-dir",
            plain.to_str().unwrap(),
            "--audit-sink",
            "plain",
        ],
    );
    // A line removed from a sealed file is named (device, shard, counts) and fails the check.
    let shard0 = plain.join("shard-0000");
    let mut sealed: Vec<_> = std::fs::read_dir(&shard0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .collect();
    sealed.sort();
    let victim = &sealed[sealed.len() / 2];
    let text = std::fs::read_to_string(victim).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let id = serde_json::from_str::<serde_json::Value>(first).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(victim, rest).unwrap();
    let (code, out) = reconcile(
        &data,
        &[
            "--audit-dir",
            plain.to_str().unwrap(),
            "--audit-sink",
            "plain",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("shard 0 device {id:?}")), "{out}");
    assert!(out.ends_with("1 differences\n"), "{out}");
    // Only the newest file of each shard may still be open (.tmp).
    for root in [&plain, &zst] {
        for sd in std::fs::read_dir(root).unwrap().flatten() {
            let mut names: Vec<String> = std::fs::read_dir(sd.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().into_string().unwrap())
                .collect();
            names.sort();
            let tmps: Vec<_> = names.iter().filter(|n| n.ends_with(".tmp")).collect();
            assert!(tmps.len() <= 1, "{tmps:?}");
            if let Some(t) = tmps.first() {
                assert_eq!(*t, names.last().unwrap(), "only the newest file is open");
            }
            assert!(names.len() >= 5 * 60, "one file per minute: {names:?}");
        }
    }
}

fn retention_waits_for_sinks_and_gaps_are_reported() {
    // One shard with 1 MiB segments and ~5 segments of data. Before any sink has read, consumed
    // is 0 and retention deletes nothing; after sink "a" drained, consumed equals durable and
    // retention deletes every sealed segment. A new sink "b" then starts at the oldest retained
    // entry without error; sink "c", whose cursor points into deleted data, reports the skipped
    // bytes and catches up.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let total = 30_000;
    let mut stores = open_stores(&data, 1);
    append(&mut stores, 0..total, total, 1);
    stores[0].sync_blocking().unwrap();
    assert!(stores[0].stats().segments >= 4);
    stores[0].register_consumer(CONSUMER_NAME).unwrap();
    let feeds = feeds(&data, &stores);
    let far = SystemTime::now() + Duration::from_secs(86_400);
    // Sink "a" is started with the stop flag already set: it reads nothing, and the consumed
    // position published at start is its (absent) cursor, 0.
    let a = dir.path().join("a");
    let stopped = Arc::new(AtomicBool::new(true));
    let handle = flusher::start(vec![audit_sink("a", &a, false)], feeds.clone(), stopped).unwrap();
    handle.join().unwrap();
    assert_eq!(feeds[0].consumed().0, 0);
    stores[0]
        .set_consumed(CONSUMER_NAME, feeds[0].consumed())
        .unwrap();
    assert_eq!(
        stores[0].delete_expired(far, Duration::ZERO).unwrap(),
        0,
        "nothing consumed yet"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let handle = flusher::start(
        vec![audit_sink("a", &a, false)],
        feeds.clone(),
        stop.clone(),
    )
    .unwrap();
    wait_until_drained(&handle, Duration::from_secs(30));
    stop.store(true, Ordering::Release);
    handle.join().unwrap();
    assert_eq!(feeds[0].consumed(), stores[0].durable());
    stores[0]
        .set_consumed(CONSUMER_NAME, feeds[0].consumed())
        .unwrap();
    let deleted = stores[0].delete_expired(far, Duration::ZERO).unwrap();
    assert!(deleted >= 3, "deleted {deleted}");
    let oldest = stores[0].log().first_pos();
    // Sink "c" had consumed only the first entry of the log.
    let shard_dir = DataDir::open_or_create(&data, 1)
        .unwrap()
        .shard_dir(ShardId(0));
    let mut stale = Cursor::start();
    stale.pos = 4096 + 8;
    write_cursor(&cursor_path(&shard_dir, "c"), &stale).unwrap();
    drop(stores);
    let (b, c) = (dir.path().join("b"), dir.path().join("c"));
    let status = drain_in_process(
        &data,
        vec![audit_sink("b", &b, false), audit_sink("c", &c, true)],
    );
    let sb = status.iter().find(|s| s.name == "b").unwrap();
    let sc = status.iter().find(|s| s.name == "c").unwrap();
    assert_eq!(
        sb.skipped_bytes, 0,
        "a new sink starts at the oldest entry quietly"
    );
    assert_eq!(sc.skipped_bytes, oldest.0 - stale.pos, "{sc:?}");
    for root in [&b, &c] {
        let lines = read_audit(root);
        assert!(!lines.is_empty());
        let first = lines
            .iter()
            .map(|l| l.2["pos"].as_u64().unwrap())
            .min()
            .unwrap();
        assert_eq!(first, oldest.0);
    }
}

fn cursor_ahead_of_durable_waits_without_rewinding() {
    // A sink whose cursor is past the durable position it is shown (here: a feed published late,
    // as after a wiring mistake or a log cut by recovery) must not rewind: it reports the
    // situation, keeps its cursor, and once the durable position passes the cursor it goes on,
    // leaving every heartbeat exactly once in its files.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("a");
    let total = 8_000;
    {
        let mut stores = open_stores(&data, 1);
        append(&mut stores, 0..total / 2, total, 1);
        stores[0].sync_blocking().unwrap();
    }
    drain_in_process(&data, vec![audit_sink("a", &out, false)]);
    let mut stores = open_stores(&data, 1);
    append(&mut stores, total / 2..total, total, 1);
    let durable = stores[0].sync_blocking().unwrap();
    let mut feeds = feeds(&data, &stores);
    drop(stores);
    feeds[0] = geobeat::flusher::ShardFeed::new(
        ShardId(0),
        feeds[0].dir.clone(),
        geobeat::log::LogPos(4096),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let handle = flusher::start(
        vec![audit_sink("a", &out, false)],
        feeds.clone(),
        stop.clone(),
    )
    .unwrap();
    let cursor = handle.status()[0].cursor;
    assert!(cursor > 4096);
    wait_for("the report", Duration::from_secs(10), || {
        handle.status()[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("past the log's durable end"))
    });
    assert_eq!(handle.status()[0].cursor, cursor, "no rewind");
    feeds[0].publish_durable(durable);
    wait_until_drained(&handle, Duration::from_secs(20));
    stop.store(true, Ordering::Release);
    handle.join().unwrap();
    verify_audit(&out, &data, 60_000);
}

fn sigkill_across_rotations_exactly_once() {
    // 40,000 heartbeats over one hour of receive time in 2 shards, drained by a plain and a zstd
    // audit sink with one-minute windows and 32 KiB files (a minute holds ~60 KiB of plain
    // lines, so plain files end by size and by time, compressed ones by time), killed
    // (SIGKILL) at six fill levels, then finished in this process. Every heartbeat is in each
    // sink exactly once and in log order, names are unique per second and sort in log order,
    // only a shard's newest file may be open, no plain file is more than a line past 32 KiB;
    // and `geobeat sinks --json` reports each cursor's file and byte count as they are on disk.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (plain, zst) = (dir.path().join("plain"), dir.path().join("zst"));
    let total = 40_000;
    let log_bytes: u64 = {
        let mut stores = open_stores(&data, 2);
        append(&mut stores, 0..total, total, 1);
        stores
            .iter_mut()
            .map(|s| s.sync_blocking().unwrap().0)
            .sum()
    };
    let rotate = Rotation {
        window_secs: 60,
        bytes: 32 << 10,
    };
    let sinks = vec![
        audit_sink_rotating("plain", &plain, false, rotate),
        audit_sink_rotating("zst", &zst, true, rotate),
    ];
    for pct in [10, 25, 40, 55, 70, 85] {
        let child = spawn_child(&data, &sinks);
        wait_for("the child to drain", Duration::from_secs(40), || {
            cursor_sum(&data, "plain").min(cursor_sum(&data, "zst")) >= log_bytes * pct / 100
        });
        kill(child);
    }
    let status = drain_in_process(&data, sinks);
    assert!(status.iter().all(|s| s.lag_bytes == 0));
    verify_audit(&plain, &data, 60_000);
    verify_audit(&zst, &data, 60_000);
    let mut size_cut = 0;
    for root in [&plain, &zst] {
        for sd in std::fs::read_dir(root).unwrap().flatten() {
            let mut names: Vec<String> = std::fs::read_dir(sd.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().into_string().unwrap())
                .collect();
            names.sort();
            let open: Vec<_> = names.iter().filter(|n| n.ends_with(".tmp")).collect();
            assert!(open.len() <= 1 && open.iter().all(|t| *t == names.last().unwrap()));
            let mut seconds = Vec::new();
            for n in &names {
                let Some(FileStart::Second(s)) = parse_file_start(&n[..n.find('.').unwrap()])
                else {
                    panic!("{n} is not named for a second")
                };
                seconds.push(s);
                let size = std::fs::metadata(sd.path().join(n)).unwrap().len();
                if root == &plain {
                    assert!(size < (32 << 10) + 1024, "{n}: {size} bytes");
                    // Only a file that follows a size cut is named off a window's start.
                    if s % 60 != 0 {
                        size_cut += 1;
                    }
                }
            }
            assert!(seconds.windows(2).all(|w| w[0] < w[1]), "{names:?}");
            assert!(names.len() >= 60, "{names:?}");
        }
    }
    assert!(size_cut > 0, "some plain files ended by size");
    // The JSON form of `geobeat sinks`: machine fields that match the files.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_geobeat"))
        .args(["sinks", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["sinks"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{v}");
    for r in rows {
        let root = if r["sink"] == "plain" { &plain } else { &zst };
        assert_eq!(r["kind"], "audit", "{r}");
        assert_eq!(r["lag_bytes"], 0, "{r}");
        assert_eq!(r["cursor"], r["log_end"], "{r}");
        let file = r["file"].as_str().expect("file name");
        let sd = root.join(format!("shard-{:04}", r["shard"].as_u64().unwrap()));
        let on_disk = std::fs::metadata(sd.join(file))
            .or_else(|_| std::fs::metadata(sd.join(format!("{file}.tmp"))))
            .unwrap()
            .len();
        assert_eq!(r["file_bytes"].as_u64(), Some(on_disk), "{r}");
    }
}

fn main() {
    if child_main() {
        return;
    }
    run_tests(&[
        (
            "sigkill_mid_drain_exactly_once",
            sigkill_mid_drain_exactly_once,
        ),
        (
            "retention_waits_for_sinks_and_gaps_are_reported",
            retention_waits_for_sinks_and_gaps_are_reported,
        ),
        (
            "cursor_ahead_of_durable_waits_without_rewinding",
            cursor_ahead_of_durable_waits_without_rewinding,
        ),
        (
            "sigkill_across_rotations_exactly_once",
            sigkill_across_rotations_exactly_once,
        ),
    ]);
}
