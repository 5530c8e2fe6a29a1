//! `POST /v1/owntracks`: OwnTracks' HTTP mode (docs/DEVICES.md). The app posts each message as
//! JSON with HTTP Basic credentials (user = device id, password = token) and expects a JSON array
//! back. Parsed into an [`OwnTracks`] command (method, token, device id against the token, body,
//! in that order of refusals: 405, 401, 403, 400), then applied: a location is stored and `[]`
//! answered only once it is durable ([`crate::net::submit`]); other message types
//! (`transition`, `waypoint`, `lwt`, ...) and empty bodies are answered `[]` at once and not
//! stored. The JSON itself is [`crate::proto::devices::owntracks`]'s business.
//!
//! Invariant: a 200 is never sent for a location that is not durable, and a location that is
//! not stored always gets a non-2xx answer with a JSON reason (the app re-queues it).

use crate::auth::Scope;
use crate::http::parse::Request;
use crate::net::auth;
use crate::net::http::device_apps;
use crate::net::http::response::Response;
use crate::proto::devices::owntracks::{self, Parsed};
use crate::proto::TsWindow;
use crate::record::Heartbeat;
use crate::shard::core::Core;

/// The path on the main listener.
pub const PATH: &str = "/v1/owntracks";

/// What the app expects on success: a JSON array of messages for it (none).
const NOTHING_FOR_THE_APP: &str = "[]";

/// A parsed OwnTracks request.
pub enum OwnTracks {
    /// A location of the device, to store.
    Location(Heartbeat),
    /// Any other message (or an empty body): acknowledged, not stored.
    Ignored,
}

impl OwnTracks {
    /// Parses an OwnTracks HTTP-mode request (`body`: the complete request body) received at
    /// `received_ms`: the command, or the answer to give instead.
    pub fn parse(
        core: &Core,
        req: &Request<'_>,
        body: &[u8],
        received_ms: i64,
    ) -> Result<OwnTracks, Response> {
        if req.method != "POST" {
            return Err(Response::error(405, "method not allowed (use POST)"));
        }
        let creds = auth::check_device(&core.shared, req)?;
        // The device is the Basic-auth user; a device token alone also names it.
        let device_id = match (creds.user, &creds.claims.scope) {
            (Some(user), _) => user,
            (None, Scope::Device(id)) => id.clone(),
            (None, _) => {
                return Err(Response::param_error(
                    "missing:user (the Basic-auth user names the device)",
                    "user",
                ))
            }
        };
        device_apps::authorize(&creds.claims, &device_id)?;
        let mut heartbeat = Heartbeat::default();
        let window = TsWindow::default();
        match owntracks::parse(body, &device_id, received_ms, &window, &mut heartbeat) {
            Ok(Parsed::Location) => Ok(OwnTracks::Location(heartbeat)),
            Ok(Parsed::Ignored) => Ok(OwnTracks::Ignored),
            Err(e) => Err(device_apps::bad_request(&core.probe, e)),
        }
    }

    /// Stores a location and answers `[]` once it is durable (else the refusal: 503 with the
    /// reason); answers `[]` at once for anything else.
    pub async fn apply(self, core: &Core) -> Response {
        match self {
            OwnTracks::Location(hb) => match device_apps::store(core, vec![hb]).await {
                Ok(_) => Response::json(200, NOTHING_FOR_THE_APP.into()),
                Err(r) => r,
            },
            OwnTracks::Ignored => Response::json(200, NOTHING_FOR_THE_APP.into()),
        }
    }
}
