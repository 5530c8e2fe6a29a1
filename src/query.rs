//! Read queries answered by one shard store: a device's history, walked along its back-pointer
//! chain (never a log scan). Pure functions over a `ShardStore`, run on the executor that owns
//! the shard; the HTTP layer only parses parameters and renders JSON.
//!
//! Invariant: history is ordered newest first by device time, whatever the arrival order. The
//! chain is in arrival order, so the walk keeps the best `limit` candidates and stops only when no
//! older entry can still qualify: a stored heartbeat's device time is at most
//! `TS_FUTURE_MS_MAX` after its receive time, and receive times fall along the chain.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::limits::{CLOCK_STEP_SLACK_MS, TS_FUTURE_MS_MAX};
use crate::log::LogPos;
use crate::record::Heartbeat;
use crate::store::ShardStore;

/// Up to `limit` heartbeats of `device_id` with device time in `[from, to]`, newest first by
/// device time (ties: newest arrival first). `None` for a device this shard has never stored.
pub fn history(
    store: &ShardStore,
    device_id: &str,
    from: i64,
    to: i64,
    limit: usize,
) -> Option<Vec<Heartbeat>> {
    store.last(device_id)?;
    // Min-heap of the best candidates so far: (ts, pos).
    let mut best: BinaryHeap<Reverse<(i64, u64)>> = BinaryHeap::with_capacity(limit.min(1024) + 1);
    for entry in store.chain(device_id) {
        let ts = entry.hb.ts_ms.to_native();
        let received = entry.hb.received_ms.to_native();
        // Every older entry has ts <= its receive time + TS_FUTURE_MS_MAX <= this bound.
        let older_ts_max = received.saturating_add(TS_FUTURE_MS_MAX + CLOCK_STEP_SLACK_MS);
        if older_ts_max < from {
            break;
        }
        if best.len() == limit
            && best
                .peek()
                .is_some_and(|Reverse((min_ts, _))| older_ts_max < *min_ts)
        {
            break;
        }
        if ts < from || ts > to || limit == 0 {
            continue;
        }
        best.push(Reverse((ts, entry.pos.0)));
        if best.len() > limit {
            best.pop();
        }
    }
    let mut picked: Vec<(i64, u64)> = best.into_iter().map(|Reverse(x)| x).collect();
    picked.sort_unstable_by(|a, b| b.cmp(a));
    Some(
        picked
            .into_iter()
            .filter_map(|(_, pos)| store.log().read(LogPos(pos)))
            .map(|e| e.hb.to_owned_heartbeat())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::ShardId;
    use crate::store::StoreConfig;

    fn hb(id: &str, ts: i64, received: i64) -> Heartbeat {
        Heartbeat {
            device_id: id.into(),
            lat: 1.0,
            lon: 2.0,
            ts_ms: ts,
            received_ms: received,
            ..Default::default()
        }
    }

    #[test]
    fn history_is_newest_first_by_device_time_with_bounds_and_limit() {
        // Appends out of device-time order (late heartbeats) and checks ordering, inclusive
        // bounds, the limit, other devices' exclusion, and None for an unknown device.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = ShardStore::open(&StoreConfig::new(dir.path(), ShardId(0))).unwrap();
        let base = 1_800_000_000_000i64;
        let order = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0];
        for (n, k) in order.iter().enumerate() {
            store
                .append(&hb("a", base + k * 1000, base + n as i64 * 1000))
                .unwrap();
            store
                .append(&hb("b", base + k * 1000, base + n as i64 * 1000))
                .unwrap();
        }
        let ts = |v: Vec<Heartbeat>| {
            v.into_iter()
                .map(|h| (h.ts_ms - base) / 1000)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ts(history(&store, "a", i64::MIN, i64::MAX, 100).unwrap()),
            vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
        );
        assert_eq!(
            ts(history(&store, "a", base + 2000, base + 6000, 100).unwrap()),
            vec![6, 5, 4, 3, 2]
        );
        assert_eq!(
            ts(history(&store, "a", i64::MIN, i64::MAX, 3).unwrap()),
            vec![9, 8, 7]
        );
        assert!(history(&store, "a", i64::MIN, i64::MAX, 0)
            .unwrap()
            .is_empty());
        assert!(history(&store, "zz", i64::MIN, i64::MAX, 10).is_none());
        assert!(history(&store, "a", base, base, 10)
            .unwrap()
            .iter()
            .all(|h| h.device_id == "a"));
    }

    #[test]
    fn history_walk_stops_early_but_never_misses_a_late_heartbeat() {
        // A device with 2,000 heartbeats: a late one (device time far older than its arrival)
        // still appears in its place; a narrow recent window is answered from the newest part of
        // the chain.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = ShardStore::open(&StoreConfig::new(dir.path(), ShardId(0))).unwrap();
        let base = 1_800_000_000_000i64;
        for i in 0..2000i64 {
            store
                .append(&hb("d", base + i * 30_000, base + i * 30_000))
                .unwrap();
        }
        // Arrives last, stamped 5 minutes in the past of the newest.
        let late_ts = base + 1999 * 30_000 - 300_000;
        store
            .append(&hb("d", late_ts + 1, base + 2000 * 30_000))
            .unwrap();
        let got = history(&store, "d", late_ts - 1, late_ts + 10, 10).unwrap();
        assert_eq!(
            got.iter().map(|h| h.ts_ms).collect::<Vec<_>>(),
            vec![late_ts + 1, late_ts]
        );
    }
}

/// One device found by an area query.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AreaHit {
    /// Device id.
    pub id: String,
    /// Last latitude.
    pub lat: f64,
    /// Last longitude.
    pub lon: f64,
    /// Device time of that location.
    pub ts: i64,
    /// Great-circle distance from the query point (near queries only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance_m: Option<f64>,
}

