//! The last-location table at one million devices: lookups, updates of existing devices, and the
//! bytes it holds per device (printed once; the target is at most 64 bytes plus the id's bytes).
//!
//! Run: `cargo bench --bench table` (about 15 s).

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use geobeat::log::LogPos;
use geobeat::table::{LastLocationTable, Observation};

const DEVICES: usize = 1_000_000;

fn id(i: usize) -> String {
    format!("device-{i:012}x")
}

fn obs(i: usize, ts_ms: i64) -> Observation {
    Observation {
        lat: 52.0 + (i % 1000) as f64 * 1e-4,
        lon: 13.0,
        ts_ms,
        received_ms: ts_ms + 40,
        pos: LogPos(4096 + i as u64 * 136),
    }
}

fn table(c: &mut Criterion) {
    let ids: Vec<String> = (0..DEVICES).map(id).collect();
    let mut t = LastLocationTable::new();
    for (i, id) in ids.iter().enumerate() {
        t.observe(id, &obs(i, 1)).expect("observe");
    }
    let id_bytes: usize = ids.iter().map(String::len).sum();
    let per_device = t.heap_bytes() as f64 / DEVICES as f64;
    let overhead = (t.heap_bytes() - id_bytes) as f64 / DEVICES as f64;
    println!(
        "table: {DEVICES} devices, heap {} bytes = {per_device:.1} B/device ({overhead:.1} B/device + {:.1} id bytes)",
        t.heap_bytes(),
        id_bytes as f64 / DEVICES as f64
    );

    let mut g = c.benchmark_group("table_1m");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // A fixed pseudo-random walk over the ids so lookups miss the cache like real traffic.
    let order: Vec<usize> = (0..DEVICES).map(|i| (i * 7_919 + 13) % DEVICES).collect();
    let mut k = 0usize;
    g.bench_function("get", |b| {
        b.iter(|| {
            k = (k + 1) % DEVICES;
            black_box(t.get(&ids[order[k]]))
        })
    });
    let mut ts = 2i64;
    g.bench_function("observe_existing", |b| {
        b.iter(|| {
            k = (k + 1) % DEVICES;
            ts += 1;
            t.observe(&ids[order[k]], &obs(order[k], ts))
                .expect("observe")
        })
    });
    g.finish();
    c.bench_function("table_build_1m", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let mut t = LastLocationTable::new();
                for (i, id) in ids.iter().enumerate() {
                    t.observe(id, &obs(i, 1)).expect("observe");
                }
                black_box(t.len());
            }
            start.elapsed()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = table
}
criterion_main!(benches);
