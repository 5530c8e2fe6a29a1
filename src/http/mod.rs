//! HTTP pieces that are pure functions over bytes (request-head parsing, query and token
//! extraction, the WebSocket accept key, JSON error bodies). The connection handling that uses
//! them lives with the server; nothing here performs I/O.
//!
//! Invariant: every function here is total over arbitrary input: bad input yields a typed error
//! carrying the HTTP status to answer with, never a panic.

pub mod parse;
