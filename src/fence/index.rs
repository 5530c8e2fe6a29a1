//! [`FenceSet`]: an immutable snapshot of all fences with a spatial index answering "which fences
//! contain this point" on the ingest hot path (every heartbeat, when fences exist). It does not
//! persist or mutate anything (that is `registry`); a change builds a new set.
//!
//! Choice: a multi-level uniform grid over fence bounding boxes. Level `L` has square cells of
//! `2^L / 256` degrees (1/256° ≈ 430 m of latitude, up to 64°: 15 levels). Each fence is put in the
//! finest level at which its box covers at most [`FENCE_CELLS_MAX`] cells, in each of those cells
//! (so its cells are between a third and two thirds of its size); fences too big even for the
//! coarsest level go into a short list checked for every point. A query looks up the one cell
//! containing the point on each non-empty level (a hash probe each), so it sees only fences near
//! the point of about the cell's size: a 100 m circle and a country-sized polygon never share a
//! candidate list, and a dense city of small fences costs only the few near the point. Cells live
//! in one hash map of `(level, cell) -> range` into a flat entry array holding each candidate's
//! box inline (rejecting a candidate reads no other memory); polygon vertices are stored back to
//! back and circle centres as precomputed unit vectors. Built once per snapshot, never updated:
//! fence changes are rare (measured in benches/fence.rs: 10,000 fences index in tens of ms).
//!
//! Polygons of more than [`FENCE_GRID_VERTICES_MIN`] positions also get a grid of their own over
//! their box, built once per snapshot, so a heartbeat near a 10,000-position polygon does not test
//! 10,000 edges (issue 20 §5: 100 overlapping such fences cut ingest twentyfold). Its rows are cut
//! at positions' latitudes so that at most [`FENCE_GRID_ROW_VERTICES_MAX`] positions lie strictly
//! inside a row; then an edge meeting a row either spans its whole height or ends inside it (a
//! "partial" edge: at most twice that many per row). Each row has equal columns over the box,
//! one per [`FENCE_GRID_CELL_EDGES_TARGET`] edges spanning the row, between
//! [`FENCE_GRID_COLUMNS_MIN`] and [`FENCE_GRID_COLUMNS_MAX`] (and at most
//! [`FENCE_GRID_CELLS_PER_VERTEX`] cells per position in all), so spanning edges spread evenly
//! (the teeth of a comb) leave few per cell. A cell that no edge comes within [`MARGIN_DEG`] of is
//! classified inside or outside at build time and answers without any edge test. A boundary cell
//! keeps the spanning edges near it and the even-odd parity of the spanning edges to its right; a
//! point in it tests those edges and the row's partial edges, nothing else. The answer is the same
//! bit for bit as testing every edge (`Fence::contains`), because each edge decides its share of
//! the even-odd count alone (`edge_test`) and an edge at least [`MARGIN_DEG`] away from the cell
//! decides exactly, whatever the rounding, for every point of the cell (it is ~10^4 times the
//! rounding error of the test at these magnitudes); edges nearer are tested as `Fence::contains`
//! tests them. So a point costs a binary search over the rows, one cell, at most
//! 2 × [`FENCE_GRID_ROW_VERTICES_MAX`] partial edges and the spanning edges within one cell. (Not
//! bounded: many spanning edges bunched within one column's width, e.g. thousands of nearly
//! parallel slanted edges; a point there tests those. The total position budget bounds even
//! that.)
//!
//! Invariant: [`FenceSet::containing`] returns exactly the fences whose [`Fence::contains`] is
//! true (proptested against brute force, with and without grids), sorted ascending, and allocates
//! nothing once `out` has room for the result.

use std::collections::HashMap;

use super::{
    chord2, chord2_of_m, edge_test, polygon_contains, unit_vector, valid_point, Fence, FenceId,
    Shape, Transition, CROSSES, ON_EDGE,
};
use crate::limits::{
    FENCE_CELLS_MAX, FENCE_GRID_CELLS_PER_VERTEX, FENCE_GRID_CELL_EDGES_TARGET,
    FENCE_GRID_COLUMNS_MAX, FENCE_GRID_COLUMNS_MIN, FENCE_GRID_ROW_VERTICES_MAX,
    FENCE_GRID_VERTICES_MIN, FENCE_VERTICES_TOTAL_MAX,
};
use crate::spatial::BBox;

