//! The cluster-wide view of one shard (issue 17 item 3): the last heartbeat of every device of
//! the shard that *other nodes* write, as followed from the streams, with a spatial grid over
//! them. It sits beside the shard's own last-location table and is consulted with it; it owns no
//! I/O, is never written to the local log or checkpoint and never counts as local history:
//! after a restart it comes back by following the streams again (`shard::follow`). It keeps the
//! whole heartbeat (a few hundred bytes), because there is no local log entry to read it from.
//!
//! "Last" is the local table's rule (`table::last_location`): the greatest device time, ties to
//! the later arrival; across the local table and this view, [`view_wins`] decides with the
//! receive time as the tie-break (the two have no common append order).
//!
//! Invariant: one entry per device, holding the heartbeat with the greatest `ts_ms` it was
//! given (ties to the later call), and the grid holds every entry in the cell of that
//! heartbeat; at most [`VIEW_DEVICES_MAX`] devices.

use std::collections::HashMap;

use crate::limits::VIEW_DEVICES_MAX;
use crate::record::Heartbeat;
use crate::spatial::{BBox, Grid};
use crate::table::LastLocation;

/// The view refused a new device: it holds [`VIEW_DEVICES_MAX`] already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cluster view of this shard is full ({0} devices)")]
pub struct ViewFull(pub usize);

/// What [`ViewTable::observe`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    /// The device's previous entry in the view: `(lat, lon, ts_ms, received_ms)`.
    pub prev: Option<(f64, f64, i64, i64)>,
    /// Whether the heartbeat replaced it (false for a late one).
    pub became_last: bool,
}

/// One shard's view (see the module comment).
#[derive(Debug, Default)]
pub struct ViewTable {
    /// Device id → its key in `entries` (and the grid).
    index: HashMap<Box<str>, u32>,
    /// Per key, the device's last heartbeat.
    entries: Vec<Heartbeat>,
    /// The entries' last locations (keys are indexes into `entries`).
    grid: Grid,
}

impl ViewTable {
    /// An empty view.
    pub fn new() -> ViewTable {
        ViewTable::default()
    }

    /// Devices in the view.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no device is in the view.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last heartbeat of `device_id`, if another node wrote one.
    pub fn get(&self, device_id: &str) -> Option<&Heartbeat> {
        self.index
            .get(device_id)
            .map(|&k| &self.entries[k as usize])
    }

    /// Takes a followed heartbeat (in stream order).
    pub fn observe(&mut self, hb: &Heartbeat) -> Result<Observed, ViewFull> {
        if let Some(&k) = self.index.get(hb.device_id.as_str()) {
            let e = &mut self.entries[k as usize];
            let prev = Some((e.lat, e.lon, e.ts_ms, e.received_ms));
            if hb.ts_ms < e.ts_ms {
                return Ok(Observed {
                    prev,
                    became_last: false,
                });
            }
            *e = hb.clone();
            self.grid.update(k, hb.lat, hb.lon);
            return Ok(Observed {
                prev,
                became_last: true,
            });
        }
        if self.entries.len() >= VIEW_DEVICES_MAX {
            return Err(ViewFull(self.entries.len()));
        }
        let k = self.entries.len() as u32;
        self.index.insert(hb.device_id.as_str().into(), k);
        self.entries.push(hb.clone());
        self.grid.update(k, hb.lat, hb.lon);
        Ok(Observed {
            prev: None,
            became_last: true,
        })
    }

    /// Calls `f` with every entry whose cell overlaps `bbox` (a superset of those inside it).
    pub fn candidates(&self, bbox: &BBox, mut f: impl FnMut(&Heartbeat)) {
        self.grid.candidates(bbox, |k| f(&self.entries[k as usize]));
    }
}

/// Whether the view's heartbeat `v` is a device's last location rather than the local table's
/// `local`: by device time, then by receive time; a full tie goes to the local table.
pub fn view_wins(local: Option<&LastLocation>, v: &Heartbeat) -> bool {
    local.is_none_or(|l| (v.ts_ms, v.received_ms) > (l.ts_ms, l.received_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogPos;

    fn hb(id: &str, ts: i64, lat: f64) -> Heartbeat {
        Heartbeat {
            device_id: id.into(),
            lat,
            lon: 10.0,
            ts_ms: ts,
            received_ms: ts + 5,
            ..Heartbeat::default()
        }
    }

    #[test]
    fn the_newest_device_time_wins_and_the_grid_follows_it() {
        let mut v = ViewTable::new();
        assert!(v.is_empty());
        let o = v.observe(&hb("a", 100, 1.0)).unwrap();
        assert_eq!((o.prev, o.became_last), (None, true));
        // A late heartbeat does not move "last".
        let o = v.observe(&hb("a", 50, 2.0)).unwrap();
        assert_eq!(
            (o.prev, o.became_last),
            (Some((1.0, 10.0, 100, 105)), false)
        );
        assert_eq!(v.get("a").unwrap().lat, 1.0);
        // A tie goes to the later one.
        v.observe(&hb("a", 100, 3.0)).unwrap();
        assert_eq!(v.get("a").unwrap().lat, 3.0);
        v.observe(&hb("b", 1, 40.0)).unwrap();
        assert_eq!(v.len(), 2);
        let bbox = |lat: f64| BBox::new(9.0, lat - 0.5, 11.0, lat + 0.5).unwrap();
        let mut seen = Vec::new();
        v.candidates(&bbox(3.0), |h| seen.push(h.device_id.clone()));
        assert_eq!(seen, vec!["a"]);
        seen.clear();
        v.candidates(&bbox(1.0), |h| seen.push(h.device_id.clone()));
        assert!(seen.is_empty(), "the grid moved a to its new cell");
        assert!(v.get("c").is_none());
    }

    #[test]
    fn view_and_local_table_compare_by_device_then_receive_time() {
        let local = LastLocation {
            lat: 0.0,
            lon: 0.0,
            ts_ms: 100,
            received_ms: 105,
            pos: LogPos(64),
            head: LogPos(64),
        };
        assert!(view_wins(None, &hb("a", 1, 0.0)));
        assert!(view_wins(Some(&local), &hb("a", 101, 0.0)));
        assert!(!view_wins(Some(&local), &hb("a", 99, 0.0)));
        // Same device and receive time: the local table keeps it.
        assert!(!view_wins(Some(&local), &hb("a", 100, 0.0)));
        let mut later = hb("a", 100, 0.0);
        later.received_ms = 106;
        assert!(view_wins(Some(&local), &later));
    }
}
