//! `/v1/devices` (devices in an area), `/v1/devices/{id}` (a device's last location) and
//! `/v1/devices/{id}/history`: parsed into a [`Devices`] command (path, method, parameters,
//! token, in the documented order of refusals), then applied on the executors that own the
//! shards (`Core::query`; rendering happens where the records live).
//!
//! History pages: without `cursor` and `format` the answer is the JSON array it always was. A
//! `cursor` parameter (empty for the first page) opts into pages, `{"items":[..],"next":..}`;
//! `format=geojson|gpx|csv` are exports, always paged, each page a complete document carrying
//! the next cursor (GeoJSON: a `next` member; GPX: `<geobeat:next>` in the metadata extensions;
//! CSV: a `cursor` column, the cursor after each row). A page is rendered where its records live
//! and holds at most `limit` heartbeats; a longer export is the client following the cursor.
//!
//! On a cluster node (issue 17 item 3) the last location and area queries also consult each
//! shard's cluster view (the devices other nodes write, `table::view`), and a history request
//! for a device whose unit another node writes is answered 307 with the same request on the
//! owner's advertise address (docs/cluster.md: its limits).
//!
//! Invariant: a subscriber token reads only devices under its prefix; area queries are ops-only.

use serde::Serialize;

use crate::http::parse::{self, Request};
use crate::limits::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX, QUERY_RADIUS_M_MAX};
use crate::net::auth::{self, Need};
use crate::net::http::response::Response;
use crate::node::Shared;
use crate::query::{Area, CursorError, HistoryCursor, HistoryPage, PageError};
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
    /// `GET /v1/devices/{id}/history?from=..&to=..&limit=..[&cursor=..][&format=..]`.
    History {
        /// The device.
        id: DeviceId,
        /// Device time range, ms, inclusive.
        from: i64,
        /// See `from`.
        to: i64,
        /// Most rows.
        limit: usize,
        /// How the answer is rendered.
        format: Format,
        /// `None`: the unpaged JSON array (no `cursor`, no export format); `Some(None)`: the
        /// first page; `Some(Some(c))`: the page after `c`.
        page: Option<Option<HistoryCursor>>,
    },
}

/// The rendering of a history answer (`format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON: the array, or with a cursor the `{"items","next"}` page.
    Json,
    /// A GeoJSON FeatureCollection: a Point per heartbeat and a LineString of the page's track.
    GeoJson,
    /// A GPX 1.1 document with one track segment.
    Gpx,
    /// CSV with a header row (RFC 4180).
    Csv,
}