/// How far (degrees, about 0.1 mm) an edge must stay from a grid cell for the cell to ignore it
/// or to count it without testing: far above the rounding error of [`edge_test`] (about 1e-13°
/// for coordinates within ±180°), so such an edge's answer is the exact one for every point of
/// the cell. Cells are widened by twice this when deciding, to absorb the rounding of the cell
/// arithmetic itself.
const MARGIN_DEG: f64 = 1e-9;

/// log2 of the cell size ratio between adjacent levels.
const LEVEL_STEP_LOG2: u32 = 1;
/// Grid levels; level `L` has cells of `2^(L * LEVEL_STEP_LOG2) / 256` degrees, up to 64°.
const LEVELS: u32 = 14 / LEVEL_STEP_LOG2 + 1;

/// Cells per degree at `level` (a power of two, so scaling is exact).
fn cells_per_deg(level: u32) -> f64 {
    256.0 / f64::from(1u32 << (LEVEL_STEP_LOG2 * level))
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

/// The exact test of one fence, precomputed where that saves work per lookup.
#[derive(Debug, Clone, Copy)]
enum Exact {
    /// A circle: its centre's unit vector and the squared chord of its radius.
    Circle { centre: [f64; 3], chord2_max: f64 },
    /// A polygon: its rings are `rings[first..first + count]` (exterior first), each a range of
    /// `verts`, so a test reads one contiguous run of memory; `grid` indexes `grids`, or is
    /// [`NO_GRID`] for a small polygon (every edge is tested).
    Polygon { first: u32, count: u32, grid: u32 },
}

/// `Exact::Polygon::grid` of a polygon without a grid.
const NO_GRID: u32 = u32::MAX;

/// A grid cell with no edge near it, wholly outside the polygon.
const OUTSIDE: u8 = 0;
/// A grid cell with no edge near it, wholly inside the polygon.
const INSIDE: u8 = 1;
/// A grid cell that edges come near: its points are tested against the cell's and row's edges.
const BOUNDARY: u8 = 2;

/// One cell of a polygon's grid.
#[derive(Debug, Clone, Copy)]
struct Cell {
    /// The spanning edges near a boundary cell: `cell_edges[start..start + len]`.
    start: u32,
    /// See `start`.
    len: u16,
    /// [`OUTSIDE`], [`INSIDE`] or [`BOUNDARY`].
    kind: u8,
    /// For a boundary cell: 1 when an odd number of the row's spanning edges lie wholly to the
    /// cell's right (each crosses the ray of every point of the cell).
    parity: u8,
}

/// The grid of one polygon (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Grid {
    /// Row `r` holds latitudes `row_bounds[bounds_first + r] <= y < row_bounds[bounds_first + r + 1]`.
    bounds_first: u32,
    /// Number of rows; row `r` is `grid_rows[rows_first + r]`.
    rows: u32,
    /// See `rows`.
    rows_first: u32,
    /// The box's smallest longitude (column 0 of every row starts there).
    min_lon: f64,
}

/// One row of a polygon's grid: equal columns over the polygon's box, as many as its spanning
/// and touching edges need to keep few per cell (see [`GridParts::add`]).
#[derive(Debug, Clone, Copy)]
struct Row {
    /// The row's partial edges: `partial_edges[partial_start..partial_start + partial_len]`.
    partial_start: u32,
    /// See `partial_start`.
    partial_len: u32,
    /// Column `c` is `grid_cells[cells_first + c]`.
    cells_first: u32,
    /// Columns.
    cols: u32,
    /// Columns per degree of longitude (0 for a box of no width: one column).
    cols_per_deg: f64,
}

/// Sizes of the polygon grids of a [`FenceSet`] (for tests, benches and RESULTS.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GridStats {
    /// Polygons with a grid.
    pub grids: usize,
    /// Cells over all grids.
    pub cells: usize,
    /// Of which boundary cells.
    pub boundary_cells: usize,
    /// Most spanning edges listed by one boundary cell.
    pub cell_edges_max: usize,
    /// Most partial edges of one row.
    pub row_partials_max: usize,
}

