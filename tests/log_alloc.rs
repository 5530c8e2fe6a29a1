//! The hot paths allocate nothing per heartbeat: a counting global allocator checks that appending
//! heartbeats of known devices through the store (log append + table update) makes no heap
//! allocation once warm, and that recovering a log allocates the same amount whether it holds 1k
//! or 5k entries (nothing per entry).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use geobeat::limits::SEGMENT_BYTES_MIN;
use geobeat::log::{Log, LogConfig};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCS.load(Ordering::Relaxed);
    f();
    ALLOCS.load(Ordering::Relaxed) - before
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
