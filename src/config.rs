//! Command line and configuration: the clap `Cli` (`serve`, `token`, `demo`, `sinks`) and the
//! resolution of every `serve` setting from its sources into a [`ServeConfig`] of concrete types,
//! including the storage sinks (`[[sinks]]` tables of the TOML file, see [`SinkConfig`]). It does
//! not act on settings (the server and the flusher do) and does not read the secret (see `auth`).
//!
//! Precedence, highest first: command-line flag, `GEOBEAT_*` environment variable, TOML file
//! (`--config`/`GEOBEAT_CONFIG`; flat, keys are the flag names with `_` for `-`), built-in
//! default. An empty environment variable counts as unset. Every source goes through the same
//! parser per setting, so a value means the same wherever it is given. Sinks come only from the
//! file (each is a table with several keys; a URL may carry a password).
//!
//! Invariant: a `ServeConfig` only exists with every value inside its bounds (the `limits`
//! constants, the open-file limit for `connections_max`); each error names the setting, the bad
//! value and where it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::{parse_ttl, resolve_secret, Secret, SecretError, SECRET_ENV};
pub use crate::limits::{AUDIT_ROTATE_BYTES_RANGE, AUDIT_ROTATE_SECS_RANGE};
use crate::limits::{
    COMMIT_ENTRIES_MAX_DEFAULT, COMMIT_INTERVAL_MS_DEFAULT, COMMIT_INTERVAL_MS_MAX,
    COMMIT_INTERVAL_MS_MIN, DEMO_DEVICES_MAX, DEMO_RATE_HZ_MAX, FRAME_BYTES_MAX, FRAME_BYTES_MIN,
    FRAME_HEARTBEATS_MAX, GROUP_ENTRIES_MAX, HANDSHAKE_TIMEOUT_MS_RANGE, IDLE_TIMEOUT_S_RANGE,
    MESH_CAPACITY_MAX, OPEN_FILES_RESERVE, PAGE_BYTES, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN, SHARDS_MAX, SINKS_MAX, SINK_BATCH_ROWS_MAX, SINK_NAME_BYTES_MAX,
    SINK_POLL_INTERVAL_MS_RANGE, ZSTD_LEVEL_RANGE,
};

/// Default listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// Default retention of log data.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 86_400);
/// Default most concurrent client connections.
pub const CONNECTIONS_MAX_DEFAULT: usize = 16_000;
/// Default time allowed from TCP accept to a completed WebSocket upgrade, ms.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 5000;
/// Default idle timeout, s.
pub const IDLE_TIMEOUT_S_DEFAULT: u64 = 60;
/// Default capacity of each cross-executor channel.
pub const MESH_CAPACITY_DEFAULT: usize = 1024;
/// Default log filter.
pub const LOG_LEVEL_DEFAULT: &str = "info";
/// Default simulated devices for `demo`.
pub const DEMO_DEVICES_DEFAULT: u32 = 1000;
/// Default unconsumed log bytes per shard (durable minus the slowest sink's cursor) above which
/// the server warns.
pub const SINK_BACKLOG_WARN_BYTES_DEFAULT: u64 = 1 << 30;
/// Default heartbeats per sink batch (one transaction, or one fsync of an audit file).
pub const SINK_BATCH_ROWS_DEFAULT: usize = 10_000;
/// Default pause of a sink that is caught up before it looks for new durable entries, ms.
pub const SINK_POLL_INTERVAL_MS_DEFAULT: u64 = 100;
/// Default zstd level of compressed audit files.
pub const ZSTD_LEVEL_DEFAULT: i32 = 3;
/// Default PostgreSQL schema of the sink tables.
pub const PG_SCHEMA_DEFAULT: &str = "public";
/// Default rotation window of an audit sink, seconds: a consumer sees a sealed file about a
/// minute after its first heartbeat (Event Hubs Capture's window is 1..15 minutes, default 5).
pub const AUDIT_ROTATE_SECS_DEFAULT: u64 = 60;
/// Default rotation size of an audit sink: 128 MiB keeps the time window in charge up to about
/// 2 MiB/s (some 8,000 heartbeats/s) per shard, and caps files at a size that is still quick to
/// read, upload or reprocess whole when a shard ingests far more.
pub const AUDIT_ROTATE_BYTES_DEFAULT: u64 = 128 << 20;

// Every default lies within the bounds `limits` sets for it.
const _: () = assert!(
    HANDSHAKE_TIMEOUT_MS_RANGE.0 <= HANDSHAKE_TIMEOUT_MS_DEFAULT
        && HANDSHAKE_TIMEOUT_MS_DEFAULT <= HANDSHAKE_TIMEOUT_MS_RANGE.1
);
const _: () = assert!(
    IDLE_TIMEOUT_S_RANGE.0 <= IDLE_TIMEOUT_S_DEFAULT
        && IDLE_TIMEOUT_S_DEFAULT <= IDLE_TIMEOUT_S_RANGE.1
);
const _: () = assert!(
    SINK_POLL_INTERVAL_MS_RANGE.0 <= SINK_POLL_INTERVAL_MS_DEFAULT
        && SINK_POLL_INTERVAL_MS_DEFAULT <= SINK_POLL_INTERVAL_MS_RANGE.1
);
const _: () =
    assert!(ZSTD_LEVEL_RANGE.0 <= ZSTD_LEVEL_DEFAULT && ZSTD_LEVEL_DEFAULT <= ZSTD_LEVEL_RANGE.1);
const _: () = assert!(DEMO_DEVICES_DEFAULT <= DEMO_DEVICES_MAX);
const _: () = assert!(MESH_CAPACITY_DEFAULT <= MESH_CAPACITY_MAX);
const _: () = assert!(SINK_BATCH_ROWS_DEFAULT <= SINK_BATCH_ROWS_MAX);
const _: () = assert!(
    AUDIT_ROTATE_SECS_RANGE.0 <= AUDIT_ROTATE_SECS_DEFAULT
        && AUDIT_ROTATE_SECS_DEFAULT <= AUDIT_ROTATE_SECS_RANGE.1
);
const _: () = assert!(
    AUDIT_ROTATE_BYTES_RANGE.0 <= AUDIT_ROTATE_BYTES_DEFAULT
        && AUDIT_ROTATE_BYTES_DEFAULT <= AUDIT_ROTATE_BYTES_RANGE.1
);

/// geobeat: durable location-heartbeat ingest for very large IoT fleets.
#[derive(Parser, Debug, Clone)]
#[command(name = "geobeat", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the ingest server.
    Serve(ServeArgs),
    /// Mint an access token and print it (only the token, on one line).
    Token(TokenArgs),
    /// Run the server together with simulated devices (a self-contained demonstration).
    Demo(DemoArgs),
    /// Print each storage sink's cursor and lag per shard (from the cursor files and the logs).
    Sinks(SinksArgs),
    /// Rewrite a data directory (offline) into another number of shards, losing nothing.
    Reshard(ReshardArgs),
    /// Rewrite a format-1 data directory (offline) for this build's routing (format 2).
    Migrate(MigrateArgs),
    /// Ask a running server: a device's last location or history, devices in an area,
    /// geofences, live events, stats.
    Query(crate::client::QueryArgs),
}

/// `reshard` settings.
#[derive(Args, Debug, Clone)]
pub struct ReshardArgs {
    /// Data directory to rewrite (the server must be stopped) [env: GEOBEAT_DATA_DIR]
    /// [default: ./shards]
    #[arg(long, value_name = "DIR", value_parser = parse_path)]
    pub data_dir: Option<PathBuf>,
    /// The new number of shards, 1..=256
    #[arg(long, value_name = "N", value_parser = parse_shards)]
    pub shards: usize,
    /// Segment file size of the new shards [default: that of the current newest segment]
    #[arg(long, value_name = "SIZE", value_parser = parse_segment_bytes)]
    pub segment_bytes: Option<u64>,
}

/// `migrate` settings.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Data directory to rewrite (the server must be stopped) [env: GEOBEAT_DATA_DIR]
    /// [default: ./shards]
    #[arg(long, value_name = "DIR", value_parser = parse_path)]
    pub data_dir: Option<PathBuf>,
    /// Segment file size of the new shards [default: that of the current newest segment]
    #[arg(long, value_name = "SIZE", value_parser = parse_segment_bytes)]
    pub segment_bytes: Option<u64>,
}

