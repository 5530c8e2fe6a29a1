//! Issue 13 §1: a device's last location outlives retention. Store-level tests (1 MiB segments,
//! retention of zero, a quiet device while other devices roll segments) check the full record
//! after retention and after reopening, a crash between the checkpoint write and the deletion, a
//! late heartbeat arriving after its device's last entry was checkpointed, and that a damaged or
//! truncated checkpoint is refused naming the file; a model test checks every device's last record
//! through random heartbeats, retention runs, crashes and reopens. An end-to-end test reproduces
//! the issue with the real binary (`--shards 1 --segment-bytes 1MiB --retention 1s`). The ignored
//! `bench_checkpoint_of_a_million_quiet_devices` gives the figures in perf/RESULTS.md.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, SystemTime};

use geobeat::checkpoint::CHECKPOINT_FILE;
use geobeat::query::{area, Area};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{RetentionStep, ShardStore, StoreConfig};

const BASE_MS: i64 = 1_800_000_000_000;

fn open(dir: &Path) -> ShardStore {
    let mut cfg = StoreConfig::new(dir, ShardId(0));
    cfg.segment_bytes = 1 << 20;
    ShardStore::open(&cfg).unwrap().0
}

/// The quiet device's heartbeat, with every optional field.
fn parked(ts: i64) -> Heartbeat {
    Heartbeat {
        device_id: "parked-truck".into(),
        lat: 48.8566,
        lon: 2.3522,
        ts_ms: ts,
        received_ms: ts + 7,
        alt_m: Some(35.5),
        speed_mps: Some(0.25),
        heading_deg: Some(271.0),
        acc_m: Some(4.5),
        attrs: br#"{"fuel":0.42,"door":"locked"}"#.to_vec(),
    }
}

fn other(i: u64) -> Heartbeat {
    Heartbeat {
        device_id: format!("busy-{}", i % 500),
        lat: 10.0 + (i % 100) as f64 / 100.0,
        lon: 20.0,
        ts_ms: BASE_MS + i as i64,
        received_ms: BASE_MS + i as i64,
        attrs: b"{\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}".to_vec(),
        ..Default::default()
    }
}

/// Appends other devices' heartbeats until `segments` more segments were created.
fn roll(store: &mut ShardStore, from: &mut u64, segments: usize) {
    let target = store.stats().segments + segments;
    while store.stats().segments < target {
        store.append(&other(*from)).unwrap();
        *from += 1;
    }
    store.sync_blocking().unwrap();
}

fn last_hb(store: &ShardStore, id: &str) -> Option<Heartbeat> {
    store.last_record(id).map(|e| e.hb.to_owned_heartbeat())
}

fn near_ids(store: &ShardStore, lat: f64, lon: f64) -> Vec<String> {
    let q = Area::Near {
        lat,
        lon,
        radius_m: 1000.0,
    };
    area(store, &q, 100).into_iter().map(|h| h.id).collect()
}

