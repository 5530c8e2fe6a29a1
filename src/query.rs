//! Read queries answered by one shard store: a device's history, walked along its back-pointer
//! chain (never a log scan). Pure functions over a `ShardStore`, run on the executor that owns
//! the shard; the HTTP layer only parses parameters and renders JSON.
//!
//! Invariant: history is ordered newest first by device time, whatever the arrival order. The
//! chain is in arrival order, so the walk keeps the best `limit` candidates and stops only when no
//! older entry can still qualify: a stored heartbeat's device time is at most
//! `TS_FUTURE_MS_MAX` after its receive time, and receive times fall along the chain.
//!
//! Paged history ([`history_page`], [`HistoryCursor`]) orders by the total key (device time, log
//! position) and reads a **snapshot**: the first page fixes the chain head, and later pages walk
//! only entries at or before it, strictly below the last key returned. So a paging client sees
//! every entry of the snapshot exactly once, newest first, however many heartbeats arrive
//! meanwhile (they belong to the next paging, not this one). A page holds at most `limit`
//! entries in memory and starts its walk where the previous page left candidates, not at the head.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::limits::{CLOCK_STEP_SLACK_MS, TS_FUTURE_MS_MAX};
use crate::log::LogPos;
use crate::record::Heartbeat;
use crate::store::ShardStore;
use crate::table::view::{view_wins, ViewTable};

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

/// Where a page of a device's history continues: opaque to clients (see [`HistoryCursor::encode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor {
    /// The device's chain head when the first page was read: the paging's snapshot (every entry
    /// it returns is at or before this position).
    pub snapshot: LogPos,
    /// The chain position the next walk starts from: every candidate not yet returned is at or
    /// before it (at most `snapshot`).
    pub resume: LogPos,
    /// `(device time, log position)` of the last entry returned: the next page holds entries
    /// strictly below it.
    pub after: (i64, u64),
    /// The query's device time range, ms, inclusive (a cursor is bound to it).
    pub from: i64,
    /// See `from`.
    pub to: i64,
}

/// Version byte of the encoded cursor.
const CURSOR_VERSION: u8 = 1;
/// Bytes of an encoded cursor before base64: version, six 8-byte fields (snapshot, resume,
/// after's time and position, from, to), check.
const CURSOR_BYTES: usize = 1 + 6 * 8 + 4;
const _: () = assert!(CURSOR_BYTES.div_ceil(3) * 4 <= crate::limits::HISTORY_CURSOR_BYTES_MAX);

/// Why a cursor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not a cursor this server wrote (bad base64, length, version or check).
    #[error("malformed cursor")]
    Malformed,
    /// A cursor of another device or another `from`/`to` range, or one damaged in a way only
    /// the check finds (the two cannot be told apart).
    #[error("cursor is damaged or belongs to another device or query")]
    Foreign,
}

impl HistoryCursor {
    /// The cursor as URL-safe text: base64url (no padding) of the fields, little-endian, followed
    /// by a CRC32C over the device id and the fields. The check refuses truncated, altered and
    /// other devices' cursors; it is not a secret (a reader holds a token for the device anyway,
    /// and [`history_page`] reads only entries of the device whatever the positions say).
    pub fn encode(&self, device_id: &str) -> String {
        use base64::Engine as _;
        let mut b = Vec::with_capacity(CURSOR_BYTES);
        b.push(CURSOR_VERSION);
        for v in [
            self.snapshot.0,
            self.resume.0,
            self.after.0 as u64,
            self.after.1,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&self.to.to_le_bytes());
        let check = crc32c::crc32c_append(crc32c::crc32c(device_id.as_bytes()), &b);
        b.extend_from_slice(&check.to_le_bytes());
        debug_assert_eq!(b.len(), CURSOR_BYTES);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// Parses a cursor written by [`HistoryCursor::encode`] for `device_id`.
    pub fn decode(text: &str, device_id: &str) -> Result<HistoryCursor, CursorError> {
        use base64::Engine as _;
        if text.len() > crate::limits::HISTORY_CURSOR_BYTES_MAX {
            return Err(CursorError::Malformed);
        }
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| CursorError::Malformed)?;
        if b.len() != CURSOR_BYTES || b[0] != CURSOR_VERSION {
            return Err(CursorError::Malformed);
        }
        let body = &b[..CURSOR_BYTES - 4];
        let check = u32::from_le_bytes(b[CURSOR_BYTES - 4..].try_into().expect("4 bytes"));
        if crc32c::crc32c_append(crc32c::crc32c(device_id.as_bytes()), body) != check {
            return Err(CursorError::Foreign);
        }
        let word = |i: usize| u64::from_le_bytes(b[1 + 8 * i..9 + 8 * i].try_into().expect("8"));
        let c = HistoryCursor {
            snapshot: LogPos(word(0)),
            resume: LogPos(word(1)),
            after: (word(2) as i64, word(3)),
            from: word(4) as i64,
            to: word(5) as i64,
        };
        if c.resume > c.snapshot || c.after.1 > c.snapshot.0 || c.from > c.to {
            return Err(CursorError::Malformed);
        }
        Ok(c)
    }
}

