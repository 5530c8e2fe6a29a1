//! Crash test of the shard log (custom harness: `cargo test --test crash_log`). The parent re-runs
//! this binary as a child (selected by an environment variable) that appends deterministic
//! heartbeats as fast as it can (after printing `READY` once its log is open), group-commits them through the io_uring syncer while appending,
//! and prints `DURABLE <pos> <seq>` after every completed commit. The parent SIGKILLs the child at
//! random moments over several rounds (the log is reopened, recovered and appended to again each
//! round) and after each kill checks that every heartbeat the child reported durable is present and
//! intact, that sequence numbers are contiguous with content matching the sequence number, that no
//! damage is reported, and that the rebuilt table and chains agree with the log.
//!
//! What this can and cannot show: SIGKILL keeps the page cache, so it proves the recovery path and
//! the commit protocol's reporting, not power-loss durability (which needs a real power cut).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use geobeat::limits::SEGMENT_BYTES_MIN;
use geobeat::log::{Commit, GroupPolicy, LogPos, ScanEnd, UringSyncer};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};
use rand::Rng;

const CHILD_ENV: &str = "GEOBEAT_CRASH_CHILD_DIR";
const ROUNDS: usize = 8;
const DEVICES: u64 = 50;
/// The child stops by itself after this long or this many entries (it is normally killed first).
const CHILD_RUN_MAX: Duration = Duration::from_secs(20);
const CHILD_ENTRIES_MAX: u64 = 20_000_000;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: ShardId(0),
        segment_bytes: SEGMENT_BYTES_MIN,
        expected_devices: DEVICES as usize,
        write_mode: geobeat::log::WriteMode::default(),
    }
}

/// The heartbeat with sequence number `seq` (so any entry can be checked from its seq alone).
fn expected(seq: u64) -> Heartbeat {
    Heartbeat {
        device_id: format!("crash-dev-{:03}", seq % DEVICES),
        lat: (seq % 180) as f64 - 90.0,
        lon: (seq % 360) as f64 - 180.0,
        ts_ms: 1_700_000_000_000 + seq as i64,
        received_ms: 1_700_000_000_007 + seq as i64,
        speed_mps: (seq % 3 == 0).then_some((seq % 50) as f32),
        attrs: vec![b'x'; (seq % 17) as usize],
        ..Heartbeat::default()
    }
}

fn child(dir: &Path) {
    let (mut store, _) = ShardStore::open(&config(dir)).expect("child: open");
    println!("READY");
    let mut syncer = UringSyncer::new().expect("child: io_uring");
    let policy = GroupPolicy::default();
    let mut pending = 0usize;
    let mut first_pending: Option<Instant> = None;
    // The job in flight and the last sequence number it covers.
    let mut in_flight = None;
    let started = Instant::now();
    let mut appended = 0u64;
    while started.elapsed() < CHILD_RUN_MAX && appended < CHILD_ENTRIES_MAX {
        for _ in 0..64 {
            let seq = store.log().next_seq();
            store.append(&expected(seq)).expect("child: append");
            appended += 1;
            pending += 1;
            first_pending.get_or_insert_with(Instant::now);
        }
        if in_flight.is_some() {
            if let Some(res) = syncer.poll() {
                let (job, last_seq) = in_flight.take().expect("job in flight");
                let durable = store.commit_end(job, res).expect("child: commit_end");
                println!("DURABLE {} {last_seq}", durable.0);
            }
        }
        let age = first_pending.map_or(Duration::ZERO, |t| t.elapsed());
        if in_flight.is_none() && policy.due(pending, age) {
            let last_seq = store.log().next_seq() - 1;
            match store.commit_begin().expect("child: commit_begin") {
                Commit::Idle => {}
                Commit::Done(pos) => println!("DURABLE {} {last_seq}", pos.0),
                Commit::Sync(job) => {
                    syncer.submit(&job).expect("child: submit");
                    in_flight = Some((job, last_seq));
                }
            }
            pending = 0;
            first_pending = None;
        }
    }
}

struct Reported {
    pos: u64,
    seq: u64,
}

enum Kill {
    /// This long after the child reports it has finished opening (mid-append kill).
    AfterReady(Duration),
    /// This long after spawning (usually during open / recovery).
    AfterSpawn(Duration),
}

