//! Shared harness of the flusher integration tests (`flusher_postgres`, `flusher_audit`): a tiny
//! test runner for custom-harness binaries (child processes need their own `main`), a data
//! directory filled with deterministic heartbeats through the real `ShardStore`, the expected
//! content computed from the logs, a child process that runs the real flusher until it is
//! SIGKILLed, and a throwaway PostgreSQL cluster (initdb into a temp dir, on a free 127.0.0.1
//! port, run as the `postgres` user when the tests run as root, which PostgreSQL refuses).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geobeat::config::{Compression, Rotation, SinkConfig, SinkKind};
use geobeat::datadir::DataDir;
use geobeat::flusher::{self, FlusherHandle, ShardFeed};
use geobeat::limits::SEGMENT_BYTES_MIN;
use geobeat::log::tail::Tail;
use geobeat::log::LogPos;
use geobeat::record::Heartbeat;
use geobeat::route::{shard_of, ShardId};
use geobeat::store::{ShardStore, StoreConfig};

/// Environment variable that turns a test binary into a flusher child: `<data-dir>|<sinks json>`.
pub const CHILD_ENV: &str = "GEOBEAT_FLUSHER_CHILD";
/// A child gives up after this long (it is normally killed long before).
pub const CHILD_RUN_MAX: Duration = Duration::from_secs(90);
/// Device time of the first heartbeat.
pub const TS0: i64 = 1_790_000_000_000;

// ---------------------------------------------------------------- runner

/// Runs the named tests (all, or those whose name contains a command-line filter), printing
/// libtest-like lines and the closing `N passed, M failed`; exits 1 on any failure.
pub fn run_tests(tests: &[(&str, fn())]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        if !filters.is_empty() && !filters.iter().any(|flt| name.contains(flt.as_str())) {
            continue;
        }
        let started = Instant::now();
        let ok = std::panic::catch_unwind(f).is_ok();
        let secs = started.elapsed().as_secs_f64();
        if ok {
            passed += 1;
            println!("test {name} ... ok ({secs:.1} s)");
        } else {
            failed += 1;
            println!("test {name} ... FAILED ({secs:.1} s)");
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- data

/// The `i`-th heartbeat: devices round-robin; device time mostly rising by round, but every 11th
/// is late (older than the device's newest) and every 29th repeats the previous round's time (a
/// tie, which goes to the later append); receive times spread over `hours` hours.
pub fn heartbeat(i: u64, devices: u64, total: u64, hours: i64) -> Heartbeat {
    let round = (i / devices) as i64;
    let mut ts = TS0 + round * 1000;
    if i % 11 == 0 {
        ts -= 3000;
    } else if i % 29 == 0 {
        ts -= 1000;
    }
    let span = hours * 3_600_000;
    Heartbeat {
        device_id: format!("dev-{:05}", i % devices),
        lat: ((i * 7) % 180) as f64 - 90.0 + 0.125,
        lon: ((i * 13) % 360) as f64 - 180.0 + 0.5,
        ts_ms: ts,
        received_ms: TS0 + (i as i128 * span as i128 / total.max(1) as i128) as i64,
        alt_m: (i % 3 == 0).then_some((i % 1000) as f32 * 0.5),
        speed_mps: (i % 4 == 0).then_some((i % 40) as f32),
        heading_deg: (i % 5 == 0).then_some((i % 360) as f32),
        acc_m: Some(3.5),
        attrs: if i % 7 == 0 {
            format!("{{\"n\":{i},\"s\":\"a\\\\b\"}}").into_bytes()
        } else {
            Vec::new()
        },
    }
}

/// Opens (creating) the stores of a data directory with small segments.
pub fn open_stores(root: &Path, shards: u32) -> Vec<ShardStore> {
    let dd = DataDir::open_or_create(root, shards).expect("data dir");
    (0..dd.shard_count())
        .map(|k| {
            let shard = ShardId(k);
            let mut cfg = StoreConfig::new(dd.shard_dir(shard), shard);
            cfg.segment_bytes = SEGMENT_BYTES_MIN;
            ShardStore::open(&cfg).expect("open store").0
        })
        .collect()
}

/// Appends heartbeats `range` (of `total`) to the stores, routed by device, without syncing.
pub fn append(stores: &mut [ShardStore], range: std::ops::Range<u64>, total: u64, hours: i64) {
    let n = stores.len() as u32;
    for i in range {
        let hb = heartbeat(i, devices_for(total), total, hours);
        let k = shard_of(&hb.device_id, n).0 as usize;
        stores[k].append(&hb).expect("append");
    }
}

/// Devices used for `total` heartbeats (about 50 heartbeats per device).
pub fn devices_for(total: u64) -> u64 {
    (total / 50).clamp(10, 5000)
}

/// Feeds for the stores (durable = their current durable position).
pub fn feeds(root: &Path, stores: &[ShardStore]) -> Vec<ShardFeed> {
    let dd = DataDir::open_or_create(root, stores.len() as u32).expect("data dir");
    stores
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let shard = ShardId(k as u32);
            ShardFeed::new(shard, dd.shard_dir(shard), s.durable())
        })
        .collect()
}

