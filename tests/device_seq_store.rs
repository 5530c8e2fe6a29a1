//! Issue 18 at the store level: deduplication by device sequence and by device time in
//! `ShardStore::append_dedupe`, the wait position a duplicate's ack must wait for, the device's
//! exactly-once state rebuilt from the log's entry trailers at reopen, and kept through retention
//! by the exactly-once snapshot (`device-seqs.ckpt`) once the entries that carried it are deleted.

use std::path::Path;
use std::time::{Duration, SystemTime};

use geobeat::checkpoint::AUDITS_FILE;
use geobeat::limits::{DEDUPE_DEVICE_TIME_ENTRIES_MAX, DEVICE_SEQ_WINDOW};
use geobeat::record::{DeviceSeq, Heartbeat};
use geobeat::route::ShardId;
use geobeat::store::{Dedupe, Outcome, ShardStore, StoreConfig};

const BASE_MS: i64 = 1_800_000_000_000;

fn open(dir: &Path) -> ShardStore {
    let mut cfg = StoreConfig::new(dir, ShardId(0));
    cfg.segment_bytes = 1 << 20;
    ShardStore::open(&cfg).unwrap().0
}

fn hb(id: &str, ts: i64) -> Heartbeat {
    Heartbeat {
        device_id: id.into(),
        lat: 1.0,
        lon: 2.0,
        ts_ms: ts,
        received_ms: ts,
        ..Default::default()
    }
}

fn stored(o: Outcome) -> bool {
    matches!(o, Outcome::Stored(_))
}

#[test]
fn sequences_survive_reopen_and_retention_and_duplicates_wait_for_their_original() {
    // seq-dev sends 1..=10 of epoch 2 without 4; a resend of 5 is a duplicate whose ack must
    // wait for the mark's entry (not durable yet). Reopening rebuilds mark and gaps from the
    // entries' trailers. Other devices then fill segments and retention deletes every entry of
    // seq-dev: the snapshot keeps its state (a resend of 7 is still a duplicate, 4 still fills
    // its hole); without the snapshot the state would be gone (checked by removing it).
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let dev = "seq-dev";
    let mut mark_pos = None;
    for s in (1..=10u64).filter(|s| *s != 4) {
        match store
            .append_dedupe(&hb(dev, BASE_MS + s as i64), s, Dedupe::Seq(2))
            .unwrap()
        {
            Outcome::Stored(a) => mark_pos = Some(a.pos),
            other => panic!("{s}: {other:?}"),
        }
    }
    let mark_pos = mark_pos.unwrap();
    match store
        .append_dedupe(&hb(dev, BASE_MS + 5), 5, Dedupe::Seq(2))
        .unwrap()
    {
        Outcome::Duplicate(wait) => {
            assert_eq!(wait, mark_pos);
            assert!(store.durable() <= wait, "the original is not durable yet");
        }
        other => panic!("{other:?}"),
    }
    store.sync_blocking().unwrap();
    assert!(store.durable() > mark_pos);
    let a = store.audit(dev).unwrap();
    assert_eq!(
        (a.mark, a.gaps(), a.duplicates),
        (Some(DeviceSeq { epoch: 2, seq: 10 }), 1, 1)
    );
    let e = store.log().read(mark_pos).unwrap();
    assert_eq!(
        e.dseq,
        Some(DeviceSeq { epoch: 2, seq: 10 }),
        "the entry carries its sequence"
    );
    drop(store);

    let mut store = open(dir.path());
    let a = store.audit(dev).unwrap();
    assert_eq!(
        (a.mark, a.gaps(), a.duplicates),
        (Some(DeviceSeq { epoch: 2, seq: 10 }), 1, 0)
    );
    // Fill segments with other devices, then retention of zero deletes all sealed segments.
    let mut i = 0u64;
    let target = store.stats().segments + 3;
    while store.stats().segments < target {
        store
            .append(&hb(&format!("busy-{}", i % 50), BASE_MS + i as i64))
            .unwrap();
        i += 1;
    }
    store.sync_blocking().unwrap();
    store
        .delete_expired(SystemTime::now(), Duration::ZERO)
        .unwrap();
    assert!(
        store.log().read(mark_pos).is_none(),
        "seq-dev's entries are gone"
    );
    assert!(dir.path().join(AUDITS_FILE).is_file());
    drop(store);

    let copy = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if f.file_name() != "LOCK" {
            std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
        }
    }
    let mut store = open(dir.path());
    let a = store.audit(dev).unwrap();
    // (Duplicates are not in the log: the count restarted at the previous reopen, and the
    // snapshot kept that.)
    assert_eq!(
        (a.mark, a.gaps(), a.duplicates),
        (Some(DeviceSeq { epoch: 2, seq: 10 }), 1, 0)
    );
    assert!(!stored(
        store
            .append_dedupe(&hb(dev, BASE_MS + 7), 7, Dedupe::Seq(2))
            .unwrap()
    ));
    assert!(stored(
        store
            .append_dedupe(&hb(dev, BASE_MS + 4), 4, Dedupe::Seq(2))
            .unwrap()
    ));
    assert_eq!(
        store.audit(dev).unwrap().gaps(),
        0,
        "the late 4 filled its hole"
    );
    drop(store);

    // The same directory without its snapshot has forgotten seq-dev's mark.
    std::fs::remove_file(copy.path().join(AUDITS_FILE)).unwrap();
    let store = open(copy.path());
    assert_eq!(store.audit(dev), None);
}

