//! geobeat-perf: the tools that measure geobeat from the outside.
//!
//! # Layout
//! - [`frame`]: device-protocol frame encoders (JSON text and binary batch).
//! - [`scan`]: the null server's minimal frame parser (highest seq per frame).
//! - [`reply`]: `{"ack":N}` formatting and server reply classification.
//! - [`track`]: plausible random-walk device tracks.
//! - [`inflight`]: open-loop schedule and in-flight/latency bookkeeping (no coordinated omission).
//! - [`stats`]: counters, HDR histograms, mergeable machine-readable summaries.
//! - [`tokens`]: device credentials (gateway token, tokens file, minted with feature `mint`).
//! - [`sys`]: RLIMIT_NOFILE and getrusage.
//! - [`load`]: the fleet simulator behind `geobeat-load`.
//! - [`null`]: the ceiling server behind `geobeat-null` (glommio, same stack as geobeat).
//! - [`floor`]: the floor server behind `geobeat-floor` (plain epoll, the leanest WebSocket acker).
//! - [`procfs`]: CPU time and peak memory of other processes' trees, load average.
//! - [`compare`]: the comparison runner behind `geobeat-compare` (geobeat vs ceiling vs peers).
//! - [`plot`]: SVG plots of a comparison run.
//! - [`subload`]: many subscribers on `/v1/subscribe` counting delivered events (`geobeat-subload`).
#![deny(missing_docs)]

pub mod compare;
pub mod floor;
pub mod frame;
pub mod inflight;
pub mod load;
pub mod null;
pub mod plot;
pub mod procfs;
pub mod reply;
pub mod scan;
pub mod stats;
pub mod subload;
pub mod sys;
pub mod tokens;
pub mod track;
