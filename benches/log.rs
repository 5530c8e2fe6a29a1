//! Append throughput of the shard log on one core, per durability mode and group-commit size.
//! Heartbeat-sized entries (20-byte ids, ~140 bytes per entry). In the Strict variants appends go on
//! while the previous group's fdatasync runs in the io_uring syncer (a commit starts once at least
//! `group` entries are pending and no sync is in flight); a group is durable when its sync
//! completes, and the measured time includes making every appended entry durable.
//! `strict_serial` waits for an fdatasync after every append (the latency floor). The
//! "store" variant also maintains the last-location table (100k devices).
//!
//! Run: `cargo bench --bench log` (about 40 s). Segments are deleted as the bench goes, so disk
//! use stays at a few segments.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use geobeat::log::{Commit, Log, LogConfig, SyncJob, UringSyncer};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};

const DEVICES: usize = 100_000;

fn heartbeats() -> Vec<Heartbeat> {
    (0..DEVICES)
        .map(|i| Heartbeat {
            device_id: format!("device-{i:012}x"),
            lat: 52.0 + (i % 1000) as f64 * 1e-4,
            lon: 13.0 + (i % 777) as f64 * 1e-4,
            ts_ms: 1_732_000_000_000 + i as i64,
            received_ms: 1_732_000_000_050 + i as i64,
            acc_m: Some(5.0),
            ..Heartbeat::default()
        })
        .collect()
}

/// Something that appends and commits: the bare log or the store.
trait Appender {
    fn append_one(&mut self, hb: &Heartbeat);
    fn commit_begin(&mut self) -> Commit;
    fn commit_end(&mut self, job: SyncJob, res: std::io::Result<()>);
    fn trim(&mut self);
}

impl Appender for Log {
    fn append_one(&mut self, hb: &Heartbeat) {
        self.append(hb, None).expect("append");
    }
    fn commit_begin(&mut self) -> Commit {
        Log::commit_begin(self).expect("commit_begin")
    }
    fn commit_end(&mut self, job: SyncJob, res: std::io::Result<()>) {
        Log::commit_end(self, job, res).expect("commit_end");
    }
    fn trim(&mut self) {
        self.delete_expired(SystemTime::now() + Duration::from_secs(1), Duration::ZERO)
            .expect("delete");
    }
}

impl Appender for ShardStore {
    fn append_one(&mut self, hb: &Heartbeat) {
        self.append(hb).expect("append");
    }
    fn commit_begin(&mut self) -> Commit {
        ShardStore::commit_begin(self).expect("commit_begin")
    }
    fn commit_end(&mut self, job: SyncJob, res: std::io::Result<()>) {
        ShardStore::commit_end(self, job, res).expect("commit_end");
    }
    fn trim(&mut self) {
        self.delete_expired(SystemTime::now() + Duration::from_secs(1), Duration::ZERO)
            .expect("delete");
    }
}

/// Strict, pipelined as the server's commit loop runs it: a commit starts when at least `group`
/// entries are pending and no sync is in flight; appends never wait for a sync (entries appended
/// meanwhile join the next group, so groups grow under load). At the end everything is durable.
fn run_strict<A: Appender>(
    a: &mut A,
    syncer: &mut UringSyncer,
    hbs: &[Heartbeat],
    n: u64,
    group: u64,
) -> Duration {
    let mut in_flight: Option<SyncJob> = None;
    let mut pending = 0u64;
    let start = Instant::now();
    for i in 0..n {
        a.append_one(&hbs[i as usize % hbs.len()]);
        pending += 1;
        if in_flight.is_some() {
            if let Some(res) = syncer.poll() {
                a.commit_end(in_flight.take().expect("job"), res);
            }
        }
        if in_flight.is_none() && pending >= group {
            if let Commit::Sync(job) = a.commit_begin() {
                syncer.submit(&job).expect("submit");
                in_flight = Some(job);
            }
            pending = 0;
        }
        if i % 200_000 == 199_999 {
            a.trim();
        }
    }
    if let Some(job) = in_flight {
        let res = syncer.wait();
        a.commit_end(job, res);
    }
    if let Commit::Sync(job) = a.commit_begin() {
        let res = job.run_blocking();
        a.commit_end(job, res);
    }
    start.elapsed()
}

