//! The HTTP endpoints served beside the WebSocket upgrade on the same listener. It owns routing
//! by method and path, ops-token checks, and JSON bodies for answers and errors. Reads of a
//! device's state are answered by the executor that owns the device's shard (`Exec::query`).
//!
//! Every error is JSON: `{"error":"<message>"}` plus `"param"` when one parameter is at fault.

use serde::Serialize;

use crate::auth::Scope;
use crate::config::Durability;
use crate::http::parse::{self, Request};
use crate::limits::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX, QUERY_RADIUS_M_MAX};
use crate::metrics::{ExecSnapshot, ProcessInfo};
use crate::server::exec::now_s;
use crate::server::exec::Exec;
use crate::server::listen::Role;

/// The OpenAPI 3 document of the HTTP API (kept true by tests/openapi.rs).
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// A complete response.
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Content type of `body` (may be followed by further fixed header lines, CRLF-separated:
    /// see `live::content_type_and_headers`).
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    fn error(status: u16, message: &str) -> Response {
        Response::json(status, error_body(message))
    }

    /// A 400 naming the parameter at fault.
    fn param_error(message: &str, param: &str) -> Response {
        let (status, body) = parse::json_error(400, message, Some(param));
        Response::json(status, body)
    }
}

/// A JSON error body: `{"error": message}` (the status line's reason phrase is
/// [`parse::status_text`], the one table).
pub fn error_body(message: &str) -> String {
    #[derive(Serialize)]
    struct E<'a> {
        error: &'a str,
    }
    serde_json::to_string(&E { error: message }).expect("serializing a string cannot fail")
}

/// The last location of a device as returned by `GET /v1/devices/{id}`.
#[derive(Serialize)]
pub struct LastLocationBody {
    /// Device id.
    pub id: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Device time, ms since the Unix epoch.
    pub ts: i64,
    /// Server receive time, ms since the Unix epoch.
    pub received_at: i64,
    /// Altitude, m.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alt: Option<f32>,
    /// Speed, m/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<f32>,
    /// Heading, degrees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heading: Option<f32>,
    /// Accuracy, m.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f32>,
    /// Attributes as sent (a JSON object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attrs: Option<Box<serde_json::value::RawValue>>,
}

impl LastLocationBody {
    /// Renders a stored heartbeat.
    pub fn from_heartbeat(hb: &crate::record::Heartbeat) -> LastLocationBody {
        let attrs = (!hb.attrs.is_empty())
            .then(|| std::str::from_utf8(&hb.attrs).ok())
            .flatten()
            .and_then(|s| serde_json::value::RawValue::from_string(s.to_owned()).ok());
        LastLocationBody {
            id: hb.device_id.clone(),
            lat: hb.lat,
            lon: hb.lon,
            ts: hb.ts_ms,
            received_at: hb.received_ms,
            alt: hb.alt_m,
            speed: hb.speed_mps,
            heading: hb.heading_deg,
            acc: hb.acc_m,
            attrs,
        }
    }
}

/// Checks the request's token: an ops token reads everything; a subscriber token reads devices
/// whose id starts with its prefix (`device` is `None` for endpoints that are not about one
/// device, which only ops tokens may use).
fn require_reader(exec: &Exec, req: &Request<'_>, device: Option<&str>) -> Result<(), Response> {
    let mut scratch = Vec::new();
    let token = match parse::bearer_token(req, &mut scratch) {
        Ok(Some(t)) => t,
        _ => return Err(Response::error(401, "missing ops token")),
    };
    let claims = crate::auth::verify(&exec.shared.secret, token, now_s())
        .map_err(|e| Response::error(401, &e.to_string()))?;
    match (&claims.scope, device) {
        (Scope::Ops, _) => Ok(()),
        (Scope::Subscriber(prefix), Some(id)) if id.starts_with(prefix.as_str()) => Ok(()),
        _ => Err(Response::error(
            401,
            "token scope does not allow this query",
        )),
    }
}

/// Checks for an ops token (writes: geofences; large bodies).
pub fn require_ops(exec: &Exec, req: &Request<'_>) -> Result<(), Response> {
    require_reader(exec, req, None)
}

/// Whether `method` on `path` takes a request body (the geofence writes; every other request
/// with a body is refused before the body is read).
pub fn takes_body(method: &str, path: &str) -> bool {
    match method {
        "POST" => path == "/v1/geofences",
        "PUT" => path.starts_with("/v1/geofences/"),
        _ => false,
    }
}

