//! Decode throughput of device frames (heartbeats per second per core): JSON text frames (one
//! object; an array of 100) and binary frames (100), each through a warmed-up `Decoder`, with a
//! borrowed-serde_json parse of the same array as a reference point. Run:
//! `cargo bench --bench proto` (about 30 s).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use geobeat::proto::{binary, json, Decoder, Ingest, IngestScope, Seq};
use geobeat::record::Heartbeat;

const NOW: i64 = 1_732_200_000_000;
const BATCH: usize = 100;

fn heartbeat(i: usize, attrs: bool) -> Heartbeat {
    Heartbeat {
        device_id: format!("fleet-{:06}", i),
        lat: 52.520008 + i as f64 * 1e-5,
        lon: 13.404954 - i as f64 * 1e-5,
        ts_ms: NOW - 1500 + i as i64,
        received_ms: NOW,
        alt_m: Some(34.5),
        speed_mps: Some(12.25),
        heading_deg: Some(271.5),
        acc_m: Some(4.0),
        attrs: if attrs {
            br#"{"fuel":0.42,"door":"closed","temp_c":21.5}"#.to_vec()
        } else {
            Vec::new()
        },
    }
}

/// What a borrowed serde parse of the same frame would look like (reference only).
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Borrowed<'a> {
    seq: u64,
    #[serde(borrow)]
    id: Option<&'a str>,
    lat: f64,
    lon: f64,
    ts: i64,
    alt: Option<f32>,
    speed: Option<f32>,
    heading: Option<f32>,
    acc: Option<f32>,
    #[serde(borrow)]
    attrs: Option<&'a serde_json::value::RawValue>,
}

fn bench(c: &mut Criterion) {
    let ing = Ingest::new(IngestScope::Gateway("fleet-"), NOW);
    let mut dec = Decoder::new();
    let mut group = c.benchmark_group("decode");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);

    for attrs in [false, true] {
        let hbs: Vec<Heartbeat> = (0..BATCH).map(|i| heartbeat(i, attrs)).collect();
        let items = || hbs.iter().enumerate().map(|(i, h)| (Seq(i as u64 + 1), h));
        let suffix = if attrs { "_attrs" } else { "" };

        let mut text = String::new();
        json::encode_frame(&mut text, items()).unwrap();
        let mut bin = Vec::new();
        binary::encode_frame(&mut bin, items()).unwrap();
        let mut single = String::new();
        json::encode_frame(&mut single, items().take(1)).unwrap();

        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(format!("json_array{BATCH}{suffix}"), |b| {
            b.iter(|| black_box(dec.decode_text(black_box(&text), &ing).unwrap().len()))
        });
        group.bench_function(format!("binary_array{BATCH}{suffix}"), |b| {
            b.iter(|| black_box(dec.decode_binary(black_box(&bin), &ing).unwrap().len()))
        });
        group.bench_function(format!("serde_borrowed_array{BATCH}{suffix}"), |b| {
            b.iter(|| {
                let v: Vec<Borrowed<'_>> = serde_json::from_str(black_box(&text)).unwrap();
                black_box(v.len())
            })
        });
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("json_single{suffix}"), |b| {
            b.iter(|| black_box(dec.decode_text(black_box(&single), &ing).unwrap().len()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
