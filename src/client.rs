//! `geobeat query ...`: a command-line client of a running server, like `redis-cli` or
//! `tile38-cli`: a device's last location, its history, devices in a box or near a point,
//! geofences, live events of a subscription, and server stats, printed as a table or as JSON. It
//! owns the command's arguments, where the server address and token come from (flag, then
//! environment, then a small config file), a minimal blocking HTTP/1.1 and WebSocket client, and
//! the rendering of answers. It does not know the server's internals: it speaks only the public
//! HTTP API and the subscription protocol (docs/openapi.json, docs/PROTOCOL.md).
//!
//! `geobeat query history <ID> --format geojson|gpx|csv [--out FILE]` exports a device's whole
//! history: it follows the server's cursor page by page and splices the pages into one document
//! as they arrive, so it holds one page at a time (plus, for GeoJSON, the track's coordinates:
//! 16 bytes a heartbeat, for the LineString written last).
//!
//! Invariant: every failure is one line naming the problem and the fix, with exit status 2 for
//! usage (no token, a bad URL) and 1 for everything the server or the network answered.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

/// Server address when neither `--url`, `GEOBEAT_URL` nor the config file names one.
pub const URL_DEFAULT: &str = "http://127.0.0.1:8080";
/// Environment variable naming the server address.
pub const URL_ENV: &str = "GEOBEAT_URL";
/// Environment variable holding the token.
pub const TOKEN_ENV: &str = "GEOBEAT_TOKEN";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "GEOBEAT_QUERY_CONFIG";
/// Longest answer read from the server (a history page of the maximum size fits many times).
const ANSWER_BYTES_MAX: usize = 64 << 20;
/// Connect and read timeout of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `geobeat query` settings.
#[derive(Args, Debug, Clone)]
pub struct QueryArgs {
    /// Server address, `http://host:port` [env: GEOBEAT_URL] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL", global = true)]
    pub url: Option<String>,
    /// Access token (ops, or subscriber for its devices) [env: GEOBEAT_TOKEN]
    #[arg(long, value_name = "TOKEN", global = true)]
    pub token: Option<String>,
    /// Config file with `url = ".."` and `token = ".."` [env: GEOBEAT_QUERY_CONFIG] [default:
    /// ~/.config/geobeat/query.toml when it exists]
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Print the server's JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    /// What to ask.
    #[command(subcommand)]
    pub what: Query,
}

