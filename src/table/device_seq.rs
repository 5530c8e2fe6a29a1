//! Per-device exactly-once state (issue 18): for a device that sends device-scoped sequence
//! numbers, its durable high-water mark `(epoch, seq)`, which of the [`DEVICE_SEQ_WINDOW`]
//! sequence numbers just below the mark are still missing, and the audit counters (gaps:
//! numbered heartbeats that never arrived; duplicates dropped). It owns the dedupe decision
//! ([`DeviceAudit::check`]) and its bookkeeping ([`DeviceAudit::apply`]); it does not read the
//! log, append, or decide when an ack may be sent (the shard's append path does).
//!
//! Invariants: a sequence number is judged new at most once per epoch (so the log holds each
//! `(epoch, seq)` of a device at most once); [`DeviceAudit::apply`] of an already-applied
//! sequence is a no-op, so replaying the log over a saved snapshot rebuilds the same state; the
//! gap count is exactly the number of sequence numbers of every epoch, up to its highest stored
//! one, that were never stored.

use crate::limits::DEVICE_SEQ_WINDOW;
use crate::log::LogPos;
use crate::record::DeviceSeq;

/// The window is a bitmap in one `u64`.
const _: () = assert!(DEVICE_SEQ_WINDOW == 64);

/// What the append path does with a heartbeat that carries a device sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never stored: append it.
    New,
    /// At or below the mark and not missing (or too far below it to tell): acknowledge it
    /// without storing it again, once the entry at the returned position is durable.
    Duplicate,
}

/// One device's exactly-once state and audit counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceAudit {
    /// The highest stored `(epoch, seq)`, if the device ever sent one.
    pub mark: Option<DeviceSeq>,
    /// Log position of the entry that set the mark (a duplicate's ack waits until it is
    /// durable: every earlier entry of the device lies before it).
    pub mark_pos: LogPos,
    /// Bit `i` set: sequence `mark.seq - 1 - i` of the mark's epoch was never stored.
    pub missing: u64,
    /// Sequence numbers that fell out of the window (or out of an ended epoch) unstored.
    pub gaps_out: u64,
    /// Duplicates dropped (sequence or device-time duplicates) since the shard opened, plus
    /// those recorded in the snapshot it opened from.
    pub duplicates: u64,
}

impl DeviceAudit {
    /// Sequence numbers skipped: numbered below the mark (in any epoch) and never stored.
    pub fn gaps(&self) -> u64 {
        self.gaps_out + u64::from(self.missing.count_ones())
    }

    /// Whether `d` must be stored or is a duplicate. Does not change anything.
    pub fn check(&self, d: DeviceSeq) -> Verdict {
        let Some(mark) = self.mark else {
            return Verdict::New;
        };
        if d.epoch != mark.epoch {
            return if d.epoch > mark.epoch {
                Verdict::New
            } else {
                Verdict::Duplicate
            };
        }
        if d.seq > mark.seq {
            return Verdict::New;
        }
        if d.seq == mark.seq || mark.seq - d.seq > DEVICE_SEQ_WINDOW {
            return Verdict::Duplicate;
        }
        let bit = mark.seq - 1 - d.seq;
        if self.missing & (1 << bit) != 0 {
            Verdict::New
        } else {
            Verdict::Duplicate
        }
    }

    /// Records that `d` was stored at `pos`. Applying a sequence already applied (log replay
    /// over a snapshot) changes nothing.
    pub fn apply(&mut self, d: DeviceSeq, pos: LogPos) {
        if self.check(d) == Verdict::Duplicate {
            return;
        }
        match self.mark {
            Some(mark) if mark.epoch == d.epoch && d.seq < mark.seq => {
                // A late heartbeat inside the window fills its hole.
                self.missing &= !(1 << (mark.seq - 1 - d.seq));
            }
            Some(mark) if mark.epoch == d.epoch => {
                let shift = d.seq - mark.seq;
                let w = DEVICE_SEQ_WINDOW;
                let lost_old = if shift >= w {
                    self.missing.count_ones()
                } else {
                    (self.missing >> (w - shift)).count_ones()
                };
                let between = shift - 1;
                self.gaps_out += u64::from(lost_old) + between.saturating_sub(w);
                let kept = if shift >= w { 0 } else { self.missing << shift };
                self.missing = kept | low_mask(between);
                self.mark = Some(d);
                self.mark_pos = pos;
            }
            _ => {
                // First sequence, or a new epoch: whatever the old epoch still missed is final;
                // the new epoch counts from 1.
                self.gaps_out += u64::from(self.missing.count_ones());
                let below = d.seq.saturating_sub(1);
                self.gaps_out += below.saturating_sub(DEVICE_SEQ_WINDOW);
                self.missing = low_mask(below);
                self.mark = Some(d);
                self.mark_pos = pos;
            }
        }
    }
}

