//! What the phone apps' endpoints ([`super::osmand`], [`super::owntracks`]) share: the answer to
//! a refused parse (400 with the parser's stable reason), the device-id check against the token
//! (403), and storing with the answer held until durable (503 when not stored). It owns no
//! endpoint and no parsing.
//!
//! Invariant: every refusal is a JSON error body of the shape every endpoint uses
//! (`{"error":..}`, plus `"param"` when one parameter is at fault), and nothing is answered 2xx
//! unless [`store`] returned `Ok`.

use crate::auth::Claims;
use crate::metrics::ExecProbe;
use crate::net::http::response::Response;
use crate::net::submit::{self, SubmitError};
use crate::proto::devices::DeviceError;
use crate::proto::{self, IngestScope, Reject};
use crate::record::{Heartbeat, Invalid};
use crate::shard::core::Core;

/// The 400 for a request the parsers refused: `{"error":"<reason>"}` with the reason string of
/// [`DeviceError::reason`] (`missing:lat`, `ts_out_of_range`, ...) and, when one parameter or
/// member is at fault, its name as `param`. Counted in `probe` under that reason, as a refused
/// WebSocket heartbeat is.
pub fn bad_request(probe: &ExecProbe, e: DeviceError) -> Response {
    probe.reject(e.reason());
    let param = match e {
        DeviceError::Missing(name) | DeviceError::BadValue(name) => Some(name),
        DeviceError::BadTimestamp | DeviceError::TsOutOfRange => Some("timestamp"),
        DeviceError::Invalid(Invalid::Lat) => Some("lat"),
        DeviceError::Invalid(Invalid::Lon) => Some("lon"),
        DeviceError::Invalid(Invalid::IdEmpty | Invalid::IdTooLong | Invalid::IdControl) => {
            Some("id")
        }
        _ => None,
    };
    match param {
        Some(p) => Response::param_error(e.reason(), p),
        None => Response::error(400, e.reason()),
    }
}

/// Checks that the token may report for device `id` (a device token for exactly this id, or a
/// gateway token whose prefix it starts with): `Err` is the 403 (or, for an id no device may
/// have, the 400) to answer with.
pub fn authorize(claims: &Claims, id: &str) -> Result<(), Response> {
    let scope = IngestScope::from_scope(&claims.scope)
        .expect("check_device admits only device and gateway tokens");
    let mut resolved = String::new();
    match proto::resolve_device_id(scope, Some(id), &mut resolved) {
        Ok(()) => {
            debug_assert_eq!(resolved, id);
            Ok(())
        }
        Err(Reject::IdMismatch) => Err(Response::error(
            403,
            "id_mismatch: the token is for another device",
        )),
        Err(Reject::IdOutsidePrefix) => Err(Response::error(
            403,
            "id_outside_prefix: the device id is outside the gateway token's prefix",
        )),
        Err(other) => Err(Response::param_error(other.reason(), "id")),
    }
}

/// Stores `heartbeats` and waits until they are durable: `Ok` with their count, or the answer
/// to give instead (503 and the reason when the server could not store them now; 400 for a
/// heartbeat the log refuses as invalid).
pub async fn store(core: &Core, heartbeats: Vec<Heartbeat>) -> Result<usize, Response> {
    let count = heartbeats.len();
    // Ownership: a device whose unit another node writes is told where (net::owner).
    for hb in &heartbeats {
        let route = crate::net::owner::route(&core.shared, &hb.device_id);
        if let Some((status, body)) = crate::net::owner::http_refusal(&route) {
            return Err(Response::json(status, body));
        }
    }
    match submit::submit_durable(core, heartbeats).await {
        Ok(()) => Ok(count),
        Err(SubmitError::Refused("invalid")) => Err(Response::error(400, "invalid")),
        Err(e) => Err(Response::error(503, &e.to_string())),
    }
}