/// The questions `geobeat query` asks.
#[derive(Subcommand, Debug, Clone)]
pub enum Query {
    /// A device's last location.
    Last {
        /// Device id.
        id: String,
    },
    /// A device's history, newest first.
    History {
        /// Device id.
        id: String,
        /// Oldest device time, ms since the Unix epoch.
        #[arg(long)]
        from: Option<i64>,
        /// Newest device time, ms since the Unix epoch.
        #[arg(long)]
        to: Option<i64>,
        /// Most rows (with --format: heartbeats per page asked of the server) [default: 1000;
        /// with --format: 10000]
        #[arg(long)]
        limit: Option<usize>,
        /// Export every heartbeat in the range (following the server's cursor to the end) as
        /// one GeoJSON, GPX or CSV document, newest first
        #[arg(long, value_enum)]
        format: Option<ExportFormat>,
        /// Write the export to FILE instead of standard output
        #[arg(long, value_name = "FILE", requires = "format")]
        out: Option<PathBuf>,
    },
    /// Devices whose last location is in a box.
    Bbox {
        /// `minLon,minLat,maxLon,maxLat`.
        #[arg(allow_hyphen_values = true)]
        bbox: String,
        /// Most rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Devices whose last location is within a radius of a point, nearest first.
    Near {
        /// `lat,lon`.
        #[arg(allow_hyphen_values = true)]
        point: String,
        /// Radius in metres.
        #[arg(long)]
        radius: f64,
        /// Most rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The geofences, or one geofence's shape.
    Fences {
        /// A fence name (all names if absent).
        name: Option<String>,
    },
    /// Prints live events (one line each) until interrupted or the server closes.
    Subscribe {
        /// Device ids, comma-separated.
        #[arg(long, conflicts_with_all = ["bbox", "fence"])]
        devices: Option<String>,
        /// `minLon,minLat,maxLon,maxLat`.
        #[arg(long, allow_hyphen_values = true, conflicts_with = "fence")]
        bbox: Option<String>,
        /// A geofence name (enter/exit events).
        #[arg(long)]
        fence: Option<String>,
    },
    /// Server statistics (per executor and shard).
    Stats,
    /// Whether the server is ready to take heartbeats (`GET /readyz`, no token needed): exit
    /// status 0 when it is, 1 with its answer when not. For container and orchestrator health
    /// checks (the image has no curl).
    Ready,
}

/// `geobeat history` settings: the same server, token and config as `geobeat query`.
#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    /// Server address, `http://host:port` [env: GEOBEAT_URL] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL", global = true)]
    pub url: Option<String>,
    /// Access token (ops, or subscriber for its devices) [env: GEOBEAT_TOKEN]
    #[arg(long, value_name = "TOKEN", global = true)]
    pub token: Option<String>,
    /// Config file with `url = ".."` and `token = ".."` [env: GEOBEAT_QUERY_CONFIG] [default:
    /// ~/.config/geobeat/query.toml when it exists]
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// What to do with the history.
    #[command(subcommand)]
    pub what: HistoryCommand,
}

/// The things `geobeat history` does.
#[derive(Subcommand, Debug, Clone)]
pub enum HistoryCommand {
    /// Export every heartbeat of a device in a time range as one GeoJSON, GPX or CSV document,
    /// newest first (the server's cursor followed to the end; the same as `geobeat query history
    /// --format`).
    Export {
        /// Device id.
        id: String,
        /// The document format.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Oldest device time, ms since the Unix epoch.
        #[arg(long)]
        from: Option<i64>,
        /// Newest device time, ms since the Unix epoch.
        #[arg(long)]
        to: Option<i64>,
        /// Heartbeats per page asked of the server [default: 10000]
        #[arg(long)]
        page: Option<usize>,
        /// Write the export to FILE instead of standard output
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

impl HistoryArgs {
    /// The `geobeat query` question this command asks.
    pub fn as_query(&self) -> QueryArgs {
        let HistoryCommand::Export {
            id,
            format,
            from,
            to,
            page,
            out,
        } = &self.what;
        QueryArgs {
            url: self.url.clone(),
            token: self.token.clone(),
            config: self.config.clone(),
            json: false,
            what: Query::History {
                id: id.clone(),
                from: *from,
                to: *to,
                limit: *page,
                format: Some(*format),
                out: out.clone(),
            },
        }
    }
}

/// The document formats of `geobeat query history --format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A GeoJSON FeatureCollection: a Point per heartbeat, then a LineString of the track.
    Geojson,
    /// GPX 1.1: one track, one segment.
    Gpx,
    /// CSV with a header row (RFC 4180).
    Csv,
}

/// Why `geobeat query` failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Bad usage: no token, a bad URL or argument, an unreadable config file.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached or broke the protocol.
    #[error("{0}")]
    Network(String),
    /// The server answered with an error.
    #[error("{0}")]
    Refused(String),
}

impl QueryError {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            QueryError::Usage(_) => 2,
            QueryError::Network(_) | QueryError::Refused(_) => 1,
        }
    }
}

/// Where to ask and with which token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    /// Path prefix (empty, or starting with `/`, no trailing `/`).
    base: String,
    token: String,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
}