/// The `n` low bits set (all 64 for `n >= 64`).
fn low_mask(n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn ds(epoch: u32, seq: u64) -> DeviceSeq {
        DeviceSeq { epoch, seq }
    }

    #[test]
    fn in_order_resends_and_small_reorders() {
        // 1..=5 stored; a resend of 3 is a duplicate; 8 skips 6 and 7 (two gaps), then 7 arrives
        // late inside the window (one gap left); 9 and a late 7 again.
        let mut a = DeviceAudit::default();
        for s in 1..=5 {
            assert_eq!(a.check(ds(0, s)), Verdict::New);
            a.apply(ds(0, s), LogPos(s));
        }
        assert_eq!(a.check(ds(0, 3)), Verdict::Duplicate);
        assert_eq!(a.check(ds(0, 5)), Verdict::Duplicate);
        a.apply(ds(0, 8), LogPos(8));
        assert_eq!(a.gaps(), 2);
        assert_eq!(a.check(ds(0, 7)), Verdict::New);
        a.apply(ds(0, 7), LogPos(9));
        assert_eq!(a.gaps(), 1);
        assert_eq!(a.check(ds(0, 7)), Verdict::Duplicate);
        assert_eq!(a.mark, Some(ds(0, 8)));
        assert_eq!(a.mark_pos, LogPos(8), "a late fill does not move the mark");
        // A new epoch makes the old epoch's hole final and starts at 1.
        a.apply(ds(1, 3), LogPos(10));
        assert_eq!(a.gaps(), 1 + 2);
        assert_eq!(a.check(ds(0, 6)), Verdict::Duplicate, "older epoch");
        assert_eq!(a.check(ds(1, 1)), Verdict::New);
    }

    #[test]
    fn big_jumps_count_every_skipped_number() {
        // Jumps larger than the window put the numbers that fall out into gaps_out exactly.
        let mut a = DeviceAudit::default();
        a.apply(ds(0, 1000), LogPos(1));
        assert_eq!(a.gaps(), 999);
        a.apply(ds(0, 1001), LogPos(2));
        a.apply(ds(0, 5000), LogPos(3));
        assert_eq!(a.gaps(), 999 + 3998);
        assert_eq!(a.check(ds(0, 5000 - 64)), Verdict::New);
        assert_eq!(
            a.check(ds(0, 5000 - 65)),
            Verdict::Duplicate,
            "below the window"
        );
    }

    #[test]
    fn matches_a_reference_model_and_replays_idempotently() {
        // Random arrivals (resends, reorders up to ~100 back, epoch bumps) against a model:
        // stored = set of (epoch, seq); a number is new iff never stored, in an epoch not older
        // than the newest, and within the window below the highest stored; gaps = numbers up to
        // each epoch's highest that were never stored. Re-applying every stored number in order
        // over the final state changes nothing (replay over a snapshot).
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _case in 0..200 {
            let mut a = DeviceAudit::default();
            let mut stored: BTreeSet<(u32, u64)> = BTreeSet::new();
            let mut order = Vec::new();
            let mut epoch = 0u32;
            let mut top = 0u64;
            for i in 0..400u64 {
                let r = next();
                if r % 97 == 0 {
                    epoch += 1;
                    top = 0;
                }
                let seq = match r % 5 {
                    0 => top.saturating_sub(next() % 100).max(1),
                    1 => top + 1 + next() % 3,
                    _ => top + 1,
                };
                top = top.max(seq);
                let d = ds(epoch, seq);
                let max = stored
                    .iter()
                    .filter(|(e, _)| *e == epoch)
                    .map(|x| x.1)
                    .max();
                let newest_epoch = stored.iter().map(|x| x.0).max().unwrap_or(0);
                let expect_new = !stored.contains(&(epoch, seq))
                    && epoch >= newest_epoch
                    && max.is_none_or(|m| seq + DEVICE_SEQ_WINDOW >= m);
                let got = a.check(d);
                assert_eq!(got == Verdict::New, expect_new, "arrival {i}: {d:?}");
                if got == Verdict::New {
                    stored.insert((epoch, seq));
                    order.push(d);
                    a.apply(d, LogPos(i));
                }
            }
            let mut tops: BTreeMap<u32, u64> = BTreeMap::new();
            for &(e, s) in &stored {
                let t = tops.entry(e).or_default();
                *t = (*t).max(s);
            }
            let gaps: u64 = tops
                .iter()
                .map(|(e, t)| t - stored.iter().filter(|x| x.0 == *e).count() as u64)
                .sum();
            assert_eq!(a.gaps(), gaps);
            let before = a;
            for d in &order {
                a.apply(*d, LogPos(9999));
            }
            assert_eq!(a, before);
        }
    }
}
