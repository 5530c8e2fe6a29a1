//! Connection accounting against the caps: every accepted socket holds a [`ConnSlot`] (the
//! connection cap), a socket that is not an authenticated WebSocket yet an [`HttpSlot`] (the share
//! of the cap plain HTTP may hold), a subscriber a [`SubscriberSlot`]. It owns the counting; the
//! router and the kinds decide when to take and release.
//!
//! Invariant: a slot counts once from its creation to its drop, whichever executor ends up
//! holding the connection (a handed-off connection's slot is released by its new executor).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::limits::CONN_RESERVED_SHARE_DIVISOR;
use crate::node::Shared;

/// Counts a connection in `connections_open` and releases it on drop.
pub struct ConnSlot(Arc<Shared>);

impl ConnSlot {
    /// Counts one more connection: the slot, and the count including it.
    pub fn open(shared: &Arc<Shared>) -> (ConnSlot, usize) {
        let open = shared.connections_open.fetch_add(1, Ordering::AcqRel) + 1;
        (ConnSlot(shared.clone()), open)
    }

    /// Keeps the count for a connection handed to another executor, which takes it over with
    /// [`ConnSlot::take_over`] (or releases it if the hand-off fails).
    pub fn hand_over(self) {
        std::mem::forget(self);
    }

    /// Takes over the count of a connection another executor handed over.
    pub fn take_over(shared: &Arc<Shared>) -> ConnSlot {
        ConnSlot(shared.clone())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let open = self.0.connections_open.fetch_sub(1, Ordering::AcqRel) - 1;
        tracing::debug!(open, "connection closed");
    }
}

/// Counts a socket in `connections_http` (not an authenticated WebSocket connection) and
/// releases it on drop, which happens when the socket closes or is upgraded.
pub struct HttpSlot(Arc<Shared>);

impl HttpSlot {
    /// Counts one more socket; also returns whether it is over the share of the cap that such
    /// sockets may hold (`connections_max` minus the reserved share), so it may only upgrade.
    pub fn acquire(shared: &Arc<Shared>) -> (HttpSlot, bool) {
        let open = shared.connections_http.fetch_add(1, Ordering::AcqRel) + 1;
        let max = shared.cfg.connections_max;
        let share = max - max / CONN_RESERVED_SHARE_DIVISOR;
        (HttpSlot(shared.clone()), open > share)
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.0.connections_http.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a subscriber connection in `Shared::subscribers_open` and releases it on drop.
pub struct SubscriberSlot(Arc<Shared>);

impl SubscriberSlot {
    /// Takes a subscriber slot, or `None` when [`crate::limits::SUBSCRIBERS_MAX`] are open.
    pub fn acquire(shared: &Arc<Shared>) -> Option<SubscriberSlot> {
        let open = shared.subscribers_open.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = SubscriberSlot(shared.clone());
        (open <= crate::limits::SUBSCRIBERS_MAX).then_some(slot)
    }
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.0.subscribers_open.fetch_sub(1, Ordering::AcqRel);
    }
}
