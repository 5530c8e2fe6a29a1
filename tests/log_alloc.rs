//! The hot paths allocate nothing per heartbeat: a counting global allocator checks that appending
//! heartbeats of known devices through the store (log append + table update) makes no heap
//! allocation once warm, and that recovering a log allocates the same amount whether it holds 1k
//! or 5k entries (nothing per entry).

mod counting_alloc;
use counting_alloc::allocations_during;

use geobeat::limits::SEGMENT_BYTES_MIN;
use geobeat::log::{Log, LogConfig};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};

fn hbs(devices: usize) -> Vec<Heartbeat> {
    (0..devices)
        .map(|i| Heartbeat {
            device_id: format!("device-{i:012}x"),
            lat: 1.0,
            lon: 2.0,
            ts_ms: i as i64,
            received_ms: i as i64,
            attrs: b"{\"a\":1}".to_vec(),
            ..Heartbeat::default()
        })
        .collect()
}

#[test]
fn appends_and_recovery_do_not_allocate_per_heartbeat() {
    // Part 1: 4k appends of 100 known devices after a warm-up append of each: zero allocations.
    // Part 2: recovering 1k and 5k entries costs the same number of allocations.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        segment_bytes: 4 * SEGMENT_BYTES_MIN,
        ..StoreConfig::new(tmp.path().join("a"), ShardId(0))
    };
    let (mut store, _) = ShardStore::open(&cfg).unwrap();
    let hbs = hbs(100);
    for hb in &hbs {
        store.append(hb).unwrap();
    }
    let n = allocations_during(|| {
        for i in 0..4_000 {
            store.append(&hbs[i % hbs.len()]).unwrap();
        }
    });
    assert_eq!(n, 0, "allocations during 4k warm appends");
    drop(store);

    let recover = |entries: usize| -> usize {
        let dir = tmp.path().join(format!("r{entries}"));
        let cfg = LogConfig {
            dir: dir.clone(),
            shard: ShardId(0),
            segment_bytes: 4 * SEGMENT_BYTES_MIN,
            write_mode: geobeat::log::WriteMode::default(),
        };
        let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
        for i in 0..entries {
            log.append(&hbs[i % hbs.len()], None).unwrap();
        }
        log.sync_blocking().unwrap();
        drop(log);
        let mut seen = 0;
        let n = allocations_during(|| {
            let (log, _) = Log::open(&cfg, |_, _| seen += 1).unwrap();
            drop(log);
        });
        assert_eq!(seen, entries);
        n
    };
    let small = recover(1_000);
    let large = recover(5_000);
    assert_eq!(
        small, large,
        "recovery allocations grow with the entry count"
    );
}
