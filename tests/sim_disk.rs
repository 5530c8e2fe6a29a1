//! Simulated-disk crash test of the shard log (issue 14 item 6; in the style of the redb crash
//! tests and TigerBeetle `src/testing/storage.zig`). Each seed runs a random workload — appends of
//! random sizes and devices (back-pointers as the store sets them), blocking commits, two-phase
//! commits with appends between `commit_begin` and `commit_end`, rollovers (1 MiB segments, the
//! smallest allowed, filled by the long seeds) and retention deletes — on a `log::sim::SimDisk`
//! that crashes at a random sync. The post-crash image keeps what was durable and tears the rest
//! at random (per 512-byte sector: old, new, or split), unsynced renames and deletions are kept as
//! a random prefix. The log is reopened on that image and must hold: every entry acknowledged
//! before the crash (below the last `durable()` a commit returned, and not deleted by retention)
//! byte-identical at its position; beyond that only a contiguous prefix of what was appended (no
//! corrupt, reordered or invented entry); damage reported only past the acknowledged position;
//! contiguous sequence numbers; and new appends accepted and recovered after another crash.
//!
//! `SIM_DISK_SEEDS` sets the number of seeds (default 400), `SIM_DISK_SEED` runs one seed. A
//! failure names its seed.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use geobeat::log::sim::SimDisk;
use geobeat::log::{Commit, Disk, Log, LogConfig, LogPos, ScanEnd, SyncJob, WriteMode};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use rand::{Rng, RngCore};

const SEEDS_DEFAULT: u64 = 400;
/// One seed in this many fills more than one segment (they are the slow ones).
const LONG_SEED_EVERY: u64 = 8;
const DEVICES: usize = 8;

/// SplitMix64, the workload's generator (ChaCha is slow in the debug builds tests run in).
struct Rng64(u64);