/// One index entry: a fence id with its box inline, so rejecting a candidate reads only the
/// cell's own contiguous memory.
#[derive(Debug, Clone, Copy)]
struct Entry {
    bbox: BBox,
    id: FenceId,
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
    /// `exact[i]`: what the exact test of `fences[i]` needs, precomputed.
    exact: Vec<Exact>,
    /// Every polygon ring's positions, back to back.
    verts: Vec<(f64, f64)>,
    /// Ring ranges `(start, len)` in `verts`.
    rings: Vec<(u32, u32)>,
    /// Polygon grids (see the module docs and [`Grid`]).
    grids: Vec<Grid>,
    /// Row boundaries of all grids, back to back.
    row_bounds: Vec<f64>,
    /// Rows of all grids.
    grid_rows: Vec<Row>,
    /// Partial edges of all rows: an edge is the index in `verts` of its first position.
    partial_edges: Vec<u32>,
    /// Cells of all grids.
    grid_cells: Vec<Cell>,
    /// Spanning edges listed by boundary cells (as `partial_edges`).
    cell_edges: Vec<u32>,
    /// `(level, cell)` key -> `(start, len)` in `cell_ids`.
    cells: HashMap<u64, (u32, u32), ahash::RandomState>,
    /// Entries per cell, ascending by id within a cell.
    cell_ids: Vec<Entry>,
    /// Fences too big for the coarsest level, ascending by id.
    huge: Vec<Entry>,
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
            exact: Vec::new(),
            verts: Vec::new(),
            rings: Vec::new(),
            grids: Vec::new(),
            row_bounds: Vec::new(),
            grid_rows: Vec::new(),
            partial_edges: Vec::new(),
            grid_cells: Vec::new(),
            cell_edges: Vec::new(),
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
    pub fn new(fences: Vec<Fence>) -> FenceSet {
        FenceSet::with_grid_min(fences, FENCE_GRID_VERTICES_MIN)
    }

