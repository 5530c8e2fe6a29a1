//! The flusher against a real PostgreSQL (custom harness: `cargo test --test flusher_postgres`;
//! needs PostgreSQL's server binaries, e.g. `apt-get install -y postgresql`). Each run starts a
//! throwaway cluster (initdb in a temp dir, free 127.0.0.1 port, as user `postgres` when run as
//! root) and stops it at the end. The heartbeats are written through the real `ShardStore`; the
//! flusher runs either in a child process that is SIGKILLed mid-drain, or in this process while a
//! writer thread appends and PostgreSQL is stopped and started again. After each scenario
//! `history` must hold every durable heartbeat exactly once (by `(shard, pos)`) with the right
//! content, and `last_location` each device's newest heartbeat by device time (ties: later
//! append), which must also equal the server's own last-location table. One scenario runs the
//! real server with the sink configured in its TOML file and checks `geobeat audit verify
//! --postgres` on the rows' digest chain: clean, an edited row, a deleted row, an upgrade.

mod common;
mod flusher_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use flusher_support::*;
use geobeat::flusher;
use geobeat::flusher::cursor::{cursor_path, read_cursor};

static PG: OnceLock<Pg> = OnceLock::new();

fn pg() -> &'static Pg {
    PG.get_or_init(Pg::start)
}