fn load_file(
    args: &QueryArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<FileConfig, QueryError> {
    let (path, explicit) = match (&args.config, env(CONFIG_ENV).filter(|v| !v.is_empty())) {
        (Some(p), _) => (p.clone(), true),
        (None, Some(p)) => (PathBuf::from(p), true),
        (None, None) => match env("HOME") {
            Some(home) => (
                PathBuf::from(home).join(".config/geobeat/query.toml"),
                false,
            ),
            None => return Ok(FileConfig::default()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileConfig::default())
        }
        Err(e) => {
            return Err(QueryError::Usage(format!(
                "cannot read the config file {}: {e}",
                path.display()
            )))
        }
    };
    toml::from_str(&text).map_err(|e| {
        QueryError::Usage(format!(
            "config file {}: {} (it takes `url = \"http://host:port\"` and `token = \"...\"`)",
            path.display(),
            e.message()
        ))
    })
}

/// Splits `http://host:port/base` (port defaults to 80).
fn parse_url(url: &str) -> Result<(String, u16, String), QueryError> {
    let bad = |why: &str| {
        QueryError::Usage(format!(
            "bad server URL {url:?}: {why}; give --url http://host:port (or set {URL_ENV})"
        ))
    };
    let rest = match url.strip_prefix("http://") {
        Some(r) => r,
        None if url.starts_with("https://") => {
            return Err(bad(
                "https is not spoken here; use the server's plain listener",
            ))
        }
        None => return Err(bad("it must start with http://")),
    };
    let (authority, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
        ),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((
        host.trim_matches(['[', ']']).to_owned(),
        port,
        base.to_owned(),
    ))
}

fn resolve(args: &QueryArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Target, QueryError> {
    let file = load_file(args, env)?;
    // `ready` asks a public endpoint: a token is not needed (an empty one sends no header).
    let need_token = !matches!(args.what, Query::Ready);
    let url = args
        .url
        .clone()
        .or_else(|| env(URL_ENV).filter(|v| !v.is_empty()))
        .or(file.url)
        .unwrap_or_else(|| URL_DEFAULT.to_owned());
    let token = args
        .token
        .clone()
        .or_else(|| env(TOKEN_ENV).filter(|v| !v.is_empty()))
        .or(file.token)
        .or_else(|| (!need_token).then(String::new))
        .ok_or_else(|| {
            QueryError::Usage(format!(
                "no token: give --token, set {TOKEN_ENV}, or put `token = \"...\"` in the config \
                 file; mint one with `geobeat token ops`"
            ))
        })?;
    let (host, port, base) = parse_url(&url)?;
    Ok(Target {
        host,
        port,
        base,
        token,
    })
}

/// Percent-encodes a path segment or query value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Target {
    fn connect(&self) -> Result<TcpStream, QueryError> {
        let addr = format!("{}:{}", self.host, self.port);
        let unreachable = |e: std::io::Error| {
            QueryError::Network(format!(
                "cannot reach the server at http://{addr}: {e} (is it running? set --url or {URL_ENV})"
            ))
        };
        let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&addr)
            .map_err(unreachable)?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, REQUEST_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
                    let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(unreachable(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }

    /// `GET base + path_and_query` with the token (if any): the parsed JSON body of a 2xx
    /// answer.
    fn get(&self, path_and_query: &str) -> Result<Value, QueryError> {
        let body = self.get_text(path_and_query)?;
        serde_json::from_str(&body)
            .map_err(|_| QueryError::Network("the answer is not JSON".into()))
    }

    /// `GET base + path_and_query` with the token (if any): the body of a 2xx answer.
    fn get_text(&self, path_and_query: &str) -> Result<String, QueryError> {
        let mut stream = self.connect()?;
        let auth = if self.token.is_empty() {
            String::new()
        } else {
            format!("authorization: Bearer {}\r\n", self.token)
        };
        let request = format!(
            "GET {}{path_and_query} HTTP/1.1\r\nhost: {}:{}\r\n{auth}\
             accept: application/json\r\nconnection: close\r\n\r\n",
            self.base, self.host, self.port
        );
        let net = |e: std::io::Error| QueryError::Network(format!("talking to the server: {e}"));
        stream.write_all(request.as_bytes()).map_err(net)?;
        let mut answer = Vec::new();
        stream
            .take(ANSWER_BYTES_MAX as u64 + 1)
            .read_to_end(&mut answer)
            .map_err(net)?;
        if answer.len() > ANSWER_BYTES_MAX {
            return Err(QueryError::Network("the answer is too large".into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&answer) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => {
                return Err(QueryError::Network(
                    "the server sent no valid HTTP answer".into(),
                ))
            }
        };
        let status = resp.code.unwrap_or(0);
        let body = &answer[head..];
        if (200..300).contains(&status) {
            return String::from_utf8(body.to_vec())
                .map_err(|_| QueryError::Network("the answer is not UTF-8".into()));
        }
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let message = json
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
        Err(QueryError::Refused(match status {
            401 => format!(
                "the server refused the token: {message} (mint one with `geobeat token ops`, or \
                 `geobeat token subscriber <PREFIX>` for some devices)"
            ),
            _ => format!("{status}: {message}"),
        }))
    }
}

/// Runs `geobeat query` and returns what to print (nothing for `subscribe`, which prints as it
/// goes to `out`).
pub fn run(args: &QueryArgs, out: &mut dyn Write) -> Result<(), QueryError> {
    run_with(args, &|name| std::env::var(name).ok(), out)
}

/// [`run`] with the environment passed in (for tests).
pub fn run_with(
    args: &QueryArgs,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> Result<(), QueryError> {
    let target = resolve(args, env)?;
    let limit = |l: &Option<usize>| l.map(|n| format!("&limit={n}")).unwrap_or_default();
    let value = match &args.what {
        Query::Last { id } => target.get(&format!("/v1/devices/{}", encode(id)))?,
        Query::History {
            id,
            from,
            to,
            limit,
            format: Some(format),
            out: path,
        } => {
            let page = limit.unwrap_or(crate::limits::QUERY_LIMIT_MAX);
            return match path {
                None => export(&target, id, *from, *to, page, *format, out).map(drop),
                Some(p) => {
                    let file = std::fs::File::create(p).map_err(|e| {
                        QueryError::Usage(format!("cannot create {}: {e}", p.display()))
                    })?;
                    let mut w = std::io::BufWriter::new(file);
                    let n = export(&target, id, *from, *to, page, *format, &mut w)?;
                    w.flush().map_err(|e| {
                        QueryError::Network(format!("writing {}: {e}", p.display()))
                    })?;
                    writeln!(out, "exported {n} heartbeats of {id} to {}", p.display())
                        .map_err(|e| QueryError::Network(format!("writing the answer: {e}")))
                }
            };
        }
        Query::History {
            id,
            from,
            to,
            limit: l,
            format: None,
            out: _,
        } => {
            let mut q = String::new();
            if let Some(f) = from {
                q.push_str(&format!("&from={f}"));
            }
            if let Some(t) = to {
                q.push_str(&format!("&to={t}"));
            }
            q.push_str(&limit(l));
            target.get(&format!(
                "/v1/devices/{}/history?{}",
                encode(id),
                q.trim_start_matches('&')
            ))?
        }
        Query::Bbox { bbox, limit: l } => {
            target.get(&format!("/v1/devices?bbox={}{}", encode(bbox), limit(l)))?
        }
        Query::Near {
            point,
            radius,
            limit: l,
        } => target.get(&format!(
            "/v1/devices?near={}&radius={radius}{}",
            encode(point),
            limit(l)
        ))?,
        Query::Fences { name: None } => target.get("/v1/geofences")?,
        Query::Fences { name: Some(n) } => target.get(&format!("/v1/geofences/{}", encode(n)))?,
        Query::Stats => target.get("/v1/stats")?,
        Query::Ready => target.get("/readyz")?,
        Query::Subscribe {
            devices,
            bbox,
            fence,
        } => return subscribe(&target, devices, bbox, fence, args.json, out),
    };
    let text = if args.json {
        serde_json::to_string_pretty(&value).expect("a JSON value serializes")
    } else {
        render(&args.what, &value)
    };
    writeln!(out, "{text}").map_err(|e| QueryError::Network(format!("writing the answer: {e}")))
}

/// Exports `id`'s history in `[from, to]` as one `format` document to `out`, asking the server
/// for pages of `page` heartbeats and following its cursor to the end; the number of heartbeats.
fn export(
    target: &Target,
    id: &str,
    from: Option<i64>,
    to: Option<i64>,
    page: usize,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<u64, QueryError> {
    let name = match format {
        ExportFormat::Geojson => "geojson",
        ExportFormat::Gpx => "gpx",
        ExportFormat::Csv => "csv",
    };
    let mut base = format!(
        "/v1/devices/{}/history?format={name}&limit={page}",
        encode(id)
    );
    if let Some(f) = from {
        base.push_str(&format!("&from={f}"));
    }
    if let Some(t) = to {
        base.push_str(&format!("&to={t}"));
    }
    let io = |e: std::io::Error| QueryError::Network(format!("writing the export: {e}"));
    let broken = |what: &str| QueryError::Network(format!("the server's {name} page {what}"));
    let mut cursor: Option<String> = None;
    let mut count = 0u64;
    // GeoJSON: the track's coordinates, for the LineString written after the points.
    let mut track: Vec<[f64; 2]> = Vec::new();
    let (mut newest, mut oldest) = (None, None);
    loop {
        let first = cursor.is_none();
        let path = match &cursor {
            None => base.clone(),
            Some(c) => format!("{base}&cursor={}", encode(c)),
        };
        let body = target.get_text(&path)?;
        let next = match format {
            ExportFormat::Csv => {
                let mut records = csv_records(&body);
                let header = records.next().ok_or_else(|| broken("has no header"))?;
                let header = header
                    .strip_suffix(",cursor")
                    .ok_or_else(|| broken("has no cursor column"))?;
                if first {
                    write!(out, "{header}\r\n").map_err(io)?;
                }
                let mut next = None;
                for record in records {
                    let (row, c) = record
                        .rsplit_once(',')
                        .ok_or_else(|| broken("has a row without a cursor"))?;
                    write!(out, "{row}\r\n").map_err(io)?;
                    count += 1;
                    next = (!c.is_empty()).then(|| c.to_owned());
                }
                next
            }
            ExportFormat::Gpx => {
                let open = "<trkseg>\n";
                let start = body.find(open).ok_or_else(|| broken("has no track"))? + open.len();
                let end = body
                    .rfind("</trkseg>")
                    .ok_or_else(|| broken("has no track"))?;
                let next = body
                    .split_once("<geobeat:next>")
                    .and_then(|(_, rest)| rest.split_once("</geobeat:next>"))
                    .map(|(c, _)| c.to_owned());
                if first {
                    // The header without the page's cursor.
                    let head = &body[..start];
                    let head = match &next {
                        Some(c) => head.replace(
                            &format!("<extensions><geobeat:next>{c}</geobeat:next></extensions>"),
                            "",
                        ),
                        None => head.to_owned(),
                    };
                    out.write_all(head.as_bytes()).map_err(io)?;
                }
                let points = &body[start..end];
                count += points.matches("<trkpt ").count() as u64;
                out.write_all(points.as_bytes()).map_err(io)?;
                next
            }
            ExportFormat::Geojson => {
                let v: Value = serde_json::from_str(&body).map_err(|_| broken("is not JSON"))?;
                if first {
                    out.write_all(b"{\"type\":\"FeatureCollection\",\"features\":[\n")
                        .map_err(io)?;
                }
                let features = v["features"]
                    .as_array()
                    .ok_or_else(|| broken("has no features"))?;
                for f in features {
                    if f["geometry"]["type"] != "Point" {
                        continue;
                    }
                    let c = &f["geometry"]["coordinates"];
                    let (Some(lon), Some(lat)) = (c[0].as_f64(), c[1].as_f64()) else {
                        return Err(broken("has a point without coordinates"));
                    };
                    if count > 0 {
                        out.write_all(b",\n").map_err(io)?;
                    }
                    out.write_all(f.to_string().as_bytes()).map_err(io)?;
                    track.push([lon, lat]);
                    let ts = f["properties"]["ts"].as_i64();
                    newest = newest.or(ts);
                    oldest = ts.or(oldest);
                    count += 1;
                }
                v["next"].as_str().map(str::to_owned)
            }
        };
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    match format {
        ExportFormat::Csv => {}
        ExportFormat::Gpx => out.write_all(b"</trkseg></trk>\n</gpx>\n").map_err(io)?,
        ExportFormat::Geojson => {
            // A LineString needs two positions (RFC 7946 3.1.4).
            if track.len() >= 2 {
                let line = serde_json::json!({
                    "type": "Feature",
                    "geometry": {"type": "LineString", "coordinates": track},
                    "properties": {"id": id, "track": true, "count": track.len(), "ts_newest": newest, "ts_oldest": oldest},
                });
                write!(out, "{}{line}", if count > 0 { ",\n" } else { "" }).map_err(io)?;
            }
            out.write_all(b"\n]}\n").map_err(io)?;
        }
    }
    out.flush().map_err(io)?;
    Ok(count)
}

/// The records of an RFC 4180 text (CRLF-separated, quoted fields may hold CR and LF), each
/// without its line end.
fn csv_records(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut quoted = false;
        let b = rest.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'"' => quoted = !quoted,
                b'\r' if !quoted && b.get(i + 1) == Some(&b'\n') => break,
                _ => {}
            }
            i += 1;
        }
        let record = &rest[..i];
        rest = rest.get(i + 2..).unwrap_or("");
        Some(record)
    })
}

/// `ts`-style milliseconds as an RFC 3339 UTC time (also the `time` of the HTTP history
/// exports, so the command line and the server write times alike).
pub fn iso_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Aligned columns: a header row, then rows.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

fn num(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn location_rows(items: &[Value]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let near = items.iter().any(|v| v.get("distance_m").is_some());
    let mut header = vec![
        "id",
        "lat",
        "lon",
        "ts",
        "received_at",
        "speed",
        "heading",
        "acc",
    ];
    if near {
        header.push("distance_m");
    }
    let rows = items
        .iter()
        .map(|v| {
            let time = |k: &str| {
                v.get(k)
                    .and_then(Value::as_i64)
                    .map(iso_ms)
                    .unwrap_or_default()
            };
            let mut row = vec![
                v.get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                num(v, "lat"),
                num(v, "lon"),
                time("ts"),
                time("received_at"),
                num(v, "speed"),
                num(v, "heading"),
                num(v, "acc"),
            ];
            if near {
                row.push(
                    v.get("distance_m")
                        .and_then(Value::as_f64)
                        .map(|d| format!("{d:.1}"))
                        .unwrap_or_default(),
                );
            }
            row
        })
        .collect();
    (header, rows)
}

/// The table form of an answer.
fn render(what: &Query, v: &Value) -> String {
    match what {
        Query::Last { .. } => {
            let (h, r) = location_rows(std::slice::from_ref(v));
            table(&h, &r)
        }
        Query::History { .. } | Query::Bbox { .. } | Query::Near { .. } => {
            let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
            let (h, r) = location_rows(items);
            format!("{}\n({} rows)", table(&h, &r), items.len())
        }
        Query::Fences { name: None } => {
            let names: Vec<Vec<String>> = v
                .get("fences")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.get("name").and_then(Value::as_str))
                        .map(|n| vec![n.to_owned()])
                        .collect()
                })
                .unwrap_or_default();
            format!("{}\n({} fences)", table(&["name"], &names), names.len())
        }
        Query::Fences { name: Some(_) } => {
            let shape = v.get("shape").cloned().unwrap_or(Value::Null);
            format!(
                "{}\n{}",
                v.get("name").and_then(Value::as_str).unwrap_or_default(),
                serde_json::to_string_pretty(&shape).expect("a JSON value serializes")
            )
        }
        Query::Stats => {
            let mut rows = Vec::new();
            for e in v
                .get("executors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for s in e
                    .get("shards")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    rows.push(vec![
                        num(s, "shard"),
                        num(e, "executor"),
                        num(s, "devices"),
                        num(s, "entries"),
                        num(s, "segments"),
                        num(s, "log_bytes"),
                        num(s, "waiters"),
                    ]);
                }
            }
            format!(
                "uptime {}s, durability {}, {} connections, {} shards\n{}",
                v.get("uptime_s")
                    .and_then(Value::as_f64)
                    .map(|u| format!("{u:.0}"))
                    .unwrap_or_default(),
                v.get("durability")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                num(v, "connections_total"),
                num(v, "shard_count"),
                table(
                    &[
                        "shard",
                        "executor",
                        "devices",
                        "entries",
                        "segments",
                        "log_bytes",
                        "waiters"
                    ],
                    &rows
                )
            )
        }
        Query::Ready => {
            let failing = v
                .get("sinks_failing")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|s| !s.is_empty());
            match failing {
                Some(f) => format!("ready (sinks failing: {f})"),
                None => "ready".to_owned(),
            }
        }
        Query::Subscribe { .. } => String::new(),
    }
}