    /// [`FenceSet::new`], giving a grid to polygons of more than `grid_min` positions (tests use
    /// 0 to put every polygon on the grid path, benches `usize::MAX` to measure without grids).
    pub fn with_grid_min(mut fences: Vec<Fence>, grid_min: usize) -> FenceSet {
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
        let (mut verts, mut rings) = (Vec::new(), Vec::new());
        let mut grids = GridParts::default();
        let exact: Vec<Exact> = fences
            .iter()
            .map(|f| match &f.shape {
                Shape::Circle { lon, lat, radius_m } => Exact::Circle {
                    centre: unit_vector(*lat, *lon),
                    chord2_max: chord2_of_m(*radius_m),
                },
                Shape::Polygon { rings: rs } => {
                    let first = rings.len() as u32;
                    for r in rs {
                        rings.push((verts.len() as u32, r.len() as u32));
                        verts.extend_from_slice(r);
                    }
                    let grid = if f.shape.vertices() > grid_min {
                        grids.add(&verts, &rings[first as usize..], &f.shape.bbox())
                    } else {
                        NO_GRID
                    };
                    Exact::Polygon {
                        first,
                        count: rs.len() as u32,
                        grid,
                    }
                }
            })
            .collect();
        // The registry keeps positions within FENCE_VERTICES_TOTAL_MAX, so u32 offsets suffice; a
        // set built directly (tests, benches) may exceed the budget but not u32.
        assert!(u32::try_from(verts.len()).is_ok(), "too many positions");
        const _: () = assert!(FENCE_VERTICES_TOTAL_MAX < u32::MAX as usize);
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
                None => huge.push(Entry { bbox: *b, id }),
            }
        }
        pairs.sort_unstable();
        let mut cells: HashMap<u64, (u32, u32), ahash::RandomState> = HashMap::default();
        let mut cell_ids = Vec::with_capacity(pairs.len());
        for (i, &(k, id)) in pairs.iter().enumerate() {
            let e = cells.entry(k).or_insert((i as u32, 0));
            e.1 += 1;
            cell_ids.push(Entry {
                bbox: bboxes[id.0 as usize],
                id,
            });
        }
        FenceSet {
            fences,
            exact,
            verts,
            rings,
            grids: grids.grids,
            row_bounds: grids.row_bounds,
            grid_rows: grids.rows,
            partial_edges: grids.partial_edges,
            grid_cells: grids.cells,
            cell_edges: grids.cell_edges,
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

    /// Polygon positions over all fences (what [`FENCE_VERTICES_TOTAL_MAX`] bounds).
    pub fn vertices_total(&self) -> usize {
        self.verts.len()
    }

    /// Sizes of the polygon grids.
    pub fn grid_stats(&self) -> GridStats {
        GridStats {
            grids: self.grids.len(),
            cells: self.grid_cells.len(),
            boundary_cells: self
                .grid_cells
                .iter()
                .filter(|c| c.kind == BOUNDARY)
                .count(),
            cell_edges_max: self
                .grid_cells
                .iter()
                .map(|c| usize::from(c.len))
                .max()
                .unwrap_or(0),
            row_partials_max: self
                .grid_rows
                .iter()
                .map(|r| r.partial_len as usize)
                .max()
                .unwrap_or(0),
        }
    }

    /// Whether the polygon with grid `g` contains `(x, y)` = `(lon, lat)`, a point within its
    /// box: the same answer as [`polygon_contains`] over all its rings (see the module docs).
    #[inline]
    fn grid_contains(&self, g: u32, x: f64, y: f64) -> bool {
        let g = &self.grids[g as usize];
        let first = g.bounds_first as usize;
        let bounds = &self.row_bounds[first..first + g.rows as usize + 1];
        let r = bounds
            .partition_point(|&b| b <= y)
            .saturating_sub(1)
            .min(g.rows as usize - 1);
        let row = &self.grid_rows[g.rows_first as usize + r];
        let c = (((x - g.min_lon) * row.cols_per_deg) as usize).min(row.cols as usize - 1);
        let cell = self.grid_cells[row.cells_first as usize + c];
        match cell.kind {
            INSIDE => return true,
            OUTSIDE => return false,
            _ => {}
        }
        let mut inside = cell.parity != 0;
        let (ps, pn) = (row.partial_start, row.partial_len);
        let listed = &self.cell_edges[cell.start as usize..cell.start as usize + cell.len as usize];
        let partial = &self.partial_edges[ps as usize..(ps + pn) as usize];
        for &e in listed.iter().chain(partial) {
            let e = e as usize;
            match edge_test(self.verts[e], self.verts[e + 1], x, y) {
                ON_EDGE => return true,
                CROSSES => inside = !inside,
                _ => {}
            }
        }
        inside
    }

    /// Index entries (fence-cell pairs) plus always-checked fences: a size figure for tests and
    /// benches.
    pub fn index_entries(&self) -> usize {
        self.cell_ids.len() + self.huge.len()
    }

    /// Pushes `id` when its fence contains the point; `pv` caches the point's unit vector.
    #[inline]
    fn check(
        &self,
        e: &Entry,
        lat: f64,
        lon: f64,
        pv: &mut Option<[f64; 3]>,
        out: &mut Vec<FenceId>,
    ) {
        if !e.bbox.contains(lat, lon) {
            return;
        }
        // Same arithmetic as `Shape::contains_in_bbox` (bit for bit), minus the repeated parts.
        let inside = match self.exact[e.id.0 as usize] {
            Exact::Circle { centre, chord2_max } => {
                let p = pv.get_or_insert_with(|| unit_vector(lat, lon));
                chord2(&centre, p) <= chord2_max
            }
            Exact::Polygon { grid, .. } if grid != NO_GRID => self.grid_contains(grid, lon, lat),
            Exact::Polygon { first, count, .. } => polygon_contains(
                self.rings[first as usize..(first + count) as usize]
                    .iter()
                    .map(|&(s, n)| &self.verts[s as usize..(s + n) as usize]),
                lon,
                lat,
            ),
        };
        if inside {
            out.push(e.id);
        }
    }

    /// The ids of the fences containing the point, ascending, appended to `out` (cleared first).
    pub fn containing(&self, lat: f64, lon: f64, out: &mut Vec<FenceId>) {
        out.clear();
        if self.fences.is_empty() || !valid_point(lat, lon) {
            return;
        }
        let mut pv = None;
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
                for e in &self.cell_ids[start as usize..(start + len) as usize] {
                    self.check(e, lat, lon, &mut pv, out);
                }
            }
        }
        for e in &self.huge {
            self.check(e, lat, lon, &mut pv, out);
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

/// The grids of a set under construction (moved into the [`FenceSet`] when done).
#[derive(Default)]
struct GridParts {
    grids: Vec<Grid>,
    row_bounds: Vec<f64>,
    rows: Vec<Row>,
    partial_edges: Vec<u32>,
    cells: Vec<Cell>,
    cell_edges: Vec<u32>,
}

/// Whether the segment `a`-`b` meets the box `[x0, x1] × [y0, y1]` (Liang-Barsky clipping).
fn segment_meets_box(a: (f64, f64), b: (f64, f64), x0: f64, x1: f64, y0: f64, y1: f64) -> bool {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, a.0 - x0),
        (dx, x1 - a.0),
        (-dy, a.1 - y0),
        (dy, y1 - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return false;
            }
        } else {
            let r = q / p;
            if p < 0.0 {
                if r > t1 {
                    return false;
                }
                t0 = t0.max(r);
            } else {
                if r < t0 {
                    return false;
                }
                t1 = t1.min(r);
            }
        }
    }
    true
}