fn run_round(dir: &Path, kill: &Kill) -> Vec<Reported> {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let spawned = Instant::now();
    let stdout = child.stdout.take().expect("piped stdout");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            match parts.next() {
                Some("READY") => {
                    let _ = ready_tx.send(());
                }
                Some("DURABLE") => {
                    let pos = parts.next().and_then(|p| p.parse().ok());
                    let seq = parts.next().and_then(|p| p.parse().ok());
                    match (pos, seq) {
                        (Some(pos), Some(seq)) => out.push(Reported { pos, seq }),
                        _ => panic!("malformed child line {line:?}"),
                    }
                }
                _ => panic!("unexpected child line {line:?}"),
            }
        }
        out
    });
    match kill {
        Kill::AfterSpawn(after) => std::thread::sleep(after.saturating_sub(spawned.elapsed())),
        Kill::AfterReady(after) => {
            ready_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("child never became ready");
            std::thread::sleep(*after);
        }
    }
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("reap child");
    assert!(
        !status.success(),
        "child should have been killed, got {status}"
    );
    reader.join().expect("reader thread")
}

fn verify(dir: &Path, max_seq_reported: u64, max_pos_reported: u64) -> u64 {
    let (store, report) = ShardStore::open(&config(dir)).expect("parent: reopen");
    assert!(
        report.damaged.is_empty(),
        "kill -9 must not damage: {report:?}"
    );
    let mut next = 1u64;
    let mut last_pos_of_dev = vec![None::<LogPos>; DEVICES as usize];
    for e in store.log().scan_from(LogPos(0), ScanEnd::Written) {
        assert_eq!(e.seq, next, "sequence numbers must be contiguous");
        assert_eq!(
            e.hb.to_owned_heartbeat(),
            expected(e.seq),
            "entry {} intact",
            e.seq
        );
        let dev = (e.seq % DEVICES) as usize;
        assert_eq!(
            e.prev, last_pos_of_dev[dev],
            "back-pointer of entry {}",
            e.seq
        );
        last_pos_of_dev[dev] = Some(e.pos);
        next += 1;
    }
    let last_seq = next - 1;
    assert!(
        last_seq >= max_seq_reported,
        "reported durable seq {max_seq_reported} but only {last_seq} recovered"
    );
    assert!(store.written().0 >= max_pos_reported);
    assert!(store.durable().0 >= max_pos_reported);
    for dev in 0..DEVICES {
        let id = format!("crash-dev-{dev:03}");
        let Some(head) = last_pos_of_dev[dev as usize] else {
            assert!(store.last(&id).is_none());
            continue;
        };
        let l = store.last(&id).expect("device in table");
        assert_eq!((l.pos, l.head), (head, head));
        let newest_seq = last_seq - ((last_seq + DEVICES - dev) % DEVICES);
        assert_eq!(l.ts_ms, expected(newest_seq).ts_ms);
        let chain_len = store.chain(&id).count() as u64;
        assert_eq!(chain_len, (last_seq - dev) / DEVICES + u64::from(dev > 0));
    }
    last_seq
}

fn parent() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir: PathBuf = tmp.path().join("shard-0000");
    let mut rng = rand::thread_rng();
    let (mut max_seq, mut max_pos, mut reports) = (0u64, 0u64, 0usize);
    let started = Instant::now();
    for round in 0..ROUNDS {
        // Mostly mid-run kills, sometimes very early ones (during open / recovery).
        let kill = if round % 3 == 2 {
            Kill::AfterSpawn(Duration::from_millis(rng.gen_range(1..60)))
        } else {
            Kill::AfterReady(Duration::from_millis(rng.gen_range(20..300)))
        };
        let got = run_round(&dir, &kill);
        for r in &got {
            assert!(
                r.seq >= max_seq && r.pos >= max_pos,
                "durable went backwards"
            );
            max_seq = r.seq;
            max_pos = r.pos;
        }
        reports += got.len();
        let last_seq = verify(&dir, max_seq, max_pos);
        println!(
            "round {round}: killed {} ms after {}, {} durable reports, max durable seq {max_seq}, recovered {last_seq}",
            match &kill { Kill::AfterReady(d) | Kill::AfterSpawn(d) => d.as_millis() },
            match &kill { Kill::AfterReady(_) => "ready", Kill::AfterSpawn(_) => "spawn" },
            got.len()
        );
    }
    assert!(reports > 0, "the child never reported a durable commit");
    println!(
        "crash_log: {ROUNDS} rounds, {reports} durable reports checked, {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        // `cargo test -- --list` enumerates tests; this harness has one.
        println!("crash_log_survives_sigkill: test");
        return;
    }
    parent();
    println!("test crash_log_survives_sigkill ... ok");
    println!("1 passed, 0 failed");
}