/// Subscribes over `/v1/subscribe` and prints events until the server closes the connection.
fn subscribe(
    target: &Target,
    devices: &Option<String>,
    bbox: &Option<String>,
    fence: &Option<String>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), QueryError> {
    let mut op = serde_json::json!({"op": "subscribe", "sub": "cli"});
    match (devices, bbox, fence) {
        (Some(d), _, _) => {
            op["devices"] = d
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        }
        (None, Some(b), _) => {
            let nums: Result<Vec<f64>, _> = b.split(',').map(|x| x.trim().parse::<f64>()).collect();
            match nums {
                Ok(n) if n.len() == 4 => op["bbox"] = n.into(),
                _ => {
                    return Err(QueryError::Usage(
                        "--bbox takes minLon,minLat,maxLon,maxLat".into(),
                    ))
                }
            }
        }
        (None, None, Some(f)) => op["fence"] = f.as_str().into(),
        (None, None, None) => {
            return Err(QueryError::Usage(
                "subscribe needs one of --devices, --bbox or --fence".into(),
            ))
        }
    }
    let stream = target.connect()?;
    let _ = stream.set_read_timeout(None);
    let url = format!(
        "ws://{}:{}{}/v1/subscribe",
        target.host, target.port, target.base
    );
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
        .map_err(|e| QueryError::Usage(format!("bad server URL: {e}")))?;
    let bearer = format!("Bearer {}", target.token)
        .parse()
        .map_err(|_| QueryError::Usage("the token is not a valid header value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    let (mut ws, _) = tungstenite::client(request, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            QueryError::Refused(format!(
                "the server refused the subscription: {} {body}",
                resp.status()
            ))
        }
        e => QueryError::Network(format!("subscribing: {e}")),
    })?;
    ws.send(tungstenite::Message::text(op.to_string()))
        .map_err(|e| QueryError::Network(format!("subscribing: {e}")))?;
    let io = |e: std::io::Error| QueryError::Network(format!("writing an event: {e}"));
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(QueryError::Network(format!("reading events: {e}"))),
        };
        let text = match msg {
            tungstenite::Message::Text(t) => t,
            tungstenite::Message::Close(frame) => {
                let why = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason));
                writeln!(
                    out,
                    "# closed by the server{}",
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                )
                .map_err(io)?;
                return Ok(());
            }
            _ => continue,
        };
        let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        if let Some(e) = v.get("error") {
            return Err(QueryError::Refused(format!(
                "the server refused the subscription: {e} {}",
                v.get("detail").and_then(Value::as_str).unwrap_or_default()
            )));
        }
        if v.get("ok").is_some() && !json {
            writeln!(out, "# subscribed; waiting for events (Ctrl-C ends)").map_err(io)?;
        } else if json || v.get("missed").is_some() || v.get("fence").is_some() {
            writeln!(out, "{text}").map_err(io)?;
        } else {
            let (_, rows) = location_rows(std::slice::from_ref(&v));
            writeln!(out, "{}", rows[0].join("  ").trim_end()).map_err(io)?;
        }
        out.flush().map_err(io)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_sources_resolve_in_order() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000").unwrap(),
            ("127.0.0.1".into(), 9000, String::new())
        );
        assert_eq!(
            parse_url("http://geo.example/api/").unwrap(),
            ("geo.example".into(), 80, "/api".into())
        );
        assert_eq!(
            parse_url("http://[::1]:81").unwrap(),
            ("::1".into(), 81, String::new())
        );
        for bad in ["127.0.0.1:80", "https://x", "http://:80", "http://h:x"] {
            let e = parse_url(bad).unwrap_err();
            assert!(matches!(e, QueryError::Usage(_)), "{bad}");
            assert!(e.to_string().contains("--url"), "{e}");
        }
        let args = |url: Option<&str>, token: Option<&str>| QueryArgs {
            url: url.map(Into::into),
            token: token.map(Into::into),
            config: None,
            json: false,
            what: Query::Stats,
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(&file, "url = \"http://f:1\"\ntoken = \"ft\"\n").unwrap();
        let f = file.display().to_string();
        let env = |k: &str| match k {
            CONFIG_ENV => Some(f.clone()),
            _ => None,
        };
        let t = resolve(&args(None, None), &env).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.token.as_str()), ("f", 1, "ft"));
        let env2 = |k: &str| match k {
            CONFIG_ENV => Some(f.clone()),
            URL_ENV => Some("http://e:2".into()),
            TOKEN_ENV => Some("et".into()),
            _ => None,
        };
        let t = resolve(&args(None, None), &env2).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.token.as_str()), ("e", 2, "et"));
        let t = resolve(&args(Some("http://a:3"), Some("at")), &env2).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.token.as_str()), ("a", 3, "at"));
        let none = |_: &str| None;
        let e = resolve(&args(None, None), &none).unwrap_err();
        assert!(e.to_string().contains("geobeat token ops"), "{e}");
        std::fs::write(&file, "tokn = \"x\"\n").unwrap();
        let e = resolve(&args(None, None), &env).unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
    }

    #[test]
    fn times_render_as_utc() {
        assert_eq!(iso_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_ms(1_732_200_000_123), "2024-11-21T14:40:00.123Z");
        assert_eq!(iso_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn csv_records_keep_quoted_line_ends() {
        let text = "a,b\r\n1,\"x\r\ny,\"\"z\"\"\",c1\r\n2,,c2\r\n";
        let got: Vec<&str> = csv_records(text).collect();
        assert_eq!(got, ["a,b", "1,\"x\r\ny,\"\"z\"\"\",c1", "2,,c2"]);
        assert_eq!(csv_records("").count(), 0);
    }

    #[test]
    fn encoding_keeps_ids_intact() {
        assert_eq!(encode("truck 7/ä"), "truck%207%2F%C3%A4");
        assert_eq!(encode("1.5,-2"), "1.5,-2");
    }
}
