//! Recovery speed of a large shard log (ignored by default: it writes ~1.4 GB). Builds a log of
//! 10M heartbeat-sized entries over 1M devices, then times reopening it: the bare log (CRC + rkyv
//! validation of every entry) and the store (plus the last-location table rebuild), first with the
//! log in the page cache, then cold if the page cache can be dropped (root). Prints the figures;
//! the goal (>= 1 GB/s of log) is checked by reading them, not asserted.
//!
//! Run: `cargo test --release --test log_perf -- --ignored --nocapture`
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
        let t = Instant::now();
        let (log, report) = Log::open(&log_cfg, |_, _| n += 1).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!((n, report.entries), (entries, entries));
        println!(
            "{pass} log recovery: {} entries, {} bytes, {} segments in {secs:.3}s = {:.2} GB/s, {:.1} M entries/s",
            report.entries,
            report.bytes,
            report.segments,
            report.bytes as f64 / secs / 1e9,
            report.entries as f64 / secs / 1e6
        );
        drop(log);
        if pass == "cold" {
            drop_page_cache();
        }
        let t = Instant::now();
        let (store, report) = ShardStore::open(&store_cfg).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(store.table().len() as u64, devices);
        println!(
            "{pass} store recovery (log + table of {} devices): {secs:.3}s = {:.2} GB/s, {:.1} M entries/s",
            store.table().len(),
            report.bytes as f64 / secs / 1e9,
            report.entries as f64 / secs / 1e6
        );
    }
}