/// One page of a device's history.
#[derive(Debug)]
pub struct HistoryPage {
    /// The heartbeats, newest first by `(device time, log position)`, each with its log position.
    pub items: Vec<(Heartbeat, LogPos)>,
    /// Where the next page starts; `None` when nothing is left. A page with a `next` is full
    /// (`limit` items).
    pub next: Option<HistoryCursor>,
    /// The cursor that continues after item `i` of this page is this page's snapshot and
    /// resume position with `after` = that item's key (see [`HistoryPage::cursor_after`]).
    snapshot: LogPos,
    /// See `snapshot`.
    resume: LogPos,
}

impl HistoryPage {
    /// The cursor that continues right after `items[index]` (the last item's is `next` when
    /// there is one, with a tighter resume position). Every candidate left after that item was
    /// at or before this page's resume position.
    pub fn cursor_after(&self, index: usize, from: i64, to: i64) -> HistoryCursor {
        let (hb, pos) = &self.items[index];
        if index + 1 == self.items.len() {
            if let Some(n) = self.next {
                return n;
            }
        }
        HistoryCursor {
            snapshot: self.snapshot,
            resume: self.resume,
            after: (hb.ts_ms, pos.0),
            from,
            to,
        }
    }
}

/// Why a page could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageError {
    /// This shard has never stored the device.
    UnknownDevice,
    /// The cursor's resume position holds another device's entry, or none (a cursor made up, or
    /// of another device that passed the check by chance): refused, nothing read.
    Foreign,
    /// Retention deleted the segment holding the cursor's resume position since the previous
    /// page: the rest of this paging is gone (a new paging starts at the oldest retained entry).
    Expired,
}

