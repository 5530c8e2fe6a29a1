//! Geofences: named areas (GeoJSON polygons with holes, or circles) that devices enter and exit.
//! This module owns a fence's shape, its parsing and validation from the HTTP body, its canonical
//! JSON form, and the point-in-fence test. [`FenceSet`] (an immutable, spatially indexed snapshot)
//! lives in `index`, [`FenceRegistry`] (persistence and publication of snapshots) in `registry`.
//! It does not know devices, subscriptions or the wire protocol of events.
//!
//! # Semantics (decided here; the index must agree exactly, see the proptests)
//! * Polygon edges are straight lines in planar longitude/latitude, as GeoJSON (RFC 7946 §3.1.1)
//!   says; there is no great-circle interpolation. A ring's longitude span may not exceed 180°:
//!   polygons crossing the antimeridian must be split into pieces (RFC 7946 §3.1.9), one fence
//!   each.
//! * A polygon's rings must be simple and apart: no two edges of its rings cross or touch (except
//!   neighbours in one ring at their shared position), every hole lies inside the exterior ring,
//!   and no hole lies inside another (refused as `self_intersecting`, `hole_outside` and
//!   `holes_overlap`; see [`validate_rings`]). Winding order is not checked (RFC 7946 §3.1.6 asks
//!   parsers not to reject on it).
//! * A polygon contains a point when the point lies on an edge of any of its rings, or when a ray
//!   from the point crosses the edges of all its rings together an odd number of times. For valid
//!   rings this is "inside or on the exterior ring and strictly inside none of the holes"; it is
//!   written as one even-odd count over all edges because every edge then decides its share of
//!   the answer alone, which is what lets the index (`index`) skip edges far from the point and
//!   still give bit for bit the same answer. So a polygon is a closed set. "On" is decided exactly
//!   in `f64` (vertices and points on horizontal/vertical edges are exact; on slanted edges
//!   rounding decides, the same way every time).
//! * A circle contains a point whose great-circle distance from its centre is at most `radius_m`,
//!   and which lies in the circle's (slightly padded) bounding box; the box test only matters at
//!   the last bits of rounding and makes the index exact by construction. The distance test is
//!   done as "chord between the unit vectors <= chord of `radius_m`", which is the same test as
//!   haversine distance <= radius (the chord is monotone in the arc) without trigonometry per
//!   fence: the index precomputes each centre's vector and the point's once per lookup.
//! * Points that are not finite or lie outside [-90, 90] × [-180, 180] are in no fence.
//!
//! # Body format
//! Either a GeoJSON Polygon geometry `{"type":"Polygon","coordinates":[exterior, hole...]}`
//! (positions `[lon, lat]` or `[lon, lat, alt]`, the altitude ignored; each ring closed, at least 4
//! positions; an RFC 7946 `"bbox"` member is accepted and ignored), or a circle
//! `{"center":[lon, lat],"radius_m":R}` with `0 < R <= 20,000 km`. Any other member is refused
//! (`bad_geojson`) rather than silently ignored: a client sending `"properties"` or `"radius"`
//! (no unit) would otherwise believe it had been applied.
//!
//! Invariant: every [`Fence`] value in the program passed [`Fence::parse`] validation (or was
//! built from a shape that did, see [`Fence::new`]), and [`Fence::to_json`] re-parses to an equal
//! shape.

mod batch;
mod index;
mod registry;

pub use batch::{parse_batch, BatchError};
pub use index::{FenceSet, GridStats, Scratch};
pub use registry::{FenceRegistry, FENCES_FILE};

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use crate::limits::{
    FENCES_MAX, FENCE_BODY_BYTES_MAX, FENCE_BULK_ENTRIES_MAX, FENCE_NAME_BYTES_MAX,
    FENCE_RADIUS_M_MAX, FENCE_VERTICES_MAX, FENCE_VERTICES_TOTAL_MAX,
};
use crate::spatial::{circle_bbox, BBox, EARTH_RADIUS_M};

/// A fence's position in one [`FenceSet`] snapshot. Ids are per snapshot: a new snapshot may
/// renumber (they follow name order), so anything kept across snapshots keys by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FenceId(pub u32);

/// A fence's area.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A polygon: `rings[0]` is the exterior ring, the others are holes. Positions are
    /// `(lon, lat)` in degrees; every ring is closed (first == last) and has at least 4 positions.
    Polygon {
        /// Exterior ring, then holes.
        rings: Vec<Vec<(f64, f64)>>,
    },
    /// A circle on the sphere.
    Circle {
        /// Centre longitude, degrees.
        lon: f64,
        /// Centre latitude, degrees.
        lat: f64,
        /// Radius (great-circle distance), metres.
        radius_m: f64,
    },
}

/// A named fence.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    /// Its name: 1..=64 bytes of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Its area.
    pub shape: Shape,
}

/// A device crossing a fence's boundary between two locations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// Outside (or never seen) before, inside now.
    Enter,
    /// Inside before, outside now.
    Exit,
}

impl Transition {
    /// The wire name: `"enter"` or `"exit"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Enter => "enter",
            Transition::Exit => "exit",
        }
    }
}

