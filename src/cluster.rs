//! `geobeat cluster status`: what an operator sees of a cluster (issue 17 item 6). It reads the
//! placement bucket (`GEOBEAT_PLACEMENT`: leases and claims, through `replicate::placement`'s
//! key formats and `replicate::blocking`'s client) and the streams (`$JS.API.STREAM.INFO`), reads
//! each node's `/metrics` at its advertise address for its replication lag (best effort), and
//! renders it as text or one JSON object; with `--haproxy-map` it writes HAProxy's unit map from
//! the live placement (atomically) and, with `--haproxy-socket`, pushes it through HAProxy's
//! runtime API. It owns none of the placement: it never writes the bucket, never claims, and its
//! judgement of liveness only reports (the nodes decide by their own clocks, see below).
//!
//! Liveness: a node re-puts its lease every `PLACEMENT_LEASE_INTERVAL`, and the nodes call a
//! lease dead when its revision has not moved for `PLACEMENT_DEAD_AFTER` by their own clocks.
//! This tool reads every lease twice, `CLUSTER_STATUS_WINDOW` apart: a lease whose revision
//! moved is *live*; one holding `-` *left* (a clean shutdown); one that did not move is *dead*
//! when the stream leader stored it at least `PLACEMENT_DEAD_AFTER` ago by its timestamp (the one
//! place a server's wall clock is compared with this machine's: the age is shown), and
//! *stalled* otherwise (the nodes call it dead within the rest of `PLACEMENT_DEAD_AFTER`).
//!
//! Invariant: exit 0 only when every unit has a claim whose node was seen live in the window;
//! any unit unplaced or owned by a node not seen live gives 1; NATS unreachable gives 2 and no
//! report; the map is written only from a completed read and names only live nodes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::ClusterStatusArgs;
use crate::limits::{
    CLUSTER_HAPROXY_SOCKET_TIMEOUT, CLUSTER_STATUS_CONNECT_WAIT, CLUSTER_STATUS_HTTP_TIMEOUT,
    CLUSTER_STATUS_METRICS_BYTES_MAX, CLUSTER_STATUS_UNITS_MAX, CLUSTER_STATUS_WINDOW,
    PLACEMENT_DEAD_AFTER, REPLICATE_VSHARDS_PER_SUBJECT, VSHARDS,
};
use crate::replicate::blocking::{parse_stored, Client};
use crate::replicate::placement::{self, Claim, LEAVING};
use crate::replicate::{self, Plan};

/// The map HAProxy loads in deploy/haproxy/haproxy.cfg (the runtime API names a map by it).
pub const HAPROXY_MAP_PATH_DEFAULT: &str = "/etc/haproxy/geobeat-units.map";
/// Rows of the HAProxy map: one per 64-vshard block (HAProxy computes `crc32c,mod(4096),div(64)`).
pub const HAPROXY_MAP_ROWS: usize = VSHARDS / REPLICATE_VSHARDS_PER_SUBJECT;

/// Why `cluster status` could not report (exit 2) or could not write the map (exit 3).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No server accepted a connection, or JetStream did not answer.
    #[error(
        "NATS unreachable at {urls}: {reason} (is nats-server running there? check --nats-url \
         or GEOBEAT_NATS_URL)"
    )]
    Unreachable {
        /// The configured URLs.
        urls: String,
        /// What failed.
        reason: String,
    },
    /// The map file could not be written.
    #[error("cannot write the HAProxy map {path}: {source}")]
    MapWrite {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// HAProxy's runtime API refused or did not answer.
    #[error("HAProxy runtime API at {path}: {reason} (is `stats socket {path} level admin` in haproxy.cfg?)")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

impl Error {
    /// The process exit status: 2 for NATS unreachable, 3 for the map.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Unreachable { .. } => 2,
            Error::MapWrite { .. } | Error::Socket { .. } => 3,
        }
    }
}

/// A node's liveness as judged from two reads of its lease (module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Its lease revision moved within the window.
    Live,
    /// Not moved in the window, but stored less than `PLACEMENT_DEAD_AFTER` ago.
    Stalled,
    /// Not moved, and stored at least `PLACEMENT_DEAD_AFTER` ago (or of unknown age).
    Dead,
    /// Its lease holds `-`: it shut down cleanly.
    Left,
}

