//! Rate-limited log lines: one line per interval for an event that can repeat thousands of
//! times a second (a refused append, a failing `accept`, a refused token), with the number of
//! occurrences suppressed since the last line. It owns only the decision "log now or count";
//! callers write the line themselves, with their own level and fields.
//!
//! Invariant: between two lines at least the interval passes, and every occurrence is either
//! logged or counted in the next line's `suppressed_since_last`. Single-threaded (a `Cell`): each
//! executor keeps its own.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Decides when a repeating event is logged again.
#[derive(Debug)]
pub struct LogEvery {
    /// Least time between two lines.
    interval: Duration,
    /// When the last line was logged (`None`: never), and occurrences counted since.
    state: Cell<(Option<Instant>, u64)>,
}

impl LogEvery {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval,
            state: Cell::new((None, 0)),
        }
    }

    /// Records one occurrence at `now`: `Some(suppressed)` when the caller should log a line
    /// now (`suppressed` occurrences were not logged since the previous line), `None` when this
    /// one is only counted.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let (last, suppressed) = self.state.get();
        if last.is_none_or(|t| now.saturating_duration_since(t) >= self.interval) {
            self.state.set((Some(now), 0));
            Some(suppressed)
        } else {
            self.state.set((last, suppressed + 1));
            None
        }
    }

    /// [`LogEvery::check_at`] now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        // The first occurrence logs; the next ones within the interval are counted; the first
        // one after it logs with the count, which then starts again from zero.
        let every = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(every.check_at(t0), Some(0));
        for i in 1..=175 {
            assert_eq!(every.check_at(t0 + Duration::from_millis(i * 5)), None);
        }
        assert_eq!(every.check_at(t0 + Duration::from_secs(10)), Some(175));
        assert_eq!(every.check_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(every.check_at(t0 + Duration::from_secs(20)), Some(1));
    }
}
