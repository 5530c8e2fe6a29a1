//! Messages that cross executors over the channel meshes. It owns their shapes only; who sends and
//! handles them is `exec`. Three meshes (`exec::Meshes`) keep the flow acyclic: requests go
//! source → owner on the request mesh, completions come back owner → source on the reply mesh,
//! and the reply receivers never wait on anything, so bounded channels cannot deadlock;
//! subscription events go owner → subscriber's executor on the event mesh, sent with `try_send`
//! only, so ingest never waits on it.
//!
//! Buffers travel both ways: a forwarded batch's `Vec` comes back inside its completion and is
//! reused, so steady-state forwarding allocates nothing per heartbeat.

use std::os::fd::OwnedFd;

use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::store::ShardStore;

/// Identifies one connection on its executor: slab index plus a generation, so a completion for a
/// connection that has since closed (and whose slot was reused) is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Slot in the executor's connection slab.
    pub slot: u32,
    /// Generation of that slot when the connection was opened.
    pub generation: u32,
}

/// A batch of heartbeats of one frame, all owned by one logical shard.
pub struct Batch {
    /// Connection that sent the frame (on the source executor).
    pub conn: ConnKey,
    /// Frame number on that connection.
    pub frame: u64,
    /// `(seq, heartbeat)` pairs, in seq order.
    pub items: Vec<(u64, Heartbeat)>,
    /// Seqs the owner could not store, with the reason (filled by the owner).
    pub failed: Vec<(u64, &'static str)>,
}

/// A job run on the owning executor against one of its shard stores (queries). The closure sends
/// its own answer back (e.g. through a oneshot channel).
pub type StoreJob = Box<dyn FnOnce(&ShardStore) + Send>;

/// A job run on another executor with access to its state (metrics snapshots, stats). The
/// closure sends its own answer back.
pub type ExecJob = Box<dyn FnOnce(&crate::server::exec::Exec) + Send>;

/// A connection handed to the executor that owns its device's shard, so its heartbeats never
/// cross cores again.
pub struct Adopt {
    /// The socket (a duplicate of the accepting executor's descriptor).
    pub fd: OwnedFd,
    /// Bytes already read past the HTTP request head.
    pub leftover: Vec<u8>,
    /// The verified WebSocket upgrade request.
    pub upgrade: crate::server::listen::Upgrade,
}

/// Source → owner.
pub enum ToOwner {
    /// Append these heartbeats to `shard` and answer once they are durable.
    Append {
        /// Logical shard (owned by the receiving executor).
        shard: ShardId,
        /// The heartbeats.
        batch: Batch,
    },
    /// Run a read-only job against `shard`'s store.
    Query {
        /// Logical shard (owned by the receiving executor).
        shard: ShardId,
        /// The job.
        job: StoreJob,
    },
    /// Run a job against the executor's state.
    Run(ExecJob),
    /// Take over a device connection.
    Adopt(Box<Adopt>),
}

/// Owner → source.
pub enum ToSource {
    /// The batch is durable (except the seqs listed in `failed`), buffer returned for reuse.
    Done(Batch),
}

/// One subscription event on its way to the executor holding the subscriber connection.
pub struct EventItem {
    /// The subscriber connection (on the destination executor).
    pub conn: ConnKey,
    /// The subscription's id on that connection (events of a replaced or removed subscription
    /// are dropped on arrival).
    pub sub: u32,
    /// The event as a JSON object without its `"sub"` member, rendered once per heartbeat (or
    /// fence transition) and shared by every subscription it matches.
    pub text: std::sync::Arc<str>,
}

/// Owner → subscriber executor, on the event mesh (sent with `try_send`: ingest never waits).
#[derive(Default)]
pub struct EventBatch {
    /// Events, in the owner's log order.
    pub events: Vec<EventItem>,
    /// Events the owner dropped for these connections since its last batch that got through
    /// (channel full, or its pending queue full): the destination adds them to the
    /// connections' missed counts.
    pub missed: Vec<(ConnKey, u64)>,
}