/// The longitude range of the part of `a`-`b` with latitude in `[y0, y1]` (the segment is known
/// to reach that band).
fn x_range_in_band(a: (f64, f64), b: (f64, f64), y0: f64, y1: f64) -> (f64, f64) {
    if a.1 == b.1 {
        return (a.0.min(b.0), a.0.max(b.0));
    }
    let at = |y: f64| {
        let t = ((y - a.1) / (b.1 - a.1)).clamp(0.0, 1.0);
        a.0 + t * (b.0 - a.0)
    };
    let (p, q) = (at(y0), at(y1));
    (p.min(q), p.max(q))
}

impl GridParts {
    /// Builds the grid of the polygon whose rings are `rings` (ranges of `verts`) and whose box
    /// is `bbox`; returns its index.
    fn add(&mut self, verts: &[(f64, f64)], rings: &[(u32, u32)], bbox: &BBox) -> u32 {
        let edges: Vec<u32> = rings.iter().flat_map(|&(s, n)| s..s + n - 1).collect();
        // Rows: cut at positions' latitudes, at most FENCE_GRID_ROW_VERTICES_MAX strictly inside
        // a row. The last row, [max, max + 1), only ever sees points at the top latitude.
        let mut ys: Vec<f64> = rings
            .iter()
            .flat_map(|&(s, n)| verts[s as usize..(s + n) as usize].iter().map(|p| p.1))
            .collect();
        ys.sort_unstable_by(f64::total_cmp);
        let (lo, hi) = (ys[0], ys[ys.len() - 1]);
        let mut bounds = vec![lo];
        let mut inside = 0usize;
        for run in ys.chunk_by(|a, b| a == b) {
            let y = run[0];
            if y <= lo || y >= hi {
                continue;
            }
            if inside + run.len() > FENCE_GRID_ROW_VERTICES_MAX {
                bounds.push(y);
                inside = 0;
            } else {
                inside += run.len();
            }
        }
        if hi > lo {
            bounds.push(hi);
        }
        bounds.push(hi + 1.0);
        let rows = bounds.len() - 1;
        let row_of = |y: f64| {
            bounds
                .partition_point(|&b| b <= y)
                .saturating_sub(1)
                .min(rows - 1)
        };
        let width = bbox.max_lon - bbox.min_lon;
        // Edges by row.
        let mut by_row: Vec<Vec<u32>> = vec![Vec::new(); rows];
        for &e in &edges {
            let (a, b) = (verts[e as usize], verts[e as usize + 1]);
            for row in &mut by_row[row_of(a.1.min(b.1))..=row_of(a.1.max(b.1))] {
                row.push(e);
            }
        }
        // Columns per row: enough for about FENCE_GRID_CELL_EDGES_TARGET listed edges per cell
        // if they were spread evenly, at least FENCE_GRID_COLUMNS_MIN (so most of a row's
        // area is classified), at most FENCE_GRID_COLUMNS_MAX, and all rows together at most
        // FENCE_GRID_CELLS_PER_VERTEX cells per position (scaled down evenly beyond).
        let mut cols: Vec<usize> = by_row
            .iter()
            .enumerate()
            .map(|(r, es)| {
                if width <= 0.0 {
                    return 1;
                }
                let (y0, y1) = (bounds[r], bounds[r + 1]);
                // Edges a cell may list: all but the row's partial ones (spanning, and touching
                // the row's bottom latitude, like the teeth of a comb ending there).
                let listed = es
                    .iter()
                    .filter(|&&e| {
                        let (a, b) = (verts[e as usize], verts[e as usize + 1]);
                        let (lo, hi) = (a.1.min(b.1), a.1.max(b.1));
                        !((lo > y0 && lo < y1) || (hi > y0 && hi < y1))
                    })
                    .count();
                listed
                    .div_ceil(FENCE_GRID_CELL_EDGES_TARGET)
                    .clamp(FENCE_GRID_COLUMNS_MIN, FENCE_GRID_COLUMNS_MAX)
            })
            .collect();
        let positions: usize = rings.iter().map(|&(_, n)| n as usize).sum();
        let budget = FENCE_GRID_CELLS_PER_VERTEX * positions;
        let total: usize = cols.iter().sum();
        if total > budget {
            for c in &mut cols {
                *c = (*c * budget / total).max(1);
            }
        }
        let grid = Grid {
            bounds_first: self.row_bounds.len() as u32,
            rows: rows as u32,
            rows_first: self.rows.len() as u32,
            min_lon: bbox.min_lon,
        };
        let m = MARGIN_DEG;
        let mut local: Vec<Vec<u32>> = Vec::new();
        let mut near = Vec::new();
        let mut toggle = Vec::new();
        for (r, row_edges) in by_row.iter().enumerate() {
            let (y0, y1) = (bounds[r], bounds[r + 1]);
            let cols = cols[r];
            let cols_per_deg = if width > 0.0 {
                cols as f64 / width
            } else {
                0.0
            };
            let col_of = |x: f64| (((x - bbox.min_lon) * cols_per_deg) as usize).min(cols - 1);
            let col_x = |c: usize| bbox.min_lon + width * c as f64 / cols as f64;
            let partial_start = self.partial_edges.len();
            local.iter_mut().for_each(Vec::clear);
            local.resize_with(cols, Vec::new);
            near.clear();
            near.resize(cols, false);
            toggle.clear();
            toggle.resize(cols + 1, 0u8);
            for &e in row_edges {
                let (a, b) = (verts[e as usize], verts[e as usize + 1]);
                let (emin, emax) = (a.1.min(b.1), a.1.max(b.1));
                let partial = (emin > y0 && emin < y1) || (emax > y0 && emax < y1);
                let spanner = !partial && emin <= y0 && emax >= y1;
                if partial {
                    self.partial_edges.push(e);
                }
                let (xl, xh) = x_range_in_band(a, b, y0 - 2.0 * m, y1 + 2.0 * m);
                let (c_lo, c_hi) = (col_of(xl - 4.0 * m), col_of(xh + 4.0 * m));
                if spanner {
                    // Every column left of c_lo has this edge wholly to its right.
                    toggle[0] ^= 1;
                    toggle[c_lo] ^= 1;
                }
                for c in c_lo..=c_hi {
                    let (x0, x1) = (col_x(c), col_x(c + 1));
                    if segment_meets_box(
                        a,
                        b,
                        x0 - 2.0 * m,
                        x1 + 2.0 * m,
                        y0 - 2.0 * m,
                        y1 + 2.0 * m,
                    ) {
                        near[c] = true;
                        if !partial {
                            local[c].push(e);
                        }
                    } else if spanner {
                        // Wholly left or right of the cell within the row: which, at mid-row.
                        let ym = (y0 + y1) / 2.0;
                        let xm = a.0 + (ym - a.1) * (b.0 - a.0) / (b.1 - a.1);
                        if xm > x1 {
                            toggle[c] ^= 1;
                            toggle[c + 1] ^= 1;
                        }
                    }
                }
            }
            let partials = &self.partial_edges[partial_start..];
            self.rows.push(Row {
                partial_start: partial_start as u32,
                partial_len: partials.len() as u32,
                cells_first: self.cells.len() as u32,
                cols: cols as u32,
                cols_per_deg,
            });
            let mut parity = 0u8;
            for c in 0..cols {
                parity ^= toggle[c];
                if near[c] {
                    let len = u16::try_from(local[c].len()).expect("edges per cell fit u16");
                    self.cells.push(Cell {
                        start: self.cell_edges.len() as u32,
                        len,
                        kind: BOUNDARY,
                        parity,
                    });
                    self.cell_edges.extend_from_slice(&local[c]);
                } else {
                    // No edge near: every point of the cell has the answer of its centre, which
                    // the row's far edges decide exactly.
                    let (xc, yc) = ((col_x(c) + col_x(c + 1)) / 2.0, (y0 + y1) / 2.0);
                    let mut inside = parity != 0;
                    for &e in partials {
                        let t = edge_test(verts[e as usize], verts[e as usize + 1], xc, yc);
                        debug_assert!(t != ON_EDGE, "a far edge is not on the centre");
                        inside ^= t == CROSSES;
                    }
                    self.cells.push(Cell {
                        start: 0,
                        len: 0,
                        kind: if inside { INSIDE } else { OUTSIDE },
                        parity: 0,
                    });
                }
            }
        }
        self.row_bounds.extend_from_slice(&bounds);
        let id = self.grids.len() as u32;
        self.grids.push(grid);
        id
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
                        // Well inside the exterior: its radii are below half the smallest
                        // exterior radius, and star rings of >= 3 points keep half of theirs.
                        rings.push(ring(c, h.iter().map(|r| r * 0.09).collect(), s));
                    }
                    Shape::Polygon { rings }
                })
                // Clamping at the poles and the 180° span can fold a ring onto itself.
                .prop_filter("valid rings", |sh| match sh {
                    Shape::Polygon { rings } => crate::fence::validate_rings(rings).is_ok(),
                    Shape::Circle { .. } => true,
                }),
            // Rings of random vertices in a small box, kept when valid (simple): concave shapes
            // with vertices at arbitrary places.
            (
                point(),
                prop::collection::vec((0.0f64..1.0, 0.0f64..1.0), 3..10),
                scale.clone()
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
                })
                .prop_filter("a simple ring", |sh| match sh {
                    Shape::Polygon { rings } => crate::fence::validate_rings(rings).is_ok(),
                    Shape::Circle { .. } => true,
                }),
            // Many-vertex rings (grids with many rows) with small holes.
            (
                point(),
                prop::collection::vec(0.5f64..1.0, 40..300),
                scale,
                0usize..4,
            )
                .prop_map(|(c, radii, s, holes)| {
                    let mut rings = vec![ring(c, radii, s)];
                    for h in 0..holes {
                        let hc = (c.0 + s * 0.2 * (h as f64 - 1.5), c.1);
                        rings.push(ring(hc, vec![0.04, 0.05, 0.03, 0.05, 0.045], s));
                    }
                    Shape::Polygon { rings }
                })
                .prop_filter("valid rings", |sh| match sh {
                    Shape::Polygon { rings } => crate::fence::validate_rings(rings).is_ok(),
                    Shape::Circle { .. } => true,
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
                // Probes on and next to every edge of polygons: boundary cells of the grids.
                if let Shape::Polygon { rings } = &f.shape {
                    for r in rings {
                        for w in r.windows(2).step_by(1 + r.len() / 16) {
                            let (a, b) = (w[0], w[1]);
                            let mid = ((a.1 + b.1) / 2.0, (a.0 + b.0) / 2.0);
                            probes.push(mid);
                            probes.push((mid.0 + 1e-12, mid.1));
                            probes.push((mid.0, mid.1 - 1e-9));
                            probes.push((a.1, a.0));
                        }
                    }
                }
            }
            // The same answers with the default grids and with a grid for every polygon.
            let gridded = FenceSet::with_grid_min(fences.clone(), 0);
            let set = FenceSet::new(fences);
            let polygons = gridded.iter().filter(|(_, f)| f.shape.vertices() > 0).count();
            prop_assert_eq!(gridded.grid_stats().grids, polygons);
            let mut out = Vec::new();
            for &(lat, lon) in &probes {
                set.containing(lat, lon, &mut out);
                let want = brute(&set, lat, lon);
                prop_assert_eq!(&out, &want, "point {},{}", lat, lon);
                gridded.containing(lat, lon, &mut out);
                prop_assert_eq!(&out, &want, "gridded, point {},{}", lat, lon);
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