/// What the status read of one node's `/metrics` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStats {
    /// Whether `/metrics` answered 200 in time.
    pub reachable: bool,
    /// The sum of `geobeat_replication_lag_bytes` over its shards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_lag_bytes: Option<u64>,
    /// The sum of `geobeat_view_lag_messages` over its streams: messages of other nodes not yet
    /// in its cluster-wide view (issue 17 item 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view_lag_messages: Option<u64>,
    /// The largest `geobeat_view_lag_seconds` over its streams: how far behind the newest
    /// stored message its view is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view_lag_seconds: Option<f64>,
    /// Why not, when not reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One node of the bucket.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeInfo {
    /// Its `--node-id`.
    pub id: String,
    /// Its advertise address (`-` once it left).
    pub addr: String,
    /// Its liveness.
    pub state: NodeState,
    /// Its lease's KV revision at the second read.
    pub lease_revision: u64,
    /// Age of its lease by the stream's timestamp and this machine's clock, ms (`None`:
    /// unknown).
    pub lease_age_ms: Option<u64>,
    /// Units whose claim names it.
    pub units: usize,
    /// Its `/metrics`, best effort (`None` for a node that left).
    pub stats: Option<NodeStats>,
}

/// Where a unit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitState {
    /// Claimed by a live node.
    Placed,
    /// Claimed by a node not seen live (stalled, dead, left or unknown).
    OwnerDown,
    /// Never claimed.
    Unplaced,
}

/// One unit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnitInfo {
    /// The unit (its first vshard).
    pub unit: u16,
    /// Its rank among the units (the assignment is rank mod live nodes).
    pub rank: usize,
    /// The node its claim names.
    pub node: Option<String>,
    /// The claim's epoch (0: never claimed).
    pub epoch: u64,
    /// Where it stands.
    pub state: UnitState,
    /// The live node the assignment rule gives it now (where it is, or is about to be).
    pub assigned: Option<String>,
}

/// One replica of a stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaInfo {
    /// The server's name.
    pub name: String,
    /// Whether it is current with the leader.
    pub current: bool,
    /// Whether the leader sees it offline.
    pub offline: bool,
    /// Operations it is behind the leader.
    pub lag: u64,
    /// Since the leader last heard from it, ms.
    pub active_ms: u64,
}

/// One stream (a `GEOBEAT_HB_<k>` or the bucket's).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamInfo {
    /// Its name.
    pub name: String,
    /// Messages held.
    pub messages: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The Raft leader's server name (`None`: no leader now).
    pub leader: Option<String>,
    /// The followers.
    pub replicas: Vec<ReplicaInfo>,
    /// Why its info could not be read (`None`: read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counts of the units.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnitSummary {
    /// Units known.
    pub total: usize,
    /// Units with a live owner.
    pub placed: usize,
    /// Units never claimed.
    pub unplaced: Vec<u16>,
    /// Units whose owner is not live.
    pub owner_down: Vec<u16>,
    /// Units whose claim names a live node other than the one the assignment gives them now
    /// (a node joined or came back: the claimant released them or is about to, the assigned
    /// node claims them within a lease interval or two).
    pub moving: Vec<u16>,
    /// Nodes seen live.
    pub live_nodes: usize,
}

/// Everything `cluster status` read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The NATS server that answered.
    pub nats: String,
    /// Time between the two lease reads, ms.
    pub window_ms: u64,
    /// Every unit has a live owner.
    pub ok: bool,
    /// The nodes, by id.
    pub nodes: Vec<NodeInfo>,
    /// The unit counts.
    pub summary: UnitSummary,
    /// Every unit, ascending.
    pub units: Vec<UnitInfo>,
    /// The streams.
    pub streams: Vec<StreamInfo>,
}

/// A lease as read.
struct Lease {
    revision: u64,
    addr: String,
    stored_ms: Option<u64>,
}

fn unreachable(urls: &[String], e: impl std::fmt::Display) -> Error {
    Error::Unreachable {
        urls: urls.join(","),
        reason: e.to_string(),
    }
}

