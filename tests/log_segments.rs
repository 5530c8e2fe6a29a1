//! Multi-segment behaviour of the shard log and store: rollover and position arithmetic, chains
//! across segments, late heartbeats, retention with a lagging consumer, ENOSPC on a tiny tmpfs,
//! reopening after a segment-size change, damage in the middle (quarantine), torn tails, and the
//! data directory feeding shard stores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use geobeat::datadir::DataDir;
use geobeat::limits::{SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES};
use geobeat::log::{self, Log, LogConfig, LogPos, ScanEnd};
use geobeat::record::Heartbeat;
use geobeat::route::{self, ShardId};
use geobeat::store::{self, ShardStore, StoreConfig};

fn hb(id: &str, ts_ms: i64) -> Heartbeat {
    Heartbeat {
        device_id: id.to_string(),
        lat: (ts_ms % 90) as f64,
        lon: -((ts_ms % 180) as f64),
        ts_ms,
        received_ms: ts_ms + 3,
        heading_deg: Some((ts_ms % 360) as f32),
        ..Heartbeat::default()
    }
}

fn store_cfg(dir: &Path, segment_bytes: u64) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: ShardId(1),
        segment_bytes,
        expected_devices: 0,
        write_mode: geobeat::log::WriteMode::default(),
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Appends `n` heartbeats round-robin over `devices` ids; returns per-device positions in order.
fn fill(store: &mut ShardStore, devices: usize, n: usize) -> HashMap<String, Vec<LogPos>> {
    let mut model: HashMap<String, Vec<LogPos>> = HashMap::new();
    for i in 0..n {
        let id = format!("device-{:02}-padding-xx", i % devices);
        let pos = store.append(&hb(&id, i as i64)).unwrap();
        model.entry(id).or_default().push(pos);
    }
    model
}

fn assert_chains(store: &ShardStore, model: &HashMap<String, Vec<LogPos>>) {
    for (id, positions) in model {
        let walked: Vec<LogPos> = store.chain(id).map(|e| e.pos).collect();
        let mut want = positions.clone();
        want.reverse();
        assert_eq!(walked, want, "chain of {id}");
    }
}

#[test]
fn rollover_keeps_positions_contiguous_and_chains_cross_segments() {
    // 30k heartbeats over 5 devices fill several 1 MiB segments: every segment is named by its
    // base, bases are contiguous (base = previous base + size), chains walk every entry of each
    // device newest first across segments, and all of it survives a reopen.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-0001");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    let model = fill(&mut store, 5, 30_000);
    store.sync_blocking().unwrap();
    let files = segment_files(&dir);
    assert!(files.len() >= 3, "{files:?}");
    for (i, f) in files.iter().enumerate() {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{:020}.seg", i as u64 * SEGMENT_BYTES_MIN));
        assert_eq!(std::fs::metadata(f).unwrap().len(), SEGMENT_BYTES_MIN);
    }
    assert_chains(&store, &model);
    let stats = store.stats();
    assert_eq!(stats.entries, 30_000);
    assert_eq!(stats.segments, files.len());
    assert_eq!(stats.written, stats.durable);
    drop(store);

    let (store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert_eq!(report.entries, 30_000);
    assert_eq!(report.segments, files.len());
    assert!(report.damaged.is_empty() && report.torn_tail_bytes == 0);
    assert_chains(&store, &model);
    let seqs: Vec<u64> = store
        .log()
        .scan_from(LogPos(0), ScanEnd::Durable)
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=30_000).collect::<Vec<u64>>());
}

#[test]
fn late_heartbeats_stay_in_history_but_do_not_move_last() {
    // t=100, t=300, then a late t=200: last() stays at t=300 with its full record, the chain holds
    // all three (late one first, as the newest append), and a reopen rebuilds the same state.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    let p100 = store.append(&hb("dev", 100)).unwrap();
    let p300 = store.append(&hb("dev", 300)).unwrap();
    let p200 = store.append(&hb("dev", 200)).unwrap();
    store.sync_blocking().unwrap();
    for pass in 0..2 {
        let l = store.last("dev").unwrap();
        assert_eq!((l.ts_ms, l.pos, l.head), (300, p300, p200), "pass {pass}");
        assert_eq!(store.last_record("dev").unwrap().hb.ts_ms.to_native(), 300);
        let chain: Vec<(LogPos, i64)> = store
            .chain("dev")
            .map(|e| (e.pos, e.hb.ts_ms.to_native()))
            .collect();
        assert_eq!(chain, vec![(p200, 200), (p300, 300), (p100, 100)]);
        drop(store);
        store = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN))
            .unwrap()
            .0;
    }
}