/// Checks `history` and `last_location` against the data directory's logs and tables.
fn verify(pg: &Pg, root: &std::path::Path) {
    let want = expected(root);
    assert!(!want.is_empty());
    assert_exactly_once("history", &pg.history_keys(), &want);
    // Content of every row.
    let rows = pg
        .client()
        .query(
            "SELECT shard, pos, seq, id, ts, received_at, lat, lon FROM history ORDER BY shard, pos",
            &[],
        )
        .unwrap();
    for (r, e) in rows.iter().zip(&want) {
        let got = Expected {
            shard: r.get::<_, i32>(0) as u32,
            pos: r.get::<_, i64>(1) as u64,
            seq: r.get::<_, i64>(2) as u64,
            id: r.get(3),
            ts: r.get(4),
            received_at: r.get(5),
            lat: r.get(6),
            lon: r.get(7),
        };
        assert_eq!(&got, e);
    }
    let attrs: i64 = pg
        .client()
        .query_one(
            "SELECT count(*) FROM history WHERE attrs->>'s' = 'a\\b' AND (attrs->>'n')::bigint >= 0",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(attrs > 0, "attrs arrive as jsonb");
    let last = pg.last_locations();
    assert_eq!(last, expected_last(&want));
    // The server's own table agrees (same rule: newest device time, ties to the later append).
    let stores = open_stores(root, 1);
    for (id, (ts, shard, pos)) in &last {
        let l = stores[*shard as usize].last(id).expect("device in table");
        assert_eq!((l.ts_ms, l.pos.0), (*ts, *pos), "{id}");
    }
    // The rows' digest chain holds (across restarts, kills, outages and replays) and every row
    // equals its log entry.
    let (code, out) = audit_verify(&["--postgres", &pg.url, "--data-dir", root.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(" 0 chained"), "{out}");
}

/// Every row below each cursor is in `history` (a cursor never runs ahead of the database).
fn cursors_covered(pg: &Pg, root: &std::path::Path, sink: &str) {
    let want = expected(root);
    let have = pg.history_keys();
    let dd = geobeat::datadir::DataDir::open_or_create(root, 1).unwrap();
    for k in 0..dd.shard_count() {
        let dir = dd.shard_dir(geobeat::route::ShardId(k));
        let Some(c) = read_cursor(&cursor_path(&dir, sink)).unwrap() else {
            continue;
        };
        for e in want.iter().filter(|e| e.shard == k && e.pos < c.pos) {
            assert!(
                have.contains_key(&(e.shard, e.pos)),
                "cursor {} of shard {k} passes ({}, {}) which is not in history",
                c.pos,
                e.shard,
                e.pos
            );
        }
    }
}

fn sigkill_mid_drain_then_restart() {
    // 120,000 heartbeats in 2 shards (1 MiB segments, so ~30 segments are crossed) are drained by
    // a child process that is SIGKILLed three times at different fill levels of `history`, each
    // time after checking that no cursor is ahead of the database; a final in-process flusher
    // finishes. History must then hold each durable heartbeat exactly once, and last_location the
    // newest per device.
    let pg = pg();
    pg.reset();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let total = 120_000;
    {
        let mut stores = open_stores(&root, 2);
        append(&mut stores, 0..total, total, 3);
        for s in &mut stores {
            s.sync_blocking().unwrap();
        }
    }
    let sinks = vec![pg_sink("pg", &pg.url)];
    for round in 1..=3i64 {
        let child = spawn_child(&root, &sinks);
        let target = round * total as i64 / 4;
        wait_for("rows to arrive", Duration::from_secs(40), || {
            pg.history_count() >= target
        });
        kill(child);
        cursors_covered(pg, &root, "pg");
        // Killed mid-batch: reconcile finds nothing missing or doubled below the cursors.
        assert_reconciled(&root, &["--postgres", &pg.url]);
    }
    let status = drain_in_process(&root, sinks);
    assert!(status
        .iter()
        .all(|s| s.kind == "postgres" && s.lag_bytes == 0));
    verify(pg, &root);
    assert_reconciled(&root, &["--postgres", &pg.url]);
    // A row deleted (or doubled) in PostgreSQL is named and fails the check.
    let id: String = pg
        .client()
        .query_one(
            "DELETE FROM history WHERE (shard, pos) = (SELECT shard, pos FROM history \
             WHERE shard = 1 ORDER BY pos LIMIT 1 OFFSET 500) RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let (code, out) = reconcile(&root, &["--postgres", &pg.url]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("shard 1 device {id:?}")), "{out}");
}

fn postgres_down_during_ingest() {
    // A writer thread appends 60,000 heartbeats in commits of 500, publishing each durable
    // position, while the flusher drains to PostgreSQL. PostgreSQL is stopped (immediate, like a
    // crash) for about two seconds in the middle: meanwhile the status shows the error and a
    // growing lag, the cursors do not move, and ingest goes on. After it is started again the
    // flusher catches up and the database holds everything exactly once.
    let pg = pg();
    pg.reset();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let total = 60_000u64;
    let mut stores = open_stores(&root, 2);
    let feeds = feeds(&root, &stores);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = flusher::start(vec![pg_sink("pg", &pg.url)], feeds.clone(), stop.clone()).unwrap();
    let appended = Arc::new(AtomicU64::new(0));
    let writer = {
        let feeds = feeds.clone();
        let appended = appended.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            while i < total {
                let next = (i + 500).min(total);
                append(&mut stores, i..next, total, 2);
                for (s, f) in stores.iter_mut().zip(&feeds) {
                    f.publish_durable(s.sync_blocking().unwrap());
                }
                i = next;
                appended.store(i, Ordering::Release);
                std::thread::sleep(Duration::from_millis(25));
            }
            stores
        })
    };
    wait_for("a third of the ingest", Duration::from_secs(30), || {
        appended.load(Ordering::Acquire) >= total / 3
    });
    pg.stop();
    let stopped_at = Instant::now();
    // Let the batch in flight fail, then watch the cursors stand still while ingest goes on.
    wait_for("the failure to show", Duration::from_secs(10), || {
        handle.status().iter().any(|s| s.last_error.is_some())
    });
    let cursors =
        |h: &flusher::FlusherHandle| h.status().iter().map(|s| s.cursor).collect::<Vec<_>>();
    let before = cursors(&handle);
    let lag_before: u64 = handle.status().iter().map(|s| s.lag_bytes).sum();
    std::thread::sleep(
        Duration::from_secs(2)
            .saturating_sub(stopped_at.elapsed())
            .max(Duration::from_millis(800)),
    );
    let during = handle.status();
    assert_eq!(
        cursors(&handle),
        before,
        "cursors moved while PostgreSQL was down"
    );
    assert!(
        during.iter().any(|s| s.failures > 0
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("postgres"))),
        "{during:?}"
    );
    let lag_during: u64 = during.iter().map(|s| s.lag_bytes).sum();
    assert!(
        lag_during > lag_before,
        "lag grows while down: {lag_before} -> {lag_during}"
    );
    for f in &feeds {
        assert!(f.backlog_bytes() > 0);
    }
    pg.start_again();
    let stores = writer.join().unwrap();
    wait_until_drained(&handle, Duration::from_secs(40));
    stop.store(true, Ordering::Release);
    handle.join().unwrap();
    for f in &feeds {
        assert_eq!(f.consumed(), f.durable());
    }
    drop(stores);
    verify(pg, &root);
    // After the outage: zero differences between the logs and PostgreSQL (issue 18).
    assert_reconciled(&root, &["--postgres", &pg.url]);
}