/// Reads the lease of `id` (`None`: gone since the key list was read).
fn read_lease(client: &mut Client, id: &str) -> Result<Option<Lease>, replicate::Error> {
    let req = serde_json::json!({ "last_by_subj": placement::key_subject(&format!("lease.{id}")) });
    let subject = format!("$JS.API.STREAM.MSG.GET.{}", placement::bucket_stream());
    let v = match client.api(&subject, &req) {
        Ok(v) => v,
        Err(replicate::Error::Api {
            err_code: 10037, ..
        }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = parse_stored(&v)?;
    let stored_ms = v["message"]["time"]
        .as_str()
        .and_then(|t| crate::revoke::parse_time(t).ok());
    Ok(Some(Lease {
        revision: m.seq,
        addr: String::from_utf8_lossy(&m.data).into_owned(),
        stored_ms,
    }))
}

/// Every lease, by node id.
fn read_leases(client: &mut Client) -> Result<Vec<(String, Lease)>, replicate::Error> {
    let mut out = Vec::new();
    for id in placement::kv_keys(client, "lease.")? {
        if let Some(l) = read_lease(client, &id)? {
            out.push((id, l));
        }
    }
    Ok(out)
}

/// Every claim, by unit.
fn read_claims(client: &mut Client) -> Result<Vec<(u16, Claim)>, replicate::Error> {
    let mut out = Vec::new();
    for key in placement::kv_keys(client, "claim.")?
        .into_iter()
        .take(CLUSTER_STATUS_UNITS_MAX)
    {
        let Ok(u) = key.parse::<u16>() else { continue };
        if let Some((_, data)) = placement::kv_get(client, &format!("claim.{key}"))? {
            if let Ok(c) = serde_json::from_slice::<Claim>(&data) {
                out.push((u, c));
            }
        }
    }
    out.sort_by_key(|(u, _)| *u);
    Ok(out)
}

/// The geobeat streams (any stream whose subjects lie under `geobeat.hb.`) and the bucket's.
fn read_streams(client: &mut Client) -> Result<Vec<StreamInfo>, replicate::Error> {
    let v = client.api(
        "$JS.API.STREAM.NAMES",
        &serde_json::json!({ "subject": format!("{}>", replicate::SUBJECT_PREFIX) }),
    )?;
    let mut names: Vec<String> = v["streams"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| {
        (
            n.strip_prefix(replicate::STREAM_PREFIX)
                .and_then(|k| k.parse::<u32>().ok())
                .unwrap_or(u32::MAX),
            n.clone(),
        )
    });
    names.push(placement::bucket_stream());
    let mut out = Vec::new();
    for name in names {
        match client.stream_info(&name) {
            Ok(info) => out.push(stream_info(&name, &info)),
            Err(replicate::Error::Api {
                err_code: 10059, ..
            }) => {}
            Err(e @ replicate::Error::Api { .. }) | Err(e @ replicate::Error::Timeout { .. }) => {
                out.push(StreamInfo {
                    name,
                    messages: 0,
                    bytes: 0,
                    leader: None,
                    replicas: Vec::new(),
                    error: Some(e.to_string()),
                })
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A stream's `$JS.API.STREAM.INFO` answer, summarized.
fn stream_info(name: &str, info: &serde_json::Value) -> StreamInfo {
    let c = &info["cluster"];
    StreamInfo {
        name: name.to_string(),
        messages: info["state"]["messages"].as_u64().unwrap_or(0),
        bytes: info["state"]["bytes"].as_u64().unwrap_or(0),
        leader: c["leader"]
            .as_str()
            .filter(|l| !l.is_empty())
            .map(str::to_string),
        replicas: c["replicas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| ReplicaInfo {
                        name: r["name"].as_str().unwrap_or("").to_string(),
                        current: r["current"].as_bool().unwrap_or(false),
                        offline: r["offline"].as_bool().unwrap_or(false),
                        lag: r["lag"].as_u64().unwrap_or(0),
                        active_ms: r["active"].as_u64().unwrap_or(0) / 1_000_000,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        error: None,
    }
}

/// Reads `/metrics` at `addr` (best effort, [`CLUSTER_STATUS_HTTP_TIMEOUT`]).
pub fn node_stats(addr: &str) -> NodeStats {
    match read_metrics(addr) {
        Ok(text) => {
            let (view_lag_messages, view_lag_seconds) = view_lag(&text);
            NodeStats {
                reachable: true,
                replication_lag_bytes: Some(replication_lag(&text)),
                view_lag_messages,
                view_lag_seconds,
                error: None,
            }
        }
        Err(e) => NodeStats {
            reachable: false,
            replication_lag_bytes: None,
            view_lag_messages: None,
            view_lag_seconds: None,
            error: Some(e),
        },
    }
}

fn read_metrics(addr: &str) -> Result<String, String> {
    let sa = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("unreachable: {e}"))?
        .next()
        .ok_or("unreachable: the address resolves to nothing")?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, CLUSTER_STATUS_HTTP_TIMEOUT)
        .map_err(|e| format!("unreachable: {e}"))?;
    let _ = s.set_read_timeout(Some(CLUSTER_STATUS_HTTP_TIMEOUT));
    let _ = s.set_write_timeout(Some(CLUSTER_STATUS_HTTP_TIMEOUT));
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("unreachable: {e}"))?;
    let deadline = Instant::now() + CLUSTER_STATUS_HTTP_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    while Instant::now() < deadline && buf.len() < CLUSTER_STATUS_METRICS_BYTES_MAX {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => return Err(format!("unreachable: {e}")),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(200) => Ok(text),
        Some(c) => Err(format!("/metrics answered {c}")),
        None => Err("unreachable: no HTTP answer".into()),
    }
}

/// The sum of `geobeat_replication_lag_bytes` over a Prometheus exposition's lines.
pub fn replication_lag(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("geobeat_replication_lag_bytes{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v.max(0.0) as u64)
        .sum()
}

/// The view lag in a Prometheus exposition: the sum of `geobeat_view_lag_messages` and the
/// largest `geobeat_view_lag_seconds` over the streams (`None`: the node has no view, i.e. the
/// metric is absent).
pub fn view_lag(text: &str) -> (Option<u64>, Option<f64>) {
    let values = |name: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .collect()
    };
    let msgs = values("geobeat_view_lag_messages");
    let secs = values("geobeat_view_lag_seconds");
    (
        (!msgs.is_empty()).then(|| msgs.iter().map(|v| v.max(0.0) as u64).sum()),
        secs.into_iter().map(|v| v.max(0.0)).reduce(f64::max),
    )
}

/// The units: those of `--shards` when given, else every 64-vshard run plus any unit a claim
/// names.
fn unit_list(shards: Option<usize>, claims: &[(u16, Claim)]) -> Vec<u16> {
    let mut units: Vec<u16> =
        match shards.and_then(|n| crate::route::Router::contiguous(n as u32).ok()) {
            Some(router) => Plan::new(&router, &[], 1, 1).units().collect(),
            None => (0..VSHARDS)
                .step_by(REPLICATE_VSHARDS_PER_SUBJECT)
                .map(|v| v as u16)
                .chain(claims.iter().map(|(u, _)| *u))
                .collect(),
        };
    units.sort_unstable();
    units.dedup();
    units
}

/// The current wall clock, ms.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the cluster's state (module comment); [`Error::Unreachable`] when NATS does not answer.
pub fn read(urls: &[String], shards: Option<usize>) -> Result<Status, Error> {
    let addrs: Vec<String> = urls.iter().map(|u| replicate::url_addr(u)).collect();
    let mut client = Client::connect_until(&addrs, Instant::now() + CLUSTER_STATUS_CONNECT_WAIT)
        .map_err(|e| match e {
            replicate::Error::Unreachable { reason, .. } => unreachable(urls, reason),
            e => unreachable(urls, e),
        })?;
    let nats = client.addr().to_string();
    // No bucket yet: no node with --node-id ever started here; every unit is unplaced.
    let bucket = match client.stream_info(&placement::bucket_stream()) {
        Ok(_) => true,
        Err(replicate::Error::Api {
            err_code: 10059, ..
        }) => false,
        Err(e) => return Err(unreachable(urls, format!("JetStream at {nats}: {e}"))),
    };
    let fail = |e: replicate::Error| unreachable(urls, format!("JetStream at {nats}: {e}"));
    let t0 = Instant::now();
    let first = if bucket {
        read_leases(&mut client).map_err(fail)?
    } else {
        Vec::new()
    };
    let claims = if bucket {
        read_claims(&mut client).map_err(fail)?
    } else {
        Vec::new()
    };
    let streams = read_streams(&mut client).map_err(fail)?;
    if bucket {
        std::thread::sleep(CLUSTER_STATUS_WINDOW.saturating_sub(t0.elapsed()));
    }
    let window = t0.elapsed();
    let second = if bucket {
        read_leases(&mut client).map_err(fail)?
    } else {
        Vec::new()
    };
    let now = now_ms();
    let mut nodes: Vec<NodeInfo> = second
        .into_iter()
        .map(|(id, l)| {
            let moved = first
                .iter()
                .find(|(i, _)| *i == id)
                .is_none_or(|(_, f)| f.revision != l.revision);
            let age = l.stored_ms.map(|t| now.saturating_sub(t));
            let state = if l.addr == LEAVING {
                NodeState::Left
            } else if moved {
                NodeState::Live
            } else if age.is_some_and(|a| a < PLACEMENT_DEAD_AFTER.as_millis() as u64) {
                NodeState::Stalled
            } else {
                NodeState::Dead
            };
            NodeInfo {
                units: claims.iter().filter(|(_, c)| c.node == id).count(),
                id,
                addr: l.addr,
                state,
                lease_revision: l.revision,
                lease_age_ms: age,
                stats: None,
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    for n in nodes.iter_mut().filter(|n| n.state != NodeState::Left) {
        n.stats = Some(node_stats(&n.addr));
    }
    Ok(assemble(nats, window, nodes, &claims, shards, streams))
}

/// Puts the read parts together: unit states, the assignment among the live nodes, the summary.
fn assemble(
    nats: String,
    window: Duration,
    nodes: Vec<NodeInfo>,
    claims: &[(u16, Claim)],
    shards: Option<usize>,
    streams: Vec<StreamInfo>,
) -> Status {
    let live: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Live)
        .collect();
    let units: Vec<UnitInfo> = unit_list(shards, claims)
        .into_iter()
        .enumerate()
        .map(|(rank, u)| {
            let claim = claims.iter().find(|(c, _)| *c == u).map(|(_, c)| c);
            let state = match claim {
                None => UnitState::Unplaced,
                Some(c) if live.iter().any(|n| n.id == c.node) => UnitState::Placed,
                Some(_) => UnitState::OwnerDown,
            };
            UnitInfo {
                unit: u,
                rank,
                node: claim.map(|c| c.node.clone()),
                epoch: claim.map_or(0, |c| c.epoch),
                state,
                assigned: placement::assigned(rank, live.len()).map(|i| live[i].id.clone()),
            }
        })
        .collect();
    let pick = |s: UnitState| -> Vec<u16> {
        units
            .iter()
            .filter(|u| u.state == s)
            .map(|u| u.unit)
            .collect()
    };
    let summary = UnitSummary {
        total: units.len(),
        placed: units
            .iter()
            .filter(|u| u.state == UnitState::Placed)
            .count(),
        unplaced: pick(UnitState::Unplaced),
        owner_down: pick(UnitState::OwnerDown),
        moving: units
            .iter()
            .filter(|u| u.state == UnitState::Placed && u.node != u.assigned)
            .map(|u| u.unit)
            .collect(),
        live_nodes: live.len(),
    };
    Status {
        nats,
        window_ms: window.as_millis() as u64,
        ok: summary.placed == summary.total,
        nodes,
        summary,
        units,
        streams,
    }
}

/// A run-length list of units: `0-192` for consecutive ranks, commas between runs.
fn ranges(units: &[&UnitInfo]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < units.len() {
        let mut j = i;
        while j + 1 < units.len() && units[j + 1].rank == units[j].rank + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if i == j {
            out.push_str(&units[i].unit.to_string());
        } else {
            out.push_str(&format!("{}-{}", units[i].unit, units[j].unit));
        }
        i = j + 1;
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

impl Status {
    /// The exit status: 0 when every unit has a live owner, else 1; with `expect_nodes`, 1 also
    /// while fewer nodes are live or some unit is still moving (the placement has not settled).
    pub fn exit_code(&self, expect_nodes: Option<usize>) -> u8 {
        let settled = expect_nodes
            .is_none_or(|n| self.summary.live_nodes >= n && self.summary.moving.is_empty());
        if self.ok && settled {
            0
        } else {
            1
        }
    }

    /// The JSON form (docs/cluster.md "Cluster status").
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the status serializes")
    }

    /// The text form.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "cluster: {} ({} of {} units have a live owner; read through {}, leases read {} ms apart)",
            if self.ok { "OK" } else { "DEGRADED" },
            self.summary.placed,
            self.summary.total,
            self.nats,
            self.window_ms
        );
        let _ = writeln!(o, "\nnodes:");
        if self.nodes.is_empty() {
            let _ = writeln!(
                o,
                "  (none: no node with --node-id has a lease in the bucket)"
            );
        }
        for n in &self.nodes {
            let age = n
                .lease_age_ms
                .map_or("?".to_string(), |a| format!("{:.1}s", a as f64 / 1000.0));
            let stats = match &n.stats {
                None => String::new(),
                Some(NodeStats {
                    reachable: true,
                    replication_lag_bytes: Some(l),
                    view_lag_messages,
                    view_lag_seconds,
                    ..
                }) => match (view_lag_messages, view_lag_seconds) {
                    (Some(m), s) => format!(
                        "replication lag {l} B  view lag {m} msgs{}",
                        s.map_or(String::new(), |s| format!(" {s:.1}s"))
                    ),
                    _ => format!("replication lag {l} B"),
                },
                Some(s) => format!(
                    "stats unreachable ({})",
                    s.error.as_deref().unwrap_or("no answer")
                ),
            };
            let mine: Vec<&UnitInfo> = self
                .units
                .iter()
                .filter(|u| u.node.as_deref() == Some(&n.id))
                .collect();
            let epochs = match (
                mine.iter().map(|u| u.epoch).min(),
                mine.iter().map(|u| u.epoch).max(),
            ) {
                (Some(a), Some(b)) if a == b => format!("epoch {a}"),
                (Some(a), Some(b)) => format!("epochs {a}..{b}"),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "  {:<16} {:<22} {:<8} lease age {:<7} {} units {}  {}",
                n.id,
                n.addr,
                format!("{:?}", n.state).to_lowercase(),
                age,
                n.units,
                epochs,
                stats
            );
            if !mine.is_empty() {
                let _ = writeln!(o, "    units: {}", ranges(&mine));
            }
        }
        if !self.summary.unplaced.is_empty() {
            let down: Vec<&UnitInfo> = self
                .units
                .iter()
                .filter(|u| u.state == UnitState::Unplaced)
                .collect();
            let _ = writeln!(o, "\nunits never claimed: {}", ranges(&down));
        }
        if !self.summary.moving.is_empty() {
            let _ = writeln!(
                o,
                "\nunits moving to the node the assignment gives them (claimed by another live node): {}",
                self.summary.moving.len()
            );
        }
        if !self.summary.owner_down.is_empty() {
            let _ = writeln!(
                o,
                "\nunits whose owner is not live (not served until taken over):"
            );
            for u in self
                .units
                .iter()
                .filter(|u| u.state == UnitState::OwnerDown)
            {
                let _ = writeln!(
                    o,
                    "  unit {} owner {} epoch {} -> assigned {}",
                    u.unit,
                    u.node.as_deref().unwrap_or("-"),
                    u.epoch,
                    u.assigned.as_deref().unwrap_or("(no live node)")
                );
            }
        }
        let _ = writeln!(o, "\nstreams:");
        for s in &self.streams {
            if let Some(e) = &s.error {
                let _ = writeln!(o, "  {:<22} {e}", s.name);
                continue;
            }
            let reps: Vec<String> = s
                .replicas
                .iter()
                .map(|r| {
                    if r.offline {
                        format!("{} offline", r.name)
                    } else if r.current {
                        format!("{} current", r.name)
                    } else {
                        format!("{} behind {} ops", r.name, r.lag)
                    }
                })
                .collect();
            let _ = writeln!(
                o,
                "  {:<22} {:>9} msgs {:>12} B  leader {}  replicas: {}",
                s.name,
                s.messages,
                s.bytes,
                s.leader
                    .as_deref()
                    .unwrap_or("NONE (election or quorum lost)"),
                if reps.is_empty() {
                    "-".to_string()
                } else {
                    reps.join(", ")
                }
            );
        }
        o
    }

    /// HAProxy's unit map (deploy/haproxy/geobeat-units.map's format): for each 64-vshard block
    /// `b` (HAProxy's `crc32c,mod(4096),div(64)`), the backend of the unit starting at vshard
    /// `b * 64` (always a unit start): its owner when live, else the live node the assignment
    /// gives it; a block with neither is left out (HAProxy's default backend serves it).
    pub fn haproxy_map(&self) -> String {
        let mut o = String::from(
            "# geobeat unit map, written by `geobeat cluster status --haproxy-map` from the live\n\
             # placement (bucket GEOBEAT_PLACEMENT): key = vshard / 64 (HAProxy: crc32c,mod(4096),div(64)),\n\
             # value = be_<node id> (characters other than letters, digits and _ become _).\n",
        );
        for b in 0..HAPROXY_MAP_ROWS {
            let first = (b * REPLICATE_VSHARDS_PER_SUBJECT) as u16;
            let Some(u) = self.units.iter().find(|u| u.unit == first) else {
                continue;
            };
            let node = match u.state {
                UnitState::Placed => u.node.as_deref(),
                _ => u.assigned.as_deref(),
            };
            if let Some(n) = node {
                o.push_str(&format!("{b} {}\n", backend_name(n)));
            }
        }
        o
    }
}

/// The HAProxy backend of node `id`: `be_` + the id with anything but `[A-Za-z0-9_]` as `_`
/// (node `geobeat-a` is `be_geobeat_a`, as in deploy/haproxy/haproxy.cfg).
pub fn backend_name(id: &str) -> String {
    let mut s = String::from("be_");
    s.extend(id.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    s
}

/// Writes `text` to `path` atomically: a temporary file beside it, fsync, rename, fsync of the
/// directory; HAProxy (or a reload) never reads a half-written map.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), Error> {
    let err = |source| Error::MapWrite {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("not a file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// One runtime API command; the answer (HAProxy closes the connection after it).
fn haproxy_command(socket: &Path, cmd: &str) -> Result<String, Error> {
    let err = |reason: String| Error::Socket {
        path: socket.to_path_buf(),
        reason,
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| err(format!("cannot connect: {e}")))?;
    let _ = s.set_read_timeout(Some(CLUSTER_HAPROXY_SOCKET_TIMEOUT));
    let _ = s.set_write_timeout(Some(CLUSTER_HAPROXY_SOCKET_TIMEOUT));
    s.write_all(format!("{cmd}\n").as_bytes())
        .map_err(|e| err(format!("{cmd}: {e}")))?;
    let mut out = String::new();
    s.take(64 << 10)
        .read_to_string(&mut out)
        .map_err(|e| err(format!("{cmd}: {e}")))?;
    Ok(out)
}

/// Pushes every row of `map` into the map HAProxy loaded from `map_path`: `set map`, or `add
/// map` for a key HAProxy does not have yet. Returns the rows pushed.
pub fn push_map(socket: &Path, map_path: &str, map: &str) -> Result<usize, Error> {
    let mut n = 0;
    for line in map
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((key, value)) = line.split_once(' ') else {
            continue;
        };
        let answer = haproxy_command(socket, &format!("set map {map_path} {key} {value}"))?;
        if !answer.trim().is_empty() {
            let added = haproxy_command(socket, &format!("add map {map_path} {key} {value}"))?;
            if !added.trim().is_empty() {
                return Err(Error::Socket {
                    path: socket.to_path_buf(),
                    reason: format!(
                        "set map {map_path} {key}: {}; add map: {}",
                        answer.trim(),
                        added.trim()
                    ),
                });
            }
        }
        n += 1;
    }
    Ok(n)
}

/// `geobeat cluster status`: reads, prints (text or JSON) to `out`, writes and pushes the map
/// when asked; the exit status (module comment). Failures are one line on stderr.
pub fn run_status(args: &ClusterStatusArgs, out: &mut impl Write) -> u8 {
    let status = match read(&args.nats_url.0, args.shards) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("geobeat cluster status: {e}");
            return e.exit_code();
        }
    };
    let printed = if args.json {
        writeln!(out, "{}", status.to_json())
    } else {
        write!(out, "{}", status.render())
    };
    if let Err(e) = printed {
        eprintln!("geobeat cluster status: cannot write the report: {e}");
        return 1;
    }
    if args.haproxy_map.is_some() || args.haproxy_socket.is_some() {
        let map = status.haproxy_map();
        if let Some(path) = &args.haproxy_map {
            if let Err(e) = write_atomic(path, &map) {
                eprintln!("geobeat cluster status: {e}");
                return e.exit_code();
            }
        }
        if let Some(socket) = &args.haproxy_socket {
            let name = args
                .haproxy_map
                .as_ref()
                .map_or(HAPROXY_MAP_PATH_DEFAULT.to_string(), |p| {
                    p.display().to_string()
                });
            if let Err(e) = push_map(socket, &name, &map) {
                eprintln!("geobeat cluster status: {e}");
                return e.exit_code();
            }
        }
    }
    status.exit_code(args.expect_nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: NodeState) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            addr: format!("{id}:1"),
            state,
            lease_revision: 1,
            lease_age_ms: Some(0),
            units: 0,
            stats: None,
        }
    }

    fn claim(u: u16, n: &str, e: u64) -> (u16, Claim) {
        (
            u,
            Claim {
                node: n.into(),
                epoch: e,
            },
        )
    }

    #[test]
    fn units_of_a_dead_or_missing_owner_fail_and_the_map_names_only_live_nodes() {
        let claims: Vec<(u16, Claim)> = (0..64u16)
            .map(|r| claim(r * 64, if r % 2 == 0 { "a" } else { "b-2" }, 1))
            .collect();
        let both = vec![node("a", NodeState::Live), node("b-2", NodeState::Live)];
        let s = assemble("n".into(), Duration::ZERO, both, &claims, None, Vec::new());
        assert!(s.ok && s.exit_code(None) == 0 && s.exit_code(Some(2)) == 0);
        assert_eq!(s.exit_code(Some(3)), 1);
        assert_eq!(s.summary.total, 64);
        let map = s.haproxy_map();
        assert!(
            map.contains("\n0 be_a\n") && map.contains("\n1 be_b_2\n"),
            "{map}"
        );
        // b-2 dead: its units are owner_down, exit 1, and the map sends them to `a` (the only
        // live node: where the assignment puts them).
        let one = vec![node("a", NodeState::Live), node("b-2", NodeState::Dead)];
        let s = assemble("n".into(), Duration::ZERO, one, &claims, None, Vec::new());
        assert_eq!(s.exit_code(None), 1);
        assert_eq!(s.summary.owner_down.len(), 32);
        assert_eq!(s.summary.owner_down[0], 64);
        // a's own units stay where they are; nothing is "moving" while b's are owner_down.
        assert!(s.summary.moving.is_empty());
        // b back, c joined: units claimed by a or b but assigned to c are moving; live owners,
        // so exit 0, but not settled for a script expecting three nodes.
        let three = vec![
            node("a", NodeState::Live),
            node("b-2", NodeState::Live),
            node("c", NodeState::Live),
        ];
        let s3 = assemble("n".into(), Duration::ZERO, three, &claims, None, Vec::new());
        assert_eq!(s3.exit_code(None), 0);
        assert!(!s3.summary.moving.is_empty());
        assert_eq!(s3.exit_code(Some(3)), 1);
        let map = s.haproxy_map();
        let rows: Vec<&str> = map
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(' ').nth(1).unwrap())
            .collect();
        assert_eq!(rows.len(), 64);
        assert!(rows.iter().all(|b| *b == "be_a"));
        // A unit never claimed (and none live): unplaced, left out of the map.
        let s = assemble(
            "n".into(),
            Duration::ZERO,
            Vec::new(),
            &claims[..10],
            None,
            Vec::new(),
        );
        assert_eq!(s.summary.unplaced.len(), 54);
        assert_eq!(
            s.haproxy_map()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .count(),
            0
        );
        // With --shards 3 the units follow the shard boundaries (more than 64).
        let s = assemble(
            "n".into(),
            Duration::ZERO,
            Vec::new(),
            &[],
            Some(3),
            Vec::new(),
        );
        assert!(s.summary.total > 64);
    }

    #[test]
    fn view_lag_sums_messages_and_takes_the_largest_age() {
        let text = "geobeat_view_lag_messages{stream=\"GEOBEAT_HB_0\"} 2\n\
                    geobeat_view_lag_messages{stream=\"GEOBEAT_HB_1\"} 5\n\
                    geobeat_view_lag_seconds{stream=\"GEOBEAT_HB_0\"} 1.5\n\
                    geobeat_view_lag_seconds{stream=\"GEOBEAT_HB_1\"} 0.25\n\
                    geobeat_view_lag_messages_total 9\n";
        assert_eq!(view_lag(text), (Some(7), Some(1.5)));
        assert_eq!(
            view_lag("geobeat_replication_lag_bytes{shard=\"0\"} 1\n"),
            (None, None)
        );
    }

    #[test]
    fn lag_sums_the_shards_and_ranges_compress_consecutive_ranks() {
        let text = "# HELP x\ngeobeat_replication_lag_bytes{shard=\"0\"} 4096\n\
                    geobeat_replication_lag_bytes{shard=\"1\"} 10\ngeobeat_other 5\n";
        assert_eq!(replication_lag(text), 4106);
        let us: Vec<UnitInfo> = [0usize, 1, 2, 5]
            .iter()
            .map(|&r| UnitInfo {
                unit: (r * 64) as u16,
                rank: r,
                node: None,
                epoch: 0,
                state: UnitState::Unplaced,
                assigned: None,
            })
            .collect();
        let refs: Vec<&UnitInfo> = us.iter().collect();
        assert_eq!(ranges(&refs), "0-128,320");
        assert_eq!(backend_name("geobeat-a"), "be_geobeat_a");
    }
}