/// Up to `limit` (≥ 1) heartbeats of `device_id` with device time in `[from, to]`, newest first
/// by `(device time, log position)`: the first page without a cursor, else the page after
/// `cursor` (whose `from`/`to` the caller checked against the request's). Memory: `limit`
/// candidates; the walk starts at the cursor's resume position and stops as [`history`]'s does.
///
/// Work: the walk reads the chain from the resume position until no older entry can qualify,
/// a bound from receive times (device time is at most `TS_FUTURE_MS_MAX` after receive time).
/// Where a device's heartbeats arrived over more than about ten minutes that is about `limit`
/// entries plus the ten minutes' worth; heartbeats that all arrived within minutes (a bulk
/// upload) give no bound, and each page then reads the rest of the chain (there is no index by
/// device time to jump to).
pub fn history_page(
    store: &ShardStore,
    device_id: &str,
    from: i64,
    to: i64,
    cursor: Option<&HistoryCursor>,
    limit: usize,
) -> Result<HistoryPage, PageError> {
    assert!(limit >= 1, "a page holds at least one entry");
    store.last(device_id).ok_or(PageError::UnknownDevice)?;
    let (mut chain, upper) = match cursor {
        None => (store.chain(device_id), (i64::MAX, u64::MAX)),
        Some(c) if c.resume < store.log().first_pos() => return Err(PageError::Expired),
        Some(c) => {
            if store.log().read(c.resume).is_none() {
                return Err(PageError::Foreign);
            }
            (store.log().chain(c.resume), c.after)
        }
    };
    let mut best: BinaryHeap<Reverse<(i64, u64)>> = BinaryHeap::with_capacity(limit.min(1024) + 1);
    // The newest-arrival candidate pushed out of `best` (left for a later page).
    let mut spilled: Option<u64> = None;
    // The first entry not walked, when the walk stopped with candidates possibly below it.
    let mut stopped_at: Option<u64> = None;
    let mut snapshot = cursor.map(|c| c.snapshot);
    let resume = cursor.map(|c| c.resume);
    let mut first = true;
    for entry in chain.by_ref() {
        if std::mem::take(&mut first) {
            if cursor.is_some() && entry.hb.device_id.as_str() != device_id {
                return Err(PageError::Foreign);
            }
            snapshot.get_or_insert(entry.pos);
        }
        let pos = entry.pos.0;
        let ts = entry.hb.ts_ms.to_native();
        let received = entry.hb.received_ms.to_native();
        // Every older entry (this one included) has ts <= its receive time + TS_FUTURE_MS_MAX
        // <= this bound.
        let older_ts_max = received.saturating_add(TS_FUTURE_MS_MAX + CLOCK_STEP_SLACK_MS);
        if older_ts_max < from {
            break;
        }
        if best.len() == limit
            && best
                .peek()
                .is_some_and(|Reverse((min_ts, _))| older_ts_max < *min_ts)
        {
            stopped_at = Some(pos);
            break;
        }
        if ts < from || ts > to || (ts, pos) >= upper {
            continue;
        }
        best.push(Reverse((ts, pos)));
        if best.len() > limit {
            let Reverse((_, p)) = best.pop().expect("more than limit");
            spilled = Some(spilled.map_or(p, |s| s.max(p)));
        }
    }
    let mut picked: Vec<(i64, u64)> = best.into_iter().map(|Reverse(x)| x).collect();
    picked.sort_unstable_by(|a, b| b.cmp(a));
    let snapshot = snapshot.unwrap_or(LogPos(0));
    let next = match (spilled.max(stopped_at), picked.last()) {
        (Some(r), Some(&last)) => Some(HistoryCursor {
            snapshot,
            resume: LogPos(r),
            after: last,
            from,
            to,
        }),
        _ => None,
    };
    let items = picked
        .into_iter()
        .filter_map(|(_, pos)| store.log().read(LogPos(pos)))
        .map(|e| (e.hb.to_owned_heartbeat(), e.pos))
        .collect();
    Ok(HistoryPage {
        items,
        next,
        snapshot,
        resume: resume.unwrap_or(snapshot),
    })
}

#[cfg(test)]
mod page_tests {
    use super::*;
    use crate::route::ShardId;
    use crate::store::StoreConfig;
    use proptest::prelude::*;

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