/// Errors of fence parsing, validation and persistence.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The fence name is empty, too long or has a character outside `[A-Za-z0-9._-]`.
    #[error("bad fence name: {0}")]
    BadName(String),
    /// The body is not JSON, or not a Polygon geometry or circle of the accepted form.
    #[error("{0}")]
    BadGeojson(String),
    /// The polygon has more positions than [`FENCE_VERTICES_MAX`].
    #[error("the polygon has more than {max} positions (over all rings)", max = FENCE_VERTICES_MAX)]
    TooManyVertices,
    /// The change would take the polygon positions of all fences beyond
    /// [`FENCE_VERTICES_TOTAL_MAX`].
    #[error(
        "the fences would hold {0} polygon positions in all, more than the limit of {max} \
         (FENCE_VERTICES_TOTAL_MAX); delete or simplify fences first",
        max = FENCE_VERTICES_TOTAL_MAX
    )]
    TooManyVerticesTotal(usize),
    /// Two edges of one ring cross or touch (other than neighbours at their shared position).
    #[error("{0}")]
    SelfIntersecting(String),
    /// A hole crosses or touches the exterior ring, or lies outside it.
    #[error("{0}")]
    HoleOutside(String),
    /// Two holes cross or touch, or one lies inside the other.
    #[error("{0}")]
    HolesOverlap(String),
    /// The circle's radius is not a finite number in (0, 20,000 km].
    #[error("{0}")]
    BadRadius(String),
    /// A coordinate is not finite, out of range, or a ring spans more than 180° of longitude.
    #[error("{0}")]
    BadCoordinates(String),
    /// The body is larger than [`FENCE_BODY_BYTES_MAX`].
    #[error("fence body of {0} bytes exceeds {max} bytes", max = FENCE_BODY_BYTES_MAX)]
    TooBig(usize),
    /// Creating the fence would exceed [`FENCES_MAX`].
    #[error("too many fences: at most {max} may exist", max = FENCES_MAX)]
    TooManyFences,
    /// A bulk import names the same fence twice.
    #[error("fence name {0:?} appears more than once in the batch")]
    DuplicateName(String),
    /// A bulk import carries more than [`FENCE_BULK_ENTRIES_MAX`] fences.
    #[error("the batch has {0} fences, at most {max} allowed per request", max = FENCE_BULK_ENTRIES_MAX)]
    TooManyEntries(usize),
    /// A bulk import body, or one of its entries, is not of the form
    /// `{"fences":[{"name":..,"shape":..},..]}`.
    #[error("{0}")]
    BadBatch(String),
    /// A file-system operation on the fences file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The fences file holds more than a limit of this build allows (e.g. it was written by a
    /// build with a larger [`FENCE_VERTICES_TOTAL_MAX`]).
    #[error("{}: the fences file is over a limit of this build: {detail}", path.display())]
    OverBudget {
        /// The fences file.
        path: PathBuf,
        /// Which limit, and by how much.
        detail: String,
    },
    /// The fences file exists but cannot be read back.
    #[error("{}: corrupt fences file: {detail}", path.display())]
    Corrupt {
        /// The fences file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl FenceError {
    /// A stable machine-readable reason (API: extend, never rename).
    pub fn reason(&self) -> &'static str {
        match self {
            FenceError::BadName(_) => "bad_name",
            FenceError::BadGeojson(_) => "bad_geojson",
            FenceError::TooManyVertices => "too_many_vertices",
            FenceError::TooManyVerticesTotal(_) => "too_many_vertices_total",
            FenceError::SelfIntersecting(_) => "self_intersecting",
            FenceError::HoleOutside(_) => "hole_outside",
            FenceError::HolesOverlap(_) => "holes_overlap",
            FenceError::BadRadius(_) => "bad_radius",
            FenceError::BadCoordinates(_) => "bad_coordinates",
            FenceError::TooBig(_) => "too_big",
            FenceError::TooManyFences => "too_many_fences",
            FenceError::DuplicateName(_) => "duplicate_name",
            FenceError::TooManyEntries(_) => "too_many_entries",
            FenceError::BadBatch(_) => "bad_batch",
            FenceError::Io { .. } => "io",
            FenceError::Corrupt { .. } => "corrupt",
            FenceError::OverBudget { .. } => "over_budget",
        }
    }
}