fn both_sinks_and_sinks_command() {
    // A PostgreSQL and a zstd audit sink drain the same 20,000 heartbeats at once; `consumed` is
    // the minimum of their cursors; `geobeat sinks` then reports both with zero lag.
    let pg = pg();
    pg.reset();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let audit = dir.path().join("audit");
    let total = 20_000;
    {
        let mut stores = open_stores(&root, 2);
        append(&mut stores, 0..total, total, 1);
        for s in &mut stores {
            s.sync_blocking().unwrap();
        }
    }
    let status = drain_in_process(
        &root,
        vec![pg_sink("pg", &pg.url), audit_sink("files", &audit, true)],
    );
    assert_eq!(status.len(), 4);
    assert_eq!(status.iter().map(|s| s.rows_total).sum::<u64>(), 2 * total);
    verify(pg, &root);
    let rows = geobeat::flusher::report::collect(&root, &["pg".into()]).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter()
            .all(|r| r.lag_bytes == Some(0) && r.cursor.is_some()),
        "{rows:?}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_geobeat"))
        .args(["sinks", "--data-dir"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("files") && text.contains("pg") && text.contains("LAG_BYTES"),
        "{text}"
    );
}

fn replay_after_lost_cursor_updates_is_idempotent() {
    // After a full drain, every shard's cursor file is set back to an entry a third of the way
    // in (as if the cursor updates after the database commits had been lost in a crash). A new
    // flusher replays from there: the replayed rows must take the conflict-checked path (never a
    // failed attempt), history must still hold everything exactly once, and last_location must
    // not move backwards.
    let pg = pg();
    pg.reset();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let total = 12_000;
    {
        let mut stores = open_stores(&root, 2);
        append(&mut stores, 0..total, total, 1);
        for s in &mut stores {
            s.sync_blocking().unwrap();
        }
    }
    drain_in_process(&root, vec![pg_sink("pg", &pg.url)]);
    let want = expected(&root);
    let dd = geobeat::datadir::DataDir::open_or_create(&root, 1).unwrap();
    for k in 0..dd.shard_count() {
        let mine: Vec<&Expected> = want.iter().filter(|e| e.shard == k).collect();
        let back = mine[mine.len() / 3];
        let path = cursor_path(&dd.shard_dir(geobeat::route::ShardId(k)), "pg");
        let mut c = read_cursor(&path).unwrap().unwrap();
        c.pos = back.pos;
        c.seq = Some(back.seq);
        geobeat::flusher::cursor::write_cursor(&path, &c).unwrap();
    }
    let status = drain_in_process(&root, vec![pg_sink("pg", &pg.url)]);
    let replayed: u64 = status.iter().map(|s| s.rows_total).sum();
    assert!(replayed as f64 > total as f64 * 0.6, "{status:?}");
    assert!(status.iter().all(|s| s.errors_total == 0), "{status:?}");
    verify(pg, &root);
}