impl RngCore for Rng64 {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// One appended entry as the model remembers it.
struct Appended {
    pos: LogPos,
    seq: u64,
    /// The entry's bytes as stored (header, payload, padding), read back right after the append.
    raw: Vec<u8>,
}

/// How many seeds reached each interesting case (printed, and checked to be non-zero).
#[derive(Debug, Default)]
struct Coverage {
    /// Recovered a log of more than one segment.
    multi_segment: u64,
    /// Ran retention before the crash.
    retention: u64,
    /// Finished a two-phase commit whose sync ran before more appends.
    two_phase: u64,
    /// Recovery zeroed a torn tail.
    torn_tail: u64,
    /// Recovery reported damage (torn unsynced bytes followed by a valid entry).
    damage: u64,
}

/// What the workload knows at the crash.
#[derive(Default)]
struct Model {
    /// A two-phase commit completed whose fdatasync ran before later appends.
    two_phase: bool,
    appended: Vec<Appended>,
    /// The highest `durable()` a commit returned (acknowledgeable).
    acked: LogPos,
    /// Retention deleted (durably) every segment below this.
    deleted_below: LogPos,
    /// Retention was asked to delete below this (maybe not durably: the crash may cut it short).
    deleting_below: LogPos,
}

/// The log's configuration for `seed`: a third of the seeds (long ones included) write entries
/// with `pwrite` from the log's stage, a third through a read-write mapping, and a third with
/// `O_DSYNC` writes of each group (`WriteMode::Dsync`: the simulated write, then its sync, so a
/// crash at that sync tears the group as a crash during a real `O_DSYNC` write may).
fn cfg(seed: u64) -> LogConfig {
    LogConfig {
        dir: PathBuf::from("/sim/shard-0"),
        shard: ShardId(0),
        segment_bytes: geobeat::limits::SEGMENT_BYTES_MIN,
        write_mode: match (seed / LONG_SEED_EVERY) % 3 {
            0 => WriteMode::Pwrite,
            1 => WriteMode::Mmap,
            _ => WriteMode::Dsync,
        },
    }
}

fn heartbeat(rng: &mut Rng64, i: u64, attrs_max: usize) -> (usize, Heartbeat) {
    let device = rng.gen_range(0..DEVICES);
    let attrs_len = rng.gen_range(0..=attrs_max);
    let hb = Heartbeat {
        device_id: format!("dev-{device}"),
        lat: rng.gen_range(-90.0..=90.0),
        lon: rng.gen_range(-180.0..=180.0),
        ts_ms: i as i64,
        received_ms: i as i64,
        // One random word spread over the bytes (drawing each byte is slow in debug builds).
        attrs: {
            let x: u64 = rng.gen();
            (0..attrs_len)
                .map(|k| (x >> (k % 8 * 8)) as u8 ^ k as u8)
                .collect()
        },
        ..Heartbeat::default()
    };
    (device, hb)
}

/// A two-phase commit in flight.
enum Job {
    /// `commit_begin` returned it; its files are not synced yet.
    Begun(SyncJob),
    /// Its files were synced with this outcome; `commit_end` not called yet.
    Ran(SyncJob, std::io::Result<()>),
}

/// Runs the workload until the disk crashes (or the workload ends, then it crashes there). Every
/// error must be the crash's doing.
fn workload(seed: u64, rng: &mut Rng64, disk: &SimDisk, model: &mut Model) -> Result<(), String> {
    let long = seed % LONG_SEED_EVERY == 0;
    let (appends, attrs_max) = if long {
        (rng.gen_range(2_700..6_000u64), 256)
    } else {
        (rng.gen_range(1..400u64), rng.gen_range(0..=256))
    };
    let (mut log, _) = match Log::open_on(&cfg(seed), Disk::Sim(disk.clone()), |_, _| {}) {
        Ok(x) => x,
        Err(e) if disk.crashed() => {
            let _ = e;
            return Ok(());
        }
        Err(e) => return Err(format!("open failed without a crash: {e}")),
    };
    let crash_err = |what: &str, e: geobeat::log::Error| -> Result<(), String> {
        if disk.crashed() {
            Ok(())
        } else {
            Err(format!("{what} failed without a crash: {e}"))
        }
    };
    let mut heads: [Option<LogPos>; DEVICES] = [None; DEVICES];
    let mut job = None;
    let mut i = 0u64;
    while i < appends {
        let (device, hb) = heartbeat(rng, i, attrs_max);
        let pos = match log.append(&hb, heads[device]) {
            Ok(pos) => pos,
            Err(e) => return crash_err("append", e),
        };
        heads[device] = Some(pos);
        let (entry, raw) = log.read_raw(pos).ok_or("appended entry unreadable")?;
        if let Some(last) = model.appended.last() {
            if entry.seq != last.seq + 1 || pos <= last.pos {
                return Err(format!(
                    "append at {pos} seq {} after {}",
                    entry.seq, last.seq
                ));
            }
        }
        model.appended.push(Appended {
            pos,
            seq: entry.seq,
            raw: raw.to_vec(),
        });
        i += 1;
        // Long seeds commit ten times less often: fewer syncs, so their crash points spread over
        // the rollovers.
        let roll = rng.gen_range(0..if long { 1000 } else { 100u32 });
        let outcome = if let Some(state) = job.take() {
            // A two-phase commit is in flight: its fdatasync runs at one point, the appends go
            // on, and `commit_end` comes later (as with an asynchronous syncer).
            match state {
                Job::Begun(j) if roll < 30 => {
                    let res = j.run_blocking();
                    job = Some(Job::Ran(j, res));
                    Ok(None)
                }
                Job::Ran(j, res) if roll < 30 => {
                    model.two_phase |= res.is_ok();
                    log.commit_end(j, res).map(Some)
                }
                other => {
                    job = Some(other);
                    Ok(None)
                }
            }
        } else if roll < 3 {
            log.sync_blocking().map(Some)
        } else if roll < 8 {
            match log.commit_begin() {
                Ok(Commit::Sync(j)) => {
                    if j.target() != log.written() {
                        return Err("job target is not the written position".into());
                    }
                    job = Some(Job::Begun(j));
                    Ok(None)
                }
                Ok(Commit::Idle) => Ok(None),
                Ok(Commit::Done(p)) => Ok(Some(p)),
                Err(e) => Err(e),
            }
        } else if roll < 9 && log.stats().segments > 1 {
            // Retention with no consumers and no age limit: every sealed segment goes.
            let far = SystemTime::now() + Duration::from_secs(3600);
            match log.expired_end(far, Duration::ZERO) {
                Some(end) => {
                    model.deleting_below = end;
                    log.delete_below(end).map(|_| {
                        model.deleted_below = end;
                        None
                    })
                }
                None => Ok(None),
            }
        } else {
            Ok(None)
        };
        match outcome {
            Ok(Some(durable)) => {
                if durable < model.acked || durable > log.written() {
                    return Err(format!("durable {durable} went back or past written"));
                }
                model.acked = durable;
            }
            Ok(None) => {}
            Err(e) => return crash_err("commit or retention", e),
        }
        if disk.crashed() {
            return Ok(());
        }
    }
    if let Some(state) = job {
        let (j, res) = match state {
            Job::Begun(j) => {
                let res = j.run_blocking();
                (j, res)
            }
            Job::Ran(j, res) => (j, res),
        };
        match log.commit_end(j, res) {
            Ok(d) => model.acked = d,
            Err(e) => return crash_err("final commit", e),
        }
    }
    disk.crash_now();
    Ok(())
}

/// The recovered entries `(pos, seq, raw bytes)` in log order, checked against the model.
fn check_recovered(log: &Log, model: &Model, damage_min: Option<LogPos>) -> Result<u64, String> {
    if let Some(d) = damage_min {
        if d < model.acked {
            return Err(format!(
                "damage reported at {d}, below the acknowledged {}",
                model.acked
            ));
        }
    }
    if log.durable() != log.written() {
        return Err("after open durable != written".into());
    }
    let mut recovered = Vec::new();
    let mut scan = log.scan_from(LogPos(0), ScanEnd::Written);
    for e in scan.by_ref() {
        let (_, raw) = log.read_raw(e.pos).ok_or("scanned entry unreadable")?;
        recovered.push((e.pos, e.seq, raw.to_vec()));
    }
    if scan.hit_damage() {
        return Err("scan of the recovered log hit damage".into());
    }
    // Every recovered entry is the appended entry with its sequence number, at its position,
    // byte for byte; sequence numbers are contiguous.
    for w in recovered.windows(2) {
        if w[1].1 != w[0].1 + 1 {
            return Err(format!("sequence {} follows {}", w[1].1, w[0].1));
        }
    }
    let first_seq = model.appended.first().map_or(1, |a| a.seq);
    for (pos, seq, raw) in &recovered {
        let a = seq
            .checked_sub(first_seq)
            .and_then(|k| model.appended.get(k as usize))
            .ok_or_else(|| format!("recovered seq {seq} at {pos} was never appended"))?;
        if a.pos != *pos || a.raw != *raw {
            return Err(format!(
                "recovered seq {seq} at {pos} differs from what was appended"
            ));
        }
        if *pos < model.deleted_below {
            return Err(format!(
                "entry {pos} below the retention point {}",
                model.deleted_below
            ));
        }
    }
    // Every acknowledged entry not (possibly) deleted by retention is there.
    let must: Vec<&Appended> = model
        .appended
        .iter()
        .filter(|a| a.pos < model.acked && a.pos >= model.deleting_below)
        .collect();
    if let (Some(first), Some(last)) = (must.first(), must.last()) {
        let have = |seq: u64| {
            recovered.first().is_some_and(|r| r.1 <= seq)
                && recovered.last().is_some_and(|r| r.1 >= seq)
        };
        if !have(first.seq) || !have(last.seq) {
            return Err(format!(
                "acknowledged entries {}..={} not all recovered (recovered {:?}..={:?}, acked {})",
                first.seq,
                last.seq,
                recovered.first().map(|r| r.1),
                recovered.last().map(|r| r.1),
                model.acked
            ));
        }
    }
    let next = recovered.last().map(|r| r.1 + 1);
    if let Some(next) = next {
        if log.next_seq() != next {
            return Err(format!(
                "next_seq {} after recovering up to {}",
                log.next_seq(),
                next - 1
            ));
        }
    }
    Ok(recovered.len() as u64)
}

fn open_checked(
    seed: u64,
    disk: &SimDisk,
    model: &Model,
    cov: &mut Coverage,
) -> Result<Log, String> {
    let (log, report) = Log::open_on(&cfg(seed), Disk::Sim(disk.clone()), |_, _| {})
        .map_err(|e| format!("recovery failed: {e}"))?;
    let damage_min = report.damaged.iter().map(|d| d.pos).min();
    check_recovered(&log, model, damage_min)?;
    cov.multi_segment += u64::from(log.stats().segments > 1);
    cov.torn_tail += u64::from(report.torn_tail_bytes > 0);
    cov.damage += u64::from(!report.damaged.is_empty());
    Ok(log)
}

fn run_seed(seed: u64, cov: &mut Coverage) -> Result<(), String> {
    let mut rng = Rng64(seed);
    let crash_at = if seed % LONG_SEED_EVERY == 0 {
        rng.gen_range(1..100)
    } else {
        rng.gen_range(1..40)
    };
    let disk = SimDisk::new(seed, Some(crash_at));
    let mut model = Model::default();
    workload(seed, &mut rng, &disk, &mut model)?;
    if !disk.crashed() {
        return Err("workload ended without a crash".into());
    }
    // Recover on the crashed image.
    let disk = disk.reboot(seed ^ 0x5eed, None);
    cov.retention += u64::from(model.deleting_below > LogPos(0));
    cov.two_phase += u64::from(model.two_phase);
    let mut log = open_checked(seed, &disk, &model, cov)?;
    // The recovered log accepts appends, and they survive a crash once synced.
    let before = log.next_seq();
    let (_, hb) = heartbeat(&mut rng, 1_000_000, 64);
    let pos = log
        .append(&hb, None)
        .map_err(|e| format!("append after recovery: {e}"))?;
    let seq = log.read(pos).ok_or("new entry unreadable")?.seq;
    if seq != before {
        return Err(format!("first seq after recovery {seq}, expected {before}"));
    }
    let durable = log
        .sync_blocking()
        .map_err(|e| format!("sync after recovery: {e}"))?;
    let raw = log.read_raw(pos).ok_or("new entry unreadable")?.1.to_vec();
    let written = log.written();
    drop(log);
    disk.crash_now();
    let disk = disk.reboot(seed ^ 0xc0ffee, None);
    let (log, _) = Log::open_on(&cfg(seed), Disk::Sim(disk), |_, _| {})
        .map_err(|e| format!("second recovery failed: {e}"))?;
    if log.written() < durable || log.read_raw(pos).map(|(_, r)| r.to_vec()) != Some(raw) {
        return Err("an entry synced after recovery was lost by the next crash".into());
    }
    // Nothing past it: bytes torn by the first crash must not come back after new appends.
    if log.written() != written || log.next_seq() != seq + 1 {
        return Err(format!(
            "second recovery ends at {} (seq {}), the log ended at {written} (seq {})",
            log.written(),
            log.next_seq(),
            seq + 1
        ));
    }
    Ok(())
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_DISK_SEED") {
        return vec![s.parse().expect("SIM_DISK_SEED is a number")];
    }
    let n = std::env::var("SIM_DISK_SEEDS")
        .map(|s| s.parse().expect("SIM_DISK_SEEDS is a number"))
        .unwrap_or(SEEDS_DEFAULT);
    (0..n).collect()
}

