//! Latency bookkeeping for one connection: the open-loop send schedule (intended send times) and
//! the queue of frames sent but not yet acknowledged. It owns the rule that latency is measured
//! from the INTENDED send time, not the actual one, so a device that falls behind its schedule (a
//! stalled server, a slow client) reports the lag as latency instead of hiding it (no coordinated
//! omission). Beside it, each ack also yields the service time (from the ACTUAL send to the ack):
//! the part of the latency the server and the network spent, without the client's own pacing
//! delay. It does not own sockets, clocks or histograms: callers pass `now` and receive
//! [`Acked`] records. Invariants: queued frames have strictly increasing, non-overlapping seq
//! ranges; the queue never holds more than its heartbeat capacity.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One frame sent and not yet fully acknowledged.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Lowest seq of the frame still unacknowledged.
    first_seq: u64,
    /// Highest seq in the frame.
    last_seq: u64,
    /// When the frame was meant to be sent (closed loop: when it was sent).
    intended: Instant,
    /// When the frame was actually handed to the connection (never before `intended`).
    sent: Instant,
    /// Heartbeats of the frame still unacknowledged (rejections reduce it).
    count: u32,
    /// Whether the frame was meant to be sent inside the measured window.
    measured: bool,
}

/// Heartbeats acknowledged by one ack, all from one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Time from the intended send to the ack, in microseconds.
    pub latency_us: u64,
    /// Time from the actual send to the ack, in microseconds (at most `latency_us`).
    pub service_us: u64,
    /// Number of heartbeats this record covers.
    pub count: u32,
    /// Whether they were meant to be sent inside the measured window.
    pub measured: bool,
}

/// Frames in flight on one connection, oldest first.
#[derive(Debug)]
pub struct InFlight {
    /// Unacknowledged frames in seq order.
    frames: VecDeque<Pending>,
    /// Sum of `count` over `frames`.
    heartbeats: usize,
    /// Most heartbeats allowed in flight.
    heartbeats_max: usize,
    /// Highest seq pushed so far (0 before the first push).
    last_seq: u64,
}

impl InFlight {
    /// An empty queue admitting at most `heartbeats_max` unacknowledged heartbeats.
    pub fn new(heartbeats_max: usize) -> Self {
        assert!(
            heartbeats_max > 0,
            "an in-flight window must admit at least one heartbeat"
        );
        Self {
            frames: VecDeque::new(),
            heartbeats: 0,
            heartbeats_max,
            last_seq: 0,
        }
    }

    /// Heartbeats sent and not yet acknowledged or rejected.
    pub fn heartbeats(&self) -> usize {
        self.heartbeats
    }

    /// Heartbeats in flight that were meant to be sent inside the measured window.
    pub fn measured_heartbeats(&self) -> u64 {
        self.frames
            .iter()
            .filter(|f| f.measured)
            .map(|f| u64::from(f.count))
            .sum()
    }

    /// Highest seq sent so far (0 before the first frame).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether a frame of `count` heartbeats may be sent without exceeding the window.
    pub fn has_room(&self, count: usize) -> bool {
        self.heartbeats + count <= self.heartbeats_max
    }

    /// Records a frame of `count` heartbeats with seqs `first_seq..first_seq + count`, meant to
    /// leave at `intended` and actually sent at `sent`.
    pub fn push(
        &mut self,
        first_seq: u64,
        count: u32,
        intended: Instant,
        sent: Instant,
        measured: bool,
    ) {
        assert!(count > 0, "a frame carries at least one heartbeat");
        assert!(
            first_seq > self.last_seq,
            "seq must increase: {first_seq} after {}",
            self.last_seq
        );
        assert!(self.has_room(count as usize), "in-flight window exceeded");
        let last_seq = first_seq + u64::from(count) - 1;
        self.frames.push_back(Pending {
            first_seq,
            last_seq,
            intended,
            sent: sent.max(intended),
            count,
            measured,
        });
        self.heartbeats += count as usize;
        self.last_seq = last_seq;
    }

