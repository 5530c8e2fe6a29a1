//! Geometry and the per-shard spatial index over last locations. It owns bounding boxes (including
//! ones that cross the antimeridian), great-circle distance, the cover of a circle by boxes (near
//! the poles a circle covers every longitude), and a grid of fixed cells that maps each cell to
//! the devices whose last location lies in it. It does not know ids or the table layout: devices
//! are opaque `u32` keys (the table's record slots).
//!
//! Choice (benches/query.rs measures its queries and bytes per device over one million devices;
//! no R-tree was benchmarked against it): a uniform grid of 0.25° cells in a hash map. Updating
//! is O(1) (most heartbeats stay in their cell: nothing to do), a bbox query visits only the cells
//! it overlaps, and memory is two small entries per device. An R-tree answers very large boxes
//! with fewer node visits but costs a rebalancing delete+insert on every move, on the ingest path.
//!
//! Invariant: every key is in exactly the cell of its last update; queries return a superset of
//! the keys inside the area (callers filter exactly with [`BBox::contains`] / [`haversine_m`]).

use std::collections::HashMap;

/// Cell edge in degrees.
pub const CELL_DEG: f64 = 0.25;
const LON_CELLS: u32 = (360.0 / CELL_DEG) as u32;
const LAT_CELLS: u32 = (180.0 / CELL_DEG) as u32;
/// Mean Earth radius (IUGG), metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A box in degrees. `min_lon > max_lon` means the box crosses the antimeridian (it covers
/// `[min_lon, 180]` and `[-180, max_lon]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    /// West edge.
    pub min_lon: f64,
    /// South edge.
    pub min_lat: f64,
    /// East edge.
    pub max_lon: f64,
    /// North edge.
    pub max_lat: f64,
}

impl BBox {
    /// Validates and builds a box; `Err` names what is wrong.
    pub fn new(
        min_lon: f64,
        min_lat: f64,
        max_lon: f64,
        max_lat: f64,
    ) -> Result<BBox, &'static str> {
        let lon_ok = |v: f64| v.is_finite() && (-180.0..=180.0).contains(&v);
        let lat_ok = |v: f64| v.is_finite() && (-90.0..=90.0).contains(&v);
        if !(lon_ok(min_lon) && lon_ok(max_lon)) {
            return Err("longitudes must be finite and within [-180, 180]");
        }
        if !(lat_ok(min_lat) && lat_ok(max_lat)) {
            return Err("latitudes must be finite and within [-90, 90]");
        }
        if min_lat > max_lat {
            return Err("minLat must not exceed maxLat");
        }
        Ok(BBox {
            min_lon,
            min_lat,
            max_lon,
            max_lat,
        })
    }

    /// Whether the point lies in the box (edges included).
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        if lat < self.min_lat || lat > self.max_lat {
            return false;
        }
        if self.min_lon <= self.max_lon {
            (self.min_lon..=self.max_lon).contains(&lon)
        } else {
            lon >= self.min_lon || lon <= self.max_lon
        }
    }

    /// The box as one or two non-crossing longitude ranges.
    fn lon_ranges(&self) -> impl Iterator<Item = (f64, f64)> {
        let (a, b) = if self.min_lon <= self.max_lon {
            ((self.min_lon, self.max_lon), None)
        } else {
            ((self.min_lon, 180.0), Some((-180.0, self.max_lon)))
        };
        std::iter::once(a).chain(b)
    }
}