#[test]
fn quiet_device_keeps_its_full_last_location_through_retention_and_reopen() {
    // parked-truck reports once (every optional field set) and a "mover" twice; other devices
    // fill several segments; retention of zero deletes every sealed segment. The full record
    // stays readable, in area queries too, across a second retention run (records carried over
    // from the previous checkpoint) and after reopening; the mover's newer entry wins over its
    // checkpointed one.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let want = parked(BASE_MS);
    let pos = store.append(&want).unwrap();
    let mover = |ts: i64, lat: f64| Heartbeat {
        device_id: "mover".into(),
        lat,
        lon: 5.0,
        ts_ms: ts,
        received_ms: ts,
        ..Default::default()
    };
    store.append(&mover(BASE_MS, 1.0)).unwrap();
    let mut n = 0;
    roll(&mut store, &mut n, 3);
    let deleted = store
        .delete_expired(SystemTime::now(), Duration::ZERO)
        .unwrap();
    assert!(deleted >= 3, "deleted {deleted}");
    assert!(store.log().read(pos).is_none(), "the segment is gone");
    assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    assert_eq!(near_ids(&store, 48.8566, 2.3522), vec!["parked-truck"]);
    let mut only_ckpt = Vec::new();
    store.for_each_checkpoint_record(|r| only_ckpt.push(r.entry.hb.device_id.to_string()));
    assert!(only_ckpt.contains(&"parked-truck".to_string()));
    assert!(only_ckpt.contains(&"mover".to_string()));

    // The mover moves; more segments, a second retention run (carries parked-truck over).
    store.append(&mover(BASE_MS + 10_000_000, 2.0)).unwrap();
    roll(&mut store, &mut n, 3);
    assert!(
        store
            .delete_expired(SystemTime::now(), Duration::ZERO)
            .unwrap()
            >= 3
    );
    assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    assert_eq!(last_hb(&store, "mover").unwrap().lat, 2.0);
    let ckpt = store.checkpoint().unwrap();
    assert!(ckpt.get(pos).is_some());
    drop(store);

    let store = open(dir.path());
    assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    assert_eq!(store.last("parked-truck").unwrap().pos, pos);
    assert_eq!(last_hb(&store, "mover").unwrap().lat, 2.0);
    assert_eq!(near_ids(&store, 48.8566, 2.3522), vec!["parked-truck"]);
    assert!(near_ids(&store, 1.0, 5.0).is_empty(), "mover left");
    assert_eq!(last_hb(&store, "busy-7").unwrap().device_id, "busy-7");
    assert_eq!(store.table().len(), 502);
}

#[test]
fn crash_between_checkpoint_write_and_deletion_recovers_correctly() {
    // The checkpoint is written but the process dies before the deletion of the segments it
    // covers is durable (the files are put back, the job never handed back). Reopening loads the checkpoint and replays only the log after its covered
    // position: devices moved after the checkpoint keep their newer location, the quiet one its
    // full record; the next retention run deletes without writing another checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let want = parked(BASE_MS);
    let mut n = 0;
    {
        let mut store = open(dir.path());
        store.append(&want).unwrap();
        roll(&mut store, &mut n, 3);
        let RetentionStep::Checkpoint(mut job) =
            store.retention_begin(SystemTime::now(), Duration::ZERO)
        else {
            panic!("a checkpoint is due");
        };
        while !job.collect_slice(&store) {}
        // The writer deletes the covered segments after the checkpoint is durable; the crash
        // comes before those deletions are durable: put the files back.
        let saved: Vec<(std::path::PathBuf, Vec<u8>)> = walk(dir.path())
            .into_iter()
            .filter(|p| p.extension() == Some("seg".as_ref()))
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        job.write().unwrap();
        for (p, b) in &saved {
            if !p.exists() {
                std::fs::write(p, b).unwrap();
            }
        }
        // After the checkpoint, busy-3 reports again (newer).
        store
            .append(&Heartbeat {
                lat: -33.0,
                ts_ms: BASE_MS + 50_000_000,
                ..other(3)
            })
            .unwrap();
        store.sync_blocking().unwrap();
        // Crash: the job is dropped, nothing deleted.
    }
    let segs_before = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("seg".as_ref()))
        .count();
    let mut store = open(dir.path());
    assert_eq!(store.stats().segments, segs_before);
    assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    assert_eq!(last_hb(&store, "busy-3").unwrap().lat, -33.0);
    assert_eq!(store.table().len(), 501);
    match store.retention_begin(SystemTime::now(), Duration::ZERO) {
        RetentionStep::Delete(end) => assert!(store.delete_below(end).unwrap() >= 3),
        other => panic!("expected a plain deletion, got {other:?}"),
    }
    assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    drop(store);
    let store = open(dir.path());
    assert_eq!(last_hb(&store, "parked-truck"), Some(want));
    assert_eq!(last_hb(&store, "busy-3").unwrap().lat, -33.0);
}