    /// Applies `{"ack":ack_seq}` at time `now`: every heartbeat with seq <= `ack_seq` is done.
    /// Calls `on_acked` once per (part of a) frame acknowledged; returns the heartbeats acked.
    pub fn ack(&mut self, ack_seq: u64, now: Instant, mut on_acked: impl FnMut(Acked)) -> usize {
        let mut acked = 0usize;
        while let Some(front) = self.frames.front_mut() {
            if front.first_seq > ack_seq {
                break;
            }
            let latency_us = micros(now.saturating_duration_since(front.intended));
            let service_us = micros(now.saturating_duration_since(front.sent));
            if front.last_seq <= ack_seq {
                let done = *front;
                self.frames.pop_front();
                if done.count > 0 {
                    on_acked(Acked {
                        latency_us,
                        service_us,
                        count: done.count,
                        measured: done.measured,
                    });
                }
                acked += done.count as usize;
                self.heartbeats -= done.count as usize;
            } else {
                // A partial ack of a batch: the server made part of the frame durable.
                let covered = ack_seq - front.first_seq + 1;
                let count = front.count.min(u32::try_from(covered).unwrap_or(u32::MAX));
                front.first_seq = ack_seq + 1;
                front.count -= count;
                if count > 0 {
                    on_acked(Acked {
                        latency_us,
                        service_us,
                        count,
                        measured: front.measured,
                    });
                }
                acked += count as usize;
                self.heartbeats -= count as usize;
                break;
            }
        }
        acked
    }

    /// Applies a rejection of heartbeat `seq`: it leaves the window without a latency sample.
    /// Returns whether the seq was in flight and whether it was meant for the measured window.
    pub fn reject(&mut self, seq: u64) -> Option<bool> {
        let index = self
            .frames
            .iter()
            .position(|f| f.first_seq <= seq && seq <= f.last_seq)?;
        let frame = &mut self.frames[index];
        if frame.count == 0 {
            return None;
        }
        frame.count -= 1;
        let measured = frame.measured;
        self.heartbeats -= 1;
        if frame.count == 0 {
            let _ = self.frames.remove(index);
        }
        Some(measured)
    }
}

/// `d` in whole microseconds, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// An open-loop send schedule: frame k is intended at `origin + k * period`, whatever happened
/// to earlier frames. Computed from k rather than accumulated, so it never drifts.
#[derive(Debug, Clone)]
pub struct OpenSchedule {
    /// Intended time of frame 0 (start plus this device's random phase).
    origin: Instant,
    /// Time between this device's frames.
    period: Duration,
    /// Index of the next frame.
    next_index: u32,
}

impl OpenSchedule {
    /// A schedule whose first frame is intended at `start + phase`.
    pub fn new(start: Instant, phase: Duration, period: Duration) -> Self {
        assert!(!period.is_zero(), "an open-loop period must be positive");
        Self {
            origin: start + phase,
            period,
            next_index: 0,
        }
    }

    /// When the next frame is intended to be sent.
    pub fn next_intended(&self) -> Instant {
        self.origin + self.period * self.next_index
    }

    /// Consumes the next slot and returns its intended time. A caller that is late calls this
    /// repeatedly and sends immediately; the lag shows up as latency.
    pub fn take(&mut self) -> Instant {
        let intended = self.next_intended();
        self.next_index = self.next_index.saturating_add(1);
        intended
    }
}

