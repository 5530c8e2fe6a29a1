//! Geofence lookups on the ingest hot path: `FenceSet::containing` and `FenceSet::transitions`
//! per heartbeat with 10,000 fences (circles of 100 m to 5 km and polygons of 5 to 50 vertices,
//! a third packed into a city, the rest over a country, plus a few huge ones: a country-sized
//! polygon, continent-sized circles, a polar cap and one across the antimeridian; half the
//! devices are in the city, where a point lies in ~50 overlapping fences), the same without the
//! city cluster ("sparse": every small fence spread over the country), and with no
//! fences at all (the cost every heartbeat pays once fences are enabled but none exist). Also
//! measures building the 10,000-fence index (what every PUT/DELETE pays).
//!
//!
//! Worst case the limits allow (issue 20 §5): FENCE_VERTICES_TOTAL_MAX / FENCE_VERTICES_MAX = 100
//! polygons of FENCE_VERTICES_MAX positions all overlapping, one point at a time on their
//! boundaries, with the polygon grids (`FenceSet::new`) and without them
//! (`FenceSet::with_grid_min(.., usize::MAX)`: every edge tested, as before the grids): "ring",
//! near-circles shifted by 1e-6° each, points on their edges; "comb", vertical combs whose 2,500
//! teeth cross every row (the most edges per row the grid must split by columns), points anywhere
//! in their box. Also the build of that set and `validate_rings` at FENCE_VERTICES_MAX.
//!
//! Run: `cargo bench --bench fence -- --warm-up-time 1 --measurement-time 3` (about a minute).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use geobeat::fence::{validate_rings, Fence, FenceId, FenceSet, Scratch, Shape};
use geobeat::limits::{FENCE_VERTICES_MAX, FENCE_VERTICES_TOTAL_MAX};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FENCES: usize = 10_000;
/// Country: 47..55 N, 6..15 E (about 900 x 650 km). City: 52.35..52.65 N, 13.1..13.7 E.
const COUNTRY: (f64, f64, f64, f64) = (47.0, 55.0, 6.0, 15.0);
const CITY: (f64, f64, f64, f64) = (52.35, 52.65, 13.1, 13.7);
const M_PER_DEG: f64 = 111_195.0;

fn in_area(rng: &mut StdRng, a: (f64, f64, f64, f64)) -> (f64, f64) {
    (rng.gen_range(a.0..a.1), rng.gen_range(a.2..a.3))
}

/// A star-shaped polygon of `n` vertices with radius up to `r_m` metres around `(lat, lon)`.
fn polygon(rng: &mut StdRng, lat: f64, lon: f64, n: usize, r_m: f64) -> Shape {
    let k = 1.0 / lat.to_radians().cos();
    let mut ring: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let a = i as f64 / n as f64 * std::f64::consts::TAU;
            let r = r_m * rng.gen_range(0.4..1.0) / M_PER_DEG;
            (lon + r * k * a.cos(), lat + r * a.sin())
        })
        .collect();
    ring.push(ring[0]);
    Shape::Polygon { rings: vec![ring] }
}