    /// Pages through `id` with `limit`, appending `during(page)` between pages; the keys seen.
    fn page_all(
        store: &mut ShardStore,
        id: &str,
        from: i64,
        to: i64,
        limit: usize,
        mut during: impl FnMut(&mut ShardStore, usize),
    ) -> Vec<(i64, u64)> {
        let mut out = Vec::new();
        let mut cursor: Option<HistoryCursor> = None;
        for n in 0.. {
            let page = history_page(store, id, from, to, cursor.as_ref(), limit).unwrap();
            assert!(page.items.len() <= limit);
            if page.next.is_some() {
                assert_eq!(page.items.len(), limit, "a page with a next is full");
            }
            for (i, (h, p)) in page.items.iter().enumerate() {
                assert_eq!(page.cursor_after(i, from, to).after, (h.ts_ms, p.0));
                out.push((h.ts_ms, p.0));
            }
            // The cursor survives its text form.
            cursor = page
                .next
                .map(|c| HistoryCursor::decode(&c.encode(id), id).unwrap());
            if cursor.is_none() {
                break;
            }
            during(store, n);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn paging_returns_the_snapshot_exactly_once_newest_first(
            // (device time offset s, arrival step s, device): late heartbeats, ties, two devices.
            hbs in prop::collection::vec((0i64..4000, 0i64..700, 0u8..2), 1..300),
            appends in prop::collection::vec(0i64..4000, 0..40),
            limit in 1usize..40,
            window in prop::option::of((0i64..4000, 0i64..4000)),
        ) {
            // Pages over a device whose heartbeats arrive out of device-time order (late ones,
            // equal device times, another device interleaved) while more arrive between pages:
            // the pages hold exactly the entries stored before the first page (in the window),
            // newest first by (ts, position), each once; appends during paging never show up.
            let dir = tempfile::tempdir().unwrap();
            let (mut store, _) = ShardStore::open(&StoreConfig::new(dir.path(), ShardId(0))).unwrap();
            let base = 1_800_000_000_000i64;
            let mut received = base;
            let mut model: Vec<(i64, u64)> = Vec::new();
            for &(t, step, dev) in &hbs {
                received += step * 1000;
                let ts = (base + t * 1000).min(received + TS_FUTURE_MS_MAX);
                let id = if dev == 0 { "a" } else { "b" };
                let pos = store.append(&hb(id, ts, received)).unwrap();
                if dev == 0 {
                    model.push((ts, pos.0));
                }
            }
            prop_assume!(!model.is_empty());
            let (from, to) = match window {
                Some((x, y)) => (base + x.min(y) * 1000, base + x.max(y) * 1000),
                None => (i64::MIN, i64::MAX),
            };
            model.retain(|&(ts, _)| ts >= from && ts <= to);
            model.sort_unstable_by(|a, b| b.cmp(a));
            let mut k = 0;
            let got = page_all(&mut store, "a", from, to, limit, |s, _| {
                for _ in 0..3 {
                    if let Some(t) = appends.get(k) {
                        s.append(&hb("a", base + t * 1000, received)).unwrap();
                    }
                    k += 1;
                }
            });
            prop_assert_eq!(got, model);
        }
    }

    #[test]
    fn cursors_refuse_damage_other_devices_and_other_positions() {
        // A cursor decodes only for its device; any altered character is refused; a cursor whose
        // resume position holds another device's entry reads nothing.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = ShardStore::open(&StoreConfig::new(dir.path(), ShardId(0))).unwrap();
        let base = 1_800_000_000_000i64;
        let mut b_pos = LogPos(0);
        for i in 0..10 {
            store.append(&hb("a", base + i, base + i)).unwrap();
            b_pos = store.append(&hb("b", base + i, base + i)).unwrap();
        }
        let page = history_page(&store, "a", i64::MIN, i64::MAX, None, 3).unwrap();
        let c = page.next.unwrap();
        let text = c.encode("a");
        assert_eq!(HistoryCursor::decode(&text, "a"), Ok(c));
        assert_eq!(HistoryCursor::decode(&text, "b"), Err(CursorError::Foreign));
        for i in 0..text.len() {
            let mut t = text.clone().into_bytes();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            assert!(HistoryCursor::decode(&t, "a").is_err(), "{t}");
        }
        for bad in ["", "x", "!!!!", &text[1..], &format!("{text}A")] {
            assert!(HistoryCursor::decode(bad, "a").is_err(), "{bad}");
        }
        let forged = HistoryCursor {
            resume: b_pos,
            snapshot: b_pos,
            ..c
        };
        assert_eq!(
            history_page(&store, "a", i64::MIN, i64::MAX, Some(&forged), 3).unwrap_err(),
            PageError::Foreign
        );
        assert_eq!(
            history_page(&store, "zz", i64::MIN, i64::MAX, None, 3).unwrap_err(),
            PageError::UnknownDevice
        );
        // A position inside an entry is no entry.
        let inside = HistoryCursor {
            resume: LogPos(c.resume.0 + 1),
            ..c
        };
        assert_eq!(
            history_page(&store, "a", i64::MIN, i64::MAX, Some(&inside), 3).unwrap_err(),
            PageError::Foreign
        );
    }

    #[test]
    fn a_cursor_into_segments_retention_deleted_has_expired() {
        // Pages of a device whose oldest segments retention deletes between two pages: the
        // cursor that continues inside them is refused as expired, not answered as the end.
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = StoreConfig::new(dir.path(), ShardId(0));
        cfg.segment_bytes = crate::limits::SEGMENT_BYTES_MIN;
        let (mut store, _) = ShardStore::open(&cfg).unwrap();
        let base = 1_800_000_000_000i64;
        let first = store.append(&hb("a", base, base)).unwrap();
        let mut i = 1;
        while store.stats().segments < 3 {
            store.append(&hb("a", base + i, base + i)).unwrap();
            i += 1;
        }
        let page = history_page(&store, "a", i64::MIN, i64::MAX, None, 5).unwrap();
        let deep = HistoryCursor {
            resume: first,
            after: (base + 1, first.0 + 1),
            ..page.next.unwrap()
        };
        assert_eq!(
            history_page(&store, "a", i64::MIN, i64::MAX, Some(&deep), 5)
                .unwrap()
                .items
                .len(),
            1
        );
        let later =
            std::time::SystemTime::now() + std::time::Duration::from_secs(86_400 * 365 * 30);
        assert!(
            store
                .delete_expired(later, std::time::Duration::ZERO)
                .unwrap()
                > 0
        );
        assert_eq!(
            history_page(&store, "a", i64::MIN, i64::MAX, Some(&deep), 5).unwrap_err(),
            PageError::Expired
        );
    }
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
    area_with_view(store, None, area, limit)
}

/// [`area`] over the shard's local table and, on a cluster node, its cluster view
/// (`table::view`): each device counts once, at its last location by [`view_wins`]'s rule.
pub fn area_with_view(
    store: &ShardStore,
    view: Option<&ViewTable>,
    area: &Area,
    limit: usize,
) -> Vec<AreaHit> {
    let (bbox, centre) = match *area {
        Area::BBox(b) => (b, None),
        Area::Near { lat, lon, radius_m } => (
            crate::spatial::circle_bbox(lat, lon, radius_m),
            Some((lat, lon, radius_m)),
        ),
    };
    // The exact test of the area and the hit it makes.
    let hit = |id: &str, lat: f64, lon: f64, ts: i64| -> Option<AreaHit> {
        let distance_m = match centre {
            None if bbox.contains(lat, lon) => None,
            None => return None,
            Some((clat, clon, r)) => {
                let d = crate::spatial::haversine_m(clat, clon, lat, lon);
                if d > r {
                    return None;
                }
                Some(d)
            }
        };
        Some(AreaHit {
            id: id.to_owned(),
            lat,
            lon,
            ts,
            distance_m,
        })
    };
    let mut hits = Vec::new();
    store.grid().candidates(&bbox, |key| {
        let (id, loc) = store.slot_location(key);
        // A device whose newer location another node wrote is where the view says.
        if view
            .and_then(|v| v.get(id))
            .is_some_and(|v| view_wins(Some(&loc), v))
        {
            return;
        }
        hits.extend(hit(id, loc.lat, loc.lon, loc.ts_ms));
    });
    if let Some(view) = view {
        view.candidates(&bbox, |hb| {
            if !view_wins(store.last(&hb.device_id).as_ref(), hb) {
                return;
            }
            hits.extend(hit(&hb.device_id, hb.lat, hb.lon, hb.ts_ms));
        });
    }
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

    #[test]
    fn a_device_counts_once_at_its_newest_location_across_table_and_view() {
        // Device "a" is in the local table at (1, 1) and in the cluster view at (5, 5) with a
        // newer device time; "b" is newer locally; "c" is only in the view. Each device is
        // found once, where its newest location is.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) =
            ShardStore::open(&StoreConfig::new(dir.path().join("0"), ShardId(0))).unwrap();
        let hb = |id: &str, ts: i64, at: f64| Heartbeat {
            device_id: id.into(),
            lat: at,
            lon: at,
            ts_ms: ts,
            received_ms: ts,
            ..Default::default()
        };
        store.append(&hb("a", 10, 1.0)).unwrap();
        store.append(&hb("b", 30, 1.0)).unwrap();
        let mut view = ViewTable::new();
        view.observe(&hb("a", 20, 5.0)).unwrap();
        view.observe(&hb("b", 20, 5.0)).unwrap();
        view.observe(&hb("c", 1, 5.0)).unwrap();
        let around =
            |at: f64| Area::BBox(BBox::new(at - 0.5, at - 0.5, at + 0.5, at + 0.5).unwrap());
        let ids = |hits: Vec<AreaHit>| hits.into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(
            ids(area_with_view(&store, Some(&view), &around(1.0), 10)),
            vec!["b"]
        );
        assert_eq!(
            ids(area_with_view(&store, Some(&view), &around(5.0), 10)),
            vec!["a", "c"]
        );
        // Without the view: the local table alone.
        assert_eq!(ids(area(&store, &around(1.0), 10)), vec!["a", "b"]);
        let near = Area::Near {
            lat: 5.0,
            lon: 5.0,
            radius_m: 1000.0,
        };
        let hits = area_with_view(&store, Some(&view), &near, 1);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].distance_m, Some(0.0));
    }
}