/// Time between one device's frames when `rate_per_s` heartbeats per second are spread evenly
/// over `devices` devices sending `batch` heartbeats per frame.
pub fn open_period(rate_per_s: f64, devices: usize, batch: usize) -> Duration {
    assert!(
        rate_per_s > 0.0 && rate_per_s.is_finite(),
        "rate must be positive"
    );
    assert!(devices > 0 && batch > 0);
    Duration::from_secs_f64(devices as f64 * batch as f64 / rate_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ack_measures_from_intended_time_and_coalesces() {
        // Checks that one coalesced ack completes several frames, each with latency measured
        // from its own intended time, and that later acks below the window are no-ops.
        let t0 = Instant::now();
        let mut window = InFlight::new(100);
        window.push(1, 1, t0, t0, true);
        window.push(2, 1, t0 + ms(10), t0 + ms(10), true);
        window.push(3, 1, t0 + ms(20), t0 + ms(20), false);
        let mut seen = Vec::new();
        let acked = window.ack(2, t0 + ms(25), |a| seen.push(a));
        assert_eq!(acked, 2);
        assert_eq!(
            seen,
            vec![
                Acked {
                    latency_us: 25_000,
                    service_us: 25_000,
                    count: 1,
                    measured: true
                },
                Acked {
                    latency_us: 15_000,
                    service_us: 15_000,
                    count: 1,
                    measured: true
                },
            ]
        );
        assert_eq!(window.heartbeats(), 1);
        assert_eq!(
            window.ack(2, t0 + ms(30), |_| panic!("no frame left at or below 2")),
            0
        );
        seen.clear();
        assert_eq!(window.ack(3, t0 + ms(30), |a| seen.push(a)), 1);
        assert_eq!(
            seen,
            vec![Acked {
                latency_us: 10_000,
                service_us: 10_000,
                count: 1,
                measured: false
            }]
        );
        assert_eq!(window.heartbeats(), 0);
    }

    #[test]
    fn late_sender_reports_its_lag_as_latency() {
        // Checks the no-coordinated-omission rule: a device that could only send at t=1s the
        // frames intended at 0, 100 and 200 ms reports latencies counted from those intended
        // times, not from the moment it actually sent; the service time is counted from the
        // actual send.
        let t0 = Instant::now();
        let mut schedule = OpenSchedule::new(t0, ms(0), ms(100));
        let mut window = InFlight::new(10);
        let mut seq = 0;
        let actual_send = t0 + ms(1000);
        while schedule.next_intended() <= t0 + ms(200) {
            seq += 1;
            window.push(seq, 1, schedule.take(), actual_send, true);
        }
        let mut latencies = Vec::new();
        let mut service = Vec::new();
        window.ack(seq, actual_send + ms(5), |a| {
            latencies.push(a.latency_us);
            service.push(a.service_us);
        });
        assert_eq!(latencies, vec![1_005_000, 905_000, 805_000]);
        // The service time excludes the client's lag: 5 ms for each, from the actual send.
        assert_eq!(service, vec![5_000, 5_000, 5_000]);
        // The schedule did not shift because of the lag.
        assert_eq!(schedule.next_intended(), t0 + ms(300));
    }

    #[test]
    fn batches_ack_partially_and_reject_single_heartbeats() {
        // Checks a batch frame acked in two parts, and a rejection inside a batch that removes
        // one heartbeat from the window without a latency sample.
        let t0 = Instant::now();
        let mut window = InFlight::new(20);
        window.push(1, 10, t0, t0, true);
        window.push(11, 5, t0 + ms(1), t0 + ms(1), true);
        let mut seen = Vec::new();
        assert_eq!(window.ack(4, t0 + ms(2), |a| seen.push(a)), 4);
        assert_eq!(
            seen,
            vec![Acked {
                latency_us: 2_000,
                service_us: 2_000,
                count: 4,
                measured: true
            }]
        );
        assert_eq!(window.heartbeats(), 11);
        assert_eq!(window.reject(12), Some(true));
        assert_eq!(window.reject(99), None);
        assert_eq!(window.heartbeats(), 10);
        seen.clear();
        assert_eq!(window.ack(15, t0 + ms(3), |a| seen.push(a)), 10);
        assert_eq!(
            seen,
            vec![
                Acked {
                    latency_us: 3_000,
                    service_us: 3_000,
                    count: 6,
                    measured: true
                },
                Acked {
                    latency_us: 2_000,
                    service_us: 2_000,
                    count: 4,
                    measured: true
                },
            ]
        );
        assert_eq!(window.heartbeats(), 0);
    }

    #[test]
    fn window_capacity_is_enforced() {
        // Checks that has_room reflects the heartbeat capacity and that acks free room.
        let t0 = Instant::now();
        let mut window = InFlight::new(4);
        assert!(window.has_room(4));
        window.push(1, 3, t0, t0, false);
        assert!(!window.has_room(2));
        assert!(window.has_room(1));
        window.ack(3, t0, |_| {});
        assert!(window.has_room(4));
        assert_eq!(window.last_seq(), 3);
    }

    #[test]
    fn schedule_is_exact_and_period_spreads_the_rate() {
        // Checks that intended times are origin + k * period exactly, and that the per-device
        // period matches the total-rate formula (33,334/s over 10,000 devices = 300 ms).
        let t0 = Instant::now();
        let mut schedule = OpenSchedule::new(t0, ms(7), ms(30));
        for k in 0..1000u32 {
            assert_eq!(schedule.take(), t0 + ms(7) + ms(30) * k);
        }
        let period = open_period(33_334.0, 10_000, 1);
        assert!(
            (period.as_secs_f64() - 0.2999940).abs() < 1e-6,
            "{period:?}"
        );
        assert_eq!(open_period(100.0, 10, 5), ms(500));
    }
}