#[test]
fn window_bounds_reordering() {
    // A number more than the window below the mark is a duplicate even if never stored; one
    // just inside the window is stored.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let top = 1000u64;
    assert!(stored(
        store
            .append_dedupe(&hb("w", BASE_MS), top, Dedupe::Seq(0))
            .unwrap()
    ));
    let inside = top - DEVICE_SEQ_WINDOW;
    let outside = inside - 1;
    assert!(stored(
        store
            .append_dedupe(&hb("w", BASE_MS + 1), inside, Dedupe::Seq(0))
            .unwrap()
    ));
    assert!(!stored(
        store
            .append_dedupe(&hb("w", BASE_MS + 2), outside, Dedupe::Seq(0))
            .unwrap()
    ));
    let a = store.audit("w").unwrap();
    assert_eq!((a.gaps(), a.duplicates), (top - 2, 1));
}

#[test]
fn device_time_dedupe_covers_the_last_entries_of_the_device() {
    // An HTTP app's resend (same device time) is a duplicate while its original is among the
    // device's last DEDUPE_DEVICE_TIME_ENTRIES_MAX stored entries, and stored again after.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let first = store
        .append_dedupe(&hb("app", BASE_MS), 0, Dedupe::DeviceTime)
        .unwrap();
    let Outcome::Stored(orig) = first else {
        panic!()
    };
    assert_eq!(
        store
            .append_dedupe(&hb("app", BASE_MS), 0, Dedupe::DeviceTime)
            .unwrap(),
        Outcome::Duplicate(orig.pos)
    );
    for k in 1..DEDUPE_DEVICE_TIME_ENTRIES_MAX as i64 {
        assert!(stored(
            store
                .append_dedupe(&hb("app", BASE_MS + k), 0, Dedupe::DeviceTime)
                .unwrap()
        ));
    }
    assert!(!stored(
        store
            .append_dedupe(&hb("app", BASE_MS), 0, Dedupe::DeviceTime)
            .unwrap()
    ));
    assert!(stored(
        store
            .append_dedupe(&hb("app", BASE_MS + 100), 0, Dedupe::DeviceTime)
            .unwrap()
    ));
    // Now the original is 17 entries back: stored again.
    assert!(stored(
        store
            .append_dedupe(&hb("app", BASE_MS), 0, Dedupe::DeviceTime)
            .unwrap()
    ));
    assert_eq!(store.audit("app").unwrap().duplicates, 2);
    assert_eq!(store.audit("app").unwrap().mark, None);
}
