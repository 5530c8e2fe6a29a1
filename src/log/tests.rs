//! Unit tests of the log's state machine (append, commit phases, poison, DAX path, rollover
//! durability, reads and scans) on small temporary logs.

use super::*;
use crate::limits::SEGMENT_BYTES_MIN;

fn hb(id: &str, ts_ms: i64) -> Heartbeat {
    Heartbeat {
        device_id: id.to_string(),
        lat: 10.0 + (ts_ms % 70) as f64,
        lon: 20.0 - (ts_ms % 150) as f64,
        ts_ms,
        received_ms: ts_ms + 1,
        alt_m: Some(1.5),
        ..Heartbeat::default()
    }
}

fn cfg(dir: &Path) -> LogConfig {
    LogConfig {
        dir: dir.to_path_buf(),
        shard: ShardId(3),
        segment_bytes: SEGMENT_BYTES_MIN,
    }
}

fn open(dir: &Path) -> Log {
    Log::open(&cfg(dir), |_, _| {}).unwrap().0
}

#[test]
fn append_read_and_positions() {
    // Appends three heartbeats and reads each back by position; positions start after the segment
    // header, are 8-aligned, increase, and written() is the end of the last entry.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    assert_eq!(log.written(), LogPos(SEGMENT_HEADER_BYTES as u64));
    assert_eq!(log.durable(), log.written());
    let p1 = log.append(&hb("a", 1), None).unwrap();
    let p2 = log.append(&hb("b", 2), None).unwrap();
    let p3 = log.append(&hb("a", 3), Some(p1)).unwrap();
    assert_eq!(p1, LogPos(SEGMENT_HEADER_BYTES as u64));
    assert!(p1 < p2 && p2 < p3 && p3 < log.written());
    assert_eq!(p2.0 % 8, 0);
    let e3 = log.read(p3).unwrap();
    assert_eq!((e3.seq, e3.prev), (FIRST_SEQ + 2, Some(p1)));
    assert_eq!(e3.hb.to_owned_heartbeat(), hb("a", 3));
    assert_eq!(e3.end(), log.written());
    assert!(log.read(LogPos(p1.0 + 8)).is_none());
    assert!(log.read(log.written()).is_none());
    let chain: Vec<u64> = log.chain(p3).map(|e| e.seq).collect();
    assert_eq!(chain, vec![FIRST_SEQ + 2, FIRST_SEQ]);
}

#[test]
fn invalid_heartbeat_is_refused_without_writing() {
    // A heartbeat failing validation returns Error::Invalid and leaves written() and the sequence
    // unchanged.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let mut bad = hb("a", 1);
    bad.lat = 91.0;
    let before = (log.written(), log.next_seq());
    assert!(matches!(log.append(&bad, None), Err(Error::Invalid { .. })));
    assert_eq!((log.written(), log.next_seq()), before);
}

#[test]
fn two_phase_commit_moves_durable_to_the_job_target() {
    // commit_begin hands out a job for the written position; appends continue while it is "in
    // flight"; commit_end moves durable() to the target only, leaving later appends pending.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    assert!(matches!(log.commit_begin().unwrap(), Commit::Idle));
    let p1 = log.append(&hb("a", 1), None).unwrap();
    let job = match log.commit_begin().unwrap() {
        Commit::Sync(job) => job,
        other => panic!("expected a sync job, got {other:?}"),
    };
    assert_eq!(job.target(), log.written());
    assert_eq!(job.files().len(), 1);
    let p2 = log.append(&hb("a", 2), Some(p1)).unwrap();
    assert!(log.durable() <= p1);
    let res = job.run_blocking();
    let durable = log.commit_end(job, res).unwrap();
    assert!(p1 < durable && durable <= p2);
    assert_eq!(log.durable(), durable);
    assert_eq!(log.sync_blocking().unwrap(), log.written());
}

#[test]
fn uring_syncer_completes_a_job() {
    // The io_uring syncer runs a job's fdatasyncs while appends continue, and its result feeds
    // commit_end.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&hb("a", 1), None).unwrap();
    let Commit::Sync(job) = log.commit_begin().unwrap() else {
        panic!("expected a job")
    };
    let target = job.target();
    let mut syncer = UringSyncer::new().unwrap();
    syncer.submit(&job).unwrap();
    assert!(syncer.busy());
    log.append(&hb("a", 2), None).unwrap();
    let res = syncer.wait();
    assert!(!syncer.busy());
    assert_eq!(log.commit_end(job, res).unwrap(), target);
    assert!(target < log.written());
}

#[test]
#[should_panic(expected = "only one sync job")]
fn second_job_in_flight_is_a_programmer_error() {
    // Starting a commit while a job is in flight panics (one job at a time).
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&hb("a", 1), None).unwrap();
    let _job = log.commit_begin().unwrap();
    log.append(&hb("a", 2), None).unwrap();
    let _ = log.commit_begin();
}