#[test]
fn crash_at_any_sync_recovers_exactly_the_durable_prefix() {
    // Runs every seed's workload, crash, recovery and checks (see the file comment); stops at
    // the first failing seed and names it.
    let started = Instant::now();
    let seeds = seeds();
    let mut cov = Coverage::default();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, &mut cov) {
            panic!("sim_disk seed {seed} failed: {e}\nreproduce: SIM_DISK_SEED={seed} cargo test --test sim_disk");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sim_disk: {} seeds in {secs:.2}s ({:.0} seeds/s); {cov:?}",
        seeds.len(),
        seeds.len() as f64 / secs
    );
    if seeds.len() >= 200 {
        // The workload must reach every case it is meant to test.
        let Coverage {
            multi_segment,
            retention,
            two_phase,
            torn_tail,
            damage,
        } = cov;
        for (name, n) in [
            ("multi_segment", multi_segment),
            ("retention", retention),
            ("two_phase", two_phase),
            ("torn_tail", torn_tail),
            ("damage", damage),
        ] {
            assert!(n > 0, "no seed reached {name}: {cov:?}");
        }
    }
}

/// The simulated disk itself: unsynced bytes can be lost, synced ones cannot, and an unsynced
/// rename may or may not survive.
#[test]
fn sim_disk_keeps_synced_bytes_and_may_lose_the_rest() {
    let mut lost_some = false;
    for seed in 0..64 {
        let disk = SimDisk::new(seed, None);
        let (log, _) = Log::open_on(&cfg(seed), Disk::Sim(disk.clone()), |_, _| {}).unwrap();
        drop(log);
        let path = disk
            .files()
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "seg"));
        let path = path.expect("a segment file");
        let before = disk.file_bytes(&path).unwrap();
        disk.crash_now();
        let after = disk.reboot(seed, None).file_bytes(&path).unwrap();
        assert_eq!(before, after, "a synced file is kept whole");
        // Now an unsynced append.
        let disk = SimDisk::new(seed, None);
        let (mut log, _) = Log::open_on(&cfg(seed), Disk::Sim(disk.clone()), |_, _| {}).unwrap();
        let mut rng = Rng64(seed);
        for i in 0..50 {
            log.append(&heartbeat(&mut rng, i, 200).1, None).unwrap();
        }
        // Staged entries (WriteMode::Pwrite) reach the file's page cache, not yet synced.
        log.write_staged().unwrap();
        let written = disk.file_bytes(&path).unwrap();
        disk.crash_now();
        let torn = disk.reboot(seed, None).file_bytes(&path).unwrap();
        assert_eq!(torn[..4096], written[..4096], "the synced header is kept");
        lost_some |= torn != written;
    }
    assert!(lost_some, "tearing never lost an unsynced byte in 64 seeds");
}