fn a_missing_database_is_reported_with_the_servers_message() {
    // A sink whose database does not exist: the flusher starts anyway, the sink's start-up check
    // fails on every shard with PostgreSQL's own message (SQLSTATE 3D000, `database "..." does
    // not exist`; the client's Display alone says "db error"), `failing()` (what /readyz shows)
    // names it, and its cursors stay put. Once the database is created the retried check
    // succeeds, the sink drains, and it is no longer failing.
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let total = 2_000;
    let stores = {
        let mut stores = open_stores(&root, 2);
        append(&mut stores, 0..total, total, 1);
        for s in &mut stores {
            s.sync_blocking().unwrap();
        }
        stores
    };
    let db = "geobeat_missing";
    let _ = pg
        .client()
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"));
    let url = pg.url.replace("dbname=postgres", &format!("dbname={db}"));
    assert_ne!(url, pg.url);
    let feeds = feeds(&root, &stores);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = flusher::start(vec![pg_sink("pg", &url)], feeds.clone(), stop.clone()).unwrap();
    wait_for("the check to fail", Duration::from_secs(20), || {
        handle.status().iter().all(|s| s.failures > 0)
    });
    for s in handle.status() {
        let e = s.last_error.expect("an error");
        assert!(
            e.contains(&format!("database \"{db}\" does not exist")) && e.contains("3D000"),
            "{e}"
        );
        assert!(!e.contains("db error"), "{e}");
        assert_eq!(s.cursor, 0);
    }
    let failing = handle.status_reader().failing();
    assert_eq!(failing.len(), 1, "{failing:?}");
    assert_eq!(
        (failing[0].sink.as_str(), failing[0].kind),
        ("pg", "postgres")
    );
    assert_eq!(failing[0].shards, vec![0, 1]);
    pg.client()
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    wait_until_drained(&handle, Duration::from_secs(30));
    assert!(handle.status_reader().failing().is_empty());
    stop.store(true, Ordering::Release);
    handle.join().unwrap();
    drop(stores);
    let rows: i64 = postgres::Client::connect(&url, postgres::NoTls)
        .unwrap()
        .query_one("SELECT count(*) FROM history", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, total as i64);
}