/// The data directory of an offline command: the flag, else `GEOBEAT_DATA_DIR`, else the default.
pub fn offline_data_dir(flag: Option<&PathBuf>) -> PathBuf {
    flag.cloned()
        .or_else(|| {
            std::env::var("GEOBEAT_DATA_DIR")
                .ok()
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(crate::auth::DATA_DIR_DEFAULT))
}

/// `sinks` settings.
#[derive(Args, Debug, Clone)]
pub struct SinksArgs {
    /// Data directory to inspect [env: GEOBEAT_DATA_DIR] [default: ./shards]
    #[arg(long, value_name = "DIR", value_parser = parse_path)]
    pub data_dir: Option<PathBuf>,
    /// TOML file whose `[[sinks]]` are listed even where they have no cursor yet
    /// [env: GEOBEAT_CONFIG]
    #[arg(long, value_name = "FILE", value_parser = parse_path)]
    pub config: Option<PathBuf>,
    /// Print JSON (one object with a `sinks` array) instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `serve` settings. Every one may also come from a `GEOBEAT_*` environment variable or the TOML
/// file; a flag always wins.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address for devices and the HTTP API [env: GEOBEAT_LISTEN] [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub listen: Option<SocketAddr>,
    /// Directory holding the shard logs and the secret [env: GEOBEAT_DATA_DIR] [default: ./shards]
    #[arg(long, value_name = "DIR", value_parser = parse_path)]
    pub data_dir: Option<PathBuf>,
    /// Executors (threads, one per core), 1..=256 [env: GEOBEAT_SHARDS] [default: available cores]
    #[arg(long, value_name = "N", value_parser = parse_shards)]
    pub shards: Option<usize>,
    /// TOML file with settings (flat keys named like the flags, `_` for `-`) [env: GEOBEAT_CONFIG]
    #[arg(long, value_name = "FILE", value_parser = parse_path)]
    pub config: Option<PathBuf>,
    /// File holding the token secret; otherwise GEOBEAT_SECRET, otherwise <data-dir>/secret
    /// (created, mode 0600) [env: GEOBEAT_SECRET_FILE]
    #[arg(long, value_name = "FILE", value_parser = parse_path)]
    pub secret_file: Option<PathBuf>,
    /// Size of each log segment file: bytes or KiB/MiB/GiB, a multiple of 4 KiB in 1 MiB..=4 GiB
    /// [env: GEOBEAT_SEGMENT_BYTES] [default: 64MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_segment_bytes)]
    pub segment_bytes: Option<u64>,
    /// Relaxed durability: background sync interval in ms, 1..=5. Strict durability: the longest
    /// a group waits when --commit-linger-us is set [env: GEOBEAT_COMMIT_INTERVAL_MS] [default: 2]
    #[arg(long, value_name = "MS", value_parser = parse_commit_interval_ms)]
    pub commit_interval_ms: Option<u64>,
    /// Most heartbeats per group commit, 1..=100000 [env: GEOBEAT_COMMIT_ENTRIES_MAX] [default: 1000]
    #[arg(long, value_name = "N", value_parser = parse_commit_entries_max)]
    pub commit_entries_max: Option<usize>,
    /// Strict durability: how long a group may wait to grow before its fdatasync starts, in µs,
    /// 0..=5000. 0 (adaptive): the next fdatasync starts as soon as the previous one completes,
    /// so a group is whatever arrived meanwhile — lowest latency, and groups grow with load
    /// [env: GEOBEAT_COMMIT_LINGER_US] [default: 0]
    #[arg(long, value_name = "US", value_parser = parse_commit_linger_us)]
    pub commit_linger_us: Option<u64>,
    /// Where a device connection lives: `migrate` hands its socket once to the executor that owns
    /// the device's shard; `forward` keeps it where it was accepted and forwards every frame over
    /// the channel mesh (gateways always forward) [env: GEOBEAT_ROUTING] [default: migrate]
    #[arg(long, value_name = "MODE", value_parser = parse_routing)]
    pub routing: Option<Routing>,
    /// strict: ack only once data is on stable storage; relaxed: ack once written to the mapped
    /// log (survives a process crash, not a power loss) [env: GEOBEAT_DURABILITY] [default: strict]
    #[arg(long, value_name = "MODE", value_parser = parse_durability)]
    pub durability: Option<Durability>,
    /// How long log data is kept: e.g. 12h, 7d, or `forever` [env: GEOBEAT_RETENTION]
    /// [default: 7d]
    #[arg(long, value_name = "AGE", value_parser = parse_retention)]
    pub retention: Option<Retention>,
    /// Most concurrent client connections; must leave 512 file descriptors under the open-file
    /// limit (ulimit -n) [env: GEOBEAT_CONNECTIONS_MAX] [default: 16000]
    #[arg(long, value_name = "N", value_parser = parse_connections_max)]
    pub connections_max: Option<usize>,
    /// Time from TCP accept to a completed WebSocket upgrade, in ms, 100..=60000
    /// [env: GEOBEAT_HANDSHAKE_TIMEOUT_MS] [default: 5000]
    #[arg(long, value_name = "MS", value_parser = parse_handshake_timeout_ms)]
    pub handshake_timeout_ms: Option<u64>,
    /// Close connections silent this long, in s, 2..=3600; the server pings at half of it
    /// [env: GEOBEAT_IDLE_TIMEOUT_S] [default: 60]
    #[arg(long, value_name = "S", value_parser = parse_idle_timeout_s)]
    pub idle_timeout_s: Option<u64>,
    /// Largest WebSocket message accepted (larger: close 1009): bytes or KiB, 1KiB..=64KiB
    /// [env: GEOBEAT_FRAME_BYTES_MAX] [default: 64KiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_frame_bytes_max)]
    pub frame_bytes_max: Option<usize>,
    /// Most heartbeats in one message, 1..=1000 [env: GEOBEAT_FRAME_HEARTBEATS_MAX]
    /// [default: 1000]
    #[arg(long, value_name = "N", value_parser = parse_frame_heartbeats_max)]
    pub frame_heartbeats_max: Option<usize>,
    /// Capacity of each channel between executors, 1..=65536 [env: GEOBEAT_MESH_CAPACITY]
    /// [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_mesh_capacity)]
    pub mesh_capacity: Option<usize>,
    /// Address for the Prometheus /metrics endpoint, or `off` [env: GEOBEAT_METRICS_LISTEN]
    /// [default: off]
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<MetricsListen>,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,geobeat=debug` [env: GEOBEAT_LOG_LEVEL] [default: info]
    #[arg(long, value_name = "FILTER", value_parser = parse_log_level)]
    pub log_level: Option<String>,
    /// Log line format on stderr: `text` (colours only when stderr is a terminal and NO_COLOR is
    /// unset) or `json` (one object per line, for log shippers) [env: GEOBEAT_LOG_FORMAT]
    /// [default: text]
    #[arg(long, value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// Warn when a shard's log holds more than this many bytes not yet consumed by every sink:
    /// bytes or KiB/MiB/GiB, or `off` [env: GEOBEAT_SINK_BACKLOG_WARN_BYTES] [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_byte_limit)]
    pub sink_backlog_warn_bytes: Option<ByteLimit>,
    /// Stop acknowledging heartbeats of a shard whose log holds more than this many bytes not yet
    /// consumed by every sink: bytes or KiB/MiB/GiB, or `off`
    /// [env: GEOBEAT_SINK_BACKLOG_MAX_BYTES] [default: off]
    #[arg(long, value_name = "SIZE", value_parser = parse_byte_limit)]
    pub sink_backlog_max_bytes: Option<ByteLimit>,
    /// Create a new data directory (and its secret) if DIR has no `geobeat.meta`. Without it a
    /// missing data directory, or a secret missing from an existing one, is an error: a removed
    /// or unmounted directory never silently becomes an empty one. Idempotent, but meant for the
    /// first start only (a flag, never read from the environment or the file)
    #[arg(long)]
    pub init: bool,
}

/// `demo` settings: everything `serve` takes, plus the simulated fleet.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Server settings.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Simulated devices, 1..=1000000
    #[arg(long, value_name = "N", default_value_t = DEMO_DEVICES_DEFAULT, value_parser = parse_demo_devices)]
    pub devices: u32,
    /// Heartbeats per second sent by each simulated device, > 0 and <= 100
    #[arg(long, value_name = "HZ", default_value_t = 1.0, value_parser = parse_demo_rate_hz)]
    pub rate_hz: f64,
}

/// `token` settings.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The kind of token.
    #[command(subcommand)]
    pub kind: TokenKind,
    /// Lifetime: a number with unit s, m, h or d (e.g. 30d)
    /// [default: 365d; ops: 30d]
    #[arg(long, global = true, value_name = "TTL")]
    pub ttl: Option<String>,
    /// Secret file to sign with [env: GEOBEAT_SECRET_FILE]; otherwise GEOBEAT_SECRET, otherwise
    /// <data-dir>/secret (created, mode 0600, if missing)
    #[arg(long, global = true, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Data directory whose `secret` file is used [env: GEOBEAT_DATA_DIR] [default: ./shards]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Token kinds for `geobeat token`.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// A device token: ingest as exactly this device
    Device {
        /// The device id (1..=64 bytes, no control characters)
        id: String,
    },
    /// A gateway token: ingest for every device whose id starts with PREFIX
    Gateway {
        /// The device-id prefix (may be empty: all devices)
        prefix: String,
    },
    /// An ops token: read any device's state, admin endpoints
    Ops,
    /// A subscriber token: read devices whose id starts with PREFIX
    Subscriber {
        /// The device-id prefix (may be empty: all devices)
        prefix: String,
    },
}

/// When an ingest is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Ack once the data is on stable storage.
    Strict,
    /// Ack once written to the mapped log (survives a process crash, not a power loss).
    Relaxed,
}

/// How log lines are written (see `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where device connections live (see `--routing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Hand the socket to the executor owning the device's shard.
    Migrate,
    /// Keep it on the accepting executor; forward frames.
    Forward,
}

/// How long log data is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Data older than this may be deleted.
    For(Duration),
    /// Never delete.
    Forever,
}

/// A byte budget that may be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteLimit {
    /// This many bytes.
    Bytes(u64),
    /// No limit.
    Off,
}

impl ByteLimit {
    fn bytes(self) -> Option<u64> {
        match self {
            ByteLimit::Bytes(b) => Some(b),
            ByteLimit::Off => None,
        }
    }
}

/// One storage sink: where the flusher copies every durable heartbeat, at least once.
#[derive(Clone, PartialEq)]
pub struct SinkConfig {
    /// Unique name (1..=32 of `a-z 0-9 _ -`): names the cursor files and the status rows.
    pub name: String,
    /// What kind of sink and its own settings.
    pub kind: SinkKind,
    /// Most heartbeats per batch (one transaction, or one fsync of an audit file).
    pub batch_rows: usize,
    /// Pause when caught up before looking for new durable entries.
    pub poll_interval: Duration,
}

/// The kinds of sinks.
#[derive(Clone, PartialEq)]
pub enum SinkKind {
    /// Newline-delimited JSON files per shard under `dir`, one per rotation window.
    Audit {
        /// Root directory of the audit files.
        dir: PathBuf,
        /// Whether files are zstd-compressed.
        compress: Compression,
        /// When a new file starts.
        rotate: Rotation,
    },
    /// A PostgreSQL database (`history` and `last_location` tables).
    Postgres {
        /// Connection string (URL or `key=value` form, as the `postgres` crate accepts).
        url: String,
        /// Schema holding the tables (created if absent).
        schema: String,
    },
}

/// When an audit sink starts a new file (see `flusher::audit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Length of the time windows (aligned to the Unix epoch) of `received_at`, seconds.
    pub window_secs: u64,
    /// A file that holds this many bytes (on disk, compressed if so) takes no more batches.
    pub bytes: u64,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            window_secs: AUDIT_ROTATE_SECS_DEFAULT,
            bytes: AUDIT_ROTATE_BYTES_DEFAULT,
        }
    }
}

