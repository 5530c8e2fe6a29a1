//! Fence lookups run on the ingest hot path for every heartbeat, so they must not allocate: a
//! counting global allocator checks that `FenceSet::containing` and `FenceSet::transitions` make
//! no heap allocation once their output buffers are warm, with thousands of fences of every size
//! (and polygons large enough to get a grid of their own).

mod counting_alloc;
use counting_alloc::allocations_during;

use geobeat::fence::{Fence, FenceSet, Scratch, Shape};

/// A deterministic pseudo-random sequence in [0, 1) (no RNG state to allocate).
fn unit(i: u64) -> f64 {
    let x = i
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(29)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[test]
fn containing_and_transitions_do_not_allocate_when_warm() {
    // 3,000 overlapping circles and polygons in a 1° square plus huge and antimeridian ones; after
    // one warm-up pass over 1,000 points, a second pass of containing + transitions allocates 0.
    let mut fences = Vec::new();
    for i in 0..3_000u64 {
        let (lat, lon) = (50.0 + unit(2 * i), 10.0 + unit(2 * i + 1));
        let shape = if i % 2 == 0 {
            Shape::Circle {
                lon,
                lat,
                radius_m: 100.0 + 5_000.0 * unit(i + 7),
            }
        } else {
            let d = 0.01 + 0.05 * unit(i + 9);
            Shape::Polygon {
                rings: vec![vec![
                    (lon, lat),
                    (lon + d, lat),
                    (lon + d, lat + d),
                    (lon, lat + d),
                    (lon, lat),
                ]],
            }
        };
        fences.push(Fence {
            name: format!("f{i}"),
            shape,
        });
    }
    for (i, (lon, lat, r)) in [(10.0, 50.0, 3e6), (180.0, 50.0, 2e5), (0.0, 90.0, 5e6)]
        .into_iter()
        .enumerate()
    {
        fences.push(Fence {
            name: format!("huge{i}"),
            shape: Shape::Circle {
                lon,
                lat,
                radius_m: r,
            },
        });
    }
    // Polygons with a grid (more than FENCE_GRID_VERTICES_MIN positions): near-circles of 5,000
    // positions over the same square, so points land in their inside, outside and boundary cells.
    for k in 0..4u64 {
        let n = 5_000;
        let (cx, cy, r) = (10.5 + 0.1 * k as f64, 50.5, 0.2 + 0.05 * k as f64);
        let mut ring: Vec<(f64, f64)> = (0..n - 1)
            .map(|i| {
                let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
                (cx + r * a.cos(), cy + r * a.sin())
            })
            .collect();
        ring.push(ring[0]);
        fences.push(Fence {
            name: format!("grid{k}"),
            shape: Shape::Polygon { rings: vec![ring] },
        });
    }
    let set = FenceSet::new(fences);
    assert_eq!(set.grid_stats().grids, 4);
    let points: Vec<(f64, f64)> = (0..1_000u64)
        .map(|i| (50.0 + unit(i + 100_000), 10.0 + unit(i + 200_000)))
        .collect();
    let mut out = Vec::new();
    let mut scratch = Scratch::new();
    let pass = |out: &mut Vec<_>, scratch: &mut Scratch| {
        let mut seen = 0usize;
        for w in points.windows(2) {
            set.containing(w[1].0, w[1].1, out);
            seen += out.len();
            set.transitions(Some(w[0]), w[1], scratch, |_, _| seen += 1);
            set.transitions(None, w[1], scratch, |_, _| seen += 1);
        }
        seen
    };
    let warm = pass(&mut out, &mut scratch);
    assert!(warm > 1_000, "the points must hit fences ({warm})");
    let mut again = 0;
    let n = allocations_during(|| again = pass(&mut out, &mut scratch));
    assert_eq!(again, warm);
    assert_eq!(n, 0, "allocations during a warm pass");
}
