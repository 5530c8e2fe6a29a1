//! The clap types of the command line: [`Cli`], its subcommands and their arguments, except
//! the `serve` settings, which come from the table in `settings` ([`ServeArgs`], flattened into
//! `demo` too). It does not resolve anything beyond clap's parsing (see `resolve`), except the
//! data directory of the offline commands.
//!
//! Invariant: every value a flag takes goes through the same parser as the setting's other
//! sources (the `settings` parsers), so clap refuses exactly what resolution would.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::settings::{
    parse_int, parse_nats_urls, parse_path, parse_segment_bytes, parse_shards, NatsUrls, ServeArgs,
    DEMO_DEVICES_DEFAULT,
};
use crate::limits::{DEMO_DEVICES_MAX, DEMO_RATE_HZ_MAX};

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
    /// Mint an access token and print it (only the token, on one line); revoke tokens.
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
    /// A device's history as a document: `geobeat history export <id> --format
    /// geojson|gpx|csv [--out FILE]`.
    History(crate::client::HistoryArgs),
    /// Copy a data directory consistently, also while a server runs on it.
    Backup(BackupArgs),
    /// Verify a backup and install it as a new data directory.
    Restore(RestoreArgs),
    /// Audit tools: `geobeat audit reconcile --data-dir DIR [--audit-dir D] [--postgres URL]`
    /// counts entries per device across the log and the sinks and prints any difference;
    /// `geobeat audit verify --data-dir DIR [--audit-dir D] [--postgres URL]` checks the logs'
    /// hash chains (and the audit files' and PostgreSQL rows' digests) and names the first entry
    /// that does not match.
    Audit(AuditArgs),
    /// Cluster tools: `geobeat cluster status --nats-url URLS [--json] [--haproxy-map FILE]`
    /// reads the placement bucket and the streams and prints nodes, units, owners and streams
    /// (exit 0: every unit has a live owner; 1: some unit has none; 2: NATS unreachable).
    Cluster(ClusterArgs),
}

/// `geobeat audit` settings.
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// What to check.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `geobeat audit` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum AuditCommand {
    /// Count entries per device across the log and the sinks; print any difference (exit 1 if any).
    Reconcile(ReconcileArgs),
    /// Recompute every shard's hash chain from its segments (and check the audit files and the
    /// PostgreSQL rows against their digests); name the first entry that does not match (exit 1
    /// if any).
    Verify(VerifyArgs),
}

/// `geobeat audit verify` settings.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Data directory (read only; a server may be running on it) [env: GEOBEAT_DATA_DIR]
    /// [default: ./shards]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of an audit sink (the `dir` of its `[[sinks]]` entry): check its files too
    #[arg(long, value_name = "D")]
    pub audit_dir: Option<PathBuf>,
    /// PostgreSQL URL of a PostgreSQL sink (its `url`): recompute its rows' digest chain too,
    /// and with a data directory (`--data-dir` or GEOBEAT_DATA_DIR) compare the rows with the
    /// log entries; alone it checks only the rows
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Schema of the PostgreSQL sink's tables
    #[arg(long, value_name = "SCHEMA", default_value = super::PG_SCHEMA_DEFAULT)]
    pub schema: String,
    /// Name of the PostgreSQL sink (whose cursors say which rows must exist) [default: the only
    /// sink whose cursors name no audit file]
    #[arg(long, value_name = "NAME")]
    pub postgres_sink: Option<String>,
}

/// `geobeat audit reconcile` settings.
#[derive(Args, Debug, Clone)]
pub struct ReconcileArgs {
    /// Data directory [env: GEOBEAT_DATA_DIR] [default: ./shards]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of an audit sink (the `dir` of its `[[sinks]]` entry)
    #[arg(long, value_name = "D")]
    pub audit_dir: Option<PathBuf>,
    /// Name of the audit sink [default: the only sink whose cursors name audit files]
    #[arg(long, value_name = "NAME")]
    pub audit_sink: Option<String>,
    /// PostgreSQL URL of a PostgreSQL sink (its `url`)
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Schema of the PostgreSQL sink's tables
    #[arg(long, value_name = "SCHEMA", default_value = super::PG_SCHEMA_DEFAULT)]
    pub schema: String,
    /// Name of the PostgreSQL sink [default: the only sink whose cursors name no audit file]
    #[arg(long, value_name = "NAME")]
    pub postgres_sink: Option<String>,
}