/// Parses an audit rotation window: a whole number of seconds, optionally with the unit `s`, `m`
/// or `h` (`"60s"`, `"5m"`, `"1h"`), within [`AUDIT_ROTATE_SECS_RANGE`].
pub fn parse_rotate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let expected = "expected a duration such as \"60s\", \"5m\" or \"1h\"";
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(expected.into()),
    };
    let n: u64 = digits.parse().map_err(|_| expected.to_string())?;
    let secs = n.saturating_mul(mult);
    let (min, max) = AUDIT_ROTATE_SECS_RANGE;
    if !(min..=max).contains(&secs) {
        return Err(format!("must be {min}s..={max}s"));
    }
    Ok(secs)
}

/// Compression of audit files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain text (`.ndjson`).
    None,
    /// zstd frames (`.ndjson.zst`).
    Zstd {
        /// Compression level.
        level: i32,
    },
}

impl SinkKind {
    /// The kind's name as written in the file (`audit`, `postgres`).
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Audit { .. } => "audit",
            SinkKind::Postgres { .. } => "postgres",
        }
    }
}

/// `url` with any password replaced by `***` (URL userinfo or a `password=` pair), for logs.
pub fn redact_url(url: &str) -> String {
    if let Some(at) = url.find("://").map(|i| i + 3) {
        let rest = &url[at..];
        let host_start = rest.find('@');
        let slash = rest.find('/').unwrap_or(rest.len());
        if let Some(h) = host_start.filter(|&h| h < slash) {
            if let Some(colon) = rest[..h].find(':') {
                return format!("{}{}:***{}", &url[..at], &rest[..colon], &rest[h..]);
            }
        }
        return url.to_string();
    }
    url.split(' ')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.trim() == "password" => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl std::fmt::Debug for SinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkKind::Audit {
                dir,
                compress,
                rotate,
            } => f
                .debug_struct("Audit")
                .field("dir", dir)
                .field("compress", compress)
                .field("rotate", rotate)
                .finish(),
            SinkKind::Postgres { url, schema } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("schema", schema)
                .finish(),
        }
    }
}

impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("batch_rows", &self.batch_rows)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// Whether and where to serve metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Serve `/metrics` on this address.
    On(SocketAddr),
    /// No metrics listener.
    Off,
}

/// Every `serve` setting resolved to concrete values.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Address for devices and the HTTP API.
    pub listen: SocketAddr,
    /// Directory of shard logs and the secret file.
    pub data_dir: PathBuf,
    /// Executors.
    pub shards: usize,
    /// Secret file, if configured (else `GEOBEAT_SECRET`, else `<data_dir>/secret`).
    pub secret_file: Option<PathBuf>,
    /// Segment file size, bytes.
    pub segment_bytes: u64,
    /// Group-commit interval.
    pub commit_interval: Duration,
    /// Most entries per group commit.
    pub commit_entries_max: usize,
    /// Strict mode: how long a group may wait to grow (zero: adaptive).
    pub commit_linger: Duration,
    /// Where device connections live.
    pub routing: Routing,
    /// Ack policy.
    pub durability: Durability,
    /// Data age after which it may be deleted; `None`: keep forever.
    pub retention: Option<Duration>,
    /// Most concurrent client connections.
    pub connections_max: usize,
    /// Accept-to-upgrade deadline.
    pub handshake_timeout: Duration,
    /// Silence after which a connection is closed (ping at half).
    pub idle_timeout: Duration,
    /// Largest WebSocket message, bytes.
    pub frame_bytes_max: usize,
    /// Most heartbeats per message.
    pub frame_heartbeats_max: usize,
    /// Capacity of each cross-executor channel.
    pub mesh_capacity: usize,
    /// Metrics listener address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter directives (validated).
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// `--init`: this start may create the data directory and its secret.
    pub init: bool,
    /// Storage sinks (`[[sinks]]` in the TOML file), in file order.
    pub sinks: Vec<SinkConfig>,
    /// Unconsumed bytes per shard above which to warn; `None`: never.
    pub sink_backlog_warn_bytes: Option<u64>,
    /// Unconsumed bytes per shard above which to stop acknowledging; `None`: never.
    pub sink_backlog_max_bytes: Option<u64>,
}

impl ServeConfig {
    /// When the server pings an idle connection: half the idle timeout.
    pub fn ping_interval(&self) -> Duration {
        self.idle_timeout / 2
    }

    /// The token secret per the documented source order (`secret_file`, `GEOBEAT_SECRET`,
    /// `<data_dir>/secret` created if missing), reading the process environment.
    pub fn load_secret(&self) -> Result<Secret, SecretError> {
        let env_secret = std::env::var(SECRET_ENV).ok().filter(|v| !v.is_empty());
        resolve_secret(
            self.secret_file.as_deref(),
            env_secret.as_deref(),
            &self.data_dir,
        )
    }
}

/// Why configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is malformed or out of bounds.
    #[error("invalid value {value:?} for {setting} (from {origin}): {reason}")]
    Invalid {
        /// The setting, as its flag (`--shards`).
        setting: &'static str,
        /// The value given.
        value: String,
        /// Where it came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The TOML file has a key that is not a setting.
    #[error("config file {}: unknown key `{key}` (known keys: {})", path.display(), known_keys())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// The TOML file does not parse.
    #[error("config file {}: {message}", path.display())]
    FileSyntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A `[[sinks]]` table is wrong.
    #[error("config file {}: [[sinks]] #{index}{}: {reason}", path.display(), name.as_deref().map(|n| format!(" ({n:?})")).unwrap_or_default())]
    Sink {
        /// The file.
        path: PathBuf,
        /// 1-based position of the table among the `[[sinks]]`.
        index: usize,
        /// The sink's name, when it has a readable one.
        name: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The TOML file cannot be read.
    #[error("config file {}: cannot read: {source}", path.display())]
    FileRead {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `connections_max` does not fit under the open-file limit.
    #[error(
        "--connections-max {connections_max} (from {origin}) needs {connections_max} + {OPEN_FILES_RESERVE} \
         reserved file descriptors, but the open-file limit (RLIMIT_NOFILE) is {limit}; lower \
         --connections-max to at most {} or raise the limit (ulimit -n)",
        limit.saturating_sub(OPEN_FILES_RESERVE)
    )]
    TooManyConnections {
        /// The configured value.
        connections_max: usize,
        /// Where it came from.
        origin: String,
        /// The current soft limit.
        limit: u64,
    },
}

