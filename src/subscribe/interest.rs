//! One executor's replica of the server-wide subscription interest: which subscriptions a
//! heartbeat matches. It owns the index (device id -> subscriptions, a coarse grid of bboxes,
//! fence name -> subscriptions) and its updates ([`InterestOp`], broadcast to every executor when
//! a subscriber subscribes or leaves); it does not hold events or connections (`fanout`).
//!
//! Invariant: every executor applies the same ops in the same order per connection, so all
//! replicas agree once a broadcast completed; a subscription is listed in exactly the cells its
//! box overlaps (or in `wide`), and removing it leaves no trace.

use std::collections::HashMap;
use std::sync::Arc;

use crate::limits::FANOUT_GRID_CELLS_PER_BOX_MAX;
use crate::record::{DeviceId, Heartbeat};
use crate::slab::Key as ConnKey;
use crate::spatial::BBox;

/// Edge of a coarse interest-grid cell, degrees.
const GRID_CELL_DEG: f64 = 10.0;
const GRID_COLS: usize = (360.0 / GRID_CELL_DEG) as usize;
const GRID_ROWS: usize = (180.0 / GRID_CELL_DEG) as usize;

/// One subscription, server-wide: the executor holding its connection, the connection, and the
/// subscription's id on that connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubKey {
    /// Executor holding the subscriber connection.
    pub exec: u32,
    /// The connection on that executor.
    pub conn: ConnKey,
    /// The subscription's id on the connection (unique per connection for its life).
    pub id: u32,
}

/// What a subscription selects.
#[derive(Debug, Clone)]
pub enum Target {
    /// Heartbeats of these devices (sorted, no duplicates).
    Devices(Vec<DeviceId>),
    /// Heartbeats located in this box.
    BBox(BBox),
    /// Enter/exit transitions of this fence (by name: fence ids change between snapshots).
    Fence(Box<str>),
}

/// A subscription's filter, as replicated to every executor.
#[derive(Debug, Clone)]
pub struct Filter {
    /// What it selects.
    pub target: Target,
    /// A subscriber token's device-id prefix (`None` for ops tokens): bbox and fence
    /// subscriptions only ever match devices under it (device lists are checked at subscribe).
    pub prefix: Option<Box<str>>,
}

impl Filter {
    pub(super) fn admits(&self, device_id: &str) -> bool {
        self.prefix
            .as_deref()
            .is_none_or(|p| device_id.starts_with(p))
    }
}

/// A change of the interest, broadcast to every executor.
#[derive(Debug)]
pub enum InterestOp {
    /// Adds `key` (removing `replaces` first: a subscription replaced under the same name).
    Put {
        /// The new subscription.
        key: SubKey,
        /// Its filter.
        filter: Arc<Filter>,
        /// The subscription it replaces, if any.
        replaces: Option<SubKey>,
    },
    /// Removes one subscription.
    Remove(SubKey),
    /// Removes every subscription of a connection (it closed).
    RemoveConn {
        /// Executor holding the connection.
        exec: u32,
        /// The connection.
        conn: ConnKey,
    },
}

/// A subscription with its filter, as listed in the bbox cells and the fence index.
pub(super) type Listed = (SubKey, Arc<Filter>);

/// One executor's replica of the server-wide interest.
#[derive(Default)]
pub(super) struct Interest {
    pub(super) subs: HashMap<SubKey, Arc<Filter>>,
    pub(super) by_conn: HashMap<(u32, ConnKey), Vec<SubKey>>,
    /// Looked up per heartbeat while any subscription exists: ahash, not SipHash.
    pub(super) by_device: HashMap<DeviceId, Vec<SubKey>, ahash::RandomState>,
    /// Coarse cells (allocated with the first bbox), each listing the boxes overlapping it.
    pub(super) cells: Vec<Vec<Listed>>,
    /// Boxes too large for the cells.
    pub(super) wide: Vec<Listed>,
    pub(super) boxes: usize,
    pub(super) by_fence: HashMap<Box<str>, Vec<Listed>, ahash::RandomState>,
}

fn grid_col(lon: f64) -> usize {
    (((lon + 180.0) / GRID_CELL_DEG).floor().max(0.0) as usize).min(GRID_COLS - 1)
}

fn grid_row(lat: f64) -> usize {
    (((lat + 90.0) / GRID_CELL_DEG).floor().max(0.0) as usize).min(GRID_ROWS - 1)
}