/// The fences; `city_share` of the small ones (1 in `city_share`) is packed into the city.
fn fences(rng: &mut StdRng, city_share: usize) -> Vec<Fence> {
    let mut v = Vec::with_capacity(FENCES);
    let huge = [
        polygon(rng, 51.0, 10.5, 40, 400_000.0),
        Shape::Circle {
            lon: 10.0,
            lat: 50.0,
            radius_m: 1_500_000.0,
        },
        Shape::Circle {
            lon: 0.0,
            lat: 90.0,
            radius_m: 2_000_000.0,
        },
        Shape::Circle {
            lon: 180.0,
            lat: 0.0,
            radius_m: 1_000_000.0,
        },
        Shape::Circle {
            lon: 20.0,
            lat: 45.0,
            radius_m: 5_000_000.0,
        },
    ];
    for (i, shape) in huge.into_iter().enumerate() {
        v.push(Fence {
            name: format!("huge-{i}"),
            shape,
        });
    }
    while v.len() < FENCES {
        let i = v.len();
        let area = if i % city_share == 0 { CITY } else { COUNTRY };
        let (lat, lon) = in_area(rng, area);
        let shape = if i % 5 < 3 {
            Shape::Circle {
                lon,
                lat,
                radius_m: rng.gen_range(100.0..5_000.0),
            }
        } else {
            let n = rng.gen_range(5..=50);
            let r_m = rng.gen_range(100.0..5_000.0);
            polygon(rng, lat, lon, n, r_m)
        };
        v.push(Fence {
            name: format!("f-{i:05}"),
            shape,
        });
    }
    // Every generated fence is valid as the HTTP layer would parse it.
    for f in &v {
        Fence::parse(&f.name, f.to_json().as_bytes()).expect("valid bench fence");
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(6);
    let list = fences(&mut rng, 3);
    let set = FenceSet::new(list.clone());
    let sparse = FenceSet::new(fences(&mut rng, usize::MAX));
    let empty = FenceSet::empty();
    // Devices: half in the city, half over the country; each then moves about 30 m.
    let points: Vec<(f64, f64)> = (0..4096)
        .map(|i| in_area(&mut rng, if i % 2 == 0 { CITY } else { COUNTRY }))
        .collect();
    let moved: Vec<(f64, f64)> = points
        .iter()
        .map(|&(lat, lon)| {
            (
                lat + rng.gen_range(-30.0..30.0) / M_PER_DEG,
                lon + rng.gen_range(-45.0..45.0) / M_PER_DEG,
            )
        })
        .collect();
    let mut out: Vec<FenceId> = Vec::new();
    let mut sc = Scratch::new();
    for (label, s) in [("10k", &set), ("10k_sparse", &sparse)] {
        let hits: usize = points
            .iter()
            .map(|&(lat, lon)| {
                s.containing(lat, lon, &mut out);
                out.len()
            })
            .sum();
        let mut changes = 0usize;
        for (p, q) in points.iter().zip(&moved) {
            s.transitions(Some(*p), *q, &mut sc, |_, _| changes += 1);
        }
        println!(
            "{label}: {} fences, {} index entries; a point is in {:.2} fences on average; \
             {:.4} transitions per 30 m move",
            s.len(),
            s.index_entries(),
            hits as f64 / points.len() as f64,
            changes as f64 / points.len() as f64
        );
    }

    // The machine is shared: wall-clock figures include time other processes held the core. The
    // thread's CPU time per call is printed too, as a figure that excludes that.
    let calls = 200_000usize;
    let per_call_cpu_ns = |f: &mut dyn FnMut(usize)| {
        let t0 = thread_cpu_ns();
        for i in 0..calls {
            f(i & 4095);
        }
        (thread_cpu_ns() - t0) as f64 / calls as f64
    };
    for (label, s) in [("10k", &set), ("10k_sparse", &sparse), ("0", &empty)] {
        let a = per_call_cpu_ns(&mut |k| {
            s.containing(points[k].0, points[k].1, &mut out);
            black_box(out.len());
        });
        let b = per_call_cpu_ns(&mut |k| {
            s.transitions(Some(points[k]), moved[k], &mut sc, |_, _| {});
        });
        let c = per_call_cpu_ns(&mut |k| s.transitions(None, points[k], &mut sc, |_, _| {}));
        println!(
            "thread CPU time per call, {label} fences: containing {a:.1} ns, \
             transitions(move 30 m) {b:.1} ns, transitions(first) {c:.1} ns"
        );
    }

    let mut g = c.benchmark_group("fence");
    for (label, s) in [("10k", &set), ("10k_sparse", &sparse), ("0", &empty)] {
        let mut i = 0usize;
        g.bench_function(format!("containing_{label}"), |b| {
            b.iter(|| {
                let (lat, lon) = points[i & 4095];
                i += 1;
                s.containing(black_box(lat), black_box(lon), &mut out);
                black_box(out.len())
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("transitions_move30m_{label}"), |b| {
            b.iter(|| {
                let k = i & 4095;
                i += 1;
                let mut n = 0u32;
                s.transitions(Some(points[k]), moved[k], &mut sc, |_, _| n += 1);
                black_box(n)
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("transitions_first_{label}"), |b| {
            b.iter(|| {
                let k = i & 4095;
                i += 1;
                let mut n = 0u32;
                s.transitions(None, points[k], &mut sc, |_, _| n += 1);
                black_box(n)
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("fence_build");
    g.sample_size(10);
    g.bench_function("index_10k", |b| {
        b.iter(|| black_box(FenceSet::new(list.clone()).len()))
    });
    g.finish();
}

/// This thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A near-circle of `n` positions (closing one included), radius 1° around (50 N, 10 E) + `d`.
fn ring(n: usize, d: f64) -> Vec<(f64, f64)> {
    let mut r: Vec<(f64, f64)> = (0..n - 1)
        .map(|i| {
            let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
            (10.0 + d + a.cos(), 50.0 + d + a.sin())
        })
        .collect();
    r.push(r[0]);
    r
}

/// A comb of `n` positions over 10..12 E, 49..51 N (+ `d`): a spine along the bottom and
/// vertical teeth 0.0004° wide reaching the top, so every tooth edge spans every row.
fn comb(n: usize, d: f64) -> Vec<(f64, f64)> {
    let teeth = (n - 3) / 4;
    let w = 2.0 / teeth as f64;
    let (x0, y0) = (10.0 + d, 49.0 + d);
    let mut r = vec![(x0, y0 - 0.01)];
    for k in 0..teeth {
        let x = x0 + k as f64 * w;
        r.extend([
            (x, y0 + 2.0),
            (x + w / 2.0, y0 + 2.0),
            (x + w / 2.0, y0),
            (x + w, y0),
        ]);
    }
    r.push((x0 + 2.0, y0 - 0.01));
    r.push(r[0]);
    r
}

/// The worst case of issue 20 §5 (see the module docs).
fn worst(c: &mut Criterion) {
    let count = FENCE_VERTICES_TOTAL_MAX / FENCE_VERTICES_MAX;
    let n = FENCE_VERTICES_MAX;
    let t = std::time::Instant::now();
    validate_rings(&[ring(n, 0.0)]).expect("valid ring");
    let v_ring = t.elapsed();
    let t = std::time::Instant::now();
    validate_rings(&[comb(n, 0.0)]).expect("valid comb");
    let v_comb = t.elapsed();
    // The comb turned on its side: every tooth overlaps every other in longitude, the sweep's
    // worst case (each edge compared with all earlier ones still active).
    let side: Vec<(f64, f64)> = comb(n, 0.0)
        .iter()
        .map(|&(x, y)| (y - 39.0, x + 39.0))
        .collect();
    let t = std::time::Instant::now();
    validate_rings(&[side]).expect("valid comb on its side");
    let v_side = t.elapsed();
    println!(
        "validate_rings at {n} positions: ring {:.2} ms, comb {:.2} ms, comb on its side {:.2} ms",
        v_ring.as_secs_f64() * 1e3,
        v_comb.as_secs_f64() * 1e3,
        v_side.as_secs_f64() * 1e3
    );
    let mut rng = StdRng::seed_from_u64(20);
    let mut g = c.benchmark_group("fence_worst");
    for (label, shape) in [("ring", ring as fn(usize, f64) -> _), ("comb", comb)] {
        let fences: Vec<Fence> = (0..count)
            .map(|i| Fence {
                name: format!("w-{i:03}"),
                shape: Shape::Polygon {
                    rings: vec![shape(n, i as f64 * 1e-6)],
                },
            })
            .collect();
        let t = std::time::Instant::now();
        let set = FenceSet::new(fences.clone());
        let built = t.elapsed();
        let plain = FenceSet::with_grid_min(fences, usize::MAX);
        assert!(set.vertices_total() >= FENCE_VERTICES_TOTAL_MAX - count);
        let points: Vec<(f64, f64)> = if label == "ring" {
            // Midpoints of fence 0's edges: a boundary cell of every fence.
            let r = ring(n, 0.0);
            (0..4096)
                .map(|_| {
                    let k = rng.gen_range(0..n - 1);
                    ((r[k].1 + r[k + 1].1) / 2.0, (r[k].0 + r[k + 1].0) / 2.0)
                })
                .collect()
        } else {
            (0..4096)
                .map(|_| (rng.gen_range(49.0..51.0), rng.gen_range(10.0..12.0)))
                .collect()
        };
        let mut out: Vec<FenceId> = Vec::new();
        let mut want: Vec<FenceId> = Vec::new();
        let mut hits = 0usize;
        for &(lat, lon) in &points {
            set.containing(lat, lon, &mut out);
            plain.containing(lat, lon, &mut want);
            assert_eq!(out, want, "{label} {lat},{lon}");
            hits += out.len();
        }
        let st = set.grid_stats();
        println!(
            "worst {label}: {count} fences x {n} positions built in {:.0} ms; {} cells, {} boundary, \
             at most {} spanning edges per cell and {} partial edges per row; a point is in \
             {:.1} fences",
            built.as_secs_f64() * 1e3,
            st.cells,
            st.boundary_cells,
            st.cell_edges_max,
            st.row_partials_max,
            hits as f64 / points.len() as f64
        );
        for (which, s) in [("grid", &set), ("no_grid", &plain)] {
            let calls = if which == "grid" { 20_000 } else { 200 };
            let t0 = thread_cpu_ns();
            for i in 0..calls {
                let (lat, lon) = points[i & 4095];
                s.containing(lat, lon, &mut out);
                black_box(out.len());
            }
            let ns = (thread_cpu_ns() - t0) as f64 / calls as f64;
            println!("thread CPU time per call, worst {label} {which}: containing {ns:.0} ns");
            let mut i = 0usize;
            if which == "no_grid" {
                g.sample_size(10);
            } else {
                g.sample_size(100);
            }
            g.bench_function(format!("containing_{label}_{which}"), |b| {
                b.iter(|| {
                    let (lat, lon) = points[i & 4095];
                    i += 1;
                    s.containing(black_box(lat), black_box(lon), &mut out);
                    black_box(out.len())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench, worst);
criterion_main!(benches);