/// One setting's names in each source.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Command-line flag.
    pub flag: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// TOML key (`None`: not settable from the file).
    pub key: Option<&'static str>,
}

macro_rules! settings {
    ($($id:ident => $flag:literal, $env:literal, $key:expr;)*) => {
        $(const $id: Setting = Setting { flag: $flag, env: $env, key: $key };)*
        /// Every `serve` setting, in `--help` order.
        pub const SETTINGS: &[Setting] = &[$($id),*];
    };
}

settings! {
    LISTEN => "--listen", "GEOBEAT_LISTEN", Some("listen");
    DATA_DIR => "--data-dir", "GEOBEAT_DATA_DIR", Some("data_dir");
    SHARDS => "--shards", "GEOBEAT_SHARDS", Some("shards");
    CONFIG => "--config", "GEOBEAT_CONFIG", None;
    SECRET_FILE => "--secret-file", "GEOBEAT_SECRET_FILE", Some("secret_file");
    SEGMENT_BYTES => "--segment-bytes", "GEOBEAT_SEGMENT_BYTES", Some("segment_bytes");
    COMMIT_INTERVAL_MS => "--commit-interval-ms", "GEOBEAT_COMMIT_INTERVAL_MS", Some("commit_interval_ms");
    COMMIT_ENTRIES_MAX_S => "--commit-entries-max", "GEOBEAT_COMMIT_ENTRIES_MAX", Some("commit_entries_max");
    COMMIT_LINGER_US => "--commit-linger-us", "GEOBEAT_COMMIT_LINGER_US", Some("commit_linger_us");
    ROUTING => "--routing", "GEOBEAT_ROUTING", Some("routing");
    DURABILITY => "--durability", "GEOBEAT_DURABILITY", Some("durability");
    RETENTION => "--retention", "GEOBEAT_RETENTION", Some("retention");
    CONNECTIONS_MAX => "--connections-max", "GEOBEAT_CONNECTIONS_MAX", Some("connections_max");
    HANDSHAKE_TIMEOUT_MS => "--handshake-timeout-ms", "GEOBEAT_HANDSHAKE_TIMEOUT_MS", Some("handshake_timeout_ms");
    IDLE_TIMEOUT_S => "--idle-timeout-s", "GEOBEAT_IDLE_TIMEOUT_S", Some("idle_timeout_s");
    FRAME_BYTES_MAX_S => "--frame-bytes-max", "GEOBEAT_FRAME_BYTES_MAX", Some("frame_bytes_max");
    FRAME_HEARTBEATS_MAX_S => "--frame-heartbeats-max", "GEOBEAT_FRAME_HEARTBEATS_MAX", Some("frame_heartbeats_max");
    MESH_CAPACITY => "--mesh-capacity", "GEOBEAT_MESH_CAPACITY", Some("mesh_capacity");
    METRICS_LISTEN => "--metrics-listen", "GEOBEAT_METRICS_LISTEN", Some("metrics_listen");
    LOG_LEVEL => "--log-level", "GEOBEAT_LOG_LEVEL", Some("log_level");
    LOG_FORMAT => "--log-format", "GEOBEAT_LOG_FORMAT", Some("log_format");
    SINK_BACKLOG_WARN_BYTES => "--sink-backlog-warn-bytes", "GEOBEAT_SINK_BACKLOG_WARN_BYTES", Some("sink_backlog_warn_bytes");
    SINK_BACKLOG_MAX_BYTES => "--sink-backlog-max-bytes", "GEOBEAT_SINK_BACKLOG_MAX_BYTES", Some("sink_backlog_max_bytes");
}

/// The TOML key of the sink tables (an array of tables, not a flat setting).
pub const SINKS_KEY: &str = "sinks";

fn known_keys() -> String {
    let mut keys = SETTINGS.iter().filter_map(|s| s.key).collect::<Vec<_>>();
    keys.push("[[sinks]]");
    keys.join(", ")
}

/// The inputs besides the flags, passed in so resolution is a pure function (tests pass maps).
pub struct Sources<'a> {
    /// Environment lookup (empty values count as unset).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The TOML file's path (for messages) and text, if any.
    pub file: Option<(&'a Path, &'a str)>,
    /// The open-file soft limit (`RLIMIT_NOFILE`).
    pub open_files_limit: u64,
    /// Cores available (the default for `shards`).
    pub cores: usize,
}

/// Where a value came from.
enum Origin<'a> {
    Flag,
    Env(&'static str),
    File(&'a Path, &'static str),
    Default,
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag => f.write_str("the command line"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File(path, key) => write!(f, "key `{key}` in {}", path.display()),
            Origin::Default => f.write_str("the default"),
        }
    }
}

/// The parsed TOML file as setting key -> value text, plus the sink tables.
struct FileValues<'a> {
    path: &'a Path,
    table: toml::Table,
    sinks: Vec<SinkConfig>,
}

impl<'a> FileValues<'a> {
    fn parse(path: &'a Path, text: &str) -> Result<FileValues<'a>, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::FileSyntax {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
        let sinks = match table.remove(SINKS_KEY) {
            Some(value) => parse_sinks(path, value)?,
            None => Vec::new(),
        };
        if let Some(key) = table
            .keys()
            .find(|k| !SETTINGS.iter().any(|s| s.key == Some(k.as_str())))
        {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            });
        }
        Ok(FileValues { path, table, sinks })
    }

    /// The value of `key` as text (strings as is, numbers and booleans printed).
    fn get(&self, setting: &Setting) -> Result<Option<String>, ConfigError> {
        let Some(key) = setting.key else {
            return Ok(None);
        };
        let Some(value) = self.table.get(key) else {
            return Ok(None);
        };
        match value {
            toml::Value::String(s) => Ok(Some(s.clone())),
            toml::Value::Integer(i) => Ok(Some(i.to_string())),
            toml::Value::Float(x) => Ok(Some(x.to_string())),
            toml::Value::Boolean(b) => Ok(Some(b.to_string())),
            other => Err(ConfigError::Invalid {
                setting: setting.flag,
                value: other.to_string(),
                origin: Origin::File(self.path, key).to_string(),
                reason: "expected a string or a number".into(),
            }),
        }
    }
}

struct Resolver<'a> {
    sources: &'a Sources<'a>,
    file: Option<FileValues<'a>>,
}

impl<'a> Resolver<'a> {
    /// The highest-precedence value of one setting, with its origin.
    fn pick<T: Clone>(
        &self,
        s: &Setting,
        flag: &Option<T>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<(T, Origin<'a>)>, ConfigError> {
        if let Some(v) = flag {
            return Ok(Some((v.clone(), Origin::Flag)));
        }
        let invalid = |value: String, origin: &Origin<'_>, reason: String| ConfigError::Invalid {
            setting: s.flag,
            value,
            origin: origin.to_string(),
            reason,
        };
        if let Some(text) = (self.sources.env)(s.env).filter(|v| !v.is_empty()) {
            let origin = Origin::Env(s.env);
            return match parse(&text) {
                Ok(v) => Ok(Some((v, origin))),
                Err(reason) => Err(invalid(text, &origin, reason)),
            };
        }
        if let Some(file) = &self.file {
            if let Some(text) = file.get(s)? {
                let origin = Origin::File(file.path, s.key.expect("file values have keys"));
                return match parse(&text) {
                    Ok(v) => Ok(Some((v, origin))),
                    Err(reason) => Err(invalid(text, &origin, reason)),
                };
            }
        }
        Ok(None)
    }

    fn get<T: Clone>(
        &self,
        s: &Setting,
        flag: &Option<T>,
        parse: fn(&str) -> Result<T, String>,
        default: T,
    ) -> Result<T, ConfigError> {
        Ok(self.pick(s, flag, parse)?.map_or(default, |(v, _)| v))
    }
}

impl ServeArgs {
    /// The config file path: `--config`, else `GEOBEAT_CONFIG`.
    pub fn config_path(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        self.config
            .clone()
            .or_else(|| env(CONFIG.env).filter(|v| !v.is_empty()).map(PathBuf::from))
    }

