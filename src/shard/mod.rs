//! The shard core of one executor (one core, [`core::Core`]): the shard stores it owns,
//! appending to them in groups, the group-commit loop ([`commit`]) and retention
//! ([`retention`]), the ack ledger of its ingest connections ([`acks`]), its subscription
//! fan-out, and its ends of the channel meshes ([`mesh`]: sending appends, queries and jobs to
//! peers, completing theirs). It knows nothing of sockets or protocols: connections (`net`) call
//! `Core::append_local`, `forward`, `query` and `on_all`; the receive loops that feed
//! `Core::append_remote`, `on_done` and `on_control` are spawned by `server`.
//!
//! It owns the rule that turns "durable up to position P" into acks: every appended group
//! registers a waiter at the position of its last entry; when a commit makes the log durable past
//! that position the waiter completes its group (in the local [`acks::AckLedger`], or by a reply
//! to the executor that holds the connection).
//!
//! On a cluster node its follower ([`follow`]) also keeps each shard's cluster-wide view (the
//! shard's devices other nodes write, followed from the streams) beside the shard's store.
//!
//! Invariants: an ack never covers a heartbeat that is not durable (Strict mode); a heartbeat is
//! appended only to the shard its device routes to, on the executor that owns that shard (both
//! asserted at the storage call); all state here is touched by this executor's thread only
//! (`RefCell`, `Cell`, `Rc`), and no `RefCell` borrow is held across an `.await`.

pub mod acks;
pub mod commit;
pub mod core;
pub mod follow;
pub mod mesh;
pub mod replicate;
pub mod retention;