/// `geobeat cluster` settings.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// `geobeat cluster` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCommand {
    /// Nodes (live or dead by their leases), units per node, each unit's owner and epoch, units
    /// without a live owner, the streams and their replicas, each node's replication lag; with
    /// `--haproxy-map`, write HAProxy's unit map from the live placement (exit 0: every unit
    /// has a live owner; 1: some unit is unplaced or owned by a dead node; 2: NATS unreachable;
    /// 3: the map could not be written or pushed)
    Status(ClusterStatusArgs),
}

/// `geobeat cluster status` settings.
#[derive(Args, Debug, Clone)]
pub struct ClusterStatusArgs {
    /// The cluster's NATS servers, comma-separated (as `serve --nats-url`) [env: GEOBEAT_NATS_URL]
    #[arg(long, value_name = "URLS", env = "GEOBEAT_NATS_URL", value_parser = parse_nats_urls)]
    pub nats_url: NatsUrls,
    /// Print one JSON object instead of text (shape: docs/cluster.md "Cluster status")
    #[arg(long)]
    pub json: bool,
    /// The nodes' `--shards` (every node uses the same): names every unit exactly; without it
    /// the units are the 64 runs of 64 vshards plus any other unit a claim names (exact for a
    /// power-of-two `--shards` up to 64)
    #[arg(long, value_name = "N", value_parser = parse_shards)]
    pub shards: Option<usize>,
    /// Exit 1 also unless at least N nodes are live and every unit is claimed by the node the
    /// assignment gives it (the placement settled): for scripts waiting for a new cluster
    #[arg(long, value_name = "N")]
    pub expect_nodes: Option<usize>,
    /// Write HAProxy's unit map (deploy/haproxy/geobeat-units.map's format) from the live
    /// placement to FILE, atomically (write, fsync, rename)
    #[arg(long, value_name = "FILE", value_parser = parse_path)]
    pub haproxy_map: Option<PathBuf>,
    /// Push the map into a running HAProxy through its runtime API socket (`set map`, else
    /// `add map`), for the map HAProxy loaded from `--haproxy-map`'s path (default
    /// /etc/haproxy/geobeat-units.map)
    #[arg(long, value_name = "PATH", value_parser = parse_path)]
    pub haproxy_socket: Option<PathBuf>,
}

/// `backup` settings.
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// Data directory to back up (a server may be running on it) [env: GEOBEAT_DATA_DIR]
    /// [default: ./shards]
    #[arg(long, value_name = "DIR", value_parser = parse_path)]
    pub data_dir: Option<PathBuf>,
    /// New (absent or empty) directory to write the backup into, outside the data directory;
    /// sealed segments are hard-linked when it is on the same file system
    #[arg(long, value_name = "PATH", value_parser = parse_path)]
    pub to: PathBuf,
}

/// `restore` settings.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Backup directory written by `geobeat backup`
    #[arg(long, value_name = "PATH", value_parser = parse_path)]
    pub from: PathBuf,
    /// Data directory to create (must be absent or empty) [env: GEOBEAT_DATA_DIR]
    /// [default: ./shards]
    #[arg(long, value_name = "DIR", value_parser = parse_path)]
    pub data_dir: Option<PathBuf>,
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
    /// Revoke a subject's tokens issued before a time (default: now), without rotating the
    /// secret; recorded in the data directory, applied by a running server within seconds
    Revoke {
        /// Whose tokens
        #[command(subcommand)]
        subject: TokenSubject,
        /// Refuse the subject's tokens issued before TIME: RFC 3339 (2026-12-05T13:00:00Z) or
        /// Unix seconds [default: now]
        #[arg(long, global = true, value_name = "TIME")]
        before: Option<String>,
    },
    /// Lift a subject's revocation (its tokens work again)
    Unrevoke {
        /// Whose revocation
        #[command(subcommand)]
        subject: TokenSubject,
    },
    /// List the revocations recorded in the data directory
    Revocations,
    /// Print a token's id, the name log lines give it (the token is read from standard input
    /// when not given, so it stays out of the process list)
    Id {
        /// The token
        token: Option<String>,
    },
}

/// Whose tokens `geobeat token revoke` / `unrevoke` name: a scope and its exact subject.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum TokenSubject {
    /// The tokens minted for this device id
    Device {
        /// The device id
        id: String,
    },
    /// The gateway tokens minted for exactly this prefix
    Gateway {
        /// The device-id prefix the gateway tokens were minted for (may be empty)
        prefix: String,
    },
    /// Every ops token
    Ops,
    /// The subscriber tokens minted for exactly this prefix
    Subscriber {
        /// The device-id prefix the subscriber tokens were minted for (may be empty)
        prefix: String,
    },
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
