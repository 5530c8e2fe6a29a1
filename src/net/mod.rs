//! The network edge of one executor: sockets, protocols and HTTP, above the shard core. Its
//! state is an [`edge::Edge`]. The [`router`] accepts, reads one bounded request head, and hands the socket to a connection kind
//! ([`ingest`], [`subscribe`], MQTT over WebSocket in [`mqtt`]: an [`edge::Kind`] each; [`mqtt`]
//! also has a TCP listener of its own) or answers plain HTTP ([`http`], one file per
//! resource); WebSocket connections read and write through [`ws`]; every token is checked by
//! [`auth`]; [`tls`] terminates TLS (wss/https on `--tls-listen`, mqtts on `--mqtts-listen`) in
//! front of the same kinds, which are generic over the stream ([`tls::Conn`]); [`slots`] counts
//! connections against the caps; [`submit`] holds a request/response
//! protocol's answer until its heartbeats are durable. It does not store, commit or route
//! heartbeats (`shard`), and does not spawn the executor's long-lived tasks (`server`).
//!
//! Adding a connection kind is one new file implementing [`edge::Kind`] plus one line in the
//! router.
//!
//! Invariant: a connection lives on one executor; the only socket that crosses executors is a
//! device connection handed once to the executor that owns its shard ([`edge::Handoff`], on a mesh of
//! its own, so a hand-off never waits behind appends or queries).

pub mod auth;
pub mod edge;
pub mod engine;
pub mod http;
pub mod ingest;
pub mod mqtt;
pub mod owner;
pub mod revoke;
pub mod router;
pub mod slots;
pub mod submit;
pub mod subscribe;
pub mod tls;
pub mod ws;
