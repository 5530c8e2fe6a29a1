//! [`FenceSet`]: an immutable snapshot of all fences with a spatial index answering "which fences
//! contain this point" on the ingest hot path (every heartbeat, when fences exist). It does not
//! persist or mutate anything (that is `registry`); a change builds a new set.
//!
//! Choice: a multi-level uniform grid over fence bounding boxes. Level `L` has square cells of
//! `4^L / 256` degrees (1/256° ≈ 430 m up to 64°, 8 levels). Each fence is put in the finest level
//! at which its box covers at most [`FENCE_CELLS_MAX`] cells, in each of those cells; fences too
//! big even for the coarsest level go into a short list checked for every point. A query looks up
//! the one cell containing the point on each non-empty level (a hash probe each), so it sees only
//! fences of about the cell's size near the point: a 100 m circle and a country-sized polygon
//! never share a candidate list, and a dense city of small fences costs only the few near the
//! point. Cells live in one hash map of `(level, cell) -> range` into a flat id array (built once,
//! never updated). Candidates are filtered by their box, then by the exact test.
//!
//! Invariant: [`FenceSet::containing`] returns exactly the fences whose [`Fence::contains`] is
//! true (proptested against brute force), sorted ascending, and allocates nothing once `out` has
//! room for the result.

use std::collections::HashMap;

use super::{valid_point, Fence, FenceId, Transition};
use crate::spatial::BBox;

/// Grid levels; level `L` has cells of `4^L / 256` degrees.
const LEVELS: u32 = 8;
/// Most cells a fence may occupy on its level (else it goes one level coarser).
pub const FENCE_CELLS_MAX: u64 = 8;

/// Cells per degree at `level` (a power of two, so scaling is exact).
fn cells_per_deg(level: u32) -> f64 {
    256.0 / f64::from(1u32 << (2 * level))
}

/// The cell index of `v` (already offset to be >= 0) on an axis of `span` degrees. Monotone in
/// `v`, so a point inside a box maps to a cell between the box edges' cells.
fn axis_cell(v: f64, span: f64, level: u32) -> u32 {
    let per = cells_per_deg(level);
    let last = (span * per).ceil() as u32 - 1;
    ((v * per) as u32).min(last)
}

fn key(level: u32, lat_cell: u32, lon_cell: u32) -> u64 {
    (u64::from(level) << 48) | (u64::from(lat_cell) << 24) | u64::from(lon_cell)
}

/// The non-crossing longitude ranges of a box (two when it crosses the antimeridian).
fn lon_ranges(b: &BBox) -> ([(f64, f64); 2], usize) {
    if b.min_lon <= b.max_lon {
        ([(b.min_lon, b.max_lon), (0.0, 0.0)], 1)
    } else {
        ([(b.min_lon, 180.0), (-180.0, b.max_lon)], 2)
    }
}

