//! geobeat: durable location-heartbeat ingest for very large IoT fleets.
//!
//! # Layout
//! - [`limits`]: every hard bound, with compile-time relationships.
//! - [`record`]: the heartbeat record, its validation and rkyv encoding.
//! - [`route`]: device-to-shard hashing (stable, fingerprinted).
//! - [`proto`]: the device ingest protocol (frame decoding, verdicts, acks, abuse guards).
//! - [`auth`]: access tokens (HMAC-signed scopes) and the server secret.
//! - [`config`]: command line and configuration resolution.
//! - [`http`]: pure HTTP request-head parsing and WebSocket upgrade helpers.
#![deny(missing_docs)]

pub mod auth;
pub mod config;
pub mod http;
pub mod limits;
pub mod proto;
pub mod record;
pub mod route;