/// The area of an area query.
#[derive(Debug, Clone, Copy)]
pub enum Area {
    /// Inside a box (possibly crossing the antimeridian).
    BBox(crate::spatial::BBox),
    /// Within `radius_m` of a point, by great-circle distance.
    Near {
        /// Centre latitude.
        lat: f64,
        /// Centre longitude.
        lon: f64,
        /// Radius in metres.
        radius_m: f64,
    },
}

/// Orders hits the way the API returns them: by id for boxes, by distance then id for circles.
pub fn hit_order(a: &AreaHit, b: &AreaHit) -> std::cmp::Ordering {
    match (a.distance_m, b.distance_m) {
        (Some(x), Some(y)) => x.total_cmp(&y).then_with(|| a.id.cmp(&b.id)),
        _ => a.id.cmp(&b.id),
    }
}

/// The first `limit` devices of this shard whose last location lies in `area`, in API order.
pub fn area(store: &ShardStore, area: &Area, limit: usize) -> Vec<AreaHit> {
    let (bbox, centre) = match *area {
        Area::BBox(b) => (b, None),
        Area::Near { lat, lon, radius_m } => (
            crate::spatial::circle_bbox(lat, lon, radius_m),
            Some((lat, lon, radius_m)),
        ),
    };
    let mut hits = Vec::new();
    store.grid().candidates(&bbox, |key| {
        let (id, loc) = store.slot_location(key);
        let distance_m = match centre {
            None if bbox.contains(loc.lat, loc.lon) => None,
            None => return,
            Some((lat, lon, r)) => {
                let d = crate::spatial::haversine_m(lat, lon, loc.lat, loc.lon);
                if d > r {
                    return;
                }
                Some(d)
            }
        };
        hits.push(AreaHit {
            id: id.to_owned(),
            lat: loc.lat,
            lon: loc.lon,
            ts: loc.ts_ms,
            distance_m,
        });
    });
    hits.sort_unstable_by(hit_order);
    hits.truncate(limit);
    hits
}

/// Merges per-shard answers (each already in API order and truncated) into the final answer.
pub fn merge_area(parts: Vec<Vec<AreaHit>>, limit: usize) -> Vec<AreaHit> {
    merge_area_by(parts, limit, |h| h)
}

/// [`merge_area`] for per-shard rows that carry more than the hit (the HTTP layer's rendered
/// records); `hit` gives each row's hit, which decides the order.
pub fn merge_area_by<T>(parts: Vec<Vec<T>>, limit: usize, hit: impl Fn(&T) -> &AreaHit) -> Vec<T> {
    let mut all: Vec<T> = parts.into_iter().flatten().collect();
    all.sort_unstable_by(|a, b| hit_order(hit(a), hit(b)));
    all.truncate(limit);
    all
}

#[cfg(test)]
mod area_tests {
    use super::*;
    use crate::route::{shard_of, ShardId};
    use crate::spatial::{haversine_m, BBox};
    use crate::store::StoreConfig;
    use proptest::prelude::*;

    fn point() -> impl Strategy<Value = (f64, f64)> {
        prop_oneof![
            (-90.0f64..=90.0, -180.0f64..=180.0),
            (80.0f64..=90.0, -180.0f64..=180.0),
            (-90.0f64..=-80.0, -180.0f64..=180.0),
            (
                -90.0f64..=90.0,
                prop_oneof![170.0f64..=180.0, -180.0f64..=-170.0]
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn area_answers_equal_a_brute_force_scan(
            moves in prop::collection::vec((0u32..150, point()), 1..400),
            a in point(), b in point(),
            centre in point(), radius in 1_000.0f64..4_000_000.0,
            limit in 1usize..50,
        ) {
            // A random fleet spread over 3 shards (devices move: only the newest location
            // counts) answers bbox and near queries exactly like a scan of the model, including
            // antimeridian-crossing boxes, circles around the poles, ordering and the limit.
            let dir = tempfile::tempdir().unwrap();
            let mut stores: Vec<ShardStore> = (0..3)
                .map(|s| ShardStore::open(&StoreConfig::new(dir.path().join(s.to_string()), ShardId(s))).unwrap().0)
                .collect();
            let mut model = std::collections::BTreeMap::new();
            for (n, (dev, (lat, lon))) in moves.iter().enumerate() {
                let id = format!("dev-{dev}");
                let hb = Heartbeat { device_id: id.clone(), lat: *lat, lon: *lon, ts_ms: n as i64, received_ms: n as i64, ..Default::default() };
                stores[shard_of(&id, 3).0 as usize].append(&hb).unwrap();
                model.insert(id, (*lat, *lon, n as i64));
            }
            let bbox = BBox::new(a.1, a.0.min(b.0), b.1, a.0.max(b.0)).unwrap();
            let queries = [
                Area::BBox(bbox),
                Area::Near { lat: centre.0, lon: centre.1, radius_m: radius },
            ];
            for q in queries {
                let got = merge_area(stores.iter().map(|s| area(s, &q, limit)).collect(), limit);
                let mut want: Vec<AreaHit> = model
                    .iter()
                    .filter_map(|(id, &(lat, lon, ts))| {
                        let distance_m = match q {
                            Area::BBox(b) => { if !b.contains(lat, lon) { return None; } None }
                            Area::Near { lat: clat, lon: clon, radius_m } => {
                                let d = haversine_m(clat, clon, lat, lon);
                                if d > radius_m { return None; }
                                Some(d)
                            }
                        };
                        Some(AreaHit { id: id.clone(), lat, lon, ts, distance_m })
                    })
                    .collect();
                want.sort_by(hit_order);
                want.truncate(limit);
                prop_assert_eq!(got, want);
            }
        }
    }
}