/// The cell keys of `b` on `level`, deduplicated, or `None` when more than [`FENCE_CELLS_MAX`].
fn cells_of(b: &BBox, level: u32) -> Option<Vec<u64>> {
    let (la0, la1) = (
        axis_cell(b.min_lat + 90.0, 180.0, level),
        axis_cell(b.max_lat + 90.0, 180.0, level),
    );
    let (ranges, n) = lon_ranges(b);
    let ranges: Vec<(u32, u32)> = ranges[..n]
        .iter()
        .map(|&(a, z)| {
            (
                axis_cell(a + 180.0, 360.0, level),
                axis_cell(z + 180.0, 360.0, level),
            )
        })
        .collect();
    let count: u64 = ranges
        .iter()
        .map(|&(a, z)| u64::from(z - a + 1))
        .sum::<u64>()
        * u64::from(la1 - la0 + 1);
    if count > FENCE_CELLS_MAX {
        return None;
    }
    let mut keys = Vec::with_capacity(count as usize);
    for la in la0..=la1 {
        for &(a, z) in &ranges {
            keys.extend((a..=z).map(|lo| key(level, la, lo)));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Some(keys)
}

/// Reusable buffers for [`FenceSet::transitions`] (keep one per executor).
#[derive(Debug, Default)]
pub struct Scratch {
    prev: Vec<FenceId>,
    next: Vec<FenceId>,
}

impl Scratch {
    /// Empty buffers (they grow to the largest number of fences containing one point).
    pub fn new() -> Scratch {
        Scratch::default()
    }
}

/// An immutable, indexed snapshot of fences. Ids are positions in name order.
#[derive(Debug)]
pub struct FenceSet {
    /// Sorted by name; `FenceId(i)` is `fences[i]`.
    fences: Vec<Fence>,
    /// `bboxes[i]` is `fences[i].shape.bbox()`.
    bboxes: Vec<BBox>,
    /// `(level, cell)` key -> `(start, len)` in `cell_ids`.
    cells: HashMap<u64, (u32, u32), ahash::RandomState>,
    /// Fence ids per cell, ascending within a cell.
    cell_ids: Vec<FenceId>,
    /// Fences too big for the coarsest level, ascending.
    huge: Vec<FenceId>,
    /// Bit `L` set when level `L` holds any fence.
    levels_used: u32,
}

impl Default for FenceSet {
    fn default() -> FenceSet {
        FenceSet::empty()
    }
}

impl FenceSet {
    /// A set without fences.
    pub fn empty() -> FenceSet {
        FenceSet {
            fences: Vec::new(),
            bboxes: Vec::new(),
            cells: HashMap::default(),
            cell_ids: Vec::new(),
            huge: Vec::new(),
            levels_used: 0,
        }
    }

    /// Indexes `fences` (any order; ids follow name order).
    ///
    /// # Panics
    /// If two fences share a name or there are more than `u32::MAX` fences (programmer errors:
    /// the registry guarantees unique names and [`crate::limits::FENCES_MAX`]).
    pub fn new(mut fences: Vec<Fence>) -> FenceSet {
        assert!(u32::try_from(fences.len()).is_ok(), "too many fences");
        fences.sort_by(|a, b| a.name.cmp(&b.name));
        for w in fences.windows(2) {
            assert!(
                w[0].name != w[1].name,
                "duplicate fence name {:?}",
                w[0].name
            );
        }
        let bboxes: Vec<BBox> = fences.iter().map(|f| f.shape.bbox()).collect();
        let mut pairs: Vec<(u64, FenceId)> = Vec::new();
        let mut huge = Vec::new();
        let mut levels_used = 0u32;
        for (i, b) in bboxes.iter().enumerate() {
            let id = FenceId(i as u32);
            match (0..LEVELS).find_map(|l| cells_of(b, l).map(|k| (l, k))) {
                Some((level, keys)) => {
                    levels_used |= 1 << level;
                    pairs.extend(keys.into_iter().map(|k| (k, id)));
                }
                None => huge.push(id),
            }
        }
        pairs.sort_unstable();
        let mut cells: HashMap<u64, (u32, u32), ahash::RandomState> = HashMap::default();
        let mut cell_ids = Vec::with_capacity(pairs.len());
        for (i, &(k, id)) in pairs.iter().enumerate() {
            let e = cells.entry(k).or_insert((i as u32, 0));
            e.1 += 1;
            cell_ids.push(id);
        }
        FenceSet {
            fences,
            bboxes,
            cells,
            cell_ids,
            huge,
            levels_used,
        }
    }

    /// Number of fences.
    pub fn len(&self) -> usize {
        self.fences.len()
    }

    /// True when there are no fences.
    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    /// The id of the fence called `name` in this snapshot.
    pub fn id(&self, name: &str) -> Option<FenceId> {
        self.fences
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
            .map(|i| FenceId(i as u32))
    }

    /// The fence with id `id`.
    ///
    /// # Panics
    /// If `id` is not from this snapshot (out of range).
    pub fn get(&self, id: FenceId) -> &Fence {
        &self.fences[id.0 as usize]
    }

    /// The fence called `name`.
    pub fn by_name(&self, name: &str) -> Option<&Fence> {
        self.id(name).map(|id| self.get(id))
    }

    /// Fence names, ascending.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fences.iter().map(|f| f.name.as_str())
    }

    /// All fences with their ids, in id (name) order.
    pub fn iter(&self) -> impl Iterator<Item = (FenceId, &Fence)> {
        self.fences
            .iter()
            .enumerate()
            .map(|(i, f)| (FenceId(i as u32), f))
    }

    /// Index entries (fence-cell pairs) plus always-checked fences: a size figure for tests and
    /// benches.
    pub fn index_entries(&self) -> usize {
        self.cell_ids.len() + self.huge.len()
    }

    #[inline]
    fn check(&self, id: FenceId, lat: f64, lon: f64, out: &mut Vec<FenceId>) {
        let i = id.0 as usize;
        if self.bboxes[i].contains(lat, lon) && self.fences[i].shape.contains_in_bbox(lat, lon) {
            out.push(id);
        }
    }

    /// The ids of the fences containing the point, ascending, appended to `out` (cleared first).
    pub fn containing(&self, lat: f64, lon: f64, out: &mut Vec<FenceId>) {
        out.clear();
        if self.fences.is_empty() || !valid_point(lat, lon) {
            return;
        }
        let mut levels = self.levels_used;
        while levels != 0 {
            let level = levels.trailing_zeros();
            levels &= levels - 1;
            let k = key(
                level,
                axis_cell(lat + 90.0, 180.0, level),
                axis_cell(lon + 180.0, 360.0, level),
            );
            if let Some(&(start, len)) = self.cells.get(&k) {
                for &id in &self.cell_ids[start as usize..(start + len) as usize] {
                    self.check(id, lat, lon, out);
                }
            }
        }
        for &id in &self.huge {
            self.check(id, lat, lon, out);
        }
        // Each fence sits on one level and a point is in one cell per level: no duplicates, but
        // levels interleave ids.
        out.sort_unstable();
    }

    /// Enter/exit transitions moving from `prev` (`None`: the device was never seen) to `next`,
    /// both `(lat, lon)`: calls `f(id, Enter)` for each fence containing `next` but not `prev`,
    /// `f(id, Exit)` for each containing `prev` but not `next`, in ascending id order.
    /// Allocation-free once `scratch` is warm.
    pub fn transitions(
        &self,
        prev: Option<(f64, f64)>,
        next: (f64, f64),
        scratch: &mut Scratch,
        mut f: impl FnMut(FenceId, Transition),
    ) {
        if self.fences.is_empty() || prev == Some(next) {
            return;
        }
        match prev {
            Some((lat, lon)) => self.containing(lat, lon, &mut scratch.prev),
            None => scratch.prev.clear(),
        }
        self.containing(next.0, next.1, &mut scratch.next);
        let (a, b) = (&scratch.prev, &scratch.next);
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(&x), Some(&y)) if x == y => {
                    i += 1;
                    j += 1;
                }
                (Some(&x), Some(&y)) if x < y => {
                    f(x, Transition::Exit);
                    i += 1;
                }
                (Some(&x), None) => {
                    f(x, Transition::Exit);
                    i += 1;
                }
                (_, Some(&y)) => {
                    f(y, Transition::Enter);
                    j += 1;
                }
                (None, None) => unreachable!("loop condition"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::Shape;
    use proptest::prelude::*;

    fn brute(set: &FenceSet, lat: f64, lon: f64) -> Vec<FenceId> {
        set.iter()
            .filter(|(_, f)| f.contains(lat, lon))
            .map(|(id, _)| id)
            .collect()
    }

    fn circle(name: &str, lon: f64, lat: f64, radius_m: f64) -> Fence {
        Fence {
            name: name.into(),
            shape: Shape::Circle { lon, lat, radius_m },
        }
    }

    fn rect(name: &str, lon0: f64, lat0: f64, lon1: f64, lat1: f64) -> Fence {
        Fence {
            name: name.into(),
            shape: Shape::Polygon {
                rings: vec![vec![
                    (lon0, lat0),
                    (lon1, lat0),
                    (lon1, lat1),
                    (lon0, lat1),
                    (lon0, lat0),
                ]],
            },
        }
    }

    #[test]
    fn ids_follow_names_and_lookups_work() {
        // Ids are name order; id/get/names agree; the empty set answers nothing.
        let set = FenceSet::new(vec![
            rect("b", 0.0, 0.0, 1.0, 1.0),
            circle("a", 0.5, 0.5, 10.0),
        ]);
        assert_eq!(set.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(set.id("b"), Some(FenceId(1)));
        assert_eq!(set.get(FenceId(0)).name, "a");
        assert_eq!(set.id("c"), None);
        assert_eq!(set.len(), 2);
        let mut out = vec![FenceId(9)];
        set.containing(0.5, 0.5, &mut out);
        assert_eq!(out, [FenceId(0), FenceId(1)]);
        let empty = FenceSet::empty();
        assert!(empty.is_empty());
        empty.containing(0.5, 0.5, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    #[should_panic(expected = "duplicate fence name")]
    fn duplicate_names_are_a_programmer_error() {
        // Two fences with one name cannot form a set.
        FenceSet::new(vec![
            rect("a", 0.0, 0.0, 1.0, 1.0),
            rect("a", 0.0, 0.0, 2.0, 2.0),
        ]);
    }

    #[test]
    fn huge_polar_and_antimeridian_fences_are_found() {
        // A hemisphere-sized polygon (always-checked list), a polar-cap circle and a circle
        // across the antimeridian are found from points on every side.
        let set = FenceSet::new(vec![
            rect("half", -180.0, -90.0, 0.0, 90.0),
            circle("pole", 0.0, 90.0, 300_000.0),
            circle("am", 180.0, -20.0, 50_000.0),
            circle("big", 0.0, 0.0, 19_000_000.0),
        ]);
        let mut out = Vec::new();
        for &(lat, lon) in &[
            (89.0, 179.0),
            (89.0, -179.0),
            (90.0, 0.0),
            (-20.0, 179.9),
            (-20.0, -179.9),
            (-20.1, -180.0),
            (0.0, 180.0),
            (10.0, 10.0),
        ] {
            set.containing(lat, lon, &mut out);
            assert_eq!(out, brute(&set, lat, lon), "{lat},{lon}");
        }
        set.containing(-20.0, -179.9, &mut out);
        assert!(out.contains(&set.id("am").unwrap()) && out.contains(&set.id("half").unwrap()));
        set.containing(89.5, 123.0, &mut out);
        assert!(out.contains(&set.id("pole").unwrap()));
    }

    #[test]
    fn transitions_diff_prev_and_next() {
        // Moving between overlapping fences reports exits and enters in id order; the first
        // sighting enters every containing fence; not moving reports nothing.
        let set = FenceSet::new(vec![
            rect("a", 0.0, 0.0, 2.0, 2.0),
            rect("b", 1.0, 1.0, 3.0, 3.0),
            rect("c", 2.5, 2.5, 4.0, 4.0),
        ]);
        let mut sc = Scratch::new();
        let run = |prev, next, sc: &mut Scratch| {
            let mut v = Vec::new();
            set.transitions(prev, next, sc, |id, t| {
                v.push((set.get(id).name.clone(), t))
            });
            v
        };
        use Transition::{Enter, Exit};
        assert_eq!(
            run(None, (1.5, 1.5), &mut sc),
            [("a".into(), Enter), ("b".into(), Enter)]
        );
        assert_eq!(
            run(Some((0.5, 0.5)), (2.7, 2.7), &mut sc),
            [("a".into(), Exit), ("b".into(), Enter), ("c".into(), Enter)]
        );
        assert_eq!(run(Some((2.7, 2.7)), (2.7, 2.7), &mut sc), []);
        assert_eq!(
            run(Some((2.7, 2.7)), (10.0, 10.0), &mut sc),
            [("b".into(), Exit), ("c".into(), Exit)]
        );
        assert_eq!(run(None, (10.0, 10.0), &mut sc), []);
    }

    fn point() -> impl Strategy<Value = (f64, f64)> {
        prop_oneof![
            (-90.0f64..=90.0, -180.0f64..=180.0),
            (80.0f64..=90.0, -180.0f64..=180.0),
            (-90.0f64..=-80.0, -180.0f64..=180.0),
            (
                -90.0f64..=90.0,
                prop_oneof![170.0f64..=180.0, -180.0f64..=-170.0]
            ),
            Just((90.0, 180.0)),
            Just((0.0, -180.0)),
        ]
    }

    /// A star-shaped ring around a centre, clamped into range and to a 180° longitude span.
    fn ring(c: (f64, f64), radii: Vec<f64>, scale: f64) -> Vec<(f64, f64)> {
        let n = radii.len();
        let lo_min = (c.1 - 89.0).max(-180.0);
        let lo_max = (c.1 + 89.0).min(180.0);
        let mut r: Vec<(f64, f64)> = radii
            .iter()
            .enumerate()
            .map(|(i, &rr)| {
                let a = i as f64 / n as f64 * std::f64::consts::TAU;
                (
                    (c.1 + scale * rr * a.cos()).clamp(lo_min, lo_max),
                    (c.0 + scale * rr * a.sin()).clamp(-90.0, 90.0),
                )
            })
            .collect();
        r.push(r[0]);
        r
    }

    fn fence() -> impl Strategy<Value = Shape> {
        let scale = prop_oneof![1e-4f64..0.01, 0.01f64..1.0, 1.0f64..60.0, 60.0f64..120.0];
        let radius = prop_oneof![
            1.0f64..1000.0,
            1000.0f64..100_000.0,
            100_000.0f64..20_000_000.0
        ];
        prop_oneof![
            (point(), radius).prop_map(|(c, r)| Shape::Circle {
                lon: c.1,
                lat: c.0,
                radius_m: r
            }),
            (
                point(),
                prop::collection::vec(0.1f64..1.0, 3..12),
                scale.clone(),
                prop::option::of(prop::collection::vec(0.05f64..0.5, 3..6)),
            )
                .prop_map(|(c, radii, s, hole)| {
                    let mut rings = vec![ring(c, radii, s)];
                    if let Some(h) = hole {
                        rings.push(ring(c, h, s));
                    }
                    Shape::Polygon { rings }
                }),
            // Self-intersecting rings of random vertices in a small box: even-odd still decides.
            (
                point(),
                prop::collection::vec((0.0f64..1.0, 0.0f64..1.0), 3..10),
                scale
            )
                .prop_map(|(c, pts, s)| {
                    let mut r: Vec<(f64, f64)> = pts
                        .iter()
                        .map(|&(x, y)| {
                            (
                                (c.1 + s * x).clamp(-180.0, 180.0),
                                (c.0 + s * y).clamp(-90.0, 90.0),
                            )
                        })
                        .collect();
                    r.push(r[0]);
                    Shape::Polygon { rings: vec![r] }
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn index_equals_brute_force(
            shapes in prop::collection::vec(fence(), 1..40),
            points in prop::collection::vec(point(), 1..40),
            near in prop::collection::vec((0usize..40, -1.5f64..1.5, -1.5f64..1.5), 0..40),
        ) {
            // For random fences (all sizes, poles, antimeridian, holes, self-intersecting rings)
            // and points (random, near fence centres or on vertices), the index returns exactly
            // the fences whose contains() is true, ascending.
            let fences: Vec<Fence> = shapes
                .into_iter()
                .enumerate()
                .map(|(i, shape)| Fence { name: format!("f{i:03}"), shape })
                .collect();
            let mut probes = points;
            for &(i, dx, dy) in &near {
                let f = &fences[i % fences.len()];
                let (lon, lat, s) = match &f.shape {
                    Shape::Circle { lon, lat, radius_m } => (*lon, *lat, radius_m / 111_000.0),
                    Shape::Polygon { rings } => {
                        let b = f.shape.bbox();
                        let v = rings[0][i % (rings[0].len())];
                        // Every other probe is a vertex exactly (a boundary point).
                        if dx < 0.0 {
                            probes.push((v.1, v.0));
                        }
                        ((b.min_lon + b.max_lon) / 2.0, (b.min_lat + b.max_lat) / 2.0, b.max_lon - b.min_lon)
                    }
                };
                probes.push(((lat + dy * s).clamp(-90.0, 90.0), (lon + dx * s).clamp(-180.0, 180.0)));
            }
            for f in &fences {
                // Every fence is valid as parsed from its canonical JSON.
                prop_assert_eq!(&Fence::parse(&f.name, f.to_json().as_bytes()).unwrap(), f);
            }
            let set = FenceSet::new(fences);
            let mut out = Vec::new();
            for &(lat, lon) in &probes {
                set.containing(lat, lon, &mut out);
                prop_assert_eq!(&out, &brute(&set, lat, lon), "point {},{}", lat, lon);
            }
        }

        #[test]
        fn transitions_equal_set_difference(
            shapes in prop::collection::vec(fence(), 1..20),
            a in prop::option::of(point()), b in point(),
        ) {
            // Transitions are exactly brute(next) - brute(prev) as enters and the reverse as exits.
            let set = FenceSet::new(shapes.into_iter().enumerate()
                .map(|(i, shape)| Fence { name: format!("f{i:03}"), shape }).collect());
            let before = a.map(|(lat, lon)| brute(&set, lat, lon)).unwrap_or_default();
            let after = brute(&set, b.0, b.1);
            let (mut enters, mut exits) = (Vec::new(), Vec::new());
            set.transitions(a, b, &mut Scratch::new(), |id, t| match t {
                Transition::Enter => enters.push(id),
                Transition::Exit => exits.push(id),
            });
            let want_enter: Vec<FenceId> = after.iter().copied().filter(|x| !before.contains(x)).collect();
            let want_exit: Vec<FenceId> = before.iter().copied().filter(|x| !after.contains(x)).collect();
            prop_assert_eq!(enters, want_enter);
            prop_assert_eq!(exits, want_exit);
        }
    }
}