#[test]
fn failed_sync_poisons_the_log() {
    // A failed sync result poisons the log: commit_end reports SyncFailed, then every append and
    // commit returns Poisoned, and durable() never moves.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&hb("a", 1), None).unwrap();
    let durable = log.durable();
    let Commit::Sync(job) = log.commit_begin().unwrap() else {
        panic!("expected a job")
    };
    let err = log
        .commit_end(job, Err(std::io::Error::from_raw_os_error(libc::EIO)))
        .unwrap_err();
    assert!(matches!(err, Error::SyncFailed { .. }), "{err}");
    assert!(log.is_poisoned());
    assert!(matches!(
        log.append(&hb("a", 2), None),
        Err(Error::Poisoned { .. })
    ));
    assert!(matches!(log.commit_begin(), Err(Error::Poisoned { .. })));
    assert_eq!(log.durable(), durable);
}

#[test]
fn dax_commit_path_flushes_inline() {
    // With the segment forced onto the DAX code path (cache-line flushes over an ordinary mapping),
    // commit_begin returns Done(written) with no job, and the flushed mark follows data_end.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.force_dax_for_test();
    assert_eq!(log.sync_mode(), SyncMode::Dax);
    log.append(&hb("a", 1), None).unwrap();
    log.append(&hb("b", 2), None).unwrap();
    match log.commit_begin().unwrap() {
        Commit::Done(p) => assert_eq!(p, log.written()),
        other => panic!("expected Done, got {other:?}"),
    }
    assert_eq!(log.durable(), log.written());
    let seg = log.segments.back().unwrap();
    assert_eq!(seg.flushed, seg.data_end);
    assert!(matches!(log.commit_begin().unwrap(), Commit::Idle));
}

#[test]
fn rollover_seals_the_old_segment_durably() {
    // Filling the first 1 MiB segment rolls over to a second whose base is the first's end; the
    // old segment is synced at rollover, so durable() reaches its last entry without a commit, and
    // a job afterwards only names the new segment.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let mut last_in_first = None;
    let mut i = 0;
    while log.stats().segments == 1 {
        let p = log.append(&hb("dev", i), None).unwrap();
        if log.stats().segments == 1 {
            last_in_first = Some(p);
        }
        i += 1;
    }
    let last_in_first = last_in_first.unwrap();
    assert!(log.durable() > last_in_first);
    assert_eq!(log.segments[1].base, SEGMENT_BYTES_MIN);
    assert_eq!(log.segments[1].first_seq, log.next_seq() - 1);
    let Commit::Sync(job) = log.commit_begin().unwrap() else {
        panic!("expected a job")
    };
    assert_eq!(job.files().len(), 1);
    assert_eq!(job.files()[0].base(), LogPos(SEGMENT_BYTES_MIN));
    let res = job.run_blocking();
    log.commit_end(job, res).unwrap();
    // Scans cross the segment boundary in order.
    let seqs: Vec<u64> = log
        .scan_from(LogPos(0), ScanEnd::Durable)
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (FIRST_SEQ..log.next_seq()).collect::<Vec<_>>());
}

#[test]
fn scan_stops_at_durable_and_resumes() {
    // A scan bounded by durable() stops before unsynced entries; next_pos() resumes exactly there.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    for i in 0..5 {
        log.append(&hb("a", i), None).unwrap();
    }
    log.sync_blocking().unwrap();
    for i in 5..8 {
        log.append(&hb("a", i), None).unwrap();
    }
    let mut scan = log.scan_from(LogPos(0), ScanEnd::Durable);
    assert_eq!(scan.by_ref().count(), 5);
    let resume = scan.next_pos();
    assert!(!scan.hit_damage());
    assert_eq!(resume, log.durable());
    let rest: Vec<i64> = log
        .scan_from(resume, ScanEnd::Written)
        .map(|e| e.hb.ts_ms.to_native())
        .collect();
    assert_eq!(rest, vec![5, 6, 7]);
    // A position that is not an entry boundary is reported as damage, not skipped.
    let mut odd = log.scan_from(LogPos(resume.0 + 8), ScanEnd::Written);
    assert!(odd.next().is_none());
    assert!(odd.hit_damage());
}

#[test]
fn second_open_of_a_shard_is_refused() {
    // The shard directory lock keeps a second log (e.g. another process) from opening it.
    let dir = tempfile::tempdir().unwrap();
    let _log = open(dir.path());
    let err = Log::open(&cfg(dir.path()), |_, _| {}).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[test]
fn log_encoding_matches_the_record_encoding() {
    // The log's arena-based encoder must produce exactly Heartbeat::encode_into's bytes.
    let mut arena = Arena::new();
    let mut ours = AlignedVec::new();
    let mut theirs = AlignedVec::new();
    let mut h = hb("some-device-id-long-enough", 123);
    h.attrs = br#"{"k":1}"#.to_vec();
    h.speed_mps = Some(3.5);
    for _ in 0..3 {
        encode(&mut arena, &mut ours, &h);
        h.encode_into(&mut theirs);
        assert_eq!(ours.as_slice(), theirs.as_slice());
    }
}
