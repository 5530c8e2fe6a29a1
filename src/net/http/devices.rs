//! `/v1/devices` (devices in an area), `/v1/devices/{id}` (a device's last location) and
//! `/v1/devices/{id}/history`: parsed into a [`Devices`] command (path, method, parameters,
//! token, in the documented order of refusals), then applied on the executors that own the
//! shards (`Core::query`; rendering happens where the records live).
//!
//! Invariant: a subscriber token reads only devices under its prefix; area queries are ops-only.

use serde::Serialize;

use crate::http::parse::{self, Request};
use crate::limits::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX, QUERY_RADIUS_M_MAX};
use crate::net::auth::{self, Need};
use crate::net::http::response::Response;
use crate::node::Shared;
use crate::query::Area;
use crate::record::DeviceId;
use crate::shard::core::Core;
use crate::subscribe::render::LastLocationBody;

/// A parsed request of this resource.
pub enum Devices {
    /// `GET /v1/devices?bbox=..|near=..&radius=..`.
    Area {
        /// The area.
        area: Area,
        /// Most rows.
        limit: usize,
    },
    /// `GET /v1/devices/{id}`.
    Last {
        /// The device.
        id: DeviceId,
    },
    /// `GET /v1/devices/{id}/history?from=..&to=..&limit=..`.
    History {
        /// The device.
        id: DeviceId,
        /// Device time range, ms, inclusive.
        from: i64,
        /// See `from`.
        to: i64,
        /// Most rows.
        limit: usize,
    },
}

impl Devices {
    /// Parses a request whose path is `/v1/devices` or starts with `/v1/devices/`: the command,
    /// or the answer to give instead (404, 405, 400, 401).
    pub fn parse(shared: &Shared, req: &Request<'_>) -> Result<Devices, Response> {
        if req.path == "/v1/devices" {
            if req.method != "GET" {
                return Err(Response::error(405, "method not allowed"));
            }
            auth::check(shared, req, Need::Read(None))?;
            let (area, limit) = area_params(req)?;
            return Ok(Devices::Area { area, limit });
        }
        let rest = &req.path["/v1/devices/".len()..];
        let (raw_id, history) = match rest.split_once('/') {
            None => (rest, false),
            Some((id, "history")) => (id, true),
            Some(_) => return Err(Response::error(404, "no such endpoint")),
        };
        if req.method != "GET" {
            return Err(Response::error(405, "method not allowed"));
        }
        let mut buf = Vec::new();
        let id = match parse::percent_decode(raw_id, &mut buf).map(DeviceId::parse) {
            Ok(Ok(id)) => id,
            _ => return Err(Response::param_error("invalid device id", "id")),
        };
        auth::check(shared, req, Need::Read(Some(&id)))?;
        if !history {
            return Ok(Devices::Last { id });
        }
        let from = int_param::<i64>(req, "from")?.unwrap_or(i64::MIN);
        let to = int_param::<i64>(req, "to")?.unwrap_or(i64::MAX);
        if from > to {
            return Err(Response::param_error("from must not be after to", "from"));
        }
        let limit = limit_param(req)?;
        Ok(Devices::History {
            id,
            from,
            to,
            limit,
        })
    }

    /// Answers the command.
    pub async fn apply(self, core: &Core) -> Response {
        match self {
            Devices::Area { area: a, limit } => area(core, a, limit).await,
            Devices::Last { id } => last_location(core, id).await,
            Devices::History {
                id,
                from,
                to,
                limit,
            } => history(core, id, from, to, limit).await,
        }
    }
}

/// One optional integer query parameter; `Err` is the 400 to answer with.
fn int_param<T: std::str::FromStr>(req: &Request<'_>, name: &str) -> Result<Option<T>, Response> {
    let mut buf = Vec::new();
    match parse::query_param(req.query, name, &mut buf) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => v
            .parse()
            .map(Some)
            .map_err(|_| Response::param_error(&format!("{name} must be an integer"), name)),
        Err(_) => Err(Response::param_error("bad percent-encoding", name)),
    }
}

/// `limit`: default and maximum from `limits`; 0 and larger than the maximum are 400s.
fn limit_param(req: &Request<'_>) -> Result<usize, Response> {
    match int_param::<usize>(req, "limit")? {
        None => Ok(QUERY_LIMIT_DEFAULT),
        Some(n) if (1..=QUERY_LIMIT_MAX).contains(&n) => Ok(n),
        Some(_) => Err(Response::param_error(
            &format!("limit must be between 1 and {QUERY_LIMIT_MAX}"),
            "limit",
        )),
    }
}