/// Strict without pipelining: every append waits for its own fdatasync (the latency floor).
fn run_serial(log: &mut Log, hbs: &[Heartbeat], n: u64) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        log.append_one(&hbs[i as usize % hbs.len()]);
        log.sync_blocking().expect("sync");
    }
    start.elapsed()
}

/// Relaxed: appends are acknowledged at once; a background sync is started at most every 2 ms
/// (never waited for inside the loop).
fn run_relaxed(log: &mut Log, syncer: &mut UringSyncer, hbs: &[Heartbeat], n: u64) -> Duration {
    let mut in_flight: Option<SyncJob> = None;
    let mut last_commit = Instant::now();
    let start = Instant::now();
    for i in 0..n {
        log.append_one(&hbs[i as usize % hbs.len()]);
        if i % 256 == 0 {
            if in_flight.is_some() {
                if let Some(res) = syncer.poll() {
                    Appender::commit_end(log, in_flight.take().expect("job"), res);
                }
            }
            if in_flight.is_none() && last_commit.elapsed() >= Duration::from_millis(2) {
                if let Commit::Sync(job) = Appender::commit_begin(log) {
                    syncer.submit(&job).expect("submit");
                    in_flight = Some(job);
                }
                last_commit = Instant::now();
            }
        }
        if i % 200_000 == 199_999 {
            log.trim();
        }
    }
    let elapsed = start.elapsed();
    if let Some(job) = in_flight {
        let res = syncer.wait();
        Appender::commit_end(log, job, res);
    }
    elapsed
}

fn bench_dir() -> tempfile::TempDir {
    // On the real disk (not tmpfs): fdatasync must cost what it costs.
    tempfile::tempdir_in(std::env::var_os("GEOBEAT_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))
        .expect("bench dir")
}

fn log_cfg(dir: &Path) -> LogConfig {
    LogConfig::new(dir.join("shard"), ShardId(0))
}

fn appends(c: &mut Criterion) {
    let hbs = heartbeats();
    let mut syncer = UringSyncer::new().expect("io_uring");
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    {
        let tmp = bench_dir();
        let (mut log, _) = Log::open(&log_cfg(tmp.path()), |_, _| {}).expect("open");
        g.bench_function("log/relaxed", |b| {
            b.iter_custom(|n| run_relaxed(&mut log, &mut syncer, &hbs, n))
        });
    }
    {
        let tmp = bench_dir();
        let (mut log, _) = Log::open(&log_cfg(tmp.path()), |_, _| {}).expect("open");
        g.measurement_time(Duration::from_secs(2));
        g.bench_function("log/strict_serial", |b| {
            b.iter_custom(|n| run_serial(&mut log, &hbs, n))
        });
        g.measurement_time(Duration::from_secs(4));
    }
    for group in [1u64, 100, 1000] {
        let tmp = bench_dir();
        let (mut log, _) = Log::open(&log_cfg(tmp.path()), |_, _| {}).expect("open");
        g.bench_with_input(
            BenchmarkId::new("log/strict", group),
            &group,
            |b, &group| b.iter_custom(|n| run_strict(&mut log, &mut syncer, &hbs, n, group)),
        );
    }
    {
        let tmp = bench_dir();
        let cfg = StoreConfig {
            expected_devices: DEVICES,
            ..StoreConfig::new(tmp.path().join("shard"), ShardId(0))
        };
        let (mut store, _) = ShardStore::open(&cfg).expect("open");
        g.bench_with_input(
            BenchmarkId::new("store/strict", 1000),
            &1000u64,
            |b, &group| b.iter_custom(|n| run_strict(&mut store, &mut syncer, &hbs, n, group)),
        );
    }
    g.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
