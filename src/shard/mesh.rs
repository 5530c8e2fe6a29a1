//! The shapes of what crosses executors for the shard core, and the channels they cross. It owns
//! the message types and [`Meshes`]: a **data** mesh (appends: source → owner), a **control**
//! mesh (store queries and jobs on an executor's core: source → owner), a **reply** mesh
//! (completions: owner → source) and the **event** mesh of subscriptions (owner → subscriber's
//! executor). Who sends and who handles is `shard` (sending) and `server` (the receive loops).
//!
//! Invariants: data and control have channels of their own, so a query, a metrics snapshot or a
//! subscription broadcast never queues behind appends; requests (data, control) go source →
//! owner and completions come back on the reply mesh, whose receivers never wait on anything, so
//! bounded channels cannot deadlock; events are sent with `try_send` only, so ingest never waits
//! on them. Buffers travel both ways: a forwarded batch's `Vec` comes back inside its completion
//! and is reused, so steady-state forwarding allocates nothing per heartbeat.

use crate::record::Heartbeat;
use crate::route::ShardId;
use crate::rt;
use crate::shard::acks::ConnKey;
use crate::store::ShardStore;
use crate::subscribe::EventBatch;

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
    /// How the owner deduplicates the items (issue 18; `Off` for connections that did not opt in).
    pub dedupe: crate::store::Dedupe,
}

/// A job run on the owning executor against one of its shard stores (queries). The closure sends
/// its own answer back (e.g. through a oneshot channel).
pub type StoreJob = Box<dyn FnOnce(&ShardStore) + Send>;

/// A job run on another executor against its core `C` (metrics snapshots, interest changes).
/// The closure sends its own answer back. (Generic so these message shapes sit below the core
/// that handles them.)
pub type CoreJob<C> = Box<dyn FnOnce(&C) + Send>;

/// Source → owner, on the data mesh: append these heartbeats to `shard` and answer once they are
/// durable.
pub struct Append {
    /// Logical shard (owned by the receiving executor).
    pub shard: ShardId,
    /// The heartbeats.
    pub batch: Batch,
}

/// Source → owner, on the control mesh, for an executor core `C`.
pub enum Control<C> {
    /// Run a read-only job against `shard`'s store.
    Query {
        /// Logical shard (owned by the receiving executor).
        shard: ShardId,
        /// The job.
        job: StoreJob,
    },
    /// Run a job against the executor's core.
    Run(CoreJob<C>),
}

/// Owner → source, on the reply mesh: the batch is durable (except the seqs listed in
/// `failed`), its buffer returned for reuse.
pub struct Done(pub Batch);

/// The four meshes, cloned into every executor before it starts (see `server`); `C` is the core
/// type control jobs run against.
pub struct Meshes<C> {
    /// Appends.
    pub data: rt::mesh::MeshBuilder<Append, rt::mesh::Full>,
    /// Queries and jobs.
    pub control: rt::mesh::MeshBuilder<Control<C>, rt::mesh::Full>,
    /// Completions of appends.
    pub replies: rt::mesh::MeshBuilder<Done, rt::mesh::Full>,
    /// Subscription events (`try_send` only).
    pub events: rt::mesh::MeshBuilder<EventBatch, rt::mesh::Full>,
}

impl<C> Clone for Meshes<C> {
    fn clone(&self) -> Self {
        Meshes {
            data: self.data.clone(),
            control: self.control.clone(),
            replies: self.replies.clone(),
            events: self.events.clone(),
        }
    }
}

impl<C: 'static> Meshes<C> {
    /// Meshes for `executors` peers with `capacity` messages per directed pair (the event mesh
    /// has its own bound).
    pub fn new(executors: usize, capacity: usize) -> Meshes<C> {
        Meshes {
            data: rt::mesh::full(executors, capacity),
            control: rt::mesh::full(executors, crate::limits::CONTROL_MESH_CAPACITY),
            replies: rt::mesh::full(executors, capacity),
            events: rt::mesh::full(executors, crate::limits::FANOUT_MESH_CAPACITY),
        }
    }
}

/// This executor's sending ends of the [`Meshes`] (the core's).
pub struct Tx<C> {
    /// Appends.
    pub data: rt::mesh::Senders<Append>,
    /// Queries and jobs.
    pub control: rt::mesh::Senders<Control<C>>,
    /// Completions.
    pub replies: rt::mesh::Senders<Done>,
    /// Subscription events.
    pub events: rt::mesh::Senders<EventBatch>,
}

/// This executor's receiving ends of the [`Meshes`] (the server's receive loops').
pub struct Rx<C> {
    /// Appends.
    pub data: rt::mesh::Receivers<Append>,
    /// Queries and jobs.
    pub control: rt::mesh::Receivers<Control<C>>,
    /// Completions.
    pub replies: rt::mesh::Receivers<Done>,
    /// Subscription events.
    pub events: rt::mesh::Receivers<EventBatch>,
}

impl<C: 'static> Meshes<C> {
    /// Joins every mesh (waits for all peers).
    pub async fn join(self) -> std::io::Result<(Tx<C>, Rx<C>)> {
        let failed = |what: &str| std::io::Error::other(format!("joining the {what} mesh"));
        let (data_tx, data_rx) = self.data.join().await.map_err(|_| failed("data"))?;
        let (control_tx, control_rx) = self.control.join().await.map_err(|_| failed("control"))?;
        let (replies_tx, replies_rx) = self.replies.join().await.map_err(|_| failed("reply"))?;
        let (events_tx, events_rx) = self.events.join().await.map_err(|_| failed("event"))?;
        Ok((
            Tx {
                data: data_tx,
                control: control_tx,
                replies: replies_tx,
                events: events_tx,
            },
            Rx {
                data: data_rx,
                control: control_rx,
                replies: replies_rx,
                events: events_rx,
            },
        ))
    }
}