#[test]
fn late_heartbeat_after_the_checkpoint_does_not_move_last() {
    // parked-truck's last entry (t=1000 s) is checkpointed and its segment deleted; then a late
    // heartbeat (t=500 s) arrives: it goes to the log and the history, but the last location stays
    // the checkpointed one, before and after reopening (the replay after the checkpoint applies
    // the same device-time rule).
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let want = parked(BASE_MS + 1_000_000);
    store.append(&want).unwrap();
    let mut n = 0;
    roll(&mut store, &mut n, 2);
    assert!(
        store
            .delete_expired(SystemTime::now(), Duration::ZERO)
            .unwrap()
            >= 2
    );
    let late = Heartbeat {
        lat: 1.0,
        ts_ms: BASE_MS + 500_000,
        received_ms: BASE_MS + 2_000_000,
        ..parked(0)
    };
    let late_pos = store.append(&late).unwrap();
    store.sync_blocking().unwrap();
    assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    assert_eq!(store.last("parked-truck").unwrap().head, late_pos);
    drop(store);
    let store = open(dir.path());
    assert_eq!(last_hb(&store, "parked-truck"), Some(want));
    let l = store.last("parked-truck").unwrap();
    assert_eq!(l.head, late_pos);
    let hist = geobeat::query::history(&store, "parked-truck", i64::MIN, i64::MAX, 10);
    assert_eq!(hist.unwrap(), vec![late]);
}

#[test]
fn damaged_or_truncated_checkpoint_is_refused_naming_the_file() {
    // A flipped byte anywhere (header, a record, the index) or a truncation makes opening fail
    // with an error naming the checkpoint file; nothing opens with devices silently missing.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = open(dir.path());
        store.append(&parked(BASE_MS)).unwrap();
        let mut n = 0;
        roll(&mut store, &mut n, 2);
        store
            .delete_expired(SystemTime::now(), Duration::ZERO)
            .unwrap();
    }
    let path = dir.path().join(CHECKPOINT_FILE);
    let good = std::fs::read(&path).unwrap();
    assert!(good.len() > 200);
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("header byte".into(), flip(&good, 20)),
        ("record byte".into(), flip(&good, 64 + 40)),
        ("index byte".into(), flip(&good, good.len() - 3)),
        ("truncated".into(), good[..good.len() - 100].to_vec()),
        ("header only".into(), good[..30].to_vec()),
        // A damaged entry whose file CRCs were recomputed: the entry's own CRC catches it.
        (
            "entry byte, file CRCs redone".into(),
            recrc(flip(&good, 64 + 16 + 40)),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let mut cfg = StoreConfig::new(dir.path(), ShardId(0));
        cfg.segment_bytes = 1 << 20;
        let err = ShardStore::open(&cfg).expect_err(&what).to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("damaged"),
            "{what}: {err}"
        );
    }
    std::fs::write(&path, &good).unwrap();
    let store = open(dir.path());
    assert_eq!(last_hb(&store, "parked-truck"), Some(parked(BASE_MS)));
}

#[test]
fn segments_removed_outside_retention_are_refused_naming_the_checkpoint() {
    // The checkpoint covers the log up to B; removing the segment that starts at B by hand
    // leaves a gap the checkpoint cannot fill: opening refuses, naming the checkpoint and what is
    // missing, instead of serving devices whose last entries fell in the gap as unknown.
    let dir = tempfile::tempdir().unwrap();
    let covered = {
        let mut store = open(dir.path());
        store.append(&parked(BASE_MS)).unwrap();
        let mut n = 0;
        roll(&mut store, &mut n, 3);
        store
            .delete_expired(SystemTime::now(), Duration::ZERO)
            .unwrap();
        store.checkpoint().unwrap().covered()
    };
    let first = walk(dir.path())
        .into_iter()
        .filter(|p| p.extension() == Some("seg".as_ref()))
        .min()
        .unwrap();
    assert_eq!(
        first
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        covered.0
    );
    // Keep one later segment so the log is not empty: roll once more first.
    {
        let mut store = open(dir.path());
        let mut n = 10_000_000;
        roll(&mut store, &mut n, 1);
    }
    std::fs::remove_file(&first).unwrap();
    let mut cfg = StoreConfig::new(dir.path(), ShardId(0));
    cfg.segment_bytes = 1 << 20;
    let err = ShardStore::open(&cfg).expect_err("a gap").to_string();
    assert!(
        err.contains(CHECKPOINT_FILE) && err.contains("removed outside retention"),
        "{err}"
    );
}