/// Checks for an ops or subscriber token (reads that are not about one device: geofences).
fn require_ops_or_subscriber(exec: &Exec, req: &Request<'_>) -> Result<(), Response> {
    let mut scratch = Vec::new();
    let token = match parse::bearer_token(req, &mut scratch) {
        Ok(Some(t)) => t,
        _ => return Err(Response::error(401, "missing ops or subscriber token")),
    };
    let claims = crate::auth::verify(&exec.shared.secret, token, now_s())
        .map_err(|e| Response::error(401, &e.to_string()))?;
    match claims.scope {
        Scope::Ops | Scope::Subscriber(_) => Ok(()),
        _ => Err(Response::error(
            401,
            "token scope does not allow this query",
        )),
    }
}

/// Answers one HTTP request.
pub async fn respond(exec: &Exec, req: &Request<'_>, body: &[u8], role: Role) -> Response {
    let path = req.path;
    let method = req.method;
    let metrics_here = match role {
        Role::Metrics => true,
        Role::Main => exec.shared.cfg.metrics_listen.is_none(),
    };
    if role == Role::Metrics && path != "/metrics" {
        return Response::error(404, "this listener serves only /metrics");
    }
    match path {
        "/metrics" if metrics_here => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            let openmetrics = req
                .accept
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            metrics(exec, openmetrics).await
        }
        "/openapi.json" => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            Response::json(200, OPENAPI_JSON.to_owned())
        }
        "/live" => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            Response {
                status: 200,
                content_type: crate::server::live::content_type_and_headers(),
                body: crate::server::live::PAGE_HTML.to_owned(),
            }
        }
        "/v1/sinks" => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            if let Err(r) = require_reader(exec, req, None) {
                return r;
            }
            let rows = exec
                .shared
                .sinks
                .as_ref()
                .map(|s| s.status())
                .unwrap_or_default();
            Response::json(
                200,
                format!(
                    r#"{{"sinks":{}}}"#,
                    serde_json::to_string(&rows).expect("serializable")
                ),
            )
        }
        "/v1/stats" => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            if let Err(r) = require_reader(exec, req, None) {
                return r;
            }
            stats(exec).await
        }
        "/healthz" | "/readyz" => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            if path == "/readyz" {
                if let Some(body) = storage_faults_body(&exec.shared) {
                    return Response::json(503, body);
                }
            }
            if exec.shared.ready() {
                // A sink that cannot be reached does not make the server unready: ingest goes on
                // and the shard logs hold the backlog. /readyz names it (details, with the
                // server's message, are in the log and the authenticated /v1/sinks).
                let failing = match (path, exec.shared.sinks.as_ref()) {
                    ("/readyz", Some(s)) => s.failing(),
                    _ => Vec::new(),
                };
                if failing.is_empty() {
                    Response::json(200, r#"{"status":"ok"}"#.into())
                } else {
                    let failing = serde_json::to_string(&failing).expect("serializable");
                    Response::json(
                        200,
                        format!(r#"{{"status":"ok","sinks_failing":{failing}}}"#),
                    )
                }
            } else {
                Response::json(503, r#"{"status":"starting"}"#.into())
            }
        }
        "/v1/devices" => {
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            if let Err(r) = require_reader(exec, req, None) {
                return r;
            }
            area(exec, req).await
        }
        _ if path.starts_with("/v1/devices/") => {
            let rest = &path["/v1/devices/".len()..];
            let (raw_id, sub) = match rest.split_once('/') {
                None => (rest, None),
                Some((id, "history")) => (id, Some("history")),
                Some(_) => return Response::error(404, "no such endpoint"),
            };
            if method != "GET" {
                return Response::error(405, "method not allowed");
            }
            let mut buf = Vec::new();
            let id = match parse::percent_decode(raw_id, &mut buf) {
                Ok(id) if crate::record::validate_device_id(id).is_ok() => id.to_owned(),
                _ => return Response::param_error("invalid device id", "id"),
            };
            if let Err(r) = require_reader(exec, req, Some(&id)) {
                return r;
            }
            match sub {
                None => last_location(exec, id).await,
                Some(_) => history(exec, req, id).await,
            }
        }
        "/v1/geofences" => {
            let auth = match method {
                "GET" => require_ops_or_subscriber(exec, req),
                "POST" => require_ops(exec, req),
                _ => return Response::error(405, "method not allowed"),
            };
            if let Err(r) = auth {
                return r;
            }
            match method {
                "GET" => fence_list(exec),
                _ => fence_bulk(exec, body).await,
            }
        }
        _ if path.starts_with("/v1/geofences/") => {
            let raw = &path["/v1/geofences/".len()..];
            let mut buf = Vec::new();
            let name = match parse::percent_decode(raw, &mut buf) {
                Ok(n) => n.to_owned(),
                Err(_) => return Response::param_error("bad percent-encoding", "name"),
            };
            let auth = match method {
                "GET" => require_ops_or_subscriber(exec, req),
                "PUT" | "DELETE" => require_ops(exec, req),
                _ => return Response::error(405, "method not allowed"),
            };
            if let Err(r) = auth {
                return r;
            }
            if let Err(e) = crate::fence::validate_name(&name) {
                return fence_error(400, &e, "name");
            }
            match method {
                "GET" => fence_get(exec, &name),
                "PUT" => fence_put(exec, &name, body).await,
                _ => fence_delete(exec, name).await,
            }
        }
        "/v1/ingest" => Response::error(426, "use a WebSocket upgrade for /v1/ingest"),
        "/v1/subscribe" => Response::error(426, "use a WebSocket upgrade for /v1/subscribe"),
        _ => Response::error(404, "no such endpoint"),
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

fn area_params(req: &Request<'_>) -> Result<(crate::server::query::Area, usize), Response> {
    use crate::server::query::Area;
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

async fn area(exec: &Exec, req: &Request<'_>) -> Response {
    let (area, limit) = match area_params(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    // Each shard renders its hits' records where the records live (the same reader and renderer
    // as `GET /v1/devices/{id}`), so a row carries every field that endpoint returns.
    let shards = (0..exec.shared.shard_count).map(|k| {
        exec.query(crate::route::ShardId(k), move |store| {
            crate::server::query::area(store, &area, limit)
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
        crate::server::query::merge_area_by(parts.into_iter().flatten().collect(), limit, |r| &r.0)
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

async fn history(exec: &Exec, req: &Request<'_>, id: String) -> Response {
    let parsed = (|| {
        let from = int_param::<i64>(req, "from")?.unwrap_or(i64::MIN);
        let to = int_param::<i64>(req, "to")?.unwrap_or(i64::MAX);
        if from > to {
            return Err(Response::param_error("from must not be after to", "from"));
        }
        Ok((from, to, limit_param(req)?))
    })();
    let (from, to, limit) = match parsed {
        Ok(p) => p,
        Err(r) => return r,
    };
    let shard = exec.shared.router.shard_of(&id);
    let found = exec
        .query(shard, move |store| {
            crate::server::query::history(store, &id, from, to, limit).map(|hbs| {
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

fn process_info(exec: &Exec) -> ProcessInfo {
    let shared = &exec.shared;
    ProcessInfo {
        uptime_s: shared.started.elapsed().as_secs_f64(),
        durability: match shared.cfg.durability {
            Durability::Strict => "strict",
            Durability::Relaxed => "relaxed",
        },
        connections_total: shared
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed),
        sinks: shared
            .sinks
            .as_ref()
            .map(|s| s.status())
            .unwrap_or_default(),
        os: crate::metrics::ProcStats::read(),
    }
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else the classic
/// Prometheus text format.
async fn metrics(exec: &Exec, openmetrics: bool) -> Response {
    let snaps = exec.on_all(|e: &Exec| e.snapshot()).await;
    let text = crate::metrics::render(snaps, process_info(exec));
    if openmetrics {
        Response {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: text,
        }
    } else {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::metrics::to_classic(&text),
        }
    }
}

async fn stats(exec: &Exec) -> Response {
    #[derive(Serialize)]
    struct Stats {
        uptime_s: f64,
        durability: &'static str,
        connections_total: usize,
        shard_count: u32,
        executors: Vec<ExecSnapshot>,
    }
    let info = process_info(exec);
    let body = Stats {
        uptime_s: info.uptime_s,
        durability: info.durability,
        connections_total: info.connections_total,
        shard_count: exec.shared.shard_count,
        executors: exec.on_all(|e: &Exec| e.snapshot()).await,
    };
    Response::json(200, serde_json::to_string(&body).expect("serializable"))
}

async fn last_location(exec: &Exec, id: String) -> Response {
    let shard = exec.shared.router.shard_of(&id);
    let found = exec
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

// ----- geofences -----

/// A fence error as JSON: `{"error": <what is wrong>, "reason": <stable reason>, "param": ..}`.
fn fence_error(status: u16, e: &crate::fence::FenceError, param: &str) -> Response {
    Response::json(
        status,
        serde_json::json!({"error": e.to_string(), "reason": e.reason(), "param": param})
            .to_string(),
    )
}

fn unknown_fence() -> Response {
    Response::json(404, r#"{"error":"unknown geofence","param":"name"}"#.into())
}

/// Runs a registry write (file write, fsync, rename) on its own thread, so the executor keeps
/// serving meanwhile; geofence writes are rare operator actions.
async fn off_executor<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = futures_channel::oneshot::channel();
    std::thread::Builder::new()
        .name("geobeat-fences".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.await.ok()
}

fn fence_list(exec: &Exec) -> Response {
    let (_, set) = exec.shared.fences.snapshot();
    let mut names: Vec<&str> = set.names().collect();
    names.sort_unstable();
    let fences: Vec<serde_json::Value> = names
        .into_iter()
        .map(|n| serde_json::json!({ "name": n }))
        .collect();
    Response::json(200, serde_json::json!({ "fences": fences }).to_string())
}

fn fence_get(exec: &Exec, name: &str) -> Response {
    let (_, set) = exec.shared.fences.snapshot();
    let Some(fence) = set.by_name(name) else {
        return unknown_fence();
    };
    let mut body = String::with_capacity(64);
    body.push_str(r#"{"name":"#);
    body.push_str(&serde_json::to_string(name).expect("serializable"));
    body.push_str(r#","shape":"#);
    body.push_str(&fence.to_json());
    body.push('}');
    Response::json(200, body)
}

async fn fence_put(exec: &Exec, name: &str, body: &[u8]) -> Response {
    use crate::fence::FenceError;
    let registry = exec.shared.fences.clone();
    // Parsing runs on the fence thread with the write: validating a 10,000-position polygon
    // (the self-intersection sweep) must not stall the executor's heartbeats.
    let (n, body) = (name.to_string(), body.to_vec());
    let done = off_executor(move || {
        let fence = crate::fence::Fence::parse(&n, &body).map_err(|e| (e, "body"))?;
        drop(body);
        registry.put(fence).map_err(|e| {
            let param = if matches!(e, FenceError::TooManyVerticesTotal(_)) {
                "body"
            } else {
                "name"
            };
            (e, param)
        })
    })
    .await;
    match done {
        Some(Ok(created)) => Response::json(
            200,
            serde_json::json!({"name": name, "created": created}).to_string(),
        ),
        Some(Err((e, param)))
            if !matches!(e, FenceError::Io { .. } | FenceError::Corrupt { .. }) =>
        {
            fence_error(400, &e, param)
        }
        Some(Err((e, param))) => {
            tracing::error!(error = %e, "could not store a geofence");
            fence_error(500, &e, param)
        }
        None => Response::error(500, "geofence write did not complete"),
    }
}

/// `POST /v1/geofences`: validates the whole batch (with the PUT route's rules), then stores it
/// with one file write and one snapshot, or changes nothing. Parsing runs beside the registry
/// write on the fence thread: a 64 MiB body must not stall the executor's heartbeats.
async fn fence_bulk(exec: &Exec, body: &[u8]) -> Response {
    use crate::fence::{BatchError, FenceError};
    let registry = exec.shared.fences.clone();
    let body = body.to_vec();
    let done = off_executor(move || {
        let batch = crate::fence::parse_batch(&body)?;
        drop(body);
        registry.put_many(batch).map_err(|error| BatchError {
            index: None,
            param: "fences",
            error,
        })
    })
    .await;
    match done {
        Some(Ok((created, replaced))) => Response::json(
            200,
            serde_json::json!({"created": created, "replaced": replaced}).to_string(),
        ),
        Some(Err(e)) if matches!(e.error, FenceError::Io { .. } | FenceError::Corrupt { .. }) => {
            tracing::error!(error = %e.error, "could not store a geofence batch");
            fence_error(500, &e.error, e.param)
        }
        Some(Err(e)) => {
            let mut v = serde_json::json!({
                "error": e.error.to_string(),
                "reason": e.error.reason(),
                "param": e.param,
            });
            if let Some(i) = e.index {
                v["index"] = i.into();
            }
            Response::json(400, v.to_string())
        }
        None => Response::error(500, "geofence write did not complete"),
    }
}

async fn fence_delete(exec: &Exec, name: String) -> Response {
    let registry = exec.shared.fences.clone();
    let n = name.clone();
    match off_executor(move || registry.delete(&n)).await {
        Some(Ok(true)) => Response::json(
            200,
            serde_json::json!({"name": name, "deleted": true}).to_string(),
        ),
        Some(Ok(false)) => unknown_fence(),
        Some(Err(e)) => {
            tracing::error!(error = %e, "could not delete a geofence");
            fence_error(500, &e, "name")
        }
        None => Response::error(500, "geofence write did not complete"),
    }
}

/// `/readyz`'s body while some shard's log refuses writes (failed sync, directory removed):
/// `{"status":"storage_unavailable","shards":[{"shard":N,"error":"..."}]}`; `None` when all
/// shards accept. Liveness (`/healthz`) is not affected: the process still serves reads.
fn storage_faults_body(shared: &crate::server::Shared) -> Option<String> {
    let faults: Vec<serde_json::Value> = shared
        .storage_faults
        .iter()
        .enumerate()
        .filter_map(|(k, f)| f.get().map(|e| serde_json::json!({"shard": k, "error": e})))
        .collect();
    if faults.is_empty() {
        return None;
    }
    Some(serde_json::json!({"status": "storage_unavailable", "shards": faults}).to_string())
}