    /// Resolves every setting from the flags (`self`) and `sources`.
    pub fn resolve(&self, sources: &Sources<'_>) -> Result<ServeConfig, ConfigError> {
        let file = match sources.file {
            Some((path, text)) => Some(FileValues::parse(path, text)?),
            None => None,
        };
        let r = Resolver { sources, file };
        let connections = r.pick(
            &CONNECTIONS_MAX,
            &self.connections_max,
            parse_connections_max,
        )?;
        let (connections_max, connections_origin) =
            connections.unwrap_or((CONNECTIONS_MAX_DEFAULT, Origin::Default));
        let limit = sources.open_files_limit;
        if (connections_max as u64).saturating_add(OPEN_FILES_RESERVE) > limit {
            return Err(ConfigError::TooManyConnections {
                connections_max,
                origin: connections_origin.to_string(),
                limit,
            });
        }
        let retention = r.get(
            &RETENTION,
            &self.retention,
            parse_retention,
            Retention::For(RETENTION_DEFAULT),
        )?;
        let metrics = r.get(
            &METRICS_LISTEN,
            &self.metrics_listen,
            parse_metrics_listen,
            MetricsListen::Off,
        )?;
        let backlog_warn = r
            .get(
                &SINK_BACKLOG_WARN_BYTES,
                &self.sink_backlog_warn_bytes,
                parse_byte_limit,
                ByteLimit::Bytes(SINK_BACKLOG_WARN_BYTES_DEFAULT),
            )?
            .bytes();
        let backlog_max = r.pick(
            &SINK_BACKLOG_MAX_BYTES,
            &self.sink_backlog_max_bytes,
            parse_byte_limit,
        )?;
        if let (Some(warn), Some((ByteLimit::Bytes(max), origin))) = (backlog_warn, &backlog_max) {
            if *max < warn {
                return Err(ConfigError::Invalid {
                    setting: SINK_BACKLOG_MAX_BYTES.flag,
                    value: max.to_string(),
                    origin: origin.to_string(),
                    reason: format!(
                        "must be at least --sink-backlog-warn-bytes ({warn} bytes), or `off`"
                    ),
                });
            }
        }
        let backlog_max = backlog_max.and_then(|(limit, _)| limit.bytes());
        let sinks = r.file.as_ref().map(|f| f.sinks.clone()).unwrap_or_default();
        Ok(ServeConfig {
            init: self.init,
            listen: r.get(
                &LISTEN,
                &self.listen,
                parse_socket_addr,
                LISTEN_DEFAULT.parse().expect("default address parses"),
            )?,
            data_dir: r.get(
                &DATA_DIR,
                &self.data_dir,
                parse_path,
                PathBuf::from(crate::auth::DATA_DIR_DEFAULT),
            )?,
            shards: r.get(
                &SHARDS,
                &self.shards,
                parse_shards,
                sources.cores.clamp(1, SHARDS_MAX),
            )?,
            secret_file: r
                .pick(&SECRET_FILE, &self.secret_file, parse_path)?
                .map(|(p, _)| p),
            segment_bytes: r.get(
                &SEGMENT_BYTES,
                &self.segment_bytes,
                parse_segment_bytes,
                SEGMENT_BYTES_DEFAULT,
            )?,
            commit_interval: Duration::from_millis(r.get(
                &COMMIT_INTERVAL_MS,
                &self.commit_interval_ms,
                parse_commit_interval_ms,
                COMMIT_INTERVAL_MS_DEFAULT,
            )?),
            commit_entries_max: r.get(
                &COMMIT_ENTRIES_MAX_S,
                &self.commit_entries_max,
                parse_commit_entries_max,
                COMMIT_ENTRIES_MAX_DEFAULT,
            )?,
            commit_linger: Duration::from_micros(r.get(
                &COMMIT_LINGER_US,
                &self.commit_linger_us,
                parse_commit_linger_us,
                0,
            )?),
            routing: r.get(&ROUTING, &self.routing, parse_routing, Routing::Migrate)?,
            durability: r.get(
                &DURABILITY,
                &self.durability,
                parse_durability,
                Durability::Strict,
            )?,
            retention: match retention {
                Retention::For(d) => Some(d),
                Retention::Forever => None,
            },
            connections_max,
            handshake_timeout: Duration::from_millis(r.get(
                &HANDSHAKE_TIMEOUT_MS,
                &self.handshake_timeout_ms,
                parse_handshake_timeout_ms,
                HANDSHAKE_TIMEOUT_MS_DEFAULT,
            )?),
            idle_timeout: Duration::from_secs(r.get(
                &IDLE_TIMEOUT_S,
                &self.idle_timeout_s,
                parse_idle_timeout_s,
                IDLE_TIMEOUT_S_DEFAULT,
            )?),
            frame_bytes_max: r.get(
                &FRAME_BYTES_MAX_S,
                &self.frame_bytes_max,
                parse_frame_bytes_max,
                FRAME_BYTES_MAX,
            )?,
            frame_heartbeats_max: r.get(
                &FRAME_HEARTBEATS_MAX_S,
                &self.frame_heartbeats_max,
                parse_frame_heartbeats_max,
                FRAME_HEARTBEATS_MAX,
            )?,
            mesh_capacity: r.get(
                &MESH_CAPACITY,
                &self.mesh_capacity,
                parse_mesh_capacity,
                MESH_CAPACITY_DEFAULT,
            )?,
            metrics_listen: match metrics {
                MetricsListen::On(a) => Some(a),
                MetricsListen::Off => None,
            },
            log_level: r.get(
                &LOG_LEVEL,
                &self.log_level,
                parse_log_level,
                LOG_LEVEL_DEFAULT.to_owned(),
            )?,
            log_format: r.get(
                &LOG_FORMAT,
                &self.log_format,
                parse_log_format,
                LogFormat::Text,
            )?,
            sinks,
            sink_backlog_warn_bytes: backlog_warn,
            sink_backlog_max_bytes: backlog_max,
        })
    }