/// One log entry as the sinks must hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub shard: u32,
    pub pos: u64,
    pub seq: u64,
    pub id: String,
    pub ts: i64,
    pub received_at: i64,
    pub lat: f64,
    pub lon: f64,
}

/// Every durable entry of the data directory, read back through the tail reader (shard order,
/// then log order).
pub fn expected(root: &Path) -> Vec<Expected> {
    let dd = DataDir::open_or_create(root, 1).expect("data dir");
    let mut out = Vec::new();
    for k in 0..dd.shard_count() {
        let shard = ShardId(k);
        let end = geobeat::log::tail::log_end(&dd.shard_dir(shard), shard)
            .expect("log end")
            .expect("a segment");
        let mut t = Tail::new(dd.shard_dir(shard), shard, LogPos(0), None);
        while let Some(e) = t.next(end).expect("tail") {
            out.push(Expected {
                shard: k,
                pos: e.pos.0,
                seq: e.seq,
                id: e.hb.device_id.to_string(),
                ts: e.hb.ts_ms.to_native(),
                received_at: e.hb.received_ms.to_native(),
                lat: e.hb.lat.to_native(),
                lon: e.hb.lon.to_native(),
            });
        }
    }
    out
}

/// Each device's newest entry by device time, ties to the later append: `(ts, shard, pos)`.
pub fn expected_last(rows: &[Expected]) -> BTreeMap<String, (i64, u32, u64)> {
    let mut last: BTreeMap<String, (i64, u32, u64)> = BTreeMap::new();
    for r in rows {
        let cand = (r.ts, r.shard, r.pos);
        match last.get_mut(&r.id) {
            Some(cur) if (cur.0, cur.2) >= (cand.0, cand.2) => {}
            Some(cur) => *cur = cand,
            None => {
                last.insert(r.id.clone(), cand);
            }
        }
    }
    last
}

/// Counts occurrences of each `(shard, pos)`.
pub fn multiplicity(keys: impl Iterator<Item = (u32, u64)>) -> HashMap<(u32, u64), u32> {
    let mut m = HashMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Asserts `got` holds every expected `(shard, pos)` exactly once and nothing else.
pub fn assert_exactly_once(what: &str, got: &HashMap<(u32, u64), u32>, want: &[Expected]) {
    let dups: Vec<_> = got.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(dups.is_empty(), "{what}: duplicated entries {dups:?}");
    let missing: Vec<_> = want
        .iter()
        .filter(|e| !got.contains_key(&(e.shard, e.pos)))
        .take(5)
        .map(|e| (e.shard, e.pos))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: missing entries {missing:?} (of {})",
        want.len()
    );
    assert_eq!(got.len(), want.len(), "{what}: unexpected extra entries");
}

// ---------------------------------------------------------------- sinks and flusher

/// An audit sink config (default rotation).
pub fn audit_sink(name: &str, dir: &Path, zstd: bool) -> SinkConfig {
    audit_sink_rotating(name, dir, zstd, Rotation::default())
}

/// An audit sink config with the given rotation.
pub fn audit_sink_rotating(name: &str, dir: &Path, zstd: bool, rotate: Rotation) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind: SinkKind::Audit {
            dir: dir.to_path_buf(),
            compress: if zstd {
                Compression::Zstd { level: 3 }
            } else {
                Compression::None
            },
            rotate,
        },
        batch_rows: 700,
        poll_interval: Duration::from_millis(10),
    }
}