/// Checks a fence name: 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), FenceError> {
    if name.is_empty() {
        return Err(FenceError::BadName("the name is empty".into()));
    }
    if name.len() > FENCE_NAME_BYTES_MAX {
        return Err(FenceError::BadName(format!(
            "the name is {} bytes, at most {FENCE_NAME_BYTES_MAX} allowed",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(FenceError::BadName(format!(
            "character {c:?} is not allowed (only A-Z a-z 0-9 . _ -)"
        )));
    }
    Ok(())
}

fn geojson(msg: impl Into<String>) -> FenceError {
    FenceError::BadGeojson(msg.into())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads one position `[lon, lat]` or `[lon, lat, alt]`; `what` names it in errors.
fn position(v: &Value, what: &dyn Fn() -> String) -> Result<(f64, f64), FenceError> {
    let a = v.as_array().ok_or_else(|| {
        geojson(format!(
            "{} must be an array [lon, lat], got {}",
            what(),
            kind_of(v)
        ))
    })?;
    if a.len() < 2 || a.len() > 3 {
        return Err(geojson(format!(
            "{} must have 2 or 3 elements ([lon, lat] or [lon, lat, alt]), got {}",
            what(),
            a.len()
        )));
    }
    let num = |i: usize, axis: &str| -> Result<f64, FenceError> {
        let n = a[i].as_f64().ok_or_else(|| {
            geojson(format!(
                "{} {axis} must be a number, got {}",
                what(),
                kind_of(&a[i])
            ))
        })?;
        if !n.is_finite() {
            return Err(FenceError::BadCoordinates(format!(
                "{} {axis} is not finite",
                what()
            )));
        }
        Ok(n)
    };
    let lon = num(0, "longitude")?;
    let lat = num(1, "latitude")?;
    if a.len() == 3 {
        // The altitude is ignored, but it must still be a number (RFC 7946 §3.1.1).
        num(2, "altitude")?;
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(FenceError::BadCoordinates(format!(
            "{} longitude {lon} is outside [-180, 180]",
            what()
        )));
    }
    if !(-90.0..=90.0).contains(&lat) {
        return Err(FenceError::BadCoordinates(format!(
            "{} latitude {lat} is outside [-90, 90]",
            what()
        )));
    }
    Ok((lon, lat))
}

fn parse_polygon(obj: &serde_json::Map<String, Value>) -> Result<Shape, FenceError> {
    for (k, v) in obj {
        match k.as_str() {
            "type" | "coordinates" => {}
            // RFC 7946 §5: a geometry may carry a bounding box; it is redundant, so it is checked
            // for form only and dropped.
            "bbox" => {
                let ok = v
                    .as_array()
                    .is_some_and(|a| (a.len() == 4 || a.len() == 6) && a.iter().all(Value::is_number));
                if !ok {
                    return Err(geojson("\"bbox\" must be an array of 4 or 6 numbers"));
                }
            }
            other => {
                return Err(geojson(format!(
                    "unknown member {other:?} in a Polygon (allowed: \"type\", \"coordinates\", \"bbox\")"
                )))
            }
        }
    }
    let coords = obj
        .get("coordinates")
        .ok_or_else(|| geojson("a Polygon needs \"coordinates\""))?;
    let rings_v = coords.as_array().ok_or_else(|| {
        geojson(format!(
            "\"coordinates\" must be an array of rings, got {}",
            kind_of(coords)
        ))
    })?;
    if rings_v.is_empty() {
        return Err(geojson(
            "\"coordinates\" must hold at least the exterior ring",
        ));
    }
    let mut total = 0usize;
    let mut rings = Vec::with_capacity(rings_v.len());
    for (ri, ring_v) in rings_v.iter().enumerate() {
        let pos_v = ring_v.as_array().ok_or_else(|| {
            geojson(format!(
                "ring {ri} must be an array of positions, got {}",
                kind_of(ring_v)
            ))
        })?;
        total += pos_v.len();
        if total > FENCE_VERTICES_MAX {
            return Err(FenceError::TooManyVertices);
        }
        if pos_v.len() < 4 {
            return Err(geojson(format!(
                "ring {ri} has {} positions; a closed ring needs at least 4",
                pos_v.len()
            )));
        }
        let mut ring = Vec::with_capacity(pos_v.len());
        for (pi, p) in pos_v.iter().enumerate() {
            ring.push(position(p, &|| format!("ring {ri} position {pi}"))?);
        }
        if ring.first() != ring.last() {
            return Err(geojson(format!(
                "ring {ri} is not closed (its first and last positions differ)"
            )));
        }
        let (lo, hi) = ring
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(x, _)| {
                (lo.min(x), hi.max(x))
            });
        if hi - lo > 180.0 {
            return Err(FenceError::BadCoordinates(format!(
                "ring {ri} spans {} degrees of longitude (more than 180); a polygon crossing the \
                 antimeridian must be split into pieces that do not cross it (RFC 7946 §3.1.9), \
                 one fence each",
                hi - lo
            )));
        }
        rings.push(ring);
    }
    validate_rings(&rings)?;
    Ok(Shape::Polygon { rings })
}

fn parse_circle(obj: &serde_json::Map<String, Value>) -> Result<Shape, FenceError> {
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "center" | "radius_m"))
    {
        return Err(geojson(format!(
            "unknown member {k:?} in a circle (allowed: \"center\", \"radius_m\")"
        )));
    }
    let center = obj
        .get("center")
        .ok_or_else(|| geojson("a circle needs \"center\": [lon, lat]"))?;
    let (lon, lat) = position(center, &|| "\"center\"".to_string())?;
    let r = obj
        .get("radius_m")
        .ok_or_else(|| FenceError::BadRadius("a circle needs \"radius_m\" (metres)".into()))?;
    let radius_m = r.as_f64().ok_or_else(|| {
        FenceError::BadRadius(format!("\"radius_m\" must be a number, got {}", kind_of(r)))
    })?;
    if !(radius_m.is_finite() && radius_m > 0.0 && radius_m <= FENCE_RADIUS_M_MAX) {
        return Err(FenceError::BadRadius(format!(
            "\"radius_m\" {radius_m} must be greater than 0 and at most {FENCE_RADIUS_M_MAX} (20,000 km)"
        )));
    }
    Ok(Shape::Circle { lon, lat, radius_m })
}

impl Shape {
    /// Parses and validates a shape body (see the module docs for the accepted forms).
    pub fn parse(body: &[u8]) -> Result<Shape, FenceError> {
        if body.len() > FENCE_BODY_BYTES_MAX {
            return Err(FenceError::TooBig(body.len()));
        }
        // serde_json bounds nesting (128 levels), so arbitrary input cannot overflow the stack.
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| geojson(format!("the body is not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| {
            geojson(format!(
                "the body must be a JSON object (a GeoJSON Polygon or a circle), got {}",
                kind_of(&v)
            ))
        })?;
        match obj.get("type") {
            Some(Value::String(t)) if t == "Polygon" => parse_polygon(obj),
            Some(Value::String(t)) => Err(geojson(format!(
                "\"type\" must be \"Polygon\", got {t:?} (a MultiPolygon or Feature must be sent \
                 as one Polygon geometry per fence)"
            ))),
            Some(other) => Err(geojson(format!(
                "\"type\" must be the string \"Polygon\", got {}",
                kind_of(other)
            ))),
            None if obj.contains_key("center") || obj.contains_key("radius_m") => parse_circle(obj),
            None => Err(geojson(
                "expected a GeoJSON Polygon {\"type\":\"Polygon\",\"coordinates\":[...]} or a circle \
                 {\"center\":[lon,lat],\"radius_m\":R}",
            )),
        }
    }