    /// Resolves against the real process: environment, the config file (read from disk), the
    /// open-file limit (after raising the soft limit to the hard one, see
    /// [`raise_open_files_limit`]) and the available cores.
    pub fn load(&self) -> Result<ServeConfig, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let path = self.config_path(&env);
        let text = match &path {
            Some(p) => {
                Some(
                    std::fs::read_to_string(p).map_err(|source| ConfigError::FileRead {
                        path: p.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sources = Sources {
            env: &env,
            file: path.as_deref().zip(text.as_deref()),
            open_files_limit: raise_open_files_limit(),
            cores,
        };
        self.resolve(&sources)
    }
}

/// Raises the open-file soft limit to the hard limit (capped at 2^20) if it is lower, and
/// returns the soft limit in force afterwards (0 if it cannot be read).
pub fn raise_open_files_limit() -> u64 {
    const CAP: u64 = 1 << 20;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, owned `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let want = lim.rlim_max.min(CAP);
    if lim.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the valid `raised`; failure leaves the limit unchanged.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return want;
        }
    }
    lim.rlim_cur
}

// ---- per-setting parsers (shared by clap, the environment and the file) ----

fn parse_int<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    text: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    let v: T = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a whole number in {min}..={max}"))?;
    if v < min || v > max {
        return Err(format!("must be in {min}..={max}"));
    }
    Ok(v)
}

/// Parses a byte size: a whole number optionally followed by `KiB`, `MiB`, `GiB` (or `K`, `M`,
/// `G`, also binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err("expected a number of bytes, optionally with KiB, MiB or GiB".into()),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a number of bytes, optionally with KiB, MiB or GiB".to_string())?;
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:8080 or [::]:8080".to_string())
}

fn parse_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        Err("empty path".into())
    } else {
        Ok(PathBuf::from(text))
    }
}

fn parse_shards(text: &str) -> Result<usize, String> {
    parse_int(text, 1, SHARDS_MAX)
}

fn parse_segment_bytes(text: &str) -> Result<u64, String> {
    let v = parse_size(text)?;
    if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&v) {
        return Err("must be in 1MiB..=4GiB".into());
    }
    if v % PAGE_BYTES != 0 {
        return Err("must be a multiple of 4KiB".into());
    }
    Ok(v)
}

fn parse_commit_interval_ms(text: &str) -> Result<u64, String> {
    parse_int(text, COMMIT_INTERVAL_MS_MIN, COMMIT_INTERVAL_MS_MAX)
}

fn parse_commit_entries_max(text: &str) -> Result<usize, String> {
    parse_int(text, 1, GROUP_ENTRIES_MAX)
}

fn parse_commit_linger_us(text: &str) -> Result<u64, String> {
    parse_int(text, 0, 5000)
}

fn parse_routing(text: &str) -> Result<Routing, String> {
    match text.trim() {
        "migrate" => Ok(Routing::Migrate),
        "forward" => Ok(Routing::Forward),
        _ => Err("expected `migrate` or `forward`".into()),
    }
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    match text.trim() {
        "strict" => Ok(Durability::Strict),
        "relaxed" => Ok(Durability::Relaxed),
        _ => Err("expected `strict` or `relaxed`".into()),
    }
}

fn parse_retention(text: &str) -> Result<Retention, String> {
    if text.trim() == "forever" {
        return Ok(Retention::Forever);
    }
    parse_ttl(text)
        .map(Retention::For)
        .map_err(|e| format!("{}; or `forever`", e.reason))
}

fn parse_connections_max(text: &str) -> Result<usize, String> {
    parse_int(text, 1, usize::MAX)
}

fn parse_handshake_timeout_ms(text: &str) -> Result<u64, String> {
    parse_int(
        text,
        HANDSHAKE_TIMEOUT_MS_RANGE.0,
        HANDSHAKE_TIMEOUT_MS_RANGE.1,
    )
}

fn parse_idle_timeout_s(text: &str) -> Result<u64, String> {
    parse_int(text, IDLE_TIMEOUT_S_RANGE.0, IDLE_TIMEOUT_S_RANGE.1)
}

fn parse_frame_bytes_max(text: &str) -> Result<usize, String> {
    let v = parse_size(text)?;
    if !(FRAME_BYTES_MIN as u64..=FRAME_BYTES_MAX as u64).contains(&v) {
        return Err(format!(
            "must be in {FRAME_BYTES_MIN}..={FRAME_BYTES_MAX} bytes"
        ));
    }
    Ok(v as usize)
}

fn parse_frame_heartbeats_max(text: &str) -> Result<usize, String> {
    parse_int(text, 1, FRAME_HEARTBEATS_MAX)
}

fn parse_mesh_capacity(text: &str) -> Result<usize, String> {
    parse_int(text, 1, MESH_CAPACITY_MAX)
}

fn parse_metrics_listen(text: &str) -> Result<MetricsListen, String> {
    if text.trim() == "off" {
        return Ok(MetricsListen::Off);
    }
    parse_socket_addr(text)
        .map(MetricsListen::On)
        .map_err(|e| format!("{e}, or `off`"))
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `text` or `json`".into()),
    }
}

fn parse_log_level(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("not a log filter ({e})"))
}

fn parse_byte_limit(text: &str) -> Result<ByteLimit, String> {
    if text.trim() == "off" {
        return Ok(ByteLimit::Off);
    }
    match parse_size(text) {
        Ok(0) => Err("must be at least 1 byte, or `off`".into()),
        Ok(b) => Ok(ByteLimit::Bytes(b)),
        Err(e) => Err(format!("{e}, or `off`")),
    }
}

/// Reads only the `[[sinks]]` tables of a TOML configuration file (for `geobeat sinks`).
pub fn load_sinks(path: &Path) -> Result<Vec<SinkConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileRead {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(FileValues::parse(path, &text)?.sinks)
}

/// Whether `name` may name a sink: 1..=32 bytes of `a-z`, `0-9`, `_`, `-` (it becomes a file name).
pub fn valid_sink_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= SINK_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && name.len() <= 63
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Parses the `sinks` value: an array of tables, each one sink.
fn parse_sinks(path: &Path, value: toml::Value) -> Result<Vec<SinkConfig>, ConfigError> {
    let bad = |index: usize, name: Option<&str>, reason: String| ConfigError::Sink {
        path: path.to_path_buf(),
        index,
        name: name.map(str::to_owned),
        reason,
    };
    let toml::Value::Array(items) = value else {
        return Err(bad(
            0,
            None,
            "`sinks` must be an array of tables ([[sinks]])".into(),
        ));
    };
    if items.len() > SINKS_MAX {
        return Err(bad(
            items.len(),
            None,
            format!("at most {SINKS_MAX} sinks may be configured"),
        ));
    }
    let mut out: Vec<SinkConfig> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let index = i + 1;
        let toml::Value::Table(mut t) = item else {
            return Err(bad(index, None, "each sink must be a table".into()));
        };
        let take_str = |t: &mut toml::Table, key: &str| -> Result<Option<String>, String> {
            match t.remove(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(format!("`{key}` must be a string, not {other}")),
            }
        };
        let name = take_str(&mut t, "name").map_err(|r| bad(index, None, r))?;
        let Some(name) = name else {
            return Err(bad(index, None, "`name` is required".into()));
        };
        let err = |reason: String| bad(index, Some(&name), reason);
        if !valid_sink_name(&name) {
            return Err(err(format!(
                "`name` must be 1..={SINK_NAME_BYTES_MAX} characters of a-z, 0-9, `_`, `-`"
            )));
        }
        if out.iter().any(|s| s.name == name) {
            return Err(err("two sinks have this name".into()));
        }
        let kind = take_str(&mut t, "kind").map_err(&err)?;
        let take_int = |t: &mut toml::Table, key: &str, min: i64, max: i64| match t.remove(key) {
            None => Ok(None),
            Some(toml::Value::Integer(v)) if (min..=max).contains(&v) => Ok(Some(v)),
            Some(other) => Err(err(format!(
                "`{key}` must be a whole number in {min}..={max}, not {other}"
            ))),
        };
        let batch_rows = take_int(&mut t, "batch_rows", 1, SINK_BATCH_ROWS_MAX as i64)?
            .map_or(SINK_BATCH_ROWS_DEFAULT, |v| v as usize);
        let poll_ms = take_int(
            &mut t,
            "poll_interval_ms",
            SINK_POLL_INTERVAL_MS_RANGE.0 as i64,
            SINK_POLL_INTERVAL_MS_RANGE.1 as i64,
        )?
        .map_or(SINK_POLL_INTERVAL_MS_DEFAULT, |v| v as u64);
        let kind = match kind.as_deref() {
            Some("audit") => {
                let dir = take_str(&mut t, "dir").map_err(&err)?;
                let Some(dir) = dir.filter(|d| !d.is_empty()) else {
                    return Err(err("an audit sink needs `dir`".into()));
                };
                let level = take_int(
                    &mut t,
                    "zstd_level",
                    ZSTD_LEVEL_RANGE.0 as i64,
                    ZSTD_LEVEL_RANGE.1 as i64,
                )?
                .map_or(ZSTD_LEVEL_DEFAULT, |v| v as i32);
                let compress = match take_str(&mut t, "compress").map_err(&err)?.as_deref() {
                    None | Some("none") => Compression::None,
                    Some("zstd") => Compression::Zstd { level },
                    Some(other) => {
                        return Err(err(format!(
                            "`compress` must be \"none\" or \"zstd\", not {other:?}"
                        )))
                    }
                };
                let mut rotate = Rotation::default();
                match t.remove("rotate") {
                    None => {}
                    Some(toml::Value::String(v)) => {
                        rotate.window_secs =
                            parse_rotate(&v).map_err(|e| err(format!("`rotate` {v:?}: {e}")))?;
                    }
                    Some(toml::Value::Integer(v)) => {
                        rotate.window_secs = parse_rotate(&v.to_string())
                            .map_err(|e| err(format!("`rotate` {v}: {e}")))?;
                    }
                    Some(other) => {
                        return Err(err(format!(
                            "`rotate` must be a duration such as \"60s\", not {other}"
                        )))
                    }
                }
                let (bmin, bmax) = AUDIT_ROTATE_BYTES_RANGE;
                if let Some(v) = t.remove("rotate_bytes") {
                    let parsed = match &v {
                        toml::Value::String(text) => parse_size(text),
                        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
                        _ => Err("expected a size".into()),
                    };
                    rotate.bytes = parsed
                        .ok()
                        .filter(|b| (bmin..=bmax).contains(b))
                        .ok_or_else(|| {
                            err(format!(
                                "`rotate_bytes` must be a size in 1MiB..=16GiB (bytes, or with \
                                 KiB/MiB/GiB), not {v}"
                            ))
                        })?;
                }
                let dir = PathBuf::from(dir);
                if out
                    .iter()
                    .any(|s| matches!(&s.kind, SinkKind::Audit { dir: d, .. } if *d == dir))
                {
                    return Err(err("two audit sinks share this `dir`".into()));
                }
                SinkKind::Audit {
                    dir,
                    compress,
                    rotate,
                }
            }
            Some("postgres") => {
                let url = take_str(&mut t, "url").map_err(&err)?;
                let Some(url) = url.filter(|u| !u.is_empty()) else {
                    return Err(err("a postgres sink needs `url`".into()));
                };
                if let Err(e) = url.parse::<postgres::Config>() {
                    return Err(err(format!("`url` does not parse: {e}")));
                }
                let schema = take_str(&mut t, "schema")
                    .map_err(&err)?
                    .unwrap_or_else(|| PG_SCHEMA_DEFAULT.to_owned());
                if !valid_identifier(&schema) {
                    return Err(err(
                        "`schema` must be a lower-case SQL identifier (a-z, 0-9, `_`)".into(),
                    ));
                }
                SinkKind::Postgres { url, schema }
            }
            Some(other) => {
                return Err(err(format!(
                    "`kind` must be \"audit\" or \"postgres\", not {other:?}"
                )))
            }
            None => return Err(err("`kind` is required (\"audit\" or \"postgres\")".into())),
        };
        if let Some(key) = t.keys().next() {
            let known = match kind {
                SinkKind::Audit { .. } => {
                    "name, kind, dir, compress, zstd_level, rotate, rotate_bytes, batch_rows, \
                     poll_interval_ms"
                }
                SinkKind::Postgres { .. } => {
                    "name, kind, url, schema, batch_rows, poll_interval_ms"
                }
            };
            return Err(err(format!("unknown key `{key}` (known keys: {known})")));
        }
        out.push(SinkConfig {
            name,
            kind,
            batch_rows,
            poll_interval: Duration::from_millis(poll_ms),
        });
    }
    Ok(out)
}

fn parse_demo_devices(text: &str) -> Result<u32, String> {
    parse_int(text, 1, DEMO_DEVICES_MAX)
}

fn parse_demo_rate_hz(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| "expected a number of heartbeats per second".to_string())?;
    if !(v > 0.0 && v <= DEMO_RATE_HZ_MAX) {
        return Err(format!("must be > 0 and <= {DEMO_RATE_HZ_MAX}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::CommandFactory as _;

    use super::*;

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["geobeat", "serve"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("arguments parse").command {
            Command::Serve(a) => a,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    fn resolve(
        args: &ServeArgs,
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> Result<ServeConfig, ConfigError> {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| map.get(k).cloned();
        let sources = Sources {
            env: &lookup,
            file: file.map(|t| (Path::new("geobeat.toml"), t)),
            open_files_limit: 20_000,
            cores: 2,
        };
        args.resolve(&sources)
    }

    #[test]
    fn defaults_apply_without_sources() {
        // Nothing given: every documented default.
        let c = resolve(&ServeArgs::default(), &[], None).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./shards"));
        assert_eq!(c.shards, 2);
        assert_eq!(c.segment_bytes, 64 << 20);
        assert_eq!(c.commit_interval, Duration::from_millis(2));
        assert_eq!(c.commit_entries_max, 1000);
        assert_eq!(c.durability, Durability::Strict);
        assert_eq!(c.retention, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.connections_max, 16_000);
        assert_eq!(c.handshake_timeout, Duration::from_millis(5000));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.ping_interval(), Duration::from_secs(30));
        assert_eq!(c.frame_bytes_max, FRAME_BYTES_MAX);
        assert_eq!(c.frame_heartbeats_max, FRAME_HEARTBEATS_MAX);
        assert_eq!(c.mesh_capacity, 1024);
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.secret_file, None);
    }

    #[test]
    fn flag_beats_env_beats_file() {
        // The same setting from three sources: the flag wins, then env, then file.
        let file = "shards = 3\nmesh_capacity = 10\nretention = \"12h\"\n";
        let env = [("GEOBEAT_SHARDS", "5"), ("GEOBEAT_MESH_CAPACITY", "20")];
        let c = resolve(&serve_args(&["--shards", "7"]), &env, Some(file)).unwrap();
        assert_eq!(c.shards, 7);
        assert_eq!(c.mesh_capacity, 20);
        assert_eq!(c.retention, Some(Duration::from_secs(12 * 3600)));
        let c = resolve(&serve_args(&[]), &env, Some(file)).unwrap();
        assert_eq!(c.shards, 5);
        let c = resolve(&serve_args(&[]), &[("GEOBEAT_SHARDS", "")], Some(file)).unwrap();
        assert_eq!(c.shards, 3, "an empty variable counts as unset");
    }

    #[test]
    fn every_source_parses_the_same_forms() {
        // Sizes with units, `forever`, `off`, durability words, from env and file.
        let c = resolve(
            &serve_args(&[
                "--segment-bytes",
                "2MiB",
                "--metrics-listen",
                "127.0.0.1:9100",
            ]),
            &[
                ("GEOBEAT_RETENTION", "forever"),
                ("GEOBEAT_DURABILITY", "relaxed"),
            ],
            Some("frame_bytes_max = \"16KiB\"\nsecret_file = \"/etc/geobeat/secret\"\n"),
        )
        .unwrap();
        assert_eq!(c.segment_bytes, 2 << 20);
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9100".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(c.retention, None);
        assert_eq!(c.durability, Durability::Relaxed);
        assert_eq!(c.frame_bytes_max, 16 << 10);
        assert_eq!(c.secret_file, Some(PathBuf::from("/etc/geobeat/secret")));
    }

    #[test]
    fn bad_values_name_setting_value_and_origin() {
        // Errors carry the flag name, the bad text and where it came from.
        let err = resolve(
            &serve_args(&[]),
            &[("GEOBEAT_COMMIT_INTERVAL_MS", "9")],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--commit-interval-ms"), "{err}");
        assert!(err.contains("\"9\""), "{err}");
        assert!(err.contains("GEOBEAT_COMMIT_INTERVAL_MS"), "{err}");
        let err = resolve(&serve_args(&[]), &[], Some("segment_bytes = 12345\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--segment-bytes") && err.contains("geobeat.toml"),
            "{err}"
        );
        let err = resolve(&serve_args(&[]), &[], Some("listen = [1]\n")).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    setting: "--listen",
                    ..
                }
            ),
            "{err}"
        );
        for (var, bad) in [
            ("GEOBEAT_LISTEN", "localhost"),
            ("GEOBEAT_SHARDS", "0"),
            ("GEOBEAT_SHARDS", "257"),
            ("GEOBEAT_FRAME_BYTES_MAX", "1MiB"),
            ("GEOBEAT_FRAME_HEARTBEATS_MAX", "1001"),
            ("GEOBEAT_DURABILITY", "maybe"),
            ("GEOBEAT_RETENTION", "7"),
            ("GEOBEAT_LOG_LEVEL", "info,[["),
            ("GEOBEAT_IDLE_TIMEOUT_S", "1"),
        ] {
            assert!(
                resolve(&serve_args(&[]), &[(var, bad)], None).is_err(),
                "{var}={bad}"
            );
        }
        // Flags are checked by clap with the same parsers.
        let mut argv = vec!["geobeat", "serve", "--shards", "0"];
        assert!(Cli::try_parse_from(&argv).is_err());
        argv[3] = "4";
        assert!(Cli::try_parse_from(&argv).is_ok());
    }

    #[test]
    fn log_format_from_flag_env_and_file() {
        // `text` by default; `json` from the file, the environment or the flag (which wins);
        // anything else is an error naming the setting.
        assert_eq!(
            resolve(&serve_args(&[]), &[], None).unwrap().log_format,
            LogFormat::Text
        );
        let file = Some("log_format = \"json\"\n");
        assert_eq!(
            resolve(&serve_args(&[]), &[], file).unwrap().log_format,
            LogFormat::Json
        );
        let env = [("GEOBEAT_LOG_FORMAT", "json")];
        assert_eq!(
            resolve(&serve_args(&[]), &env, None).unwrap().log_format,
            LogFormat::Json
        );
        let flag = serve_args(&["--log-format", "text"]);
        assert_eq!(
            resolve(&flag, &env, file).unwrap().log_format,
            LogFormat::Text
        );
        let err = resolve(&serve_args(&[]), &[("GEOBEAT_LOG_FORMAT", "xml")], None).unwrap_err();
        assert!(err.to_string().contains("GEOBEAT_LOG_FORMAT"), "{err}");
    }

    #[test]
    fn unknown_toml_key_is_named() {
        // A typo in the file is an error naming the key, not silently ignored.
        let err = resolve(&serve_args(&[]), &[], Some("shard = 4\n")).unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "shard"));
        assert!(err.to_string().contains("`shard`"));
        let err = resolve(&serve_args(&[]), &[], Some("shards = \n")).unwrap_err();
        assert!(matches!(err, ConfigError::FileSyntax { .. }));
    }

    #[test]
    fn connections_must_fit_under_open_file_limit() {
        // 19,600 + 512 reserved > 20,000: refused with the largest allowed value in the message.
        let err = resolve(&serve_args(&["--connections-max", "19600"]), &[], None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            ConfigError::TooManyConnections { limit: 20_000, .. }
        ));
        assert!(msg.contains("19488"), "{msg}");
        assert!(resolve(&serve_args(&["--connections-max", "19488"]), &[], None).is_ok());
    }

    #[test]
    fn help_documents_every_setting_and_its_env_var() {
        // `serve --help` mentions each flag and its GEOBEAT_* variable.
        let mut cmd = Cli::command();
        let serve = cmd.find_subcommand_mut("serve").unwrap();
        let help = serve.render_long_help().to_string();
        for s in SETTINGS {
            assert!(help.contains(s.flag), "{} missing from help", s.flag);
            assert!(help.contains(s.env), "{} missing from help", s.env);
        }
    }

    #[test]
    fn sink_tables_parse_with_defaults() {
        // Two `[[sinks]]` tables: every key read, defaults filled in, file order kept, and the
        // database password never shown by Debug.
        let file = r#"
shards = 2
[[sinks]]
name = "archive"
kind = "audit"
dir = "/var/lib/geobeat/audit"
compress = "zstd"
zstd_level = 9

[[sinks]]
name = "pg-main"
kind = "postgres"
url = "postgres://geo:s3cret@db.example:5432/geo"
schema = "geobeat"
batch_rows = 5000
poll_interval_ms = 250
"#;
        let c = resolve(&serve_args(&[]), &[], Some(file)).unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(
            c.sinks[0],
            SinkConfig {
                name: "archive".into(),
                kind: SinkKind::Audit {
                    dir: PathBuf::from("/var/lib/geobeat/audit"),
                    compress: Compression::Zstd { level: 9 },
                    rotate: Rotation {
                        window_secs: 60,
                        bytes: 128 << 20,
                    },
                },
                batch_rows: SINK_BATCH_ROWS_DEFAULT,
                poll_interval: Duration::from_millis(SINK_POLL_INTERVAL_MS_DEFAULT),
            }
        );
        assert_eq!(c.sinks[1].name, "pg-main");
        assert_eq!(
            (c.sinks[1].batch_rows, c.sinks[1].poll_interval),
            (5000, Duration::from_millis(250))
        );
        assert!(
            matches!(&c.sinks[1].kind, SinkKind::Postgres { schema, .. } if schema == "geobeat")
        );
        let shown = format!("{:?}", c.sinks);
        assert!(
            !shown.contains("s3cret") && shown.contains("geo:***@db.example"),
            "{shown}"
        );
        assert_eq!(
            redact_url("host=db user=geo password=x"),
            "host=db user=geo password=***"
        );
        assert!(resolve(&serve_args(&[]), &[], None)
            .unwrap()
            .sinks
            .is_empty());
        // The rotation window and size, in each accepted spelling.
        for (rotate, rotate_bytes, want) in [
            ("\"90s\"", "\"64MiB\"", (90, 64 << 20)),
            ("\"5m\"", "2097152", (300, 2 << 20)),
            ("\"1h\"", "\"1GiB\"", (3600, 1 << 30)),
            ("30", "\"1M\"", (30, 1 << 20)),
        ] {
            let file = format!(
                "[[sinks]]\nname = \"a\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = {rotate}\n\
                 rotate_bytes = {rotate_bytes}\n"
            );
            let c = resolve(&serve_args(&[]), &[], Some(&file)).unwrap();
            let SinkKind::Audit { rotate, .. } = c.sinks[0].kind else {
                panic!("an audit sink")
            };
            assert_eq!((rotate.window_secs, rotate.bytes), want, "{file}");
        }
    }

    #[test]
    fn bad_sink_tables_name_the_sink_and_the_problem() {
        // Each malformed table is refused with its position, its name when known, and the fault.
        let audit = "kind = \"audit\"\ndir = \"/a\"\n";
        for (table, expect) in [
            ("kind = \"audit\"\ndir = \"/a\"", "`name` is required"),
            ("name = \"x\"\ndir = \"/a\"", "`kind` is required"),
            ("name = \"X Y\"\nkind = \"audit\"\ndir = \"/a\"", "a-z"),
            ("name = \"x\"\nkind = \"kafka\"", "\"kafka\""),
            ("name = \"x\"\nkind = \"audit\"", "needs `dir`"),
            ("name = \"x\"\nkind = \"postgres\"", "needs `url`"),
            (
                "name = \"x\"\nkind = \"postgres\"\nurl = \"postgres://h/db\"\nschema = \"A;drop\"",
                "identifier",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\ncompress = \"lz4\"",
                "`compress`",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nbatch_rows = 0",
                "`batch_rows`",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nurl = \"u\"",
                "unknown key `url`",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = \"2h\"",
                "`rotate` \"2h\": must be 1s..=3600s",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = \"1.5m\"",
                "expected a duration",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = 0",
                "`rotate` 0",
            ),
            (
                "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate_bytes = \"10KiB\"",
                "`rotate_bytes` must be a size in 1MiB..=16GiB",
            ),
        ] {
            let file = format!("[[sinks]]\n{table}\n");
            let err = resolve(&serve_args(&[]), &[], Some(&file)).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::Sink { index: 1, .. }), "{msg}");
            assert!(msg.contains(expect), "{table:?}: {msg}");
        }
        let twice = format!("[[sinks]]\nname = \"a\"\n{audit}[[sinks]]\nname = \"a\"\nkind = \"audit\"\ndir = \"/b\"\n");
        let msg = resolve(&serve_args(&[]), &[], Some(&twice))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("#2") && msg.contains("two sinks have this name"),
            "{msg}"
        );
        let same_dir = format!("[[sinks]]\nname = \"a\"\n{audit}[[sinks]]\nname = \"b\"\n{audit}");
        let msg = resolve(&serve_args(&[]), &[], Some(&same_dir))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("share this `dir`"), "{msg}");
        let msg = resolve(&serve_args(&[]), &[], Some("sinks = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("array of tables"), "{msg}");
        let many: String = (0..=SINKS_MAX)
            .map(|i| format!("[[sinks]]\nname = \"s{i}\"\nkind = \"audit\"\ndir = \"/d{i}\"\n"))
            .collect();
        assert!(resolve(&serve_args(&[]), &[], Some(&many)).is_err());
    }

    #[test]
    fn sink_backlog_limits_resolve() {
        // Defaults: warn at 1 GiB, no hard limit; sizes and `off` from every source; a hard limit
        // below the warning is refused naming the flag.
        let c = resolve(&serve_args(&[]), &[], None).unwrap();
        assert_eq!(
            (c.sink_backlog_warn_bytes, c.sink_backlog_max_bytes),
            (Some(1 << 30), None)
        );
        let c = resolve(
            &serve_args(&["--sink-backlog-max-bytes", "8GiB"]),
            &[("GEOBEAT_SINK_BACKLOG_WARN_BYTES", "2GiB")],
            None,
        )
        .unwrap();
        assert_eq!(
            (c.sink_backlog_warn_bytes, c.sink_backlog_max_bytes),
            (Some(2 << 30), Some(8 << 30))
        );
        let c = resolve(
            &serve_args(&[]),
            &[],
            Some("sink_backlog_warn_bytes = \"off\"\nsink_backlog_max_bytes = 4096\n"),
        )
        .unwrap();
        assert_eq!(
            (c.sink_backlog_warn_bytes, c.sink_backlog_max_bytes),
            (None, Some(4096))
        );
        let err = resolve(
            &serve_args(&["--sink-backlog-max-bytes", "1MiB"]),
            &[],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--sink-backlog-max-bytes") && err.contains("at least"),
            "{err}"
        );
        assert!(resolve(
            &serve_args(&[]),
            &[("GEOBEAT_SINK_BACKLOG_MAX_BYTES", "0")],
            None
        )
        .is_err());
    }

    #[test]
    fn sinks_command_parses() {
        // `geobeat sinks` takes --data-dir, --config and --json.
        let cli = Cli::try_parse_from(["geobeat", "sinks", "--data-dir", "/d", "--json"]).unwrap();
        let Command::Sinks(a) = cli.command else {
            panic!("sinks expected")
        };
        assert_eq!(
            (a.data_dir, a.config, a.json),
            (Some(PathBuf::from("/d")), None, true)
        );
    }

    #[test]
    fn token_and_demo_arguments_parse() {
        // Global token options work after the kind; demo takes serve flags plus its own.
        let cli =
            Cli::try_parse_from(["geobeat", "token", "device", "truck-1", "--ttl", "30d"]).unwrap();
        let Command::Token(t) = cli.command else {
            panic!("token expected")
        };
        assert_eq!(
            t.kind,
            TokenKind::Device {
                id: "truck-1".into()
            }
        );
        assert_eq!(t.ttl.as_deref(), Some("30d"));
        let cli = Cli::try_parse_from(["geobeat", "token", "--data-dir", "/tmp/x", "ops"]).unwrap();
        let Command::Token(t) = cli.command else {
            panic!("token expected")
        };
        assert_eq!(t.kind, TokenKind::Ops);
        assert_eq!(t.data_dir, Some(PathBuf::from("/tmp/x")));
        let cli =
            Cli::try_parse_from(["geobeat", "demo", "--devices", "50", "--shards", "2"]).unwrap();
        let Command::Demo(d) = cli.command else {
            panic!("demo expected")
        };
        assert_eq!((d.devices, d.rate_hz, d.serve.shards), (50, 1.0, Some(2)));
        assert!(Cli::try_parse_from(["geobeat", "demo", "--rate-hz", "0"]).is_err());
        Cli::command().debug_assert();
    }
}
