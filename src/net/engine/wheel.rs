//! [`Wheel`]: the connection engine's one timing wheel per executor. It owns the deadlines of
//! every engine connection (idle, token expiry, write stall, close step), in ticks of
//! [`ENGINE_WHEEL_TICK`], so reading a message or sending an ack creates no timer: the
//! connection moves its own deadline fields, and the wheel holds one entry per connection
//! that, when it fires, asks the connection for its next deadline. It does not know what the
//! deadlines mean, and it keeps stale entries (the caller drops those whose tick it no longer
//! expects).
//!
//! Invariant: an entry inserted for tick `t` is returned by the first [`Wheel::advance`] to a
//! tick `>= t`, exactly once, and never earlier.

use crate::limits::ENGINE_WHEEL_SLOTS;

/// One timing wheel of `K` (connection keys) over ticks (see the module comment).
pub struct Wheel<K> {
    slots: Vec<Vec<(u64, K)>>,
    /// One bit per slot: set while the slot holds entries.
    occupied: Vec<u64>,
    /// Last tick advanced to; entries are for later ticks.
    now: u64,
    len: usize,
}

impl<K: Copy> Wheel<K> {
    /// An empty wheel at tick `now`.
    pub fn new(now: u64) -> Wheel<K> {
        Wheel {
            slots: (0..ENGINE_WHEEL_SLOTS).map(|_| Vec::new()).collect(),
            occupied: vec![0; ENGINE_WHEEL_SLOTS / 64],
            now,
            len: 0,
        }
    }

    /// Entries held (stale ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wheel holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tick last advanced to.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Adds `key`, due at tick `at` (a tick already passed is due at the next advance).
    pub fn insert(&mut self, at: u64, key: K) {
        let at = at.max(self.now + 1);
        let slot = (at as usize) & (ENGINE_WHEEL_SLOTS - 1);
        self.slots[slot].push((at, key));
        self.occupied[slot / 64] |= 1 << (slot % 64);
        self.len += 1;
    }

    /// Moves to tick `to`, appending every entry due by then to `fired` as `(tick, key)`.
    pub fn advance(&mut self, to: u64, fired: &mut Vec<(u64, K)>) {
        if to <= self.now {
            return;
        }
        // A jump of a whole turn or more visits every slot once.
        let steps = (to - self.now).min(ENGINE_WHEEL_SLOTS as u64);
        for t in self.now + 1..=self.now + steps {
            let slot = (t as usize) & (ENGINE_WHEEL_SLOTS - 1);
            if self.occupied[slot / 64] & (1 << (slot % 64)) == 0 {
                continue;
            }
            let entries = &mut self.slots[slot];
            let before = entries.len();
            entries.retain(|&(at, key)| {
                if at <= to {
                    fired.push((at, key));
                    false
                } else {
                    true
                }
            });
            self.len -= before - entries.len();
            if entries.is_empty() {
                self.occupied[slot / 64] &= !(1 << (slot % 64));
            }
        }
        self.now = to;
    }

    /// The first tick after `now` whose slot holds entries (they may be due a turn later: the
    /// caller advances there and asks again), or `None` if the wheel is empty.
    pub fn next_due(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = (self.now as usize + 1) & (ENGINE_WHEEL_SLOTS - 1);
        let words = self.occupied.len();
        // Scan the bitmap from `start`, wrapping once.
        for i in 0..=words {
            let w = (start / 64 + i) % words;
            let mut bits = self.occupied[w];
            if i == 0 {
                bits &= !0u64 << (start % 64);
            } else if i == words {
                bits &= !(!0u64 << (start % 64));
            }
            if bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                let ahead = (slot + ENGINE_WHEEL_SLOTS - start) % ENGINE_WHEEL_SLOTS;
                return Some(self.now + 1 + ahead as u64);
            }
        }
        unreachable!("len > 0 but no slot occupied")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_fire_at_their_tick_not_before_and_once() {
        // Entries at ticks 3, 3, 5 and one a turn and a half away: advancing tick by tick fires
        // each exactly at its tick; the far one survives its slot's visits of earlier turns;
        // `next_due` points at the next occupied slot; a past tick is due at the next advance.
        let mut w = Wheel::new(0);
        let far = ENGINE_WHEEL_SLOTS as u64 * 3 / 2;
        for (at, k) in [(3, 'a'), (5, 'c'), (3, 'b'), (far, 'z')] {
            w.insert(at, k);
        }
        assert_eq!(w.next_due(), Some(3));
        let mut fired = Vec::new();
        w.advance(2, &mut fired);
        assert!(fired.is_empty());
        w.advance(3, &mut fired);
        assert_eq!(fired, vec![(3, 'a'), (3, 'b')]);
        assert_eq!(w.next_due(), Some(5));
        fired.clear();
        w.advance(far - 1, &mut fired);
        assert_eq!(fired, vec![(5, 'c')]);
        assert_eq!((w.len(), w.next_due()), (1, Some(far)));
        fired.clear();
        w.advance(far, &mut fired);
        assert_eq!(fired, vec![(far, 'z')]);
        assert_eq!((w.is_empty(), w.next_due()), (true, None));
        w.insert(1, 'p');
        assert_eq!(w.next_due(), Some(far + 1));
        fired.clear();
        w.advance(far + 1, &mut fired);
        assert_eq!(fired, vec![(far + 1, 'p')]);
    }

    proptest! {
        /// Random inserts and advances (jumps of more than a turn included): every entry fires
        /// exactly once, at the first advance to a tick at or past its own, and `next_due` never
        /// lies past the earliest pending entry's tick.
        #[test]
        fn every_entry_fires_once_at_the_first_advance_past_it(
            ops in prop::collection::vec((any::<bool>(), 0u64..3 * ENGINE_WHEEL_SLOTS as u64), 1..200),
        ) {
            let mut w = Wheel::new(0);
            let mut pending: Vec<(u64, usize)> = Vec::new();
            let mut fired = Vec::new();
            for (i, &(insert, n)) in ops.iter().enumerate() {
                if insert {
                    let at = (w.now() + n).max(w.now() + 1);
                    w.insert(at, i);
                    pending.push((at, i));
                } else {
                    let to = w.now() + n % (2 * ENGINE_WHEEL_SLOTS as u64);
                    fired.clear();
                    w.advance(to, &mut fired);
                    let mut due: Vec<_> = pending.iter().copied().filter(|&(at, _)| at <= to).collect();
                    pending.retain(|&(at, _)| at > to);
                    fired.sort();
                    due.sort();
                    prop_assert_eq!(&fired, &due);
                }
                prop_assert_eq!(w.len(), pending.len());
                if let Some(min) = pending.iter().map(|p| p.0).min() {
                    prop_assert!(w.next_due().unwrap() <= min);
                }
            }
        }
    }
}