/// Great-circle distance in metres (haversine on a sphere of [`EARTH_RADIUS_M`]).
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// A box containing every point within `radius_m` of `(lat, lon)`. Near a pole (or for a radius
/// that reaches past one) it spans every longitude.
pub fn circle_bbox(lat: f64, lon: f64, radius_m: f64) -> BBox {
    let dlat = (radius_m / EARTH_RADIUS_M).to_degrees();
    let min_lat = (lat - dlat).max(-90.0);
    let max_lat = (lat + dlat).min(90.0);
    if min_lat <= -90.0 || max_lat >= 90.0 {
        return BBox {
            min_lon: -180.0,
            min_lat,
            max_lon: 180.0,
            max_lat,
        };
    }
    // The widest longitude span of the circle: asin(sin(r) / cos(lat)) (exact on a sphere).
    let r = radius_m / EARTH_RADIUS_M;
    let s = r.sin() / lat.to_radians().cos();
    if s >= 1.0 || r >= std::f64::consts::FRAC_PI_2 {
        return BBox {
            min_lon: -180.0,
            min_lat,
            max_lon: 180.0,
            max_lat,
        };
    }
    // A small margin for rounding, so points exactly on the circle are never cut off.
    let dlon = s.asin().to_degrees() * 1.000_001 + 1e-9;
    if dlon >= 180.0 {
        return BBox {
            min_lon: -180.0,
            min_lat,
            max_lon: 180.0,
            max_lat,
        };
    }
    let wrap = |v: f64| {
        if v > 180.0 {
            v - 360.0
        } else if v < -180.0 {
            v + 360.0
        } else {
            v
        }
    };
    BBox {
        min_lon: wrap(lon - dlon),
        min_lat,
        max_lon: wrap(lon + dlon),
        max_lat,
    }
}

fn lat_cell(lat: f64) -> u32 {
    (((lat + 90.0) / CELL_DEG) as u32).min(LAT_CELLS - 1)
}

fn lon_cell(lon: f64) -> u32 {
    (((lon + 180.0) / CELL_DEG) as u32).min(LON_CELLS - 1)
}

fn cell_of(lat: f64, lon: f64) -> u32 {
    lat_cell(lat) * LON_CELLS + lon_cell(lon)
}

/// The grid: cell → keys, key → cell.
#[derive(Debug, Default)]
pub struct Grid {
    cells: HashMap<u32, Vec<u32>, ahash::RandomState>,
    at: HashMap<u32, u32, ahash::RandomState>,
}

impl Grid {
    /// An empty grid.
    pub fn new() -> Grid {
        Grid::default()
    }