/// A PostgreSQL sink config.
pub fn pg_sink(name: &str, url: &str) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind: SinkKind::Postgres {
            url: url.into(),
            schema: "public".into(),
        },
        batch_rows: 1000,
        poll_interval: Duration::from_millis(10),
    }
}

fn sinks_to_text(sinks: &[SinkConfig]) -> String {
    sinks
        .iter()
        .map(|s| match &s.kind {
            SinkKind::Audit {
                dir,
                compress,
                rotate,
            } => format!(
                "audit;{};{};{};{};{};{}",
                s.name,
                dir.display(),
                matches!(compress, Compression::Zstd { .. }),
                rotate.window_secs,
                rotate.bytes,
                s.batch_rows
            ),
            SinkKind::Postgres { url, .. } => format!("postgres;{};{url};{}", s.name, s.batch_rows),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn sinks_from_text(text: &str) -> Vec<SinkConfig> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(';').collect();
            let mut s = match f[0] {
                "audit" => audit_sink_rotating(
                    f[1],
                    Path::new(f[2]),
                    f[3] == "true",
                    Rotation {
                        window_secs: f[4].parse().unwrap(),
                        bytes: f[5].parse().unwrap(),
                    },
                ),
                "postgres" => pg_sink(f[1], f[2]),
                other => panic!("bad sink kind {other}"),
            };
            s.batch_rows = f[f.len() - 1].parse().unwrap();
            s
        })
        .collect()
}

/// Child mode: opens the stores of the data directory, starts the flusher with the given sinks
/// and runs until killed (or `CHILD_RUN_MAX`). Returns true if this process is a child.
pub fn child_main() -> bool {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let (root, sinks) = spec.split_once('|').expect("child spec");
    let root = PathBuf::from(root);
    let stores = open_stores(&root, 1);
    let feeds = feeds(&root, &stores);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = flusher::start(sinks_from_text(sinks), feeds, stop.clone()).expect("start");
    println!("STARTED");
    std::thread::sleep(CHILD_RUN_MAX);
    stop.store(true, Ordering::Release);
    handle.join().expect("join");
    drop(stores);
    true
}