    /// The canonical JSON text of the shape (altitudes and `bbox` dropped; numbers in shortest
    /// round-trip form, so [`Shape::parse`] of it gives back an equal shape).
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        let num = |s: &mut String, v: f64| {
            // Finite by validation; serde_json prints the shortest text that parses back exactly.
            s.push_str(
                &serde_json::Number::from_f64(v)
                    .expect("validated finite")
                    .to_string(),
            );
        };
        match self {
            Shape::Polygon { rings } => {
                s.push_str("{\"type\":\"Polygon\",\"coordinates\":[");
                for (ri, ring) in rings.iter().enumerate() {
                    if ri > 0 {
                        s.push(',');
                    }
                    s.push('[');
                    for (pi, &(lon, lat)) in ring.iter().enumerate() {
                        if pi > 0 {
                            s.push(',');
                        }
                        s.push('[');
                        num(&mut s, lon);
                        s.push(',');
                        num(&mut s, lat);
                        s.push(']');
                    }
                    s.push(']');
                }
                s.push_str("]}");
            }
            Shape::Circle { lon, lat, radius_m } => {
                s.push_str("{\"center\":[");
                num(&mut s, *lon);
                s.push(',');
                num(&mut s, *lat);
                s.push_str("],\"radius_m\":");
                num(&mut s, *radius_m);
                s.push('}');
            }
        }
        s
    }

    /// The shape's bounding box: the exterior ring's vertex extent, or the circle's box (padded
    /// by 1e-9° in latitude against rounding). Every point the shape contains lies in it.
    pub fn bbox(&self) -> BBox {
        match self {
            Shape::Polygon { rings } => ring_bbox(&rings[0]),
            Shape::Circle { lon, lat, radius_m } => {
                let mut b = circle_bbox(*lat, *lon, *radius_m);
                b.min_lat = (b.min_lat - 1e-9).max(-90.0);
                b.max_lat = (b.max_lat + 1e-9).min(90.0);
                b
            }
        }
    }

    /// The exact test for a valid point already known to lie in [`Shape::bbox`].
    pub(crate) fn contains_in_bbox(&self, lat: f64, lon: f64) -> bool {
        match self {
            Shape::Polygon { rings } => polygon_contains(rings.iter().map(Vec::as_slice), lon, lat),
            Shape::Circle {
                lon: clon,
                lat: clat,
                radius_m,
            } => {
                chord2(&unit_vector(*clat, *clon), &unit_vector(lat, lon)) <= chord2_of_m(*radius_m)
            }
        }
    }

    /// Positions over all rings (0 for a circle).
    pub fn vertices(&self) -> usize {
        match self {
            Shape::Polygon { rings } => rings.iter().map(Vec::len).sum(),
            Shape::Circle { .. } => 0,
        }
    }
}

/// What one edge says about a point: it lies on the edge ([`ON_EDGE`]), a ray from it towards +x
/// crosses the edge ([`CROSSES`]), or neither (0).
pub(crate) const CROSSES: u8 = 1;
/// See [`CROSSES`].
pub(crate) const ON_EDGE: u8 = 2;

/// The even-odd ray test of one edge `a`-`b` against the point `(x, y)`, with an exact on-edge
/// test first. Each edge's answer depends on that edge alone, so any subset of edges can be
/// tested in any order and combined (the index relies on it).
#[inline]
pub(crate) fn edge_test(a: (f64, f64), b: (f64, f64), x: f64, y: f64) -> u8 {
    let ((ax, ay), (bx, by)) = (a, b);
    // An edge wholly above or below the point matters to neither test (most edges).
    if (y < ay && y < by) || (y > ay && y > by) {
        return 0;
    }
    if x >= ax.min(bx) && x <= ax.max(bx) {
        let cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax);
        if cross == 0.0 {
            return ON_EDGE;
        }
    }
    // Half-open in y, so a ray through a vertex counts the two edges meeting there once.
    if (ay > y) != (by > y) {
        let xi = ax + (y - ay) * (bx - ax) / (by - ay);
        if x < xi {
            return CROSSES;
        }
    }
    0
}

/// Whether the polygon of `rings` (exterior first, then holes) contains `(x, y)`: on an edge of
/// any ring, or an odd number of ray crossings over the edges of all rings (see the module docs).
#[inline]
pub(crate) fn polygon_contains<'a>(
    rings: impl Iterator<Item = &'a [(f64, f64)]>,
    x: f64,
    y: f64,
) -> bool {
    let mut inside = false;
    for ring in rings {
        for w in ring.windows(2) {
            match edge_test(w[0], w[1], x, y) {
                ON_EDGE => return true,
                CROSSES => inside = !inside,
                _ => {}
            }
        }
    }
    inside
}

/// Even-odd test of one ring alone (validation: is a ring's position inside another ring).
fn ring_contains(ring: &[(f64, f64)], p: (f64, f64)) -> bool {
    polygon_contains(std::iter::once(ring), p.0, p.1)
}

/// The sign of the turn `a` -> `b` -> `c` (positive counter-clockwise, 0 collinear).
fn orient(a: (f64, f64), b: (f64, f64), c: (f64, f64)) -> f64 {
    (b.0 - a.0) * (c.1 - a.1) - (b.1 - a.1) * (c.0 - a.0)
}

/// Whether `p`, known collinear with `a`-`b`, lies within the segment's box.
fn within(a: (f64, f64), b: (f64, f64), p: (f64, f64)) -> bool {
    p.0 >= a.0.min(b.0) && p.0 <= a.0.max(b.0) && p.1 >= a.1.min(b.1) && p.1 <= a.1.max(b.1)
}

/// Whether the closed segments `p1`-`p2` and `q1`-`q2` share a point.
fn segments_meet(p1: (f64, f64), p2: (f64, f64), q1: (f64, f64), q2: (f64, f64)) -> bool {
    let (o1, o2) = (orient(p1, p2, q1), orient(p1, p2, q2));
    let (o3, o4) = (orient(q1, q2, p1), orient(q1, q2, p2));
    if ((o1 > 0.0 && o2 < 0.0) || (o1 < 0.0 && o2 > 0.0))
        && ((o3 > 0.0 && o4 < 0.0) || (o3 < 0.0 && o4 > 0.0))
    {
        return true;
    }
    (o1 == 0.0 && within(p1, p2, q1))
        || (o2 == 0.0 && within(p1, p2, q2))
        || (o3 == 0.0 && within(q1, q2, p1))
        || (o4 == 0.0 && within(q1, q2, p2))
}

/// One edge of a ring, for validation: positions `i`, `i + 1` of ring `ring`, and its sequence
/// number among the ring's edges of non-zero length (`seq`) out of `of`.
#[derive(Clone, Copy)]
struct VEdge {
    a: (f64, f64),
    b: (f64, f64),
    ring: usize,
    i: usize,
    seq: usize,
    of: usize,
}

