//! [`AckLedger`]: one executor's table of ingest connections and the frames each is waiting on.
//! It owns the rule that turns completed groups into an ack: a frame is split into groups (one
//! per destination shard); each group completes once its shard made it durable (or refused its
//! heartbeats, which become error frames); the ack of a connection is the highest seq of its
//! completed prefix of frames. It does not append, commit or write to sockets: the commit loop
//! (`shard::commit`) completes groups, and the connection's writer reads `ack_ready` and `errors`.
//!
//! Invariants: an ack never covers a heartbeat that is not durable: `ack_ready` only moves to the
//! `seq_max` of a frame all of whose groups completed, and only across a prefix of completed
//! frames (a later frame completing first acks nothing until the earlier ones do); a completion
//! for a closed connection (its key's slot reused) is dropped; all of it is touched by its
//! executor's thread only.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use crate::metrics::Hist;
use crate::rt::Signal;
use crate::slab::{Key, Slab};

/// Names one connection on its executor (see [`crate::slab::Key`]).
pub type ConnKey = Key;

/// A frame waiting for its groups to become durable.
struct FrameWait {
    frame: u64,
    /// When the frame was read (ack latency starts here).
    received: Instant,
    /// Highest accepted seq in the frame (0 if none).
    seq_max: u64,
    /// Groups not yet complete.
    groups: u32,
}

/// The ack state of one ingest connection.
pub struct ConnAcks {
    frames: VecDeque<FrameWait>,
    next_frame: u64,
    /// Highest seq that may be acked (the completed prefix of frames).
    pub ack_ready: u64,
    /// Error frames to send: `(seq, reason)`.
    pub errors: VecDeque<(Option<u64>, &'static str)>,
    /// Wakes the connection's writer (and a paused reader).
    pub signal: Rc<Signal>,
}

impl ConnAcks {
    /// Frames still waiting for durability.
    pub fn frames_in_flight(&self) -> usize {
        self.frames.len()
    }
}

/// The ack state of every ingest connection of one executor (see the module comment).
#[derive(Default)]
pub struct AckLedger {
    conns: RefCell<Slab<ConnAcks>>,
}

impl AckLedger {
    /// An empty ledger.
    pub fn new() -> AckLedger {
        AckLedger::default()
    }

    /// Registers a new connection.
    pub fn open(&self) -> ConnKey {
        self.conns.borrow_mut().insert_with(
            || ConnAcks {
                frames: VecDeque::new(),
                next_frame: 0,
                ack_ready: 0,
                errors: VecDeque::new(),
                signal: Signal::new(),
            },
            |c| {
                c.frames.clear();
                c.next_frame = 0;
                c.ack_ready = 0;
                c.errors.clear();
                // A fresh signal: tasks of the slot's previous tenant may still hold the old one.
                c.signal = Signal::new();
            },
        )
    }

    /// Unregisters a connection; completions still in flight for it are dropped on arrival.
    pub fn close(&self, key: ConnKey) {
        self.conns.borrow_mut().remove(key);
    }

    /// Connections registered.
    pub fn open_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Runs `f` on a live connection's state.
    pub fn with<R>(&self, key: ConnKey, f: impl FnOnce(&mut ConnAcks) -> R) -> Option<R> {
        self.conns.borrow_mut().get_mut(key).map(f)
    }

    /// Starts a frame with `groups` destination groups whose highest accepted seq is `seq_max`;
    /// returns its number. A frame with zero groups (everything rejected) completes at once.
    /// Ack latencies are recorded in `latency`.
    pub fn frame_begin(
        &self,
        key: ConnKey,
        seq_max: u64,
        groups: u32,
        received: Instant,
        latency: &Hist,
    ) -> u64 {
        let frame = self
            .with(key, |c| {
                // Seqs rise across frames (the reader checks them), so a later frame never acks
                // less than an earlier one.
                assert!(seq_max == 0 || seq_max >= c.ack_ready, "frame seqs go back");
                let frame = c.next_frame;
                c.next_frame += 1;
                c.frames.push_back(FrameWait {
                    frame,
                    received,
                    seq_max,
                    groups,
                });
                frame
            })
            .expect("frame_begin on a live connection");
        if groups == 0 {
            self.settle(key, latency);
        }
        frame
    }

