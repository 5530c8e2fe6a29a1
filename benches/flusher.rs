//! Storage flusher throughput (custom harness: `cargo bench --bench flusher`). Fills a fresh data
//! directory (2 shards, default 64 MiB segments) with N heartbeats through the real `ShardStore`
//! (N = `GEOBEAT_FLUSH_BENCH_N`, default 1,000,000; about 1 in 7 carries attrs), syncs it, then
//! times the real flusher draining that backlog completely, once per sink: plain audit files,
//! zstd audit files, and PostgreSQL by COPY (a throwaway local cluster with fsync and synchronous
//! commit on; skipped with a note if PostgreSQL is not installed). Batches are the default 10,000
//! heartbeats. Prints heartbeats per second and the drain time per sink, and the machine.

#[path = "../tests/flusher_support/mod.rs"]
mod flusher_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flusher_support::*;
use geobeat::config::{SinkConfig, SINK_BATCH_ROWS_DEFAULT};
use geobeat::datadir::DataDir;
use geobeat::flusher;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};

fn fill(root: &Path, n: u64) -> u64 {
    let dd = DataDir::open_or_create(root, 2).unwrap();
    let mut stores: Vec<ShardStore> = (0..2)
        .map(|k| {
            let cfg = StoreConfig::new(dd.shard_dir(ShardId(k)), ShardId(k));
            ShardStore::open(&cfg).unwrap().0
        })
        .collect();
    append(&mut stores, 0..n, n, 4);
    stores
        .iter_mut()
        .map(|s| s.sync_blocking().unwrap().0)
        .sum()
}

/// Drains the whole backlog into `sink`; returns the elapsed time.
fn drain(root: &Path, mut sink: SinkConfig) -> Duration {
    sink.batch_rows = SINK_BATCH_ROWS_DEFAULT;
    sink.poll_interval = Duration::from_millis(5);
    let dd = DataDir::open_or_create(root, 2).unwrap();
    let feeds: Vec<_> = (0..dd.shard_count())
        .map(|k| {
            let shard = ShardId(k);
            let dir = dd.shard_dir(shard);
            let end = geobeat::log::tail::log_end(&dir, shard).unwrap().unwrap();
            flusher::ShardFeed::new(shard, dir, end)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handle = flusher::start(vec![sink], feeds, stop.clone()).unwrap();
    wait_for("the drain", Duration::from_secs(600), || {
        handle.status().iter().all(|s| s.lag_bytes == 0)
    });
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Release);
    handle.join().unwrap();
    elapsed
}

fn report(what: &str, n: u64, d: Duration) {
    let rate = n as f64 / d.as_secs_f64();
    println!(
        "{what:<28} {n:>9} heartbeats in {:>7.2} s = {:>9.0} /s  (10M would take ~{:.0} s)",
        d.as_secs_f64(),
        rate,
        10_000_000.0 / rate
    );
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("flusher: benchmark");
        return;
    }
    let n: u64 = std::env::var("GEOBEAT_FLUSH_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "flusher bench: {n} heartbeats, 2 shards; {} cores, {cpu}",
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let t = Instant::now();
    let log_bytes = fill(&data, n);
    println!(
        "filled the logs: {:.1} MB in {:.2} s",
        log_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    for (name, zstd) in [("audit (plain)", false), ("audit (zstd level 3)", true)] {
        let out = tmp.path().join(if zstd { "zst" } else { "plain" });
        let d = drain(
            &data,
            audit_sink(if zstd { "zst" } else { "plain" }, &out, zstd),
        );
        report(name, n, d);
        println!("{:<28} {:.1} MB of files", "", dir_bytes(&out) as f64 / 1e6);
    }
    if std::env::var_os("GEOBEAT_FLUSH_BENCH_NO_PG").is_some() {
        return;
    }
    let pg = match std::panic::catch_unwind(Pg::start_durable) {
        Ok(pg) => pg,
        Err(_) => {
            println!("postgres: skipped (PostgreSQL not available)");
            return;
        }
    };
    let d = drain(&data, pg_sink("pg", &pg.url));
    report("postgres (COPY + merge)", n, d);
    assert_eq!(pg.history_count() as u64, n);
    pg.stop();
}
