//! What the log's hash chain costs (issue 18 item 3, `log::chain`): SHA-256 per heartbeat-sized
//! entry (144 bytes as stored, hashed in groups of `CHAIN_GROUP_ENTRIES` like the chain does),
//! the chain writer's throughput over a real log, and a log's append + group-commit loop with the
//! chain thread off vs on (the store's way: each commit publishes its durable position, the
//! thread hashes behind). For the A/B it prints heartbeats per second of the append/commit loop
//! (the ack path) and the whole process's CPU per heartbeat (user + system from `getrusage`,
//! which includes the chain thread; measured after the thread has caught up and stopped).
//!
//! Run: `cargo bench --bench chain` (about a minute; `CHAIN_BENCH_ENTRIES=N`, default 300,000;
//! the logs live in `CHAIN_BENCH_DIR`, default the system temp dir).

use std::time::{Duration, Instant};

use geobeat::limits::CHAIN_GROUP_ENTRIES;
use geobeat::log::chain::{ChainThread, ChainWriter, Step};
use geobeat::log::{Log, LogConfig};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use sha2::{Digest as _, Sha256};

fn cpu_self() -> Duration {
    // SAFETY: getrusage fills a plain struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn hb(i: u64) -> Heartbeat {
    Heartbeat {
        device_id: format!("truck-{:05}", i % 10_000),
        lat: 52.0 + (i % 1000) as f64 / 1000.0,
        lon: 13.0 + (i % 777) as f64 / 1000.0,
        ts_ms: 1_700_000_000_000 + i as i64,
        received_ms: 1_700_000_000_001 + i as i64,
        ..Heartbeat::default()
    }
}

fn dir() -> tempfile::TempDir {
    match std::env::var_os("CHAIN_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn cfg(dir: &std::path::Path) -> LogConfig {
    LogConfig {
        segment_bytes: 16 << 20,
        ..LogConfig::new(dir, ShardId(0))
    }
}

/// Appends `n` heartbeats committing every 1,000 (the default group), with or without the
/// chain thread; returns (loop wall time, process CPU including the chain's catch-up).
fn append_loop(n: u64, chain: bool) -> (Duration, Duration, u64) {
    let d = dir();
    let (mut log, _) = Log::open(&cfg(d.path()), |_, _| {}).unwrap();
    let t = if chain {
        Some(ChainThread::spawn(d.path(), ShardId(0), log.durable()))
    } else {
        None
    };
    let hbs: Vec<Heartbeat> = (0..n).map(hb).collect();
    let (cpu0, t0) = (cpu_self(), Instant::now());
    for (i, h) in hbs.iter().enumerate() {
        log.append(h, None).unwrap();
        if i % 1000 == 999 {
            let pos = log.sync_blocking().unwrap();
            if let Some(t) = &t {
                t.publish_durable(pos);
            }
        }
    }
    let pos = log.sync_blocking().unwrap();
    let wall = t0.elapsed();
    let mut sealed = 0;
    if let Some(t) = t {
        t.publish_durable(pos);
        // Dropping it lets it catch up (at most `CHAIN_STOP_CATCH_UP_MS`, far more than this
        // needs) and stop, so its whole work is in the CPU figure.
        sealed = t.sealed_below().0;
        drop(t);
    }
    (wall, cpu_self() - cpu0, sealed)
}

fn main() {
    let n: u64 = std::env::var("CHAIN_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let sha_ni = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains(" sha_ni"))
        .unwrap_or(false);
    println!("cpu sha_ni: {sha_ni}");

    // 1. SHA-256 per 144-byte entry, in groups.
    let entry = [0x5au8; 144];
    let groups = 40_000u64;
    let t0 = Instant::now();
    let mut d = [0u8; 32];
    for _ in 0..groups {
        let mut h = Sha256::new();
        h.update(d);
        h.update(0u64.to_le_bytes());
        for _ in 0..CHAIN_GROUP_ENTRIES {
            h.update(entry);
        }
        d = h.finalize().into();
    }
    let per = t0.elapsed().as_nanos() as f64 / (groups * u64::from(CHAIN_GROUP_ENTRIES)) as f64;
    println!(
        "sha256 per 144-byte entry (groups of {CHAIN_GROUP_ENTRIES}): {per:.0} ns ({:.0} MB/s) [digest {:02x}{:02x}]",
        144.0 / per * 1000.0,
        d[0],
        d[1]
    );

    // 2. The chain writer over a real log.
    let dd = dir();
    {
        let (mut log, _) = Log::open(&cfg(dd.path()), |_, _| {}).unwrap();
        for i in 0..n {
            log.append(&hb(i), None).unwrap();
        }
        let durable = log.sync_blocking().unwrap();
        let t0 = Instant::now();
        let mut w = ChainWriter::open(dd.path(), ShardId(0)).unwrap();
        while w.step(durable, 1 << 20).unwrap() != Step::Idle {}
        w.finish().unwrap();
        let el = t0.elapsed();
        println!(
            "chain writer: {n} entries ({} MiB) in {:.1} ms: {:.0} ns/entry, {:.2} M entries/s",
            durable.0 >> 20,
            el.as_secs_f64() * 1e3,
            el.as_nanos() as f64 / n as f64,
            n as f64 / el.as_secs_f64() / 1e6
        );
    }

    // 3. Append + commit loop, chain off vs on (alternating, 3 rounds each).
    for round in 0..3 {
        for chain in [false, true] {
            let (wall, cpu, _) = append_loop(n, chain);
            println!(
                "round {round} chain {}: {:.0} heartbeats/s on the append/commit loop, {:.2} us CPU per heartbeat (process)",
                if chain { "on " } else { "off" },
                n as f64 / wall.as_secs_f64(),
                cpu.as_nanos() as f64 / n as f64 / 1e3
            );
        }
    }
}