impl Format {
    fn parse(text: &str) -> Option<Format> {
        match text {
            "json" => Some(Format::Json),
            "geojson" => Some(Format::GeoJson),
            "gpx" => Some(Format::Gpx),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::GeoJson => "application/geo+json",
            Format::Gpx => "application/gpx+xml",
            Format::Csv => "text/csv; charset=utf-8; header=present",
        }
    }
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
        let from = int_param::<i64>(req, "from")?;
        let to = int_param::<i64>(req, "to")?;
        let limit = limit_param(req)?;
        let mut buf = Vec::new();
        let format = match parse::query_param(req.query, "format", &mut buf) {
            Ok(None) => Format::Json,
            Ok(Some(f)) => Format::parse(f).ok_or_else(|| {
                Response::param_error("format must be json, geojson, gpx or csv", "format")
            })?,
            Err(_) => return Err(Response::param_error("bad percent-encoding", "format")),
        };
        let cursor = match parse::query_param(req.query, "cursor", &mut buf) {
            Ok(None) => None,
            Ok(Some("")) => Some(None),
            Ok(Some(text)) => Some(Some(HistoryCursor::decode(text, &id).map_err(|e| {
                let why = match e {
                    CursorError::Malformed => "malformed cursor",
                    CursorError::Foreign => {
                        "cursor is damaged or belongs to another device or query"
                    }
                };
                Response::param_error(why, "cursor")
            })?)),
            Err(_) => return Err(Response::param_error("bad percent-encoding", "cursor")),
        };
        // A cursor carries its query's range: `from`/`to` may be repeated, not changed.
        let (from, to) = match cursor {
            Some(Some(c)) => {
                if from.is_some_and(|f| f != c.from) || to.is_some_and(|t| t != c.to) {
                    return Err(Response::param_error(
                        "cursor belongs to another from/to range",
                        "cursor",
                    ));
                }
                (c.from, c.to)
            }
            _ => (from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX)),
        };
        if from > to {
            return Err(Response::param_error("from must not be after to", "from"));
        }
        // A cluster node keeps the history of the devices it writes only.
        if let Some(r) = history_redirect(shared, req.path, req.query, &id) {
            return Err(r);
        }
        let page = match (cursor, format) {
            (None, Format::Json) => None,
            (None, _) => Some(None),
            (Some(c), _) => Some(c),
        };
        Ok(Devices::History {
            id,
            from,
            to,
            limit,
            format,
            page,
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
                format: _,
                page: None,
            } => history(core, id, from, to, limit).await,
            Devices::History {
                id,
                from,
                to,
                limit,
                format,
                page: Some(cursor),
            } => history_page(core, id, from, to, limit, format, cursor).await,
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
    // as `GET /v1/devices/{id}`), so a row carries every field that endpoint returns. On a
    // cluster node the shard's view of the devices other nodes write is searched beside it.
    let shards = (0..core.shared.shard_count).map(|k| {
        core.query_view(crate::route::ShardId(k), move |store, view| {
            crate::query::area_with_view(store, Some(view), &area, limit)
                .into_iter()
                .map(|hit| {
                    let device = view_body(store, view, &hit.id)
                        .or_else(|| device_body(store, &hit.id))
                        .or_else(|| table_body(store, &hit.id))
                        .expect("an area hit is a device in this shard's table or view");
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

/// The body of a device whose last location is in the shard's cluster view (another node wrote
/// it: `table::view`), `None` if the local table's is newer or the view does not know it.
fn view_body(
    store: &crate::store::ShardStore,
    view: &crate::table::view::ViewTable,
    id: &str,
) -> Option<LastLocationBody> {
    let hb = view.get(id)?;
    crate::table::view::view_wins(store.last(id).as_ref(), hb)
        .then(|| LastLocationBody::from_heartbeat(hb))
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

async fn history_page(
    core: &Core,
    id: DeviceId,
    from: i64,
    to: i64,
    limit: usize,
    format: Format,
    cursor: Option<HistoryCursor>,
) -> Response {
    let shard = core.shared.router.shard_of(&id);
    let found = core
        .query(shard, move |store| {
            crate::query::history_page(store, &id, from, to, cursor.as_ref(), limit)
                .map(|page| render_page(&id, &page, from, to, format))
        })
        .await;
    match found {
        Some(Ok(body)) => Response {
            status: 200,
            content_type: format.content_type(),
            body,
        },
        Some(Err(PageError::UnknownDevice)) => {
            Response::json(404, r#"{"error":"unknown device","param":"id"}"#.into())
        }
        Some(Err(PageError::Foreign)) => Response::param_error(
            "cursor is damaged or belongs to another device or query",
            "cursor",
        ),
        Some(Err(PageError::Expired)) => Response::error(
            410,
            "retention deleted the heartbeats this cursor continues from; start a new paging",
        ),
        None => Response::error(503, "shard unavailable"),
    }
}

/// Renders one history page of device `id` in `format` (see the module docs).
fn render_page(id: &str, page: &HistoryPage, from: i64, to: i64, format: Format) -> String {
    let next = page.next.map(|c| c.encode(id));
    match format {
        Format::Json => {
            #[derive(Serialize)]
            struct Page {
                items: Vec<LastLocationBody>,
                next: Option<String>,
            }
            let items = page
                .items
                .iter()
                .map(|(hb, _)| LastLocationBody::from_heartbeat(hb))
                .collect();
            serde_json::to_string(&Page { items, next }).expect("serializable")
        }
        Format::GeoJson => render_geojson(id, page, next),
        Format::Gpx => render_gpx(id, page, next),
        Format::Csv => render_csv(id, page, from, to),
    }
}

/// A GeoJSON (RFC 7946) FeatureCollection: a Point feature per heartbeat, newest first, whose
/// properties are the heartbeat as `GET /v1/devices/{id}` renders it, then (with two or more
/// points: a LineString needs two positions) one LineString feature of the page's track, and
/// the foreign member `next` (the cursor, or null).
fn render_geojson(id: &str, page: &HistoryPage, next: Option<String>) -> String {
    use serde_json::json;
    let mut features: Vec<serde_json::Value> = page
        .items
        .iter()
        .map(|(hb, _)| {
            json!({
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [hb.lon, hb.lat]},
                "properties": LastLocationBody::from_heartbeat(hb),
            })
        })
        .collect();
    if page.items.len() >= 2 {
        let coordinates: Vec<[f64; 2]> = page.items.iter().map(|(h, _)| [h.lon, h.lat]).collect();
        let newest = page.items.first().map(|(h, _)| h.ts_ms);
        let oldest = page.items.last().map(|(h, _)| h.ts_ms);
        features.push(json!({
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": coordinates},
            "properties": {"id": id, "track": true, "count": page.items.len(), "ts_newest": newest, "ts_oldest": oldest},
        }));
    }
    json!({"type": "FeatureCollection", "features": features, "next": next}).to_string()
}

/// The namespace of geobeat's GPX extension elements (`next`, `speed`, `course`, `acc`).
pub const GPX_EXTENSION_NS: &str = "urn:geobeat:gpx:1";

/// A GPX 1.1 document: one track named after the device, one segment of track points newest
/// first (lat, lon, `ele` from the altitude, `time`; speed, course and accuracy as geobeat
/// extensions), the next cursor in the metadata's extensions. Valid against the GPX 1.1 schema
/// (tests/history_export.rs checks with xmllint): longitude 180 is written as -180 (the schema's
/// range is [-180, 180)), extension elements are in their own namespace.
fn render_gpx(id: &str, page: &HistoryPage, next: Option<String>) -> String {
    use std::fmt::Write as _;
    let name = xml_escape(id);
    let mut out = String::with_capacity(256 + page.items.len() * 200);
    out.push_str(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<gpx version=\"1.1\" creator=\"geobeat\" \
         xmlns=\"http://www.topografix.com/GPX/1/1\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ",
    );
    let _ = write!(
        out,
        "xmlns:geobeat=\"{GPX_EXTENSION_NS}\" xsi:schemaLocation=\"http://www.topografix.com/GPX/1/1 \
         http://www.topografix.com/GPX/1/1/gpx.xsd\">\n<metadata><name>{name}</name>"
    );
    if let Some(n) = &next {
        let _ = write!(
            out,
            "<extensions><geobeat:next>{n}</geobeat:next></extensions>"
        );
    }
    let _ = write!(out, "</metadata>\n<trk><name>{name}</name><trkseg>\n");
    for (hb, _) in &page.items {
        let lon = if hb.lon >= 180.0 { -180.0 } else { hb.lon };
        let _ = write!(out, "<trkpt lat=\"{}\" lon=\"{lon}\">", hb.lat);
        if let Some(alt) = hb.alt_m {
            let _ = write!(out, "<ele>{alt}</ele>");
        }
        let _ = write!(out, "<time>{}</time>", crate::client::iso_ms(hb.ts_ms));
        let ext = [
            ("speed", hb.speed_mps),
            ("course", hb.heading_deg),
            ("acc", hb.acc_m),
        ];
        if ext.iter().any(|(_, v)| v.is_some()) {
            out.push_str("<extensions>");
            for (tag, v) in ext {
                if let Some(v) = v {
                    let _ = write!(out, "<geobeat:{tag}>{v}</geobeat:{tag}>");
                }
            }
            out.push_str("</extensions>");
        }
        out.push_str("</trkpt>\n");
    }
    out.push_str("</trkseg></trk>\n</gpx>\n");
    out
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The CSV header row (without its CRLF).
pub const CSV_HEADER: &str = "id,ts,time,lat,lon,alt,speed,heading,acc,received_at,attrs,cursor";

/// CSV (RFC 4180: CRLF line ends, a field with a comma, quote, CR or LF quoted, quotes doubled):
/// [`CSV_HEADER`], then a row per heartbeat, newest first; an absent optional field is empty;
/// `time` is the device time in RFC 3339 UTC; `attrs` the attribute object as JSON. `cursor` is
/// the cursor that continues after that row (empty on the last row of the last page), so an
/// export resumes from any row it kept.
fn render_csv(id: &str, page: &HistoryPage, from: i64, to: i64) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(128 + page.items.len() * 240);
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
    let last = page.items.len().saturating_sub(1);
    for (i, (hb, _)) in page.items.iter().enumerate() {
        let cursor = if i == last && page.next.is_none() {
            String::new()
        } else {
            page.cursor_after(i, from, to).encode(id)
        };
        let attrs = std::str::from_utf8(&hb.attrs).unwrap_or_default();
        let _ = write!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{}\r\n",
            csv_field(&hb.device_id),
            hb.ts_ms,
            crate::client::iso_ms(hb.ts_ms),
            hb.lat,
            hb.lon,
            opt(hb.alt_m),
            opt(hb.speed_mps),
            opt(hb.heading_deg),
            opt(hb.acc_m),
            hb.received_ms,
            csv_field(attrs),
            cursor
        );
    }
    out
}

fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text.into()
    }
}

/// Adds the device's exactly-once audit (issue 18) to a rendered object, as its last field:
/// `"audit":{"epoch":E,"seq":N,"gaps":G,"duplicates":D}` (`epoch` and `seq`, the durable
/// high-water mark, only for a device that sent device sequences).
fn append_audit(text: &mut String, a: &crate::table::DeviceAudit) {
    use std::fmt::Write;
    debug_assert!(text.ends_with('}'));
    text.pop();
    text.push_str(",\"audit\":{");
    if let Some(m) = a.mark {
        let _ = write!(text, "\"epoch\":{},\"seq\":{},", m.epoch, m.seq);
    }
    let _ = write!(
        text,
        "\"gaps\":{},\"duplicates\":{}}}}}",
        a.gaps(),
        a.duplicates
    );
}

async fn last_location(core: &Core, id: DeviceId) -> Response {
    let shard = core.shared.router.shard_of(&id);
    let found = core
        .query_view(shard, move |store, view| {
            // On a cluster node, a device another node wrote is answered from the view (its
            // exactly-once audit lives with its writer).
            if let Some(body) = view_body(store, view, &id) {
                return Some((body, None));
            }
            device_body(store, &id).map(|b| (b, store.audit(&id)))
        })
        .await;
    match found {
        Some(Some((body, audit))) => {
            let mut text = serde_json::to_string(&body).expect("serializable");
            if let Some(a) = audit {
                append_audit(&mut text, &a);
            }
            Response::json(200, text)
        }
        Some(None) => Response::json(404, r#"{"error":"unknown device","param":"id"}"#.into()),
        None => Response::error(503, "shard unavailable"),
    }
}

/// On a cluster node, the 307 for a history request of a device whose unit another node writes
/// (its history is in that node's log): `Location` is the same request on the owner's advertise
/// address. `None`: answer here (no cluster, the unit is written here, or nobody writes it yet).
fn history_redirect(shared: &Shared, req_path: &str, query: &str, id: &str) -> Option<Response> {
    match crate::net::owner::route(shared, id) {
        crate::net::owner::Route::Elsewhere { node, addr } => {
            let location = if query.is_empty() {
                format!("http://{addr}{req_path}")
            } else {
                format!("http://{addr}{req_path}?{query}")
            };
            Some(Response::json(
                307,
                crate::net::owner::redirect_body(&node, &addr, &location),
            ))
        }
        _ => None,
    }
}
