//! Redirects at the network edge under ownership (`--node-id`; issue 17 item 2): where a device
//! id is first known, [`route`] says whether its unit is written here, elsewhere (the owner's
//! advertise address) or by nobody yet, and the helpers here answer a device that belongs
//! elsewhere in its protocol's way: WebSocket 307 with `Location` before the upgrade, MQTT 5
//! CONNACK 0x9C (Use another server) with a Server Reference, MQTT 3.1.1 CONNACK 0x03 (server
//! unavailable), HTTP 503 with a JSON body naming the owner. It does not decide placement
//! (`replicate::placement`).
//!
//! Invariant: without ownership (no `--node-id`, or no NATS at all) [`route`] is always
//! [`Route::Here`]: a single node behaves exactly as before.

use crate::http::parse::Request;
use crate::net::auth::Refusal;
use crate::node::Shared;
use crate::proto::mqtt::codec::{self, ConnAck, Packet, PropsWriter, Version};
use crate::replicate::placement::Owner;
use crate::route::vshard_of;

/// WebSocket close code for a device connection whose unit moved away: Try Again Later (its
/// reconnect is redirected to the owner).
pub const WS_CLOSE_TRY_AGAIN: u16 = 1013;
/// Close reason of such a connection.
pub const NOT_OWNER: &str = "not_owner";
/// MQTT 5 reason code: Use another server.
pub const MQTT5_USE_ANOTHER_SERVER: u8 = 0x9C;
/// MQTT 5 reason code: Server unavailable.
pub const MQTT5_SERVER_UNAVAILABLE: u8 = 0x88;
/// MQTT 3.1.1 CONNACK return code: server unavailable.
pub const MQTT311_SERVER_UNAVAILABLE: u8 = 0x03;
/// MQTT 5 property: Server Reference.
pub const PROP_SERVER_REFERENCE: u8 = codec::prop::SERVER_REFERENCE;

/// Where a device's heartbeats go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Serve here.
    Here,
    /// Another node owns the device's unit: its id and advertise address.
    Elsewhere {
        /// The owner's node id.
        node: String,
        /// Its advertise address (`host:port`).
        addr: String,
    },
    /// The unit has no writer yet (placement converging): retry shortly.
    Pending,
}

/// Where device `id`'s heartbeats go.
pub fn route(shared: &Shared, id: &str) -> Route {
    let Some(p) = shared
        .replication
        .as_ref()
        .and_then(|plan| plan.placement.as_ref().map(|p| (plan, p)))
    else {
        return Route::Here;
    };
    let (plan, p) = p;
    match p.owner(plan.unit_of(vshard_of(id))) {
        Owner::Local(_) => Route::Here,
        Owner::Remote(n) => Route::Elsewhere {
            node: n.id,
            addr: n.addr,
        },
        Owner::Pending => Route::Pending,
    }
}

/// The JSON body naming the owner (WebSocket 307, HTTP 503).
fn body(node: &str, addr: &str, location: Option<&str>) -> String {
    serde_json::json!({
        "error": "not_owner: another node writes this device's heartbeats",
        "owner": { "node": node, "addr": addr },
        "location": location,
    })
    .to_string()
}

/// The body of a 307 to `location` on the owner (`node`, `addr`) of a device's unit: a history
/// request on a node that does not write the device (`net::http::devices`).
pub fn redirect_body(node: &str, addr: &str, location: &str) -> String {
    body(node, addr, Some(location))
}

/// The JSON body while a unit has no writer yet.
fn pending_body() -> String {
    serde_json::json!({
        "error": "no_owner_yet: the device's unit is being placed; retry shortly",
    })
    .to_string()
}

/// The refusal of a WebSocket upgrade for a device that is not served here: 307 to the owner
/// (the router writes the `Location` header from [`location_of`]), or 503 while pending.
pub fn ws_refusal(route: &Route, req: &Request<'_>) -> Option<Refusal> {
    match route {
        Route::Here => None,
        Route::Elsewhere { node, addr } => {
            let location = if req.query.is_empty() {
                format!("ws://{addr}{}", req.path)
            } else {
                format!("ws://{addr}{}?{}", req.path, req.query)
            };
            Some(Refusal {
                status: 307,
                body: body(node, addr, Some(&location)),
            })
        }
        Route::Pending => Some(Refusal {
            status: 503,
            body: pending_body(),
        }),
    }
}

/// The `Location` of a 307 refusal made by [`ws_refusal`].
pub fn location_of(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("location")?
        .as_str()
        .map(str::to_string)
}

/// The 307 response with its `Location` header.
pub fn redirect_response(location: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The HTTP answer (status, JSON body) for a phone-app request of a device not served here.
pub fn http_refusal(route: &Route) -> Option<(u16, String)> {
    match route {
        Route::Here => None,
        Route::Elsewhere { node, addr } => Some((503, body(node, addr, None))),
        Route::Pending => Some((503, pending_body())),
    }
}

/// The CONNACK for an MQTT device not served here (`None`: serve it).
pub fn mqtt_connack(route: &Route, version: Version) -> Option<Vec<u8>> {
    let mut props = PropsWriter::default();
    let code = match (route, version) {
        (Route::Here, _) => return None,
        (_, Version::V311) => MQTT311_SERVER_UNAVAILABLE,
        (Route::Elsewhere { addr, .. }, Version::V5) => {
            props.str(PROP_SERVER_REFERENCE, addr, 256);
            MQTT5_USE_ANOTHER_SERVER
        }
        (Route::Pending, Version::V5) => MQTT5_SERVER_UNAVAILABLE,
    };
    let mut out = Vec::new();
    codec::encode(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            props: &props.bytes,
        }),
        version,
        &mut out,
    );
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_307_names_the_owner_and_keeps_path_and_query() {
        let head = b"GET /v1/ingest?token=t HTTP/1.1\r\nhost: a\r\n\r\n";
        let req = match crate::http::parse::parse_head(head) {
            Ok(crate::http::parse::Parsed::Complete(r)) => r,
            _ => panic!("a complete head"),
        };
        let r = ws_refusal(
            &Route::Elsewhere {
                node: "b".into(),
                addr: "127.0.0.2:8080".into(),
            },
            &req,
        )
        .unwrap();
        assert_eq!(r.status, 307);
        assert_eq!(
            location_of(&r.body).as_deref(),
            Some("ws://127.0.0.2:8080/v1/ingest?token=t")
        );
        assert!(ws_refusal(&Route::Here, &req).is_none());
        let c = mqtt_connack(
            &Route::Elsewhere {
                node: "b".into(),
                addr: "h:1".into(),
            },
            Version::V5,
        )
        .unwrap();
        assert_eq!(c[0], 0x20);
        assert_eq!(c[3], MQTT5_USE_ANOTHER_SERVER);
        let c = mqtt_connack(&Route::Pending, Version::V311).unwrap();
        assert_eq!(c, vec![0x20, 2, 0, MQTT311_SERVER_UNAVAILABLE]);
    }
}
