//! `GET|POST /v1/osmand` (and any path on `--osmand-listen`): the OsmAnd protocol of OsmAnd's
//! online tracking, Traccar Client (query parameters up to 8.x, the JSON body from 9 on) and
//! GPSLogger's custom URL (docs/DEVICES.md). Parsed into an [`Osmand`] command (method, token,
//! parameters or body, device id against the token, in that order of refusals: 405, 401, 400,
//! 403), then applied: the heartbeat is stored on its shard and the answer, 200, is sent only
//! once it is durable ([`crate::net::submit`]). The parameters themselves are
//! [`crate::proto::devices::osmand`]'s business.
//!
//! Invariant: a 200 is never sent for a heartbeat that is not durable, and a request that is
//! not stored always gets a non-2xx answer with a JSON reason (the apps resend on non-2xx).

use crate::http::parse::Request;
use crate::net::auth;
use crate::net::http::device_apps;
use crate::net::http::response::Response;
use crate::proto::devices::{osmand, DeviceError};
use crate::proto::TsWindow;
use crate::record::Heartbeat;
use crate::shard::core::Core;

/// The path on the main listener.
pub const PATH: &str = "/v1/osmand";

/// A parsed OsmAnd request: one heartbeat, its device id checked against the token.
pub struct Osmand {
    /// The heartbeat (validated).
    heartbeat: Heartbeat,
}

impl Osmand {
    /// Parses a request of the OsmAnd protocol (`body`: the complete request body, possibly
    /// empty) received at `received_ms`: the command, or the answer to give instead.
    pub fn parse(
        core: &Core,
        req: &Request<'_>,
        body: &[u8],
        received_ms: i64,
    ) -> Result<Osmand, Response> {
        if !matches!(req.method, "GET" | "POST") {
            return Err(Response::error(405, "method not allowed (use GET or POST)"));
        }
        let creds = auth::check_device(&core.shared, req)?;
        let mut heartbeat = Heartbeat::default();
        let window = TsWindow::default();
        let json = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let parsed = if json {
            // Traccar Client 9: the location as JSON; the URL carries only the token.
            osmand::parse_traccar_json(body, received_ms, &window, &mut heartbeat)
        } else if body.is_empty() {
            osmand::parse_params(req.query, received_ms, &window, &mut heartbeat)
        } else {
            // A form body: its parameters after the URL's (a later value of a key wins).
            let form = std::str::from_utf8(body)
                .map_err(|_| device_apps::bad_request(&core.probe, DeviceError::BadEncoding))?;
            let all = format!("{}&{form}", req.query);
            osmand::parse_params(&all, received_ms, &window, &mut heartbeat)
        };
        parsed.map_err(|e| device_apps::bad_request(&core.probe, e))?;
        device_apps::authorize(&creds.claims, &heartbeat.device_id)?;
        Ok(Osmand { heartbeat })
    }

    /// Stores the heartbeat and answers once it is durable: 200 `{"durable":1}`, else the
    /// refusal (503 with the reason).
    pub async fn apply(self, core: &Core) -> Response {
        match device_apps::store(core, vec![self.heartbeat]).await {
            Ok(n) => Response::json(200, format!("{{\"durable\":{n}}}")),
            Err(r) => r,
        }
    }
}