#[test]
fn retention_waits_for_expiry_and_for_a_lagging_consumer() {
    // Three full segments and a registered consumer at 0: nothing is deleted while the consumer
    // lags, even when expired; once it passes the first segment's data, only that one goes; an
    // unexpired segment stays even when consumed. Chains then stop cleanly at the deleted segment,
    // and a reopen starts the log at the second segment with sequence numbers intact.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    store.register_consumer("flusher").unwrap();
    assert!(matches!(
        store.set_consumed("nobody", LogPos(1)),
        Err(store::Error::Log(log::Error::UnknownConsumer { .. }))
    ));
    let model = fill(&mut store, 3, 25_000);
    store.sync_blocking().unwrap();
    assert!(store.stats().segments >= 3);
    let later = SystemTime::now() + Duration::from_secs(7200);
    let hour = Duration::from_secs(3600);
    assert_eq!(store.delete_expired(later, hour).unwrap(), 0);

    // The consumer reaches the end of the first segment's data (as a scan would report it).
    let first_end = store
        .log()
        .scan_from(LogPos(0), ScanEnd::Durable)
        .take_while(|e| e.pos.0 < SEGMENT_BYTES_MIN)
        .last()
        .unwrap()
        .end();
    store
        .set_consumed("flusher", LogPos(first_end.0 - 8))
        .unwrap();
    assert_eq!(
        store.delete_expired(later, hour).unwrap(),
        0,
        "consumer one entry short"
    );
    store.set_consumed("flusher", first_end).unwrap();
    assert_eq!(
        store.delete_expired(SystemTime::now(), hour).unwrap(),
        0,
        "not yet expired"
    );
    assert_eq!(store.delete_expired(later, hour).unwrap(), 1);
    assert!(!dir.join(format!("{:020}.seg", 0)).exists());
    assert_eq!(
        store.log().first_pos(),
        LogPos(SEGMENT_BYTES_MIN + SEGMENT_HEADER_BYTES as u64)
    );

    let surviving = |model: &HashMap<String, Vec<LogPos>>, id: &str| -> Vec<LogPos> {
        model[id]
            .iter()
            .rev()
            .copied()
            .take_while(|p| p.0 >= SEGMENT_BYTES_MIN)
            .collect()
    };
    for id in model.keys() {
        let walked: Vec<LogPos> = store.chain(id).map(|e| e.pos).collect();
        assert_eq!(walked, surviving(&model, id), "chain of {id}");
    }
    let first_seq = store
        .log()
        .scan_from(LogPos(0), ScanEnd::Written)
        .next()
        .unwrap()
        .seq;
    drop(store);
    let (store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert!(report.damaged.is_empty());
    assert_eq!(
        store
            .log()
            .scan_from(LogPos(0), ScanEnd::Written)
            .next()
            .unwrap()
            .seq,
        first_seq
    );
    assert_eq!(store.log().next_seq(), 25_001);
    for id in model.keys() {
        let walked: Vec<LogPos> = store.chain(id).map(|e| e.pos).collect();
        assert_eq!(walked, surviving(&model, id), "chain of {id} after reopen");
    }
}

/// Mounts a tmpfs of `size` at `dir`; `Err(reason)` if this environment cannot.
fn mount_tmpfs(dir: &Path, size: &str) -> Result<(), String> {
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn enospc_is_a_clean_error_and_appends_resume_when_space_returns() {
    // On a 3 MiB tmpfs, 1 MiB segments run out of space at a rollover: the append fails with
    // NoSpace, nothing is written (written(), next_seq and the table unchanged, no temp file left),
    // the same append fails again while full, and succeeds after the tmpfs is grown; a reopen then
    // recovers every accepted heartbeat and nothing else.
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(reason) = mount_tmpfs(&mnt, "3m") {
        println!("SKIPPED enospc test: cannot mount a tmpfs here: {reason}");
        return;
    }
    let _guard = Unmount(mnt.clone());
    let dir = mnt.join("s");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    let mut accepted = 0u64;
    let err = loop {
        match store.append(&hb("dev", accepted as i64)) {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100_000, "tmpfs never filled up");
    };
    assert!(
        matches!(err, store::Error::Log(log::Error::NoSpace { .. })),
        "{err}"
    );
    let before = (store.written(), store.log().next_seq(), store.last("dev"));
    assert!(matches!(
        store.append(&hb("dev", accepted as i64)),
        Err(store::Error::Log(log::Error::NoSpace { .. }))
    ));
    assert_eq!(
        (store.written(), store.log().next_seq(), store.last("dev")),
        before
    );
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
    store.sync_blocking().unwrap();

    let out = std::process::Command::new("mount")
        .args(["-o", "remount,size=8m"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    store.append(&hb("dev", accepted as i64)).unwrap();
    accepted += 1;
    store.sync_blocking().unwrap();
    drop(store);
    let (store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert_eq!(report.entries, accepted);
    assert!(report.damaged.is_empty() && report.torn_tail_bytes == 0);
    assert_eq!(store.last("dev").unwrap().ts_ms, accepted as i64 - 1);
}

#[test]
fn segment_size_change_applies_to_new_segments_only() {
    // A log written with 1 MiB segments is reopened with 2 MiB: old segments keep their recorded
    // size, the next one is 2 MiB at base = old end; reopening with 1 MiB again reads everything.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    let mut model = fill(&mut store, 4, 9_000);
    store.sync_blocking().unwrap();
    let old_segments = store.stats().segments;
    drop(store);

    let (mut store, _) = ShardStore::open(&store_cfg(&dir, 2 * SEGMENT_BYTES_MIN)).unwrap();
    let before = store.stats().segments;
    assert_eq!(before, old_segments);
    for i in 0..20_000 {
        let id = format!("device-{:02}-padding-xx", i % 4);
        let pos = store.append(&hb(&id, 100_000 + i)).unwrap();
        model.get_mut(&id).unwrap().push(pos);
    }
    store.sync_blocking().unwrap();
    let files = segment_files(&dir);
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    assert!(sizes[..old_segments]
        .iter()
        .all(|&s| s == SEGMENT_BYTES_MIN));
    assert!(sizes[old_segments..]
        .iter()
        .all(|&s| s == 2 * SEGMENT_BYTES_MIN));
    assert!(sizes.len() > old_segments);
    let expected_base = old_segments as u64 * SEGMENT_BYTES_MIN;
    assert!(files[old_segments].ends_with(format!("{expected_base:020}.seg")));
    drop(store);

    let (store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert_eq!(report.entries, 29_000);
    assert_chains(&store, &model);
}

#[test]
fn damage_in_the_middle_is_reported_quarantined_and_the_prefix_kept() {
    // A flipped byte in an entry of the FIRST of several segments: reopen keeps the entries before
    // it, reports the damage with path and offset, copies the damaged file and moves the later
    // segments into quarantine/, and keeps serving: appends continue, and the next reopen is clean.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    fill(&mut store, 3, 20_000);
    store.sync_blocking().unwrap();
    let victim = store
        .log()
        .scan_from(LogPos(0), ScanEnd::Written)
        .nth(1000)
        .unwrap();
    let (victim_pos, victim_seq) = (victim.pos, victim.seq);
    let later_files = segment_files(&dir).len() - 1;
    assert!(later_files >= 1);
    drop(store);

    let seg0 = dir.join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&seg0).unwrap();
    bytes[victim_pos.0 as usize + 40] ^= 0x55;
    std::fs::write(&seg0, &bytes).unwrap();

    let (mut store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let d = &report.damaged[0];
    assert_eq!(d.path, seg0);
    assert_eq!(d.offset, victim_pos.0);
    assert_eq!(d.pos, victim_pos);
    assert_eq!(d.moved_aside.len(), later_files);
    assert_eq!(std::fs::read(d.copy.as_ref().unwrap()).unwrap(), bytes);
    assert_eq!(
        std::fs::read_dir(dir.join("quarantine")).unwrap().count(),
        1 + later_files
    );
    assert_eq!(report.entries, victim_seq - 1);
    assert_eq!(segment_files(&dir), vec![seg0.clone()]);
    assert_eq!(store.written(), victim_pos);

    let pos = store.append(&hb("after-damage", 1)).unwrap();
    assert_eq!(pos, victim_pos);
    store.sync_blocking().unwrap();
    drop(store);
    let (store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert!(
        report.damaged.is_empty() && report.torn_tail_bytes == 0,
        "{report:?}"
    );
    assert_eq!(report.entries, victim_seq);
    assert_eq!(store.last_record("after-damage").unwrap().seq, victim_seq);
}

#[test]
fn torn_tail_is_zeroed_and_never_resurrected() {
    // Garbage after the last entry (a torn write) is zeroed at reopen; a new, shorter entry written
    // over it then reads back cleanly and the garbage never reappears after another reopen.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let (mut store, _) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    fill(&mut store, 2, 100);
    store.sync_blocking().unwrap();
    let end = store.written().0 as usize;
    drop(store);
    let seg0 = dir.join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&seg0).unwrap();
    for (i, b) in bytes[end..end + 300].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) | 1;
    }
    std::fs::write(&seg0, &bytes).unwrap();

    let (mut store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert_eq!(report.torn_tail_bytes, 300);
    assert!(report.damaged.is_empty());
    assert_eq!(report.entries, 100);
    store.append(&hb("x", 5)).unwrap();
    store.sync_blocking().unwrap();
    drop(store);
    let (_store, report) = ShardStore::open(&store_cfg(&dir, SEGMENT_BYTES_MIN)).unwrap();
    assert_eq!((report.entries, report.torn_tail_bytes), (101, 0));
    assert!(report.damaged.is_empty());
}

#[test]
fn unusable_first_segment_refuses_to_open_and_stale_temp_files_are_removed() {
    // A leftover ".seg.tmp" (an interrupted segment creation) is removed at open; a first segment
    // whose header is damaged makes open fail with a Corrupt error naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let cfg = LogConfig {
        dir: dir.clone(),
        shard: ShardId(1),
        segment_bytes: SEGMENT_BYTES_MIN,
        write_mode: geobeat::log::WriteMode::default(),
    };
    let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
    log.append(&hb("a", 1), None).unwrap();
    log.sync_blocking().unwrap();
    drop(log);
    let stale = dir.join(format!("{:020}.seg.tmp", SEGMENT_BYTES_MIN));
    std::fs::write(&stale, b"half-made").unwrap();
    let (log, report) = Log::open(&cfg, |_, _| {}).unwrap();
    assert_eq!(report.entries, 1);
    assert!(!stale.exists());
    drop(log);

    let seg0 = dir.join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&seg0).unwrap();
    bytes[20] ^= 1; // inside the header's base field
    std::fs::write(&seg0, &bytes).unwrap();
    let err = Log::open(&cfg, |_, _| {}).unwrap_err();
    assert!(
        matches!(&err, log::Error::Corrupt { path, .. } if *path == seg0),
        "{err}"
    );
}

#[test]
fn data_dir_feeds_one_store_per_shard() {
    // Opens a 4-shard data directory, routes heartbeats to their shard's store by route::shard_of,
    // and checks each device is found exactly in its own shard after reopening everything.
    let tmp = tempfile::tempdir().unwrap();
    let dd = DataDir::open_or_create(tmp.path().join("data"), 4).unwrap();
    let open_all = |dd: &DataDir| -> Vec<ShardStore> {
        (0..dd.shard_count())
            .map(|s| {
                let cfg = StoreConfig {
                    dir: dd.shard_dir(ShardId(s)),
                    shard: ShardId(s),
                    segment_bytes: SEGMENT_BYTES_MIN,
                    expected_devices: 0,
                    write_mode: geobeat::log::WriteMode::default(),
                };
                ShardStore::open(&cfg).unwrap().0
            })
            .collect()
    };
    let mut stores = open_all(&dd);
    for i in 0..200 {
        let id = format!("dev-{i}");
        let shard = route::shard_of(&id, dd.shard_count());
        stores[shard.0 as usize].append(&hb(&id, i)).unwrap();
    }
    for s in &mut stores {
        s.sync_blocking().unwrap();
    }
    drop(stores);
    let dd = DataDir::open_or_create(tmp.path().join("data"), 9).unwrap();
    assert_eq!(dd.shard_count(), 4);
    let stores = open_all(&dd);
    for i in 0..200 {
        let id = format!("dev-{i}");
        let shard = route::shard_of(&id, 4).0 as usize;
        for (s, store) in stores.iter().enumerate() {
            assert_eq!(store.last(&id).is_some(), s == shard, "{id} in shard {s}");
        }
    }
}