    /// Marks one group of `frame` complete, after queueing `failed` seqs as error frames.
    pub fn group_done(
        &self,
        key: ConnKey,
        frame: u64,
        failed: &[(u64, &'static str)],
        latency: &Hist,
    ) {
        self.with(key, |c| {
            for &(seq, reason) in failed {
                c.errors.push_back((Some(seq), reason));
            }
            if !failed.is_empty() {
                // Errors of a frame behind an unfinished one go out now, not with its ack.
                c.signal.notify();
            }
            let Some(front) = c.frames.front() else {
                return;
            };
            let idx = frame.wrapping_sub(front.frame) as usize;
            if let Some(f) = c.frames.get_mut(idx) {
                assert!(f.frame == frame && f.groups > 0, "group completed twice");
                f.groups -= 1;
            }
        });
        self.settle(key, latency);
    }

    /// Pops the completed prefix of frames and wakes the writer (and a paused reader) if anything
    /// changed.
    fn settle(&self, key: ConnKey, latency: &Hist) {
        self.with(key, |c| {
            let before = (c.ack_ready, c.errors.len(), c.frames.len());
            let mut now = None;
            while c.frames.front().is_some_and(|f| f.groups == 0) {
                let f = c.frames.pop_front().expect("front exists");
                c.ack_ready = c.ack_ready.max(f.seq_max);
                let now = *now.get_or_insert_with(Instant::now);
                latency.observe(now.duration_since(f.received).as_secs_f64());
            }
            // Any change wakes the writer and a reader paused on backpressure (popped frames
            // make room even when the ack does not move, e.g. a frame refused whole).
            if (c.ack_ready, c.errors.len(), c.frames.len()) != before {
                c.signal.notify();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hist() -> Hist {
        Hist::new(&[0.001, 1.0])
    }

    #[test]
    fn a_later_frame_completing_first_acks_nothing_until_the_earlier_one_does() {
        let (l, h) = (AckLedger::new(), hist());
        let k = l.open();
        let now = Instant::now();
        let f0 = l.frame_begin(k, 10, 2, now, &h);
        let f1 = l.frame_begin(k, 20, 1, now, &h);
        l.group_done(k, f1, &[], &h);
        assert_eq!(l.with(k, |c| c.ack_ready), Some(0));
        l.group_done(k, f0, &[(7, "storage_full")], &h);
        assert_eq!(l.with(k, |c| c.ack_ready), Some(0), "one group of f0 open");
        l.group_done(k, f0, &[], &h);
        assert_eq!(
            l.with(k, |c| (c.ack_ready, c.frames_in_flight())),
            Some((20, 0))
        );
        assert_eq!(
            l.with(k, |c| c.errors.iter().copied().collect::<Vec<_>>()),
            Some(vec![(Some(7), "storage_full")])
        );
    }

    #[test]
    fn completions_for_a_closed_connection_are_dropped() {
        // The slot is reused by a new connection: the old frame's completion must not touch it.
        let (l, h) = (AckLedger::new(), hist());
        let old = l.open();
        let f = l.frame_begin(old, 5, 1, Instant::now(), &h);
        l.close(old);
        let new = l.open();
        assert_eq!(new.slot, old.slot);
        let g = l.frame_begin(new, 3, 1, Instant::now(), &h);
        l.group_done(old, f, &[(5, "x")], &h);
        assert_eq!(
            l.with(new, |c| (c.ack_ready, c.errors.len(), c.frames_in_flight())),
            Some((0, 0, 1))
        );
        l.group_done(new, g, &[], &h);
        assert_eq!(l.with(new, |c| c.ack_ready), Some(3));
        assert_eq!(l.open_count(), 1);
    }

    proptest! {
        /// Frames of rising seqs, each split into 0..4 groups, complete in an arbitrary order:
        /// after every completion, `ack_ready` is exactly the `seq_max` of the longest prefix of
        /// frames whose groups all completed (never a seq of an incomplete frame).
        #[test]
        fn the_ack_is_the_completed_prefix(
            groups in prop::collection::vec(0u32..4, 1..24),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..100),
        ) {
            let (l, h) = (AckLedger::new(), hist());
            let k = l.open();
            let now = Instant::now();
            let mut left: Vec<u32> = Vec::new();
            let mut seq_max = Vec::new();
            for (i, &g) in groups.iter().enumerate() {
                let seq = 10 * (i as u64 + 1);
                prop_assert_eq!(l.frame_begin(k, seq, g, now, &h), i as u64);
                left.push(g);
                seq_max.push(seq);
            }
            let mut pending: Vec<usize> = left
                .iter()
                .enumerate()
                .flat_map(|(f, &g)| std::iter::repeat_n(f, g as usize))
                .collect();
            let expect = |left: &[u32]| {
                let done = left.iter().take_while(|&&g| g == 0).count();
                if done == 0 { 0 } else { seq_max[done - 1] }
            };
            prop_assert_eq!(l.with(k, |c| c.ack_ready).unwrap(), expect(&left));
            for ix in order {
                if pending.is_empty() {
                    break;
                }
                let f = pending.swap_remove(ix.index(pending.len()));
                left[f] -= 1;
                l.group_done(k, f as u64, &[], &h);
                prop_assert_eq!(l.with(k, |c| c.ack_ready).unwrap(), expect(&left));
            }
        }
    }
}
