//! Recovery speed of a large shard log (ignored by default: it writes ~1.4 GB). Builds a log of
//! 10M heartbeat-sized entries over 1M devices, then times reopening it: the bare log (CRC + rkyv
//! validation of every entry) and the store (plus the last-location table rebuild), first with the
//! log in the page cache, then cold if the page cache can be dropped (root). Prints the figures;
//! the goal (>= 1 GB/s of log) is checked by reading them, not asserted.
//!
//! Also a quick append-throughput figure per durability mode (`append_throughput_quick`).
//!
//! Run: `cargo test --release --test log_perf -- --ignored --nocapture`
//! (one test: add `recovery` or `append` to the command)
//! (GEOBEAT_PERF_ENTRIES overrides the entry count; GEOBEAT_BENCH_DIR the directory.)

use std::time::Instant;

use geobeat::log::{Log, LogConfig};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};

fn drop_page_cache() -> bool {
    // SAFETY: plain syscall, no memory arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

#[test]
#[ignore = "writes ~1.4 GB and takes ~1 minute; run explicitly (see the file's doc)"]
fn recovery_speed_of_a_10m_entry_log() {
    // Builds the log, then checks recovery returns every entry while printing its speed.
    let entries: u64 = std::env::var("GEOBEAT_PERF_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let devices = 1_000_000u64.min(entries);
    let root = std::env::var_os("GEOBEAT_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let tmp = tempfile::tempdir_in(root).unwrap();
    let dir = tmp.path().join("shard-0000");
    let store_cfg = StoreConfig {
        expected_devices: devices as usize,
        ..StoreConfig::new(&dir, ShardId(0))
    };

    let started = Instant::now();
    {
        let (mut store, _) = ShardStore::open(&store_cfg).unwrap();
        let mut hb = Heartbeat {
            lat: 52.5,
            lon: 13.4,
            acc_m: Some(5.0),
            ..Heartbeat::default()
        };
        for i in 0..entries {
            hb.device_id.clear();
            use std::fmt::Write;
            write!(hb.device_id, "device-{:012}x", i % devices).unwrap();
            hb.ts_ms = 1_732_000_000_000 + i as i64;
            hb.received_ms = hb.ts_ms + 40;
            store.append(&hb).unwrap();
            if i % 1_000_000 == 999_999 {
                store.sync_blocking().unwrap();
            }
        }
        store.sync_blocking().unwrap();
    }
    println!(
        "built {entries} entries over {devices} devices in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let log_cfg = LogConfig::new(&dir, ShardId(0));
    for pass in ["warm", "cold"] {
        if pass == "cold" && !drop_page_cache() {
            println!("cold pass skipped: cannot drop the page cache (not root?)");
            break;
        }
        let mut n = 0u64;
        let (t, cpu) = (Instant::now(), thread_cpu());
        let (log, report) = Log::open(&log_cfg, |_, _| n += 1).unwrap();
        let (secs, cpu_secs) = (
            t.elapsed().as_secs_f64(),
            (thread_cpu() - cpu).as_secs_f64(),
        );
        assert_eq!((n, report.entries), (entries, entries));
        println!(
            "{pass} log recovery: {} entries, {} bytes, {} segments in {secs:.3}s = {:.2} GB/s, {:.1} M entries/s; {cpu_secs:.3} CPU-s = {:.2} GB per CPU-s",
            report.entries,
            report.bytes,
            report.segments,
            report.bytes as f64 / secs / 1e9,
            report.entries as f64 / secs / 1e6,
            report.bytes as f64 / cpu_secs / 1e9
        );
        drop(log);
        if pass == "cold" {
            drop_page_cache();
        }
        let (t, cpu) = (Instant::now(), thread_cpu());
        let (store, report) = ShardStore::open(&store_cfg).unwrap();
        let (secs, cpu_secs) = (
            t.elapsed().as_secs_f64(),
            (thread_cpu() - cpu).as_secs_f64(),
        );
        assert_eq!(store.table().len() as u64, devices);
        println!(
            "{pass} store recovery (log + table of {} devices): {secs:.3}s = {:.2} GB/s, {:.1} M entries/s; {cpu_secs:.3} CPU-s = {:.2} GB per CPU-s",
            store.table().len(),
            report.bytes as f64 / secs / 1e9,
            report.entries as f64 / secs / 1e6,
            report.bytes as f64 / cpu_secs / 1e9
        );
    }
}

fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into the local timespec only.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Appends `n` heartbeats; a commit starts when at least `group` entries are pending and no sync is
/// in flight (`group == 0`: Relaxed, a background commit at most every 2 ms). Everything is durable
/// at the end. Returns (wall, this thread's CPU time).
fn pipelined(
    append: &mut dyn FnMut(&Heartbeat),
    commit_begin: &mut dyn FnMut() -> geobeat::log::Commit,
    commit_end: &mut dyn FnMut(geobeat::log::SyncJob, std::io::Result<()>),
    hbs: &[Heartbeat],
    n: usize,
    group: usize,
) -> (std::time::Duration, std::time::Duration) {
    use geobeat::log::Commit;
    let mut syncer = geobeat::log::UringSyncer::new().unwrap();
    let mut in_flight = None;
    let mut pending = 0;
    let mut last_commit = Instant::now();
    let (wall, cpu) = (Instant::now(), thread_cpu());
    for i in 0..n {
        append(&hbs[i % hbs.len()]);
        pending += 1;
        if group > 0 || i % 256 == 0 {
            if in_flight.is_some() {
                if let Some(res) = syncer.poll() {
                    commit_end(in_flight.take().unwrap(), res);
                }
            }
            let due = if group > 0 {
                pending >= group
            } else {
                last_commit.elapsed() >= std::time::Duration::from_millis(2)
            };
            if in_flight.is_none() && due {
                if let Commit::Sync(job) = commit_begin() {
                    syncer.submit(&job).unwrap();
                    in_flight = Some(job);
                }
                pending = 0;
                last_commit = Instant::now();
            }
        }
    }
    if let Some(job) = in_flight {
        let res = syncer.wait();
        commit_end(job, res);
    }
    if let Commit::Sync(job) = commit_begin() {
        let res = job.run_blocking();
        commit_end(job, res);
    }
    (wall.elapsed(), thread_cpu() - cpu)
}

#[test]
#[ignore = "writes ~1.5 GB; run explicitly (see the file's doc)"]
fn append_throughput_quick() {
    // Quick, non-criterion append figures: per mode, appends per wall second and per second of
    // this thread's CPU time (the latter is insensitive to other load on a shared machine; the
    // fdatasyncs run in io_uring workers and are not in it). Checks every append landed.
    let n: usize = std::env::var("GEOBEAT_PERF_APPENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let root = std::env::var_os("GEOBEAT_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let hbs: Vec<Heartbeat> = (0..100_000)
        .map(|i| Heartbeat {
            device_id: format!("device-{i:012}x"),
            lat: 52.5,
            lon: 13.4,
            ts_ms: 1_732_000_000_000 + i as i64,
            received_ms: 1_732_000_000_040 + i as i64,
            acc_m: Some(5.0),
            ..Heartbeat::default()
        })
        .collect();
    let report = |name: &str, (wall, cpu): (std::time::Duration, std::time::Duration)| {
        println!(
            "{name:<22} {n} appends: {:>5.2} M/s wall, {:>5.2} M/s per CPU-second ({:.0} ns CPU/append)",
            n as f64 / wall.as_secs_f64() / 1e6,
            n as f64 / cpu.as_secs_f64() / 1e6,
            cpu.as_nanos() as f64 / n as f64
        );
    };
    for group in [0usize, 1, 100, 1000] {
        let tmp = tempfile::tempdir_in(&root).unwrap();
        let log = std::cell::RefCell::new(
            Log::open(&LogConfig::new(tmp.path().join("s"), ShardId(0)), |_, _| {})
                .unwrap()
                .0,
        );
        let r = pipelined(
            &mut |hb| {
                log.borrow_mut().append(hb, None).unwrap();
            },
            &mut || log.borrow_mut().commit_begin().unwrap(),
            &mut |job, res| {
                log.borrow_mut().commit_end(job, res).unwrap();
            },
            &hbs,
            n,
            group,
        );
        let log = log.into_inner();
        assert_eq!(log.stats().entries, n as u64);
        assert_eq!(log.durable(), log.written());
        let name = if group == 0 {
            "log relaxed".to_string()
        } else {
            format!("log strict group>={group}")
        };
        report(&name, r);
    }
    let tmp = tempfile::tempdir_in(&root).unwrap();
    let cfg = StoreConfig {
        expected_devices: hbs.len(),
        ..StoreConfig::new(tmp.path().join("s"), ShardId(0))
    };
    let store = std::cell::RefCell::new(ShardStore::open(&cfg).unwrap().0);
    let r = pipelined(
        &mut |hb| {
            store.borrow_mut().append(hb).unwrap();
        },
        &mut || store.borrow_mut().commit_begin().unwrap(),
        &mut |job, res| {
            store.borrow_mut().commit_end(job, res).unwrap();
        },
        &hbs,
        n,
        1000,
    );
    assert_eq!(store.borrow().table().len(), hbs.len());
    report("store strict group>=1000", r);
}
