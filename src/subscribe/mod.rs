//! Real-time subscriptions below the network: which subscriptions a heartbeat matches
//! ([`interest`]), the events waiting for durability and the subscriber connections' delivery
//! queues and the messages of the event mesh ([`fanout`]), and how locations and events are
//! written as JSON ([`render`], shared with the HTTP answers). It does not
//! parse client ops or speak WebSocket (`net::subscribe`), and does not commit (`shard`).
//!
//! Invariant: ingest never waits on a subscriber (see [`fanout`]).

pub mod fanout;
pub mod interest;
pub mod render;

pub use fanout::{EventBatch, EventItem, Fanout, Out};
pub use interest::{Filter, InterestOp, SubKey, Target};