/// Runs `geobeat audit verify` with `args`; returns the exit code and the output.
fn audit_verify(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_geobeat"))
        .args(["audit", "verify"])
        .args(args)
        .env_remove("GEOBEAT_DATA_DIR")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Sends heartbeats `range` (with attrs) for 16 devices over one WebSocket and waits for the
/// acks; returns how many were sent.
fn send_through_server(server: &common::Server, range: std::ops::Range<u64>) -> u64 {
    let tok = server.token(&["gateway", "v-"]);
    let mut ws = common::ws_connect(server, &tok).unwrap();
    let t = common::now_ms();
    for (seq, i) in range.clone().enumerate() {
        let frame = format!(
            r#"{{"seq":{},"id":"v-{}","lat":{},"lon":{},"ts":{},"speed":{},"attrs":{{"n":{i},"s":"a b","f":1.50,"z":{{"k":[1e3,true]}}}}}}"#,
            seq + 1,
            i % 16,
            52.0 + i as f64 * 1e-4,
            13.0 - i as f64 * 1e-4,
            t + i as i64,
            (i % 30) as f32 * 0.5,
        );
        ws.send(common::Message::text(frame)).unwrap();
    }
    let n = range.end - range.start;
    assert!(common::wait_ack(&mut ws, n).is_empty());
    n
}

fn audit_verify_names_edited_and_deleted_rows() {
    // 600 heartbeats go through the real server (WebSocket) into a PostgreSQL sink from its
    // TOML file; the server is restarted and 200 more follow (the chain goes on across the
    // restart). `audit verify --postgres` then exits 0, with and without the data directory.
    // (b) one row's lat changed: exit 1 naming its shard, pos and device (and, with the log,
    // the column); restored: exit 0. (c) one row deleted: exit 1 naming the gap (with the log:
    // "deleted" at its position; without: the next row); restored: exit 0. (d) a shard's newest
    // row deleted: only the log comparison sees it (below the sink's cursor). (e) upgrade: the
    // digest column dropped (an older build's table), the server restarted (adds the column)
    // and 100 more heartbeats: the old rows are "unchained", the new ones chain, exit 0.
    let pg = pg();
    pg.reset();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("geobeat.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"db\"\nkind = \"postgres\"\nurl = \"{}\"\npoll_interval_ms = 20\n",
            pg.url
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut server = common::Server::start(&data, &["--config", &config.display().to_string()]);
    let mut sent = send_through_server(&server, 0..600);
    wait_for("600 rows", Duration::from_secs(30), || {
        pg.history_count() == sent as i64
    });
    assert!(server.sigterm().success());
    server.restart();
    sent += send_through_server(&server, 600..800);
    wait_for("800 rows", Duration::from_secs(30), || {
        pg.history_count() == sent as i64
    });
    assert!(server.sigterm().success());
    let d = data.to_str().unwrap();
    let url = pg.url.as_str();
    let clean = |what: &str| {
        for args in [
            vec!["--postgres", url],
            vec!["--postgres", url, "--data-dir", d],
        ] {
            let (code, out) = audit_verify(&args);
            assert_eq!(code, 0, "{what}: {args:?}: {out}");
            assert!(out.contains("verified: no mismatch"), "{out}");
        }
    };
    clean("untouched");
    let (_, out) = audit_verify(&["--postgres", url, "--data-dir", d]);
    let chained: u64 = out
        .lines()
        .filter(|l| l.starts_with("postgres shard"))
        .map(|l| {
            assert!(
                l.contains(" 0 unchained") && l.contains("compared with the log"),
                "{l}"
            );
            l.split(", ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(chained, sent, "{out}");
    let row = |offset: i64| -> (i32, i64, String) {
        let r = pg
            .client()
            .query_one(
                "SELECT shard, pos, id FROM history ORDER BY shard, pos OFFSET $1 LIMIT 1",
                &[&offset],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let named = |(shard, pos, id): &(i32, i64, String)| {
        format!("postgres shard {shard} pos {pos} device {id:?}")
    };

    // (b) An edited lat.
    let victim = row(300);
    let edit = "UPDATE history SET lat = lat + 0.5 WHERE shard = $1 AND pos = $2";
    assert_eq!(
        pg.client().execute(edit, &[&victim.0, &victim.1]).unwrap(),
        1
    );
    let (code, out) = audit_verify(&["--postgres", url]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "MISMATCH: {}: the digest does not match",
            named(&victim)
        )),
        "{out}"
    );
    let (code, out) = audit_verify(&["--postgres", url, "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("MISMATCH: {}: edited: lat is ", named(&victim))),
        "{out}"
    );
    println!("{out}");
    let undo = "UPDATE history SET lat = lat - 0.5 WHERE shard = $1 AND pos = $2";
    pg.client().execute(undo, &[&victim.0, &victim.1]).unwrap();
    clean("lat restored");

    // (c) A deleted row in the middle.
    let victim = row(200);
    let next = row(201);
    assert_eq!(victim.0, next.0, "same shard");
    let mut c = pg.client();
    c.execute(
        "CREATE TABLE saved AS SELECT * FROM history WHERE shard = $1 AND pos = $2",
        &[&victim.0, &victim.1],
    )
    .unwrap();
    c.execute(
        "DELETE FROM history WHERE shard = $1 AND pos = $2",
        &[&victim.0, &victim.1],
    )
    .unwrap();
    let (code, out) = audit_verify(&["--postgres", url]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "MISMATCH: {}: the digest does not match",
            named(&next)
        )),
        "{out}"
    );
    let (code, out) = audit_verify(&["--postgres", url, "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("MISMATCH: {}: deleted", named(&victim))),
        "{out}"
    );
    println!("{out}");
    c.batch_execute("INSERT INTO history SELECT * FROM saved; DROP TABLE saved")
        .unwrap();
    clean("row restored");

    // (d) The newest row of shard 0 deleted: the chain cannot tell, the cursor can.
    let newest: (i32, i64, String) = {
        let r = c
            .query_one(
                "SELECT shard, pos, id FROM history WHERE shard = 0 ORDER BY pos DESC LIMIT 1",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    c.execute(
        "CREATE TABLE saved AS SELECT * FROM history WHERE shard = $1 AND pos = $2",
        &[&newest.0, &newest.1],
    )
    .unwrap();
    c.execute(
        "DELETE FROM history WHERE shard = $1 AND pos = $2",
        &[&newest.0, &newest.1],
    )
    .unwrap();
    let (code, out) = audit_verify(&["--postgres", url]);
    assert_eq!(
        code, 0,
        "a chain alone cannot see a deleted newest row: {out}"
    );
    let (code, out) = audit_verify(&["--postgres", url, "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("MISMATCH: {}: deleted", named(&newest))) && out.contains("cursor"),
        "{out}"
    );
    c.batch_execute("INSERT INTO history SELECT * FROM saved; DROP TABLE saved")
        .unwrap();
    clean("newest restored");

    // (e) An older build's table: no digest column. The sink adds it; old rows stay NULL.
    c.batch_execute("ALTER TABLE history DROP COLUMN digest")
        .unwrap();
    server.restart();
    sent += send_through_server(&server, 800..900);
    wait_for("900 rows", Duration::from_secs(30), || {
        pg.history_count() == sent as i64
    });
    assert!(server.sigterm().success());
    clean("upgraded");
    let (_, out) = audit_verify(&["--postgres", url]);
    let unchained: u64 = out
        .lines()
        .filter(|l| l.starts_with("postgres shard"))
        .map(|l| {
            let at = l.find(" unchained").unwrap();
            l[..at].rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(unchained, 800, "{out}");
    let chained: i64 = c
        .query_one("SELECT count(*) FROM history WHERE digest IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert_eq!(chained, 100);
    // A cleared digest after chained rows is not "unchained": it is named.
    let last = {
        let r = c
            .query_one("SELECT shard, pos, id FROM history WHERE digest IS NOT NULL ORDER BY shard, pos LIMIT 1 OFFSET 10", &[])
            .unwrap();
        (
            r.get::<_, i32>(0),
            r.get::<_, i64>(1),
            r.get::<_, String>(2),
        )
    };
    let prior_chained: i64 = c
        .query_one(
            "SELECT count(*) FROM history WHERE shard = $1 AND pos < $2 AND digest IS NOT NULL",
            &[&last.0, &last.1],
        )
        .unwrap()
        .get(0);
    if prior_chained > 0 {
        c.execute(
            "UPDATE history SET digest = NULL WHERE shard = $1 AND pos = $2",
            &[&last.0, &last.1],
        )
        .unwrap();
        let (code, out) = audit_verify(&["--postgres", url]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!("{}: no digest after chained rows", named(&last))),
            "{out}"
        );
    }
}

fn main() {
    if child_main() {
        return;
    }
    run_tests(&[
        (
            "sigkill_mid_drain_then_restart",
            sigkill_mid_drain_then_restart,
        ),
        ("postgres_down_during_ingest", postgres_down_during_ingest),
        ("both_sinks_and_sinks_command", both_sinks_and_sinks_command),
        (
            "replay_after_lost_cursor_updates_is_idempotent",
            replay_after_lost_cursor_updates_is_idempotent,
        ),
        (
            "a_missing_database_is_reported_with_the_servers_message",
            a_missing_database_is_reported_with_the_servers_message,
        ),
        (
            "audit_verify_names_edited_and_deleted_rows",
            audit_verify_names_edited_and_deleted_rows,
        ),
    ]);
    if let Some(pg) = PG.get() {
        pg.stop();
    }
}