/// Starts a child running the flusher over `root` with `sinks`.
pub fn spawn_child(root: &Path, sinks: &[SinkConfig]) -> Child {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(
            CHILD_ENV,
            format!("{}|{}", root.display(), sinks_to_text(sinks)),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    // Wait for STARTED so a kill always lands in a running flusher.
    use std::io::{BufRead, BufReader};
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("child output");
    assert_eq!(line.trim(), "STARTED", "child did not start");
    child
}

/// SIGKILLs a child and reaps it.
pub fn kill(mut child: Child) {
    // SAFETY: plain syscall on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Waits until `cond` holds, polling every 20 ms, up to `max`; panics with `what` otherwise.
pub fn wait_for(what: &str, max: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + max;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the flusher in this process over `root` until every sink has consumed every shard, then
/// stops it. Returns the final status.
pub fn drain_in_process(root: &Path, sinks: Vec<SinkConfig>) -> Vec<flusher::SinkStatus> {
    let stores = open_stores(root, 1);
    let feeds = feeds(root, &stores);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = flusher::start(sinks, feeds, stop.clone()).expect("start");
    wait_until_drained(&handle, Duration::from_secs(40));
    let status = handle.status();
    stop.store(true, Ordering::Release);
    handle.join().expect("join");
    status
}

/// Waits until every status row has lag 0 and no error.
pub fn wait_until_drained(handle: &FlusherHandle, max: Duration) {
    wait_for("the sinks to drain", max, || {
        handle
            .status()
            .iter()
            .all(|s| s.lag_bytes == 0 && s.last_error.is_none())
    });
    for f in handle.feeds() {
        assert_eq!(
            f.backlog_bytes(),
            0,
            "consumed reaches durable on shard {}",
            f.shard
        );
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// A throwaway PostgreSQL cluster, stopped (immediately) when dropped.
pub struct Pg {
    bin: PathBuf,
    /// Keeps the directory alive.
    _root: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    run_as: Option<String>,
    /// Whether the server fsyncs (off in tests, for speed; on in benchmarks).
    fsync: bool,
    /// Connection string for the `postgres` database as superuser `geobeat`.
    pub url: String,
}

fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?;
    Path::new(path.trim()).parent().map(Path::to_path_buf)
}

impl Pg {
    /// Starts a fresh cluster with fsync off (tests: a SIGKILL of the server keeps the page
    /// cache), or panics saying how to install PostgreSQL.
    pub fn start() -> Pg {
        Pg::start_with(false)
    }

    /// Starts a fresh cluster with fsync and synchronous commit on (benchmarks).
    pub fn start_durable() -> Pg {
        Pg::start_with(true)
    }

    fn start_with(fsync: bool) -> Pg {
        let bin = pg_bin_dir().expect(
            "PostgreSQL not found (no initdb under /usr/lib/postgresql/*/bin or on PATH): \
             apt-get install -y postgresql, or set PG_BIN",
        );
        // PostgreSQL refuses to run as root: run it as the `postgres` user then.
        // SAFETY: geteuid has no preconditions.
        let run_as = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string());
        let root = tempfile::Builder::new()
            .prefix("geobeat-pg-")
            .tempdir()
            .expect("temp dir");
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg(user)
                .arg(root.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown {user} {}", root.path().display());
        }
        let data = root.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Pg {
            bin,
            data,
            port,
            run_as,
            fsync,
            url: format!("host=127.0.0.1 port={port} user=geobeat dbname=postgres"),
            _root: root,
        };
        let initdb = pg.bin.join("initdb");
        let out = pg
            .command(&initdb)
            .args([
                "-A",
                "trust",
                "-U",
                "geobeat",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&pg.data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        pg
    }

    fn command(&self, program: &Path) -> Command {
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Starts the (stopped) cluster and waits until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=20 \
             -c shared_buffers=128MB",
            self.port,
            self._root.path().display(),
            if self.fsync { "on" } else { "off" }
        );
        let out = self
            .command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self._root.path().join("server.log"))
            .args(["-w", "-t", "30", "-o", &opts, "start"])
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the cluster at once (like a crash: `-m immediate`).
    pub fn stop(&self) {
        let _ = self
            .command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    /// A new client connection.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to test postgres")
    }

    /// Drops the sink tables (a clean database for the next test).
    pub fn reset(&self) {
        self.client()
            .batch_execute("DROP TABLE IF EXISTS history, last_location")
            .expect("drop tables");
    }

    /// Rows of `history` as `(shard, pos)` multiplicities.
    pub fn history_keys(&self) -> HashMap<(u32, u64), u32> {
        let rows = self
            .client()
            .query("SELECT shard, pos FROM history", &[])
            .expect("query history");
        multiplicity(
            rows.iter()
                .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1) as u64)),
        )
    }

    /// Number of rows in `history` (0 if the table does not exist yet).
    pub fn history_count(&self) -> i64 {
        let mut c = self.client();
        match c.query_one("SELECT count(*) FROM history", &[]) {
            Ok(r) => r.get(0),
            Err(_) => 0,
        }
    }

    /// `last_location` as id -> (ts, shard, pos).
    pub fn last_locations(&self) -> BTreeMap<String, (i64, u32, u64)> {
        self.client()
            .query("SELECT id, ts, shard, pos FROM last_location", &[])
            .expect("query last_location")
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    (
                        r.get::<_, i64>(1),
                        r.get::<_, i32>(2) as u32,
                        r.get::<_, i64>(3) as u64,
                    ),
                )
            })
            .collect()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the real `geobeat audit reconcile --data-dir root <args>`: its exit code and stdout.
pub fn reconcile(root: &Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_geobeat"))
        .args(["audit", "reconcile", "--data-dir"])
        .arg(root)
        .args(args)
        .output()
        .expect("run geobeat audit reconcile");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "reconcile failed ({code}): {stderr}"
    );
    (code, stdout)
}

/// Asserts that reconcile finds zero differences (and compared something).
pub fn assert_reconciled(root: &Path, args: &[&str]) {
    let (code, out) = reconcile(root, args);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("0 differences\n"), "{out}");
    assert!(out.contains(" exported"), "{out}");
}
