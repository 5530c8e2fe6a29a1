//! The HTTP endpoints served beside the WebSocket upgrades on the same listener: one file per
//! resource ([`devices`], [`fences`], [`ops`]; the `/live` page in [`live`]; the phone apps'
//! ingest in [`osmand`] and [`owntracks`], sharing [`device_apps`]), each parsing a
//! request into a command and then applying it (tokio-rs/mini-redis `src/cmd/`). This module
//! routes a request to its resource and owns [`Response`]; tokens are checked by
//! [`crate::net::auth`], reads of a device's state are answered by the executor that owns its
//! shard (`Core::query`).
//!
//! Every error is JSON: `{"error":"<message>"}` plus `"param"` when one parameter is at fault.
//!
//! Invariant: the order of refusals per endpoint (404, 405, 400, 401) is the documented one
//! (the phone apps' endpoints check the token first, as the router does before reading their
//! body: 405, 401, then 400 and 403); a resource parses completely before it touches any shard.

pub mod device_apps;
pub mod devices;
pub mod fences;
pub mod live;
pub mod ops;
pub mod osmand;
pub mod owntracks;
pub mod response;

pub use fences::takes_body;
pub use ops::OPENAPI_JSON;
pub use response::Response;

use crate::http::parse::Request;
use crate::net::edge::{Edge, Role};

use devices::Devices;
use fences::Fences;
use ops::Ops;
use osmand::Osmand;
use owntracks::OwnTracks;

/// Whether a request to `path` on a listener of `role` is a phone app's (OsmAnd protocol,
/// OwnTracks): its token is a device or gateway token, checked before any body is read, and its
/// body is bounded by [`crate::limits::DEVICE_HTTP_BODY_BYTES_MAX`].
pub fn is_device_app(role: Role, path: &str) -> bool {
    match role {
        Role::Osmand => true,
        Role::Main => path == osmand::PATH || path == owntracks::PATH,
        Role::Metrics => false,
    }
}

/// Answers one HTTP request (the head `req` and its complete `body`) arriving on a listener of
/// `role`.
pub async fn respond(edge: &Edge, req: &Request<'_>, body: &[u8], role: Role) -> Response {
    let core = &edge.core;
    let shared = &core.shared;
    let path = req.path;
    let metrics_here = match role {
        Role::Metrics => true,
        Role::Main => shared.cfg.metrics_listen.is_none(),
        Role::Osmand => false,
    };
    if role == Role::Metrics && path != "/metrics" {
        return Response::error(404, "this listener serves only /metrics");
    }
    // The OsmAnd listener serves the protocol at any path (an app's "server URL" is often just
    // `http://host:port`).
    if role == Role::Osmand || path == osmand::PATH {
        return match Osmand::parse(core, req, body, crate::rt::now_ms()) {
            Ok(cmd) => cmd.apply(core).await,
            Err(r) => r,
        };
    }
    if path == owntracks::PATH {
        return match OwnTracks::parse(core, req, body, crate::rt::now_ms()) {
            Ok(cmd) => cmd.apply(core).await,
            Err(r) => r,
        };
    }
    if path == "/metrics" && !metrics_here {
        return Response::error(404, "no such endpoint");
    }
    if let Some(op) = Ops::parse(shared, req) {
        return match op {
            Ok(op) => op.apply(core).await,
            Err(r) => r,
        };
    }
    if path == "/v1/devices" || path.starts_with("/v1/devices/") {
        return match Devices::parse(shared, req) {
            Ok(cmd) => cmd.apply(core).await,
            Err(r) => r,
        };
    }
    if path == "/v1/geofences" || path.starts_with("/v1/geofences/") {
        return match Fences::parse(shared, req, body) {
            Ok(cmd) => cmd.apply(shared).await,
            Err(r) => r,
        };
    }
    match path {
        "/v1/ingest" => Response::error(426, "use a WebSocket upgrade for /v1/ingest"),
        "/v1/subscribe" => Response::error(426, "use a WebSocket upgrade for /v1/subscribe"),
        _ => Response::error(404, "no such endpoint"),
    }
}