    /// Keys indexed.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        let slot = |k: usize, v: usize| k + v + 1;
        self.at.capacity() * slot(4, 4)
            + self.cells.capacity() * slot(4, std::mem::size_of::<Vec<u32>>())
            + self.cells.values().map(|v| v.capacity() * 4).sum::<usize>()
    }

    /// Moves `key` to the cell of `(lat, lon)` (adds it if new).
    pub fn update(&mut self, key: u32, lat: f64, lon: f64) {
        let cell = cell_of(lat, lon);
        match self.at.insert(key, cell) {
            Some(old) if old == cell => {}
            Some(old) => {
                if let Some(v) = self.cells.get_mut(&old) {
                    if let Some(i) = v.iter().position(|&k| k == key) {
                        v.swap_remove(i);
                    }
                    if v.is_empty() {
                        self.cells.remove(&old);
                    }
                }
                self.cells.entry(cell).or_default().push(key);
            }
            None => self.cells.entry(cell).or_default().push(key),
        }
    }

    /// Calls `f` for every key in a cell overlapping `bbox` (a superset of the keys inside it).
    /// When the box covers more cells than are occupied, walks the occupied cells instead.
    pub fn candidates(&self, bbox: &BBox, mut f: impl FnMut(u32)) {
        let (lat0, lat1) = (lat_cell(bbox.min_lat), lat_cell(bbox.max_lat));
        let ranges: Vec<(u32, u32)> = bbox
            .lon_ranges()
            .map(|(a, b)| (lon_cell(a), lon_cell(b)))
            .collect();
        let covered: u64 = ranges
            .iter()
            .map(|(a, b)| u64::from(b - a + 1))
            .sum::<u64>()
            * u64::from(lat1 - lat0 + 1);
        if covered > self.cells.len() as u64 {
            for (&cell, keys) in &self.cells {
                let (la, lo) = (cell / LON_CELLS, cell % LON_CELLS);
                if (lat0..=lat1).contains(&la)
                    && ranges.iter().any(|(a, b)| (*a..=*b).contains(&lo))
                {
                    keys.iter().for_each(|&k| f(k));
                }
            }
            return;
        }
        for la in lat0..=lat1 {
            for &(a, b) in &ranges {
                for lo in a..=b {
                    if let Some(keys) = self.cells.get(&(la * LON_CELLS + lo)) {
                        keys.iter().for_each(|&k| f(k));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn antimeridian_boxes_and_distances() {
        // A box from 170 to -170 contains 179 and -179 but not 0; distances are great-circle.
        let b = BBox::new(170.0, -10.0, -170.0, 10.0).unwrap();
        assert!(b.contains(0.0, 179.0) && b.contains(0.0, -179.0) && !b.contains(0.0, 0.0));
        assert!((haversine_m(0.0, 179.5, 0.0, -179.5) - 111_195.0).abs() < 10.0);
        assert!((haversine_m(89.9, 0.0, 89.9, 180.0) - 22_239.0).abs() < 10.0);
        assert!(BBox::new(0.0, 10.0, 1.0, 5.0).is_err());
        assert!(BBox::new(f64::NAN, 0.0, 1.0, 1.0).is_err());
    }

    fn point() -> impl Strategy<Value = (f64, f64)> {
        prop_oneof![
            (-90.0f64..=90.0, -180.0f64..=180.0),
            // Near the poles and the antimeridian, where boxes and circles are hard.
            (85.0f64..=90.0, -180.0f64..=180.0),
            (-90.0f64..=-85.0, -180.0f64..=180.0),
            (
                -90.0f64..=90.0,
                prop_oneof![175.0f64..=180.0, -180.0f64..=-175.0]
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn grid_candidates_cover_every_point_in_any_box(
            points in prop::collection::vec(point(), 1..300),
            moves in prop::collection::vec((0usize..300, point()), 0..100),
            a in point(), b in point(),
        ) {
            // After random inserts and moves, every point inside a random box (crossing the
            // antimeridian when min_lon > max_lon) is among the grid's candidates.
            let mut grid = Grid::new();
            let mut model: Vec<(f64, f64)> = points.clone();
            for (k, &(lat, lon)) in points.iter().enumerate() {
                grid.update(k as u32, lat, lon);
            }
            for (k, (lat, lon)) in moves {
                let k = k % model.len();
                model[k] = (lat, lon);
                grid.update(k as u32, lat, lon);
            }
            let bbox = BBox::new(a.1, a.0.min(b.0), b.1, a.0.max(b.0)).unwrap();
            let mut got = std::collections::HashSet::new();
            grid.candidates(&bbox, |k| { got.insert(k); });
            for (k, &(lat, lon)) in model.iter().enumerate() {
                if bbox.contains(lat, lon) {
                    prop_assert!(got.contains(&(k as u32)), "point {k} {lat},{lon} missing for {bbox:?}");
                }
            }
            prop_assert_eq!(grid.len(), model.len());
        }

        #[test]
        fn circle_box_contains_points_placed_inside_the_circle(
            c in point(), bearing in 0.0f64..360.0, frac in 0.0f64..=1.0, radius in 1.0f64..3_000_000.0,
        ) {
            // A point placed at a random bearing and distance <= radius from the centre (on the
            // sphere) lies in the circle's box, near poles and across the antimeridian too.
            let (lat1, lon1, th) = (c.0.to_radians(), c.1.to_radians(), bearing.to_radians());
            let d = radius * frac * 0.999_999 / EARTH_RADIUS_M;
            let lat2 = (lat1.sin() * d.cos() + lat1.cos() * d.sin() * th.cos()).asin();
            let lon2 = lon1 + (th.sin() * d.sin() * lat1.cos()).atan2(d.cos() - lat1.sin() * lat2.sin());
            let (plat, plon) = (lat2.to_degrees(), (lon2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0);
            prop_assume!(haversine_m(c.0, c.1, plat, plon) <= radius);
            let b = circle_bbox(c.0, c.1, radius);
            prop_assert!(b.contains(plat, plon), "{plat},{plon} within {radius} m of {c:?} but not in {b:?}");
        }

        #[test]
        fn circle_box_contains_every_point_within_the_radius(
            c in point(), p in point(), radius in 1.0f64..3_000_000.0,
        ) {
            // Any point within the radius (great-circle) lies in the circle's box.
            if haversine_m(c.0, c.1, p.0, p.1) <= radius {
                let b = circle_bbox(c.0, c.1, radius);
                prop_assert!(b.contains(p.0, p.1), "{p:?} within {radius} m of {c:?} but not in {b:?}");
            }
        }
    }
}