/// A parameter made of comma-separated numbers; `Err` is the 400 to answer with.
fn floats_param<const N: usize>(
    req: &Request<'_>,
    name: &str,
    what: &str,
) -> Result<Option<[f64; N]>, Response> {
    let mut buf = Vec::new();
    let raw = match parse::query_param(req.query, name, &mut buf) {
        Ok(None) => return Ok(None),
        Ok(Some(v)) => v,
        Err(_) => return Err(Response::param_error("bad percent-encoding", name)),
    };
    let bad = || Response::param_error(&format!("{name} must be {what}"), name);
    let mut out = [0.0; N];
    let mut parts = raw.split(',');
    for slot in out.iter_mut() {
        *slot = parts
            .next()
            .and_then(|p| p.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .ok_or_else(bad)?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(Some(out))
}

fn area_params(req: &Request<'_>) -> Result<(Area, usize), Response> {
    let limit = limit_param(req)?;
    let bbox = floats_param::<4>(req, "bbox", "minLon,minLat,maxLon,maxLat")?;
    let near = floats_param::<2>(req, "near", "lat,lon")?;
    let radius = floats_param::<1>(req, "radius", "a number of metres")?;
    match (bbox, near) {
        (Some([min_lon, min_lat, max_lon, max_lat]), None) => {
            let b = crate::spatial::BBox::new(min_lon, min_lat, max_lon, max_lat)
                .map_err(|e| Response::param_error(e, "bbox"))?;
            Ok((Area::BBox(b), limit))
        }
        (None, Some([lat, lon])) => {
            if !((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)) {
                return Err(Response::param_error(
                    "near must be lat,lon within range",
                    "near",
                ));
            }
            let radius_m = match radius {
                Some([r]) if r > 0.0 && r <= QUERY_RADIUS_M_MAX => r,
                Some(_) => {
                    return Err(Response::param_error(
                        &format!("radius must be > 0 and <= {QUERY_RADIUS_M_MAX} metres"),
                        "radius",
                    ))
                }
                None => {
                    return Err(Response::param_error(
                        "near needs radius (metres)",
                        "radius",
                    ))
                }
            };
            Ok((Area::Near { lat, lon, radius_m }, limit))
        }
        (Some(_), Some(_)) => Err(Response::param_error(
            "give either bbox or near, not both",
            "bbox",
        )),
        (None, None) => Err(Response::param_error(
            "give bbox=minLon,minLat,maxLon,maxLat or near=lat,lon&radius=m",
            "bbox",
        )),
    }
}

async fn area(core: &Core, area: Area, limit: usize) -> Response {
    // Each shard renders its hits' records where the records live (the same reader and renderer
    // as `GET /v1/devices/{id}`), so a row carries every field that endpoint returns.
    let shards = (0..core.shared.shard_count).map(|k| {
        core.query(crate::route::ShardId(k), move |store| {
            crate::query::area(store, &area, limit)
                .into_iter()
                .map(|hit| {
                    let device = device_body(store, &hit.id)
                        .or_else(|| table_body(store, &hit.id))
                        .expect("an area hit is a device in this shard's table");
                    (hit, device)
                })
                .collect::<Vec<_>>()
        })
    });
    let parts = futures_util::future::join_all(shards).await;
    if parts.iter().any(Option::is_none) {
        return Response::error(503, "shard unavailable");
    }
    let rows: Vec<AreaRow> =
        crate::query::merge_area_by(parts.into_iter().flatten().collect(), limit, |r| &r.0)
            .into_iter()
            .map(|(hit, device)| AreaRow {
                device,
                distance_m: hit.distance_m,
            })
            .collect();
    Response::json(200, serde_json::to_string(&rows).expect("serializable"))
}

/// One device of an area answer: its `GET /v1/devices/{id}` body plus, for near queries, its
/// distance from the query point.
#[derive(Serialize)]
struct AreaRow {
    #[serde(flatten)]
    device: LastLocationBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    distance_m: Option<f64>,
}

/// The body of `GET /v1/devices/{id}` for a device of `store`'s shard: its last location's full
/// record, read from the log or, once retention deleted its segment, from the last-location
/// checkpoint (`None` if unknown or unreadable). Area answers use it too.
fn device_body(store: &crate::store::ShardStore, id: &str) -> Option<LastLocationBody> {
    store
        .last_record(id)
        .map(|e| LastLocationBody::from_heartbeat(&e.hb.to_owned_heartbeat()))
}

/// What the last-location table alone knows of a device (position, device and receive time),
/// for an area hit whose record [`device_body`] could not read: the optional fields are absent.
fn table_body(store: &crate::store::ShardStore, id: &str) -> Option<LastLocationBody> {
    let loc = store.last(id)?;
    Some(LastLocationBody {
        id: id.to_owned(),
        lat: loc.lat,
        lon: loc.lon,
        ts: loc.ts_ms,
        received_at: loc.received_ms,
        alt: None,
        speed: None,
        heading: None,
        acc: None,
        attrs: None,
    })
}

async fn history(core: &Core, id: DeviceId, from: i64, to: i64, limit: usize) -> Response {
    let shard = core.shared.router.shard_of(&id);
    let found = core
        .query(shard, move |store| {
            crate::query::history(store, &id, from, to, limit).map(|hbs| {
                let bodies: Vec<LastLocationBody> =
                    hbs.iter().map(LastLocationBody::from_heartbeat).collect();
                serde_json::to_string(&bodies).expect("serializable")
            })
        })
        .await;
    match found {
        Some(Some(body)) => Response::json(200, body),
        Some(None) => Response::json(404, r#"{"error":"unknown device","param":"id"}"#.into()),
        None => Response::error(503, "shard unavailable"),
    }
}

async fn last_location(core: &Core, id: DeviceId) -> Response {
    let shard = core.shared.router.shard_of(&id);
    let found = core
        .query(shard, move |store| device_body(store, &id))
        .await;
    match found {
        Some(Some(body)) => {
            Response::json(200, serde_json::to_string(&body).expect("serializable"))
        }
        Some(None) => Response::json(404, r#"{"error":"unknown device","param":"id"}"#.into()),
        None => Response::error(503, "shard unavailable"),
    }
}