/// Refuses rings that are not simple and apart (see the module docs): edges are swept in order
/// of their smallest longitude (or latitude, when the edges overlap less that way), each compared
/// with the earlier edges still overlapping it on both axes. That is O(n log n + pairs
/// compared), at worst O(n²) for [`FENCE_VERTICES_MAX`] positions (e.g. a square spiral, long
/// edges both ways), measured in benches/fence.rs (`validate_rings at ...`). Repeated
/// consecutive positions are allowed (a zero-length edge is skipped).
pub fn validate_rings(rings: &[Vec<(f64, f64)>]) -> Result<(), FenceError> {
    let mut edges: Vec<VEdge> = Vec::new();
    for (ri, ring) in rings.iter().enumerate() {
        let first = edges.len();
        for (i, w) in ring.windows(2).enumerate() {
            if w[0] != w[1] {
                let seq = edges.len() - first;
                edges.push(VEdge {
                    a: w[0],
                    b: w[1],
                    ring: ri,
                    i,
                    seq,
                    of: 0,
                });
            }
        }
        let of = edges.len() - first;
        if of < 3 {
            return Err(FenceError::SelfIntersecting(format!(
                "ring {ri} has fewer than 3 distinct positions, so it encloses no area"
            )));
        }
        for e in &mut edges[first..] {
            e.of = of;
        }
    }
    // Sweep along the axis the edges overlap less on (teeth of a comb lying along x overlap on
    // x, not on y): mirroring the plane across the diagonal changes no intersection.
    let (mut wx, mut wy) = (0.0f64, 0.0f64);
    for e in &edges {
        wx += (e.b.0 - e.a.0).abs();
        wy += (e.b.1 - e.a.1).abs();
    }
    let b = ring_bbox(&rings[0]);
    if wx * (b.max_lat - b.min_lat) > wy * (b.max_lon - b.min_lon) {
        for e in &mut edges {
            e.a = (e.a.1, e.a.0);
            e.b = (e.b.1, e.b.0);
        }
    }
    let min_x = |e: &VEdge| e.a.0.min(e.b.0);
    let mut order: Vec<usize> = (0..edges.len()).collect();
    order.sort_unstable_by(|&p, &q| min_x(&edges[p]).total_cmp(&min_x(&edges[q])));
    let mut active: Vec<usize> = Vec::new();
    for &k in &order {
        let e = edges[k];
        let x0 = min_x(&e);
        active.retain(|&j| edges[j].a.0.max(edges[j].b.0) >= x0);
        let (y0, y1) = (e.a.1.min(e.b.1), e.a.1.max(e.b.1));
        for &j in &active {
            let f = edges[j];
            if f.a.1.max(f.b.1) < y0 || f.a.1.min(f.b.1) > y1 {
                continue;
            }
            let adjacent = e.ring == f.ring
                && (e.seq.abs_diff(f.seq) == 1 || e.seq.abs_diff(f.seq) == e.of - 1);
            let bad = if adjacent {
                // Neighbours share one position; they may not fold back along each other.
                let (shared, p, q) = if e.a == f.b {
                    (e.a, e.b, f.a)
                } else {
                    (e.b, e.a, f.b)
                };
                orient(shared, p, q) == 0.0
                    && (p.0 - shared.0) * (q.0 - shared.0) + (p.1 - shared.1) * (q.1 - shared.1)
                        > 0.0
            } else {
                segments_meet(e.a, e.b, f.a, f.b)
            };
            if bad {
                let (e, f) = if (e.ring, e.i) < (f.ring, f.i) {
                    (e, f)
                } else {
                    (f, e)
                };
                let what = format!(
                    "the edge from position {} to {} of ring {} and the edge from position {} \
                     to {} of ring {} cross or touch",
                    e.i,
                    e.i + 1,
                    e.ring,
                    f.i,
                    f.i + 1,
                    f.ring
                );
                return Err(if e.ring == f.ring {
                    FenceError::SelfIntersecting(format!(
                        "{what} (a ring must be simple: split a figure eight into two fences)"
                    ))
                } else if e.ring == 0 {
                    FenceError::HoleOutside(format!(
                        "{what} (a hole must lie strictly inside the exterior ring)"
                    ))
                } else {
                    FenceError::HolesOverlap(format!(
                        "{what} (holes may not cross or touch: merge them into one)"
                    ))
                });
            }
        }
        active.push(k);
    }
    // No two rings meet, so each hole is wholly inside or outside every other ring: one
    // position of it decides.
    let boxes: Vec<BBox> = rings.iter().map(|r| ring_bbox(r)).collect();
    for (hi, hole) in rings.iter().enumerate().skip(1) {
        let p = hole[0];
        if !ring_contains(&rings[0], p) {
            return Err(FenceError::HoleOutside(format!(
                "ring {hi} (a hole) lies outside the exterior ring"
            )));
        }
        for (oi, other) in rings.iter().enumerate().skip(1) {
            if oi != hi && boxes[oi].contains(p.1, p.0) && ring_contains(other, p) {
                return Err(FenceError::HolesOverlap(format!(
                    "ring {hi} (a hole) lies inside ring {oi} (another hole)"
                )));
            }
        }
    }
    Ok(())
}

/// The box of one ring's positions.
fn ring_bbox(ring: &[(f64, f64)]) -> BBox {
    let mut b = BBox {
        min_lon: f64::INFINITY,
        min_lat: f64::INFINITY,
        max_lon: f64::NEG_INFINITY,
        max_lat: f64::NEG_INFINITY,
    };
    for &(x, y) in ring {
        b.min_lon = b.min_lon.min(x);
        b.max_lon = b.max_lon.max(x);
        b.min_lat = b.min_lat.min(y);
        b.max_lat = b.max_lat.max(y);
    }
    b
}

/// The point on the unit sphere at `(lat, lon)` degrees.
pub(crate) fn unit_vector(lat: f64, lon: f64) -> [f64; 3] {
    let (sp, cp) = lat.to_radians().sin_cos();
    let (sl, cl) = lon.to_radians().sin_cos();
    [cp * cl, cp * sl, sp]
}

/// The squared chord between two unit vectors (a difference of nearby vectors keeps its relative
/// precision, so this resolves nanometres, unlike a dot product near 1).
#[inline]
pub(crate) fn chord2(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    let (x, y, z) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    x * x + y * y + z * z
}

/// The squared chord of a great-circle arc of `m` metres (monotone for arcs up to half the globe).
pub(crate) fn chord2_of_m(m: f64) -> f64 {
    let s = (m / (2.0 * EARTH_RADIUS_M)).sin();
    4.0 * s * s
}