/// Recomputes a checkpoint's body CRC (header 40..44) and header CRC (44..48).
fn recrc(mut v: Vec<u8>) -> Vec<u8> {
    let body = crc32c::crc32c(&v[64..]);
    v[40..44].copy_from_slice(&body.to_le_bytes());
    let head = crc32c::crc32c(&v[..44]);
    v[44..48].copy_from_slice(&head.to_le_bytes());
    v
}

fn flip(b: &[u8], at: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    v[at] ^= 0x40;
    v
}

#[test]
fn server_keeps_the_last_location_of_a_quiet_device_through_retention_and_restart() {
    // The issue's reproduction against the real binary: one heartbeat (all optional fields) for
    // parked-truck, then a few MB of heartbeats from other devices so 1 MiB segments roll and the
    // 1 s retention deletes them (the retention check runs every 5 s). GET answers the full
    // record, near= finds it, and both still hold after a restart.
    let dir = tempfile::tempdir().unwrap();
    // A private data directory, as geobeat requires.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let mut server = Server::start(
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
    let ops = server.token(&["ops"]);
    let gw = server.token(&["gateway", ""]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let ts = now_ms() - 60_000;
    ws.send(Message::text(format!(
        r#"{{"seq":1,"id":"parked-truck","lat":48.8566,"lon":2.3522,"ts":{ts},"alt":35.5,"speed":0.25,"heading":271,"acc":4.5,"attrs":{{"fuel":0.42,"door":"locked"}}}}"#
    )))
    .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    let want = last_location(&server, "parked-truck", &ops).expect("stored");
    assert_eq!(want["alt"], 35.5);
    assert_eq!(want["attrs"]["door"], "locked");
    let seg_count = |dir: &Path| {
        walk(dir)
            .iter()
            .filter(|p| p.extension() == Some("seg".as_ref()))
            .count()
    };
    let mut seq = 1u64;
    let pad = "x".repeat(200);
    // About 4 MB of other devices' heartbeats.
    for batch in 0..40 {
        for i in 0..400u64 {
            seq += 1;
            ws.send(Message::text(format!(
                r#"{{"seq":{seq},"id":"busy-{}","lat":10.5,"lon":20.5,"ts":{},"attrs":{{"pad":"{pad}"}}}}"#,
                i % 300,
                ts + batch * 1000 + i as i64
            )))
            .unwrap();
        }
        assert!(wait_ack(&mut ws, seq).is_empty());
    }
    let near = |server: &Server| {
        let (st, body) = server.get("/v1/devices?near=48.8566,2.3522&radius=500", Some(&ops));
        assert_eq!(st, 200, "{body}");
        body
    };
    // Wait for retention to delete the first segment (where parked-truck's entry is).
    let data_dir = dir.path();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ckpt_exists = || {
        walk(data_dir)
            .iter()
            .any(|p| p.file_name().unwrap() == CHECKPOINT_FILE)
    };
    while !ckpt_exists() || first_segment_base(data_dir) == Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not run ({} segments)",
            seg_count(data_dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last_location(&server, "parked-truck", &ops),
        Some(want.clone())
    );
    assert!(near(&server).contains("parked-truck"));
    server.sigterm();
    server.restart();
    assert_eq!(last_location(&server, "parked-truck", &ops), Some(want));
    assert!(near(&server).contains("parked-truck"));
    server.sigterm();

    // A damaged checkpoint: the server refuses to start, naming the file, and exits non-zero.
    let ckpt = walk(data_dir)
        .into_iter()
        .find(|p| p.file_name().unwrap() == CHECKPOINT_FILE)
        .unwrap();
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&ckpt, &bytes).unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let args: Vec<&str> = server.args.iter().map(String::as_str).collect();
    let (status, out) = serve_until_exit(&args, log.path());
    let status = status.expect("exits on its own");
    assert!(!status.success());
    assert!(
        out.contains(&ckpt.display().to_string()) && out.contains("damaged"),
        "{out}"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The base position of the oldest segment file in the data directory (names are the base).
fn first_segment_base(dir: &Path) -> Option<u64> {
    walk(dir)
        .iter()
        .filter(|p| p.extension() == Some("seg".as_ref()))
        .filter_map(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
        .min()
}

#[test]
#[ignore = "benchmark: run in release, see perf/RESULTS.md (Last-location checkpoint)"]
fn bench_checkpoint_of_a_million_quiet_devices() {
    // 1M devices, one heartbeat each (a few optional fields, ~40 bytes of attrs), then retention
    // deletes every sealed segment: prints the time to open the shard from the log alone, the
    // checkpoint build (on the executor) and write (off it) times, and the time to open the shard
    // again from the checkpoint plus the short log after it. Every device is checked afterwards.
    let devices: u64 = std::env::var("CKPT_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir =
        tempfile::tempdir_in(std::env::var("CKPT_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    let cfg = StoreConfig::new(dir.path(), ShardId(0));
    let hb = |i: u64| Heartbeat {
        device_id: format!("device-{i:09}"),
        lat: (i % 180) as f64 - 89.5,
        lon: (i % 360) as f64 - 179.5,
        ts_ms: BASE_MS + i as i64,
        received_ms: BASE_MS + i as i64,
        speed_mps: Some(3.5),
        acc_m: Some(5.0),
        attrs: br#"{"fuel":0.42,"door":"locked","v":17}"#.to_vec(),
        ..Default::default()
    };
    {
        let (mut store, _) = ShardStore::open(&cfg).unwrap();
        for i in 0..devices {
            store.append(&hb(i)).unwrap();
        }
        store.sync_blocking().unwrap();
    }
    let t = std::time::Instant::now();
    let (mut store, _) = ShardStore::open(&cfg).unwrap();
    let open_from_log = t.elapsed();
    let log_bytes = store.stats().bytes;
    // Roll once more so every device's entry lies in a sealed segment.
    let mut n = 0;
    roll(&mut store, &mut n, 1);
    let first = bench_retention(&mut store);
    // A second run: every quiet device is carried over from the first checkpoint.
    roll(&mut store, &mut n, 1);
    let second = bench_retention(&mut store);
    drop(store);
    // Reading the checkpoint alone: open (header, file CRC, index) and validate every record.
    let t = std::time::Instant::now();
    let c = geobeat::checkpoint::Checkpoint::open(ShardId(0), dir.path())
        .unwrap()
        .unwrap();
    let ckpt_open = t.elapsed();
    let t = std::time::Instant::now();
    let valid = c.iter_checked().filter(|r| r.is_ok()).count();
    let ckpt_validate = t.elapsed();
    assert_eq!(valid, c.len());
    drop(c);
    let t = std::time::Instant::now();
    let (store, _) = ShardStore::open(&cfg).unwrap();
    let open_from_ckpt = t.elapsed();
    assert_eq!(store.table().len() as u64, devices + 500);
    for i in (0..devices).step_by(9973) {
        assert_eq!(last_hb(&store, &format!("device-{i:09}")), Some(hb(i)));
    }
    println!(
        "devices={devices} log_bytes={log_bytes} open_from_log_ms={}\nfirst: {first}\nsecond (carried over): {second}\ncheckpoint_open_crc_index_ms={} checkpoint_validate_records_ms={} open_from_checkpoint_ms={}",
        open_from_log.as_millis(),
        ckpt_open.as_millis(),
        ckpt_validate.as_millis(),
        open_from_ckpt.as_millis()
    );
}

/// One retention run of `store` (zero retention), its figures as text.
fn bench_retention(store: &mut ShardStore) -> String {
    let RetentionStep::Checkpoint(mut job) =
        store.retention_begin(SystemTime::now(), Duration::ZERO)
    else {
        panic!("a checkpoint is due");
    };
    let mut slice_times = Vec::new();
    loop {
        let t = std::time::Instant::now();
        let done = job.collect_slice(store);
        slice_times.push(t.elapsed());
        if done {
            break;
        }
    }
    let slowest = (0..slice_times.len())
        .max_by_key(|&i| slice_times[i])
        .unwrap_or(0);
    slice_times.sort();
    let slices = slice_times.len();
    let slice_p50 = slice_times[slices / 2];
    let res = job.write();
    let (collect, slice_max, build, write, delete) = (
        job.collect_time,
        job.collect_slice_max,
        job.build_time,
        job.write_time,
        job.delete_time,
    );
    let t = std::time::Instant::now();
    let retired = store.retention_end(job, res).unwrap();
    let end = t.elapsed();
    let deleted = retired.segments();
    let t = std::time::Instant::now();
    drop(retired);
    let unmap = t.elapsed();
    assert!(deleted >= 1);
    let c = store.checkpoint().unwrap();
    format!(
        "records={} bytes={} executor: collect_ms={} slices={slices} slowest_slice={slowest} slice_p50_us={} slice_max_us={} end_us={}; threads: build_ms={} write_fsync_reopen_ms={} delete_ms={} unmap_ms={} segments_deleted={deleted}",
        c.len(),
        c.file_bytes(),
        collect.as_millis(),
        slice_p50.as_micros(),
        slice_max.as_micros(),
        end.as_micros(),
        build.as_millis(),
        write.as_millis(),
        delete.as_millis(),
        unmap.as_millis(),
    )
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// A heartbeat of quiet device `dev` at device time `ts` (seconds; older than the device's
    /// last is a late heartbeat).
    Beat {
        dev: usize,
        ts: i64,
        speed: Option<f32>,
    },
    /// Other devices fill the active segment until a new one starts.
    Roll,
    /// Retention of zero, completed.
    Retain,
    /// Retention of zero whose checkpoint is written but whose deletions never become durable
    /// (crash), then reopen.
    CrashInRetention,
    /// Close and reopen.
    Reopen,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0usize..6, 0i64..50, proptest::option::of(0.0f32..50.0))
            .prop_map(|(dev, ts, speed)| Op::Beat { dev, ts, speed }),
        2 => Just(Op::Roll),
        2 => Just(Op::Retain),
        1 => Just(Op::CrashInRetention),
        1 => Just(Op::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    #[test]
    fn last_records_equal_a_model_through_retention_crashes_and_reopens(
        ops in proptest::collection::vec(op(), 1..24)
    ) {
        // Random heartbeats of six devices (late ones included), segment rolls, completed
        // retention runs, retention runs cut by a crash after the checkpoint's rename, and
        // reopens: after every step each device's last record (all fields) equals the model's
        // newest-by-device-time heartbeat (ties: the later append), and the table holds exactly
        // the devices ever seen.
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut model: std::collections::HashMap<String, Heartbeat> = Default::default();
        let mut n = 0u64;
        for op in ops {
            match op {
                Op::Beat { dev, ts, speed } => {
                    let hb = Heartbeat {
                        device_id: format!("quiet-{dev}"),
                        lat: dev as f64 + ts as f64 / 100.0,
                        lon: -(dev as f64),
                        ts_ms: BASE_MS + ts * 1000,
                        received_ms: BASE_MS + n as i64,
                        speed_mps: speed,
                        attrs: format!(r#"{{"n":{n}}}"#).into_bytes(),
                        ..Default::default()
                    };
                    n += 1;
                    store.append(&hb).unwrap();
                    let newer = model.get(&hb.device_id).is_none_or(|m| hb.ts_ms >= m.ts_ms);
                    if newer {
                        model.insert(hb.device_id.clone(), hb);
                    }
                }
                Op::Roll => {
                    let from = n;
                    roll(&mut store, &mut n, 1);
                    for i in from..n {
                        let hb = other(i);
                        let newer = model.get(&hb.device_id).is_none_or(|m| hb.ts_ms >= m.ts_ms);
                        if newer {
                            model.insert(hb.device_id.clone(), hb);
                        }
                    }
                }
                Op::Retain => {
                    store.sync_blocking().unwrap();
                    store.delete_expired(SystemTime::now(), Duration::ZERO).unwrap();
                }
                Op::CrashInRetention => {
                    store.sync_blocking().unwrap();
                    if let RetentionStep::Checkpoint(mut job) =
                        store.retention_begin(SystemTime::now(), Duration::ZERO)
                    {
                        while !job.collect_slice(&store) {}
                        let saved: Vec<(std::path::PathBuf, Vec<u8>)> = walk(dir.path())
                            .into_iter()
                            .filter(|p| p.extension() == Some("seg".as_ref()))
                            .map(|p| {
                                let b = std::fs::read(&p).unwrap();
                                (p, b)
                            })
                            .collect();
                        job.write().unwrap();
                        for (p, b) in &saved {
                            if !p.exists() {
                                std::fs::write(p, b).unwrap();
                            }
                        }
                    }
                    drop(store);
                    store = open(dir.path());
                }
                Op::Reopen => {
                    store.sync_blocking().unwrap();
                    drop(store);
                    store = open(dir.path());
                }
            }
            proptest::prop_assert_eq!(store.table().len(), model.len());
            for (id, want) in &model {
                let got = last_hb(&store, id);
                proptest::prop_assert_eq!(got.as_ref(), Some(want), "device {}", id);
            }
        }
    }
}

#[test]
fn reshard_carries_last_locations_held_only_by_the_checkpoint() {
    // A quiet device whose only entry retention deleted lives on in the shard's checkpoint; an
    // offline reshard (1 -> 2 shards) rewrites the logs and must carry that record, with every
    // optional field, into the new layout (fails if the rewrite scans only the logs).
    let root = tempfile::tempdir().unwrap();
    let dd = geobeat::datadir::DataDir::open_or_create(root.path(), 1).unwrap();
    let shard_dir = dd.shard_dir(ShardId(0));
    drop(dd);
    let want = parked(BASE_MS);
    {
        let mut store = open(&shard_dir);
        store.append(&want).unwrap();
        let mut n = 0;
        roll(&mut store, &mut n, 3);
        assert!(
            store
                .delete_expired(SystemTime::now(), Duration::ZERO)
                .unwrap()
                >= 3
        );
        assert_eq!(last_hb(&store, "parked-truck"), Some(want.clone()));
    }
    let outcome = geobeat::reshard::run(&geobeat::reshard::Request {
        root: root.path().to_path_buf(),
        shards: Some(2),
        segment_bytes: Some(1 << 20),
    })
    .unwrap();
    assert!(
        matches!(outcome, geobeat::reshard::Outcome::Rewritten(_)),
        "{outcome:?}"
    );
    let dd = geobeat::datadir::DataDir::open_or_create(root.path(), 2).unwrap();
    assert_eq!(dd.shard_count(), 2);
    let owner = dd.router().shard_of("parked-truck");
    let mut cfg = StoreConfig::new(dd.shard_dir(owner), owner);
    cfg.segment_bytes = 1 << 20;
    let store = ShardStore::open(&cfg).unwrap().0;
    assert_eq!(last_hb(&store, "parked-truck"), Some(want));
}
