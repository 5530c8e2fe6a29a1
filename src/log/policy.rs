//! Caller-side durability policy: when an append may be acknowledged ([`Durability`]) and when a
//! group commit is due ([`GroupPolicy`]). The log itself only reports positions (`written`,
//! `durable`); these types let the server's commit loop decide consistently. No I/O here.
//!
//! Invariant: a group commit is never due with nothing pending, and always due once either bound
//! (entries or age) is reached, so no acknowledgement waits longer than one interval plus a sync.

use std::time::Duration;

use crate::limits::{
    GROUP_ENTRIES_DEFAULT, GROUP_ENTRIES_MAX, GROUP_INTERVAL_US_DEFAULT, GROUP_INTERVAL_US_MAX,
    GROUP_INTERVAL_US_MIN,
};

/// When an append may be acknowledged to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only once the entry is durable (`pos < log.durable()`): survives kill -9, power
    /// loss and node loss (up to what the disk itself promises).
    #[default]
    Strict,
    /// Acknowledge once the entry is written into the mapping; sync in the background every
    /// interval. A process crash (kill -9) loses nothing, since the page cache survives it, but a
    /// power or node loss can lose up to the last interval of acknowledged heartbeats.
    Relaxed,
}

/// Group-commit policy: commit when `entries_max` entries are pending or the oldest pending entry
/// is `interval` old, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupPolicy {
    /// Longest time an entry waits for its commit to start (1 to 5 ms).
    pub interval: Duration,
    /// Pending entries that make a commit due immediately.
    pub entries_max: usize,
}

impl Default for GroupPolicy {
    fn default() -> Self {
        GroupPolicy {
            interval: Duration::from_micros(GROUP_INTERVAL_US_DEFAULT),
            entries_max: GROUP_ENTRIES_DEFAULT,
        }
    }
}

impl GroupPolicy {
    /// A checked policy: the interval must be 1..=5 ms and `entries_max` 1..=`GROUP_ENTRIES_MAX`.
    pub fn new(interval: Duration, entries_max: usize) -> Result<GroupPolicy, String> {
        let us = interval.as_micros();
        if us < u128::from(GROUP_INTERVAL_US_MIN) || us > u128::from(GROUP_INTERVAL_US_MAX) {
            return Err(format!(
                "group commit interval {interval:?} outside {GROUP_INTERVAL_US_MIN}..={GROUP_INTERVAL_US_MAX} us"
            ));
        }
        if !(1..=GROUP_ENTRIES_MAX).contains(&entries_max) {
            return Err(format!(
                "group commit entries {entries_max} outside 1..={GROUP_ENTRIES_MAX}"
            ));
        }
        Ok(GroupPolicy {
            interval,
            entries_max,
        })
    }

    /// Whether a commit should start now, given the number of entries appended since the last
    /// commit began and how long ago the first of them was appended.
    pub fn due(&self, pending_entries: usize, since_first_pending: Duration) -> bool {
        pending_entries > 0
            && (pending_entries >= self.entries_max || since_first_pending >= self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_when_either_bound_is_reached() {
        // Nothing pending is never due; a full group or an old first entry is.
        let p = GroupPolicy::default();
        assert!(!p.due(0, Duration::from_secs(1)));
        assert!(!p.due(999, Duration::from_micros(1_999)));
        assert!(p.due(1000, Duration::ZERO));
        assert!(p.due(1, Duration::from_millis(2)));
    }

    #[test]
    fn new_checks_bounds() {
        // The interval must be within 1..=5 ms and the group size positive.
        assert!(GroupPolicy::new(Duration::from_micros(999), 10).is_err());
        assert!(GroupPolicy::new(Duration::from_millis(6), 10).is_err());
        assert!(GroupPolicy::new(Duration::from_millis(3), 0).is_err());
        assert_eq!(
            GroupPolicy::new(Duration::from_millis(5), 7)
                .unwrap()
                .entries_max,
            7
        );
    }
}