/// Whether `(lat, lon)` is a finite point on the globe.
pub(crate) fn valid_point(lat: f64, lon: f64) -> bool {
    (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)
}

impl Fence {
    /// Builds a fence from a name and an already valid shape (e.g. one from [`Shape::parse`]);
    /// validates the name only.
    pub fn new(name: &str, shape: Shape) -> Result<Fence, FenceError> {
        validate_name(name)?;
        Ok(Fence {
            name: name.to_string(),
            shape,
        })
    }

    /// Validates `name` and parses `body` (a GeoJSON Polygon or a circle; see the module docs).
    pub fn parse(name: &str, body: &[u8]) -> Result<Fence, FenceError> {
        validate_name(name)?;
        Ok(Fence {
            name: name.to_string(),
            shape: Shape::parse(body)?,
        })
    }

    /// The canonical JSON of the shape (the `"shape"` value of `GET /v1/geofences/{name}`).
    pub fn to_json(&self) -> String {
        self.shape.to_json()
    }

    /// Whether the fence contains the point (see the module docs for the exact semantics).
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        valid_point(lat, lon)
            && self.shape.bbox().contains(lat, lon)
            && self.shape.contains_in_bbox(lat, lon)
    }
}

/// Appends `s` to `out` as a JSON string literal.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    let _ = write!(out, "{}", Value::String(s.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(body: &str) -> FenceError {
        Fence::parse("f", body.as_bytes()).expect_err(body)
    }

    /// Asserts `body` is refused with `reason` and a message containing `needle`.
    fn refused(body: &str, reason: &str, needle: &str) {
        let e = err(body);
        assert_eq!(e.reason(), reason, "{body}: {e}");
        assert!(
            e.to_string().contains(needle),
            "{body}: {e:?} lacks {needle:?}"
        );
    }

    const SQUARE: &str =
        r#"{"type":"Polygon","coordinates":[[[0,0],[10,0],[10,10],[0,10],[0,0]]]}"#;

    #[test]
    fn parses_polygons_and_circles() {
        // Valid bodies parse to the expected shapes: altitude dropped, bbox accepted, holes kept.
        let f = Fence::parse("depot-1.a_b", SQUARE.as_bytes()).unwrap();
        assert_eq!(f.name, "depot-1.a_b");
        let Shape::Polygon { rings } = &f.shape else {
            panic!("not a polygon")
        };
        assert_eq!(rings.len(), 1);
        assert_eq!(rings[0][2], (10.0, 10.0));
        let alt = r#"{"type":"Polygon","bbox":[0,0,1,1],"coordinates":[[[0,0,5],[1,0,5],[1,1,5],[0,0,5]],
            [[0.5,0.1],[0.6,0.1],[0.6,0.2],[0.5,0.1]]]}"#;
        let f = Fence::parse("x", alt.as_bytes()).unwrap();
        assert_eq!(f.shape.vertices(), 8);
        let c = Fence::parse("c", br#"{"center":[13.4,52.5],"radius_m":250.5}"#).unwrap();
        assert_eq!(
            c.shape,
            Shape::Circle {
                lon: 13.4,
                lat: 52.5,
                radius_m: 250.5
            }
        );
    }

    #[test]
    fn refuses_every_bad_name() {
        // Empty, too long and bad-character names are refused with bad_name.
        for name in ["", &"a".repeat(65), "a b", "a/b", "é", "a\0"] {
            let e = Fence::parse(name, SQUARE.as_bytes()).unwrap_err();
            assert_eq!(e.reason(), "bad_name", "{name:?}");
        }
        assert!(Fence::parse(&"a".repeat(64), SQUARE.as_bytes()).is_ok());
    }

    #[test]
    fn refuses_every_bad_body() {
        // Each malformed body is refused with its reason and a message naming the problem.
        refused("", "bad_geojson", "not valid JSON");
        refused("[1]", "bad_geojson", "must be a JSON object");
        refused("{}", "bad_geojson", "expected a GeoJSON Polygon");
        refused(
            r#"{"type":"Point","coordinates":[0,0]}"#,
            "bad_geojson",
            "\"Point\"",
        );
        refused(r#"{"type":7}"#, "bad_geojson", "must be the string");
        refused(
            r#"{"type":"Polygon"}"#,
            "bad_geojson",
            "needs \"coordinates\"",
        );
        refused(
            r#"{"type":"Polygon","coordinates":{}}"#,
            "bad_geojson",
            "array of rings",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[]}"#,
            "bad_geojson",
            "exterior ring",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[5]}"#,
            "bad_geojson",
            "ring 0 must be an array",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[0,0]]]}"#,
            "bad_geojson",
            "ring 0 has 3 positions",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0]],[[0,0],[1,0],[1,1],[0,1]]]}"#,
            "bad_geojson",
            "ring 1 is not closed",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],"x",[0,0]]]}"#,
            "bad_geojson",
            "ring 0 position 2 must be an array",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0],[1,0],[1,1],[0,0]]]}"#,
            "bad_geojson",
            "2 or 3 elements",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0,0,0],[1,0],[1,1],[0,0]]]}"#,
            "bad_geojson",
            "2 or 3 elements",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,"0"],[1,0],[1,1],[0,0]]]}"#,
            "bad_geojson",
            "latitude must be a number",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0,null],[1,0],[1,1],[0,0]]]}"#,
            "bad_geojson",
            "altitude must be a number",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0],[181,0],[1,1],[0,0]]]}"#,
            "bad_coordinates",
            "ring 0 position 1 longitude 181",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0],[1,-90.5],[1,1],[0,0]]]}"#,
            "bad_coordinates",
            "latitude -90.5",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0]]],"properties":{}}"#,
            "bad_geojson",
            "unknown member \"properties\"",
        );
        refused(
            r#"{"type":"Polygon","bbox":[1,2],"coordinates":[[[0,0],[1,0],[1,1],[0,0]]]}"#,
            "bad_geojson",
            "\"bbox\"",
        );
        refused(
            r#"{"type":"Polygon","coordinates":[[[170,0],[-170,0],[-170,5],[170,0]]]}"#,
            "bad_coordinates",
            "antimeridian",
        );
        // Non-finite numbers cannot be written in JSON; a number too big for f64 is not JSON.
        refused(
            r#"{"type":"Polygon","coordinates":[[[1e999,0],[1,0],[1,1],[0,0]]]}"#,
            "bad_geojson",
            "not valid JSON",
        );
        refused(r#"{"center":[0,0]}"#, "bad_radius", "needs \"radius_m\"");
        refused(r#"{"radius_m":5}"#, "bad_geojson", "needs \"center\"");
        refused(
            r#"{"center":[0,0],"radius_m":"5"}"#,
            "bad_radius",
            "must be a number",
        );
        refused(
            r#"{"center":[0,0],"radius_m":0}"#,
            "bad_radius",
            "greater than 0",
        );
        refused(
            r#"{"center":[0,0],"radius_m":-1}"#,
            "bad_radius",
            "greater than 0",
        );
        refused(
            r#"{"center":[0,0],"radius_m":20000001}"#,
            "bad_radius",
            "20,000 km",
        );
        refused(
            r#"{"center":[0,91],"radius_m":5}"#,
            "bad_coordinates",
            "\"center\" latitude 91",
        );
        refused(
            r#"{"center":0,"radius_m":5}"#,
            "bad_geojson",
            "\"center\" must be an array",
        );
        refused(
            r#"{"center":[0,0],"radius_m":5,"radius":5}"#,
            "bad_geojson",
            "unknown member \"radius\"",
        );
        let big = vec![b' '; FENCE_BODY_BYTES_MAX + 1];
        let e = Fence::parse("f", &big).unwrap_err();
        assert_eq!(e.reason(), "too_big");
        assert!(Fence::parse("f", br#"{"center":[0,0],"radius_m":20000000}"#).is_ok());
    }

    #[test]
    fn refuses_too_many_vertices() {
        // A ring of FENCE_VERTICES_MAX positions parses; one more position over all rings is refused.
        let ring = |n: usize, dx: f64| {
            let mut pts: Vec<String> = (0..n - 1)
                .map(|i| {
                    let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
                    format!("[{},{}]", dx + a.cos(), a.sin())
                })
                .collect();
            pts.push(pts[0].clone());
            format!("[{}]", pts.join(","))
        };
        let ok = format!(
            r#"{{"type":"Polygon","coordinates":[{}]}}"#,
            ring(FENCE_VERTICES_MAX, 0.0)
        );
        assert_eq!(
            Fence::parse("f", ok.as_bytes()).unwrap().shape.vertices(),
            FENCE_VERTICES_MAX
        );
        let over = format!(
            r#"{{"type":"Polygon","coordinates":[{},{}]}}"#,
            ring(FENCE_VERTICES_MAX - 3, 0.0),
            ring(4, 0.0)
        );
        assert_eq!(err(&over).reason(), "too_many_vertices");
    }

    #[test]
    fn refuses_rings_that_are_not_simple_and_apart() {
        // A figure eight, a ring touching itself at a vertex, a spike folding back, a ring of
        // two distinct positions, a hole crossing, touching or outside the exterior, holes
        // crossing or nested: each refused with its reason and the edges it found.
        let poly = |rings: &str| format!(r#"{{"type":"Polygon","coordinates":[{rings}]}}"#);
        let sq = "[[0,0],[10,0],[10,10],[0,10],[0,0]]";
        refused(
            &poly("[[0,0],[1,1],[1,0],[0,1],[0,0]]"),
            "self_intersecting",
            "position 0 to 1 of ring 0 and the edge from position 2 to 3 of ring 0 cross",
        );
        refused(
            &poly("[[0,0],[2,0],[1,1],[2,2],[0,2],[1,1],[0,0]]"),
            "self_intersecting",
            "ring 0",
        );
        refused(
            &poly("[[0,0],[2,0],[1,0],[1,1],[0,0]]"),
            "self_intersecting",
            "cross or touch",
        );
        refused(
            &poly("[[0,0],[1,0],[0,0],[0,0]]"),
            "self_intersecting",
            "fewer than 3 distinct positions",
        );
        refused(
            &poly(&format!("{sq},[[5,5],[12,5],[12,6],[5,5]]")),
            "hole_outside",
            "of ring 1 cross or touch",
        );
        refused(
            &poly(&format!("{sq},[[0,5],[5,5],[5,6],[0,5]]")),
            "hole_outside",
            "strictly inside the exterior ring",
        );
        refused(
            &poly(&format!("{sq},[[20,20],[21,20],[21,21],[20,20]]")),
            "hole_outside",
            "ring 1 (a hole) lies outside the exterior ring",
        );
        refused(
            &poly(&format!(
                "{sq},[[1,1],[5,1],[5,5],[1,5],[1,1]],[[4,4],[6,4],[6,6],[4,4]]"
            )),
            "holes_overlap",
            "ring 1 and the edge",
        );
        refused(
            &poly(&format!(
                "{sq},[[1,1],[5,1],[5,5],[1,5],[1,1]],[[2,2],[3,2],[3,3],[2,2]]"
            )),
            "holes_overlap",
            "ring 2 (a hole) lies inside ring 1",
        );
        // Repeated positions, collinear runs and separate holes are fine.
        let ok = poly(
            "[[0,0],[5,0],[5,0],[10,0],[10,10],[0,10],[0,0]],[[1,1],[2,1],[2,2],[1,1]],[[3,3],[4,3],[4,4],[3,3]]",
        );
        assert!(Fence::parse("ok", ok.as_bytes()).is_ok());
    }

    #[test]
    fn validating_the_largest_polygon_is_fast() {
        // The sweep at FENCE_VERTICES_MAX positions: a circle-like ring (n log n) and a comb whose
        // teeth all overlap in longitude (every pair compared, were it swept along x) both finish
        // well within 10 s even in a debug build (release figures: benches/fence.rs).
        let n = FENCE_VERTICES_MAX;
        let mut circle: Vec<(f64, f64)> = (0..n - 1)
            .map(|i| {
                let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
                (a.cos(), a.sin())
            })
            .collect();
        circle.push(circle[0]);
        let t = std::time::Instant::now();
        validate_rings(&[circle]).unwrap();
        // Horizontal teeth stacked in latitude, all spanning the same longitudes.
        let teeth = (n - 3) / 4;
        let mut comb = vec![(0.0, 0.0)];
        for k in 0..teeth {
            let y = k as f64 * 0.01;
            comb.extend([
                (10.0, y),
                (10.0, y + 0.005),
                (1.0, y + 0.005),
                (1.0, y + 0.01),
            ]);
        }
        comb.push((0.0, teeth as f64 * 0.01));
        comb.push((0.0, 0.0));
        assert!(comb.len() <= n);
        validate_rings(&[comb]).unwrap();
        assert!(t.elapsed().as_secs_f64() < 10.0, "{:?}", t.elapsed());
    }

    #[test]
    fn polygon_contains_with_holes_and_boundaries() {
        // The square with a hole contains its interior, its edges and vertices, the hole's edge,
        // but not the hole's inside nor the outside.
        let body = r#"{"type":"Polygon","coordinates":[[[0,0],[10,0],[10,10],[0,10],[0,0]],
            [[4,4],[6,4],[6,6],[4,6],[4,4]]]}"#;
        let f = Fence::parse("h", body.as_bytes()).unwrap();
        // contains(lat, lon)
        assert!(f.contains(1.0, 1.0));
        assert!(f.contains(9.9, 0.1));
        assert!(!f.contains(5.0, 5.0), "inside the hole");
        assert!(f.contains(4.0, 5.0), "on the hole's edge");
        assert!(f.contains(0.0, 5.0) && f.contains(10.0, 10.0) && f.contains(5.0, 10.0));
        assert!(!f.contains(-0.1, 5.0) && !f.contains(5.0, 10.1) && !f.contains(11.0, 11.0));
        // A concave (L-shaped) polygon, clockwise: the notch is outside.
        let l =
            r#"{"type":"Polygon","coordinates":[[[0,0],[0,10],[5,10],[5,5],[10,5],[10,0],[0,0]]]}"#;
        let f = Fence::parse("l", l.as_bytes()).unwrap();
        assert!(f.contains(2.0, 2.0) && f.contains(8.0, 2.0) && f.contains(2.0, 8.0));
        assert!(!f.contains(8.0, 8.0));
        // Out-of-range and non-finite points are in no fence.
        assert!(!f.contains(f64::NAN, 1.0) && !f.contains(1.0, f64::INFINITY));
    }

    #[test]
    fn circles_contain_by_great_circle_distance_across_the_antimeridian_and_poles() {
        // A 100 km circle centred on the antimeridian contains points on both sides of it; a
        // circle around the north pole contains every longitude near the pole.
        let c = Fence::parse("am", br#"{"center":[180,0],"radius_m":100000}"#).unwrap();
        assert!(c.contains(0.0, 179.5) && c.contains(0.0, -179.5) && c.contains(0.5, -180.0));
        assert!(!c.contains(0.0, 179.0) && !c.contains(0.0, -179.0) && !c.contains(0.0, 0.0));
        let c = Fence::parse("w", br#"{"center":[-179.9,10],"radius_m":50000}"#).unwrap();
        assert!(c.contains(10.0, 179.9) && !c.contains(10.0, 179.0));
        let p = Fence::parse("np", br#"{"center":[0,89.5],"radius_m":200000}"#).unwrap();
        assert!(p.contains(89.9, 180.0) && p.contains(89.9, -90.0) && p.contains(90.0, 0.0));
        assert!(!p.contains(87.0, 180.0) && p.contains(88.0, 0.0));
        // 1 km circle: 0.99 km north is in, 1.01 km is out.
        let k = Fence::parse("k", br#"{"center":[10,50],"radius_m":1000}"#).unwrap();
        let dlat = |m: f64| (m / crate::spatial::EARTH_RADIUS_M).to_degrees();
        assert!(k.contains(50.0 + dlat(990.0), 10.0) && !k.contains(50.0 + dlat(1010.0), 10.0));
    }

    #[test]
    fn canonical_json_round_trips() {
        // to_json of parsed bodies parses back to an equal shape and drops altitude and bbox.
        for body in [
            SQUARE,
            r#"{"type":"Polygon","bbox":[0,0,1,1],"coordinates":[[[0.1,0.2,3],[1e-7,0],[1,1],[0.1,0.2]]]}"#,
            r#"{"center":[-179.99999999999997,-89.1],"radius_m":0.001}"#,
        ] {
            let f = Fence::parse("r", body.as_bytes()).unwrap();
            let j = f.to_json();
            assert!(!j.contains("bbox"), "{j}");
            assert_eq!(Fence::parse("r", j.as_bytes()).unwrap(), f, "{j}");
        }
        assert_eq!(Transition::Enter.as_str(), "enter");
        assert_eq!(Transition::Exit.as_str(), "exit");
    }

    fn json_ish() -> impl Strategy<Value = String> {
        // Fragments of fence bodies in random order: mostly near-miss JSON.
        let frag = prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"type\"",
            "\"Polygon\"",
            "\"coordinates\"",
            "\"center\"",
            "\"radius_m\"",
            "\"bbox\"",
            "0",
            "1",
            "-181",
            "90.0000001",
            "1e308",
            "-0",
            "null",
            "true",
            "\"x\"",
            "[0,0]",
            "[1,0,2]",
            "[[0,0],[1,0],[1,1],[0,0]]",
        ]);
        prop::collection::vec(frag, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            // Arbitrary bytes give a fence or an error with a reason, never a panic.
            if let Err(e) = Fence::parse("f", &bytes) {
                prop_assert!(!e.reason().is_empty());
            }
        }

        #[test]
        fn parse_never_panics_on_json_like_text(s in json_ish()) {
            // Near-miss JSON built from fence-body fragments never panics; what parses round-trips.
            if let Ok(f) = Fence::parse("f", s.as_bytes()) {
                prop_assert_eq!(Fence::parse("f", f.to_json().as_bytes()).unwrap(), f);
            }
        }
    }
}