/// The cells a box overlaps (`None` when more than [`FANOUT_GRID_CELLS_PER_BOX_MAX`]).
fn box_cells(b: &BBox) -> Option<Vec<usize>> {
    let ranges: &[(f64, f64)] = if b.min_lon <= b.max_lon {
        &[(b.min_lon, b.max_lon)]
    } else {
        &[(b.min_lon, 180.0), (-180.0, b.max_lon)]
    };
    let (r0, r1) = (grid_row(b.min_lat), grid_row(b.max_lat));
    let mut out = Vec::new();
    for &(lo, hi) in ranges {
        let (c0, c1) = (grid_col(lo), grid_col(hi));
        if out.len() + (c1 - c0 + 1) * (r1 - r0 + 1) > FANOUT_GRID_CELLS_PER_BOX_MAX {
            return None;
        }
        for r in r0..=r1 {
            for c in c0..=c1 {
                out.push(r * GRID_COLS + c);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

impl Interest {
    pub(super) fn apply(&mut self, op: &InterestOp) {
        match op {
            InterestOp::Put {
                key,
                filter,
                replaces,
            } => {
                if let Some(old) = replaces {
                    self.remove(*old);
                }
                self.insert(*key, filter.clone());
            }
            InterestOp::Remove(key) => self.remove(*key),
            InterestOp::RemoveConn { exec, conn } => {
                for key in self.by_conn.remove(&(*exec, *conn)).unwrap_or_default() {
                    self.remove(key);
                }
            }
        }
    }

    fn insert(&mut self, key: SubKey, filter: Arc<Filter>) {
        if self.subs.contains_key(&key) {
            self.remove(key);
        }
        self.by_conn
            .entry((key.exec, key.conn))
            .or_default()
            .push(key);
        match &filter.target {
            Target::Devices(ids) => {
                for id in ids {
                    self.by_device.entry(id.clone()).or_default().push(key);
                }
            }
            Target::BBox(b) => {
                self.boxes += 1;
                match box_cells(b) {
                    Some(cells) => {
                        if self.cells.is_empty() {
                            self.cells = (0..GRID_COLS * GRID_ROWS).map(|_| Vec::new()).collect();
                        }
                        for c in cells {
                            self.cells[c].push((key, filter.clone()));
                        }
                    }
                    None => self.wide.push((key, filter.clone())),
                }
            }
            Target::Fence(name) => {
                self.by_fence
                    .entry(name.clone())
                    .or_default()
                    .push((key, filter.clone()));
            }
        }
        self.subs.insert(key, filter);
    }

    fn remove(&mut self, key: SubKey) {
        let Some(filter) = self.subs.remove(&key) else {
            return;
        };
        if let Some(list) = self.by_conn.get_mut(&(key.exec, key.conn)) {
            list.retain(|k| *k != key);
            if list.is_empty() {
                self.by_conn.remove(&(key.exec, key.conn));
            }
        }
        match &filter.target {
            Target::Devices(ids) => {
                for id in ids {
                    if let Some(list) = self.by_device.get_mut(id) {
                        list.retain(|k| *k != key);
                        if list.is_empty() {
                            self.by_device.remove(id);
                        }
                    }
                }
            }
            Target::BBox(b) => {
                self.boxes -= 1;
                match box_cells(b) {
                    Some(cells) => {
                        for c in cells {
                            self.cells[c].retain(|(k, _)| *k != key);
                        }
                    }
                    None => self.wide.retain(|(k, _)| *k != key),
                }
                if self.boxes == 0 {
                    self.cells = Vec::new();
                }
            }
            Target::Fence(name) => {
                if let Some(list) = self.by_fence.get_mut(name) {
                    list.retain(|(k, _)| *k != key);
                    if list.is_empty() {
                        self.by_fence.remove(name);
                    }
                }
            }
        }
    }

    /// Appends the device and bbox subscriptions `hb` matches to `out` (each at most once).
    pub(super) fn matching(&self, hb: &Heartbeat, out: &mut Vec<SubKey>) {
        if let Some(keys) = self.by_device.get(hb.device_id.as_str()) {
            out.extend_from_slice(keys);
        }
        if self.boxes == 0 {
            return;
        }
        let hit = |(k, f): &Listed| match &f.target {
            Target::BBox(b) if b.contains(hb.lat, hb.lon) && f.admits(&hb.device_id) => Some(*k),
            _ => None,
        };
        if !self.cells.is_empty() {
            let cell = grid_row(hb.lat) * GRID_COLS + grid_col(hb.lon);
            out.extend(self.cells[cell].iter().filter_map(hit));
        }
        out.extend(self.wide.iter().filter_map(hit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conn: u32, id: u32) -> SubKey {
        SubKey {
            exec: 0,
            conn: ConnKey {
                slot: conn,
                generation: 1,
            },
            id,
        }
    }

    fn hb(id: &str, lat: f64, lon: f64) -> Heartbeat {
        Heartbeat {
            device_id: id.into(),
            lat,
            lon,
            ..Default::default()
        }
    }

    fn bbox(filter_prefix: Option<&str>, b: [f64; 4]) -> Arc<Filter> {
        Arc::new(Filter {
            target: Target::BBox(BBox::new(b[0], b[1], b[2], b[3]).unwrap()),
            prefix: filter_prefix.map(Into::into),
        })
    }

    #[test]
    fn interest_matches_devices_boxes_and_prefixes_and_forgets_removed_subs() {
        // Device, small-box, world-box, antimeridian-box and prefixed-box subscriptions are each
        // matched exactly when they should be; removing one subscription and then a whole
        // connection leaves an empty index.
        let mut i = Interest::default();
        let devices = Arc::new(Filter {
            target: Target::Devices(vec![
                DeviceId::parse("a").unwrap(),
                DeviceId::parse("b").unwrap(),
            ]),
            prefix: None,
        });
        let put = |i: &mut Interest, k, f: &Arc<Filter>| {
            i.apply(&InterestOp::Put {
                key: k,
                filter: f.clone(),
                replaces: None,
            })
        };
        put(&mut i, key(1, 1), &devices);
        put(&mut i, key(1, 2), &bbox(None, [13.0, 52.0, 14.0, 53.0]));
        put(&mut i, key(2, 1), &bbox(None, [-180.0, -90.0, 180.0, 90.0]));
        put(&mut i, key(2, 2), &bbox(None, [170.0, -10.0, -170.0, 10.0]));
        put(
            &mut i,
            key(3, 1),
            &bbox(Some("x-"), [13.0, 52.0, 14.0, 53.0]),
        );
        let m = |i: &Interest, h: &Heartbeat| {
            let mut out = Vec::new();
            i.matching(h, &mut out);
            out.sort_by_key(|k| (k.conn.slot, k.id));
            out
        };
        assert_eq!(
            m(&i, &hb("a", 52.5, 13.5)),
            vec![key(1, 1), key(1, 2), key(2, 1)]
        );
        assert_eq!(
            m(&i, &hb("x-1", 52.5, 13.5)),
            vec![key(1, 2), key(2, 1), key(3, 1)]
        );
        assert_eq!(m(&i, &hb("c", 0.0, 179.0)), vec![key(2, 1), key(2, 2)]);
        assert_eq!(m(&i, &hb("c", 0.0, -175.0)), vec![key(2, 1), key(2, 2)]);
        assert_eq!(m(&i, &hb("c", 20.0, -175.0)), vec![key(2, 1)]);
        assert_eq!(m(&i, &hb("b", 90.0, 180.0)), vec![key(1, 1), key(2, 1)]);
        i.apply(&InterestOp::Remove(key(2, 1)));
        assert_eq!(m(&i, &hb("c", 20.0, -175.0)), vec![]);
        for conn in [1, 2, 3] {
            i.apply(&InterestOp::RemoveConn {
                exec: 0,
                conn: key(conn, 0).conn,
            });
        }
        assert!(i.subs.is_empty() && i.by_device.is_empty() && i.by_conn.is_empty());
        assert_eq!(i.boxes, 0);
        assert!(i.cells.is_empty() && i.wide.is_empty());
    }

    #[test]
    fn replacing_a_subscription_removes_the_old_filter() {
        // A Put that replaces an older key leaves only the new filter matching.
        let mut i = Interest::default();
        i.apply(&InterestOp::Put {
            key: key(1, 1),
            filter: bbox(None, [0.0, 0.0, 1.0, 1.0]),
            replaces: None,
        });
        i.apply(&InterestOp::Put {
            key: key(1, 2),
            filter: bbox(None, [5.0, 5.0, 6.0, 6.0]),
            replaces: Some(key(1, 1)),
        });
        let mut out = Vec::new();
        i.matching(&hb("a", 0.5, 0.5), &mut out);
        assert!(out.is_empty());
        i.matching(&hb("a", 5.5, 5.5), &mut out);
        assert_eq!(out, vec![key(1, 2)]);
        assert_eq!(i.subs.len(), 1);
    }
}
