//! Fills a fresh data directory with heartbeats for timing `geobeat reshard` (see
//! perf/RESULTS.md): `cargo run --release --example reshard_fill -- DIR SHARDS DEVICES ROUNDS`.
//! Writes through the same store API as the server (format 2, default routing), with a 40-byte
//! attribute blob on every heartbeat, and syncs at the end.

use geobeat::datadir::DataDir;
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, shards, devices, rounds] = args.as_slice() else {
        eprintln!("usage: reshard_fill DIR SHARDS DEVICES ROUNDS");
        std::process::exit(2);
    };
    let shards: u32 = shards.parse().expect("SHARDS");
    let devices: usize = devices.parse().expect("DEVICES");
    let rounds: i64 = rounds.parse().expect("ROUNDS");
    let dd = DataDir::open_or_create(dir, shards).expect("data dir");
    let mut stores: Vec<ShardStore> = (0..dd.shard_count())
        .map(|k| {
            let cfg = StoreConfig::new(dd.shard_dir(ShardId(k)), ShardId(k));
            ShardStore::open(&cfg).expect("open shard").0
        })
        .collect();
    let ids: Vec<String> = (0..devices).map(|i| format!("truck-{i:07}")).collect();
    let t0 = 1_764_000_000_000i64;
    let started = std::time::Instant::now();
    for r in 0..rounds {
        for (i, id) in ids.iter().enumerate() {
            let hb = Heartbeat {
                device_id: id.clone(),
                lat: 48.0 + (i % 1000) as f64 * 1e-3,
                lon: 11.0 + r as f64 * 1e-4,
                ts_ms: t0 + r * 1000,
                received_ms: t0 + r * 1000 + 5,
                speed_mps: Some(12.5),
                heading_deg: Some(90.0),
                attrs: br#"{"fuel":0.5,"door":"closed","temp":4.25}"#.to_vec(),
                ..Heartbeat::default()
            };
            let k = dd.router().shard_of(id).0 as usize;
            stores[k].append(&hb).expect("append");
        }
    }
    for s in &mut stores {
        s.sync_blocking().expect("sync");
    }
    println!(
        "{} heartbeats into {} shards in {:.2} s",
        devices as i64 * rounds,
        dd.shard_count(),
        started.elapsed().as_secs_f64()
    );
}
