//! Area queries on one shard store holding one million devices spread over Europe: a bbox that
//! contains about 1,000 of them (target: under 5 ms), the same through the multi-shard merge, a
//! `near` query of similar size, and an antimeridian-crossing box. Also reports the spatial
//! index's bytes per device.
//!
//! Run: `cargo bench --bench query` (about 1 minute, most of it building the fleet).

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use geobeat::query::{area, merge_area, Area};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::spatial::BBox;
use geobeat::store::{ShardStore, StoreConfig};
use rand::{Rng, SeedableRng};

const DEVICES: usize = 1_000_000;

fn queries(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(dir.path(), ShardId(0));
    cfg.segment_bytes = 256 << 20;
    let (mut store, _) = ShardStore::open(&cfg).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut hb = Heartbeat::default();
    // Europe-sized area: 35..70 N, -10..40 E (35 x 50 degrees), uniform.
    for i in 0..DEVICES {
        hb.device_id.clear();
        hb.device_id.push_str(&format!("dev-{i:07}"));
        hb.lat = rng.gen_range(35.0..70.0);
        hb.lon = rng.gen_range(-10.0..40.0);
        hb.ts_ms = 1_800_000_000_000 + i as i64;
        hb.received_ms = hb.ts_ms;
        store.append(&hb).unwrap();
    }
    // 1,000 of 1M uniformly over 1,750 square degrees: a box of 1.75 square degrees.
    let b = BBox::new(10.0, 50.0, 11.25, 51.4).unwrap();
    let n = area(&store, &Area::BBox(b), 10_000).len();
    println!(
        "bbox holds {n} devices; grid {} bytes = {:.1} B/device",
        store.grid().heap_bytes(),
        store.grid().heap_bytes() as f64 / DEVICES as f64
    );
    let mut g = c.benchmark_group("area_1M");
    g.measurement_time(Duration::from_secs(5)).sample_size(30);
    g.bench_function("bbox_1000", |bch| {
        bch.iter(|| black_box(area(&store, &Area::BBox(b), 1000)))
    });
    g.bench_function("bbox_1000_merged", |bch| {
        bch.iter(|| black_box(merge_area(vec![area(&store, &Area::BBox(b), 1000)], 1000)))
    });
    let near = Area::Near {
        lat: 50.7,
        lon: 10.6,
        radius_m: 75_000.0,
    };
    println!("near holds {} devices", area(&store, &near, 10_000).len());
    g.bench_function("near_75km", |bch| {
        bch.iter(|| black_box(area(&store, &near, 1000)))
    });
    let crossing = BBox::new(179.0, -10.0, -179.0, 10.0).unwrap();
    g.bench_function("bbox_antimeridian_empty", |bch| {
        bch.iter(|| black_box(area(&store, &Area::BBox(crossing), 1000)))
    });
    g.finish();
}

criterion_group!(benches, queries);
criterion_main!(benches);
