//! Resolution of the `serve` settings: for each row of the settings table the flag, else the
//! `GEOBEAT_*` variable, else the TOML file's key, else the row's default, each read by the row's
//! parser, into a [`ServeConfig`] of concrete types; plus the checks that span settings (the
//! open-file limit, the backlog limits). It owns [`ConfigError`]. It does not define settings
//! (see `settings`) nor parse `[[sinks]]` tables (see `sinks`).
//!
//! Invariant: resolution is a pure function of the flags and [`Sources`] (the process is read
//! only by [`ServeArgs::load`]), and a `ServeConfig` only exists with every value in bounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::settings::{
    known_keys, ByteLimit, Durability, Engine, LogFormat, MetricsListen, Retention, Routing,
    ServeArgs, Setting, Typed, WriteMode, ADVERTISE, AUDIT_CHAIN, COMMIT_ENTRIES_MAX_S,
    COMMIT_INTERVAL_MS, COMMIT_LINGER_ADAPTIVE_US, COMMIT_LINGER_US, CONFIG, CONNECTIONS_MAX,
    DATA_DIR, DURABILITY, ENGINE, FRAME_BYTES_MAX_S, FRAME_HEARTBEATS_MAX_S, HANDSHAKE_TIMEOUT_MS,
    IDLE_TIMEOUT_S, LISTEN, LOG_FORMAT, LOG_LEVEL, MESH_CAPACITY, METRICS_LISTEN, MQTTS_LISTEN,
    MQTT_LISTEN, NATS_REPLICAS, NATS_STREAMS, NATS_URL, NODE_ID, OSMAND_LISTEN, RETENTION, ROUTING,
    SECRET_FILE, SEGMENT_BYTES, SETTINGS, SHARDS, SINKS_KEY, SINK_BACKLOG_MAX_BYTES,
    SINK_BACKLOG_WARN_BYTES, TLS_CERT, TLS_CLIENT_CA, TLS_KEY, TLS_LISTEN, WRITE_MODE,
};
use super::sinks::{parse_sinks, SinkConfig};
use crate::auth::{resolve_secret, Secret, SecretError, SECRET_ENV};
use crate::limits::{OPEN_FILES_RESERVE, SHARDS_MAX};

/// Every `serve` setting resolved to concrete values.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Address for devices and the HTTP API.
    pub listen: SocketAddr,
    /// Address of the OsmAnd-protocol-only listener, if any.
    pub osmand_listen: Option<SocketAddr>,
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
    /// Strict mode: the longest a group waits for company while recent groups were small
    /// (`--commit-linger-adaptive-us`; zero: off). Never set together with `commit_linger`.
    pub commit_linger_adaptive: Duration,
    /// Where device connections live.
    pub routing: Routing,
    /// What drives device WebSocket connections.
    pub engine: Engine,
    /// Ack policy.
    pub durability: Durability,
    /// `--nats-url`: the JetStream servers (required by, and only with, replicated durability).
    pub nats_urls: Vec<String>,
    /// `--nats-streams`.
    pub nats_streams: u32,
    /// `--nats-replicas`.
    pub nats_replicas: u32,
    /// `--node-id` and `--advertise`: ownership of units in a cluster (replicated only; both or
    /// neither).
    pub ownership: Option<Ownership>,
    /// How heartbeats reach the log's files.
    pub write_mode: WriteMode,
    /// `--audit-chain`: whether the shard logs get their hash chain.
    pub audit_chain: bool,
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
    /// MQTT listener address, if any (`--mqtt-listen`).
    pub mqtt_listen: Option<SocketAddr>,
    /// TLS listener (wss://, https) address, if any (`--tls-listen`).
    pub tls_listen: Option<SocketAddr>,
    /// MQTT-over-TLS listener address, if any (`--mqtts-listen`).
    pub mqtts_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listeners.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA for client certificates (mTLS), if any.
    pub tls_client_ca: Option<PathBuf>,
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

/// This node's identity in a cluster (`--node-id`, `--advertise`; docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The node id.
    pub node_id: String,
    /// Where devices are redirected for the units this node owns.
    pub advertise: String,
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
pub(super) struct FileValues<'a> {
    path: &'a Path,
    table: toml::Table,
    pub(super) sinks: Vec<SinkConfig>,
}

impl<'a> FileValues<'a> {
    /// Parses the file: the `[[sinks]]` tables fully, the flat keys only checked against the
    /// table of settings (their values are read per setting).
    pub(super) fn parse(path: &'a Path, text: &str) -> Result<FileValues<'a>, ConfigError> {
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
    /// The highest-precedence value of one setting from flag, environment or file, with its
    /// origin; `None` when no source gives one.
    fn pick<T: Clone>(
        &self,
        row: &Typed<T>,
        flag: &Option<T>,
    ) -> Result<Option<(T, Origin<'a>)>, ConfigError> {
        let s = &row.meta;
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
            return match (row.parse)(&text) {
                Ok(v) => Ok(Some((v, origin))),
                Err(reason) => Err(invalid(text, &origin, reason)),
            };
        }
        if let Some(file) = &self.file {
            if let Some(text) = file.get(s)? {
                let origin = Origin::File(file.path, s.key.expect("file values have keys"));
                return match (row.parse)(&text) {
                    Ok(v) => Ok(Some((v, origin))),
                    Err(reason) => Err(invalid(text, &origin, reason)),
                };
            }
        }
        Ok(None)
    }

    /// Like [`Resolver::pick`], else the row's fixed default (origin: the default).
    fn pick_or_default<T: Clone + Send + Sync + 'static>(
        &self,
        row: &Typed<T>,
        flag: &Option<T>,
    ) -> Result<(T, Origin<'a>), ConfigError> {
        Ok(self.pick(row, flag)?.unwrap_or_else(|| {
            let default = row.fixed_default().expect("the row has a fixed default");
            (default, Origin::Default)
        }))
    }

    /// The value of a setting with a fixed default.
    fn get<T: Clone + Send + Sync + 'static>(
        &self,
        row: &Typed<T>,
        flag: &Option<T>,
    ) -> Result<T, ConfigError> {
        Ok(self.pick_or_default(row, flag)?.0)
    }
}

impl ServeArgs {
    /// The config file path: `--config`, else `GEOBEAT_CONFIG`.
    pub fn config_path(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            env(CONFIG.meta.env)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }

    /// Resolves every setting from the flags (`self`) and `sources`.
    pub fn resolve(&self, sources: &Sources<'_>) -> Result<ServeConfig, ConfigError> {
        let file = match sources.file {
            Some((path, text)) => Some(FileValues::parse(path, text)?),
            None => None,
        };
        let r = Resolver { sources, file };
        let (connections_max, connections_origin) =
            r.pick_or_default(&CONNECTIONS_MAX, &self.connections_max)?;
        let limit = sources.open_files_limit;
        if (connections_max as u64).saturating_add(OPEN_FILES_RESERVE) > limit {
            return Err(ConfigError::TooManyConnections {
                connections_max,
                origin: connections_origin.to_string(),
                limit,
            });
        }
        let retention = r.get(&RETENTION, &self.retention)?;
        let metrics = r.get(&METRICS_LISTEN, &self.metrics_listen)?;
        let mqtt = r.get(&MQTT_LISTEN, &self.mqtt_listen)?;
        let backlog_warn = r
            .get(&SINK_BACKLOG_WARN_BYTES, &self.sink_backlog_warn_bytes)?
            .bytes();
        let backlog_max = r.pick(&SINK_BACKLOG_MAX_BYTES, &self.sink_backlog_max_bytes)?;
        if let (Some(warn), Some((ByteLimit::Bytes(max), origin))) = (backlog_warn, &backlog_max) {
            if *max < warn {
                return Err(ConfigError::Invalid {
                    setting: SINK_BACKLOG_MAX_BYTES.meta.flag,
                    value: max.to_string(),
                    origin: origin.to_string(),
                    reason: format!(
                        "must be at least --sink-backlog-warn-bytes ({warn} bytes), or `off`"
                    ),
                });
            }
        }
        // No source: the row's default (`off`).
        let backlog_max = match backlog_max {
            Some((limit, _)) => limit.bytes(),
            None => SINK_BACKLOG_MAX_BYTES
                .fixed_default()
                .and_then(ByteLimit::bytes),
        };
        let sinks = r.file.as_ref().map(|f| f.sinks.clone()).unwrap_or_default();
        let listen = r.get(&LISTEN, &self.listen)?;
        let osmand_listen = match r.pick(&OSMAND_LISTEN, &self.osmand_listen)? {
            // Both listeners bind with SO_REUSEPORT: one address would silently split them.
            Some((Some(a), origin)) if a == listen || Some(a) == metrics_addr(metrics) => {
                return Err(ConfigError::Invalid {
                    setting: OSMAND_LISTEN.meta.flag,
                    value: a.to_string(),
                    origin: origin.to_string(),
                    reason: "must differ from --listen and --metrics-listen".into(),
                })
            }
            Some((a, _)) => a,
            None => OSMAND_LISTEN.fixed_default().flatten(),
        };
        let tls_listen = r.get(&TLS_LISTEN, &self.tls_listen)?;
        let mqtts_listen = r.get(&MQTTS_LISTEN, &self.mqtts_listen)?;
        let tls_cert = r.pick(&TLS_CERT, &self.tls_cert)?.map(|(p, _)| p);
        let tls_key = r.pick(&TLS_KEY, &self.tls_key)?.map(|(p, _)| p);
        let tls_client_ca = r.pick(&TLS_CLIENT_CA, &self.tls_client_ca)?.map(|(p, _)| p);
        let tls_on = tls_listen.is_some() || mqtts_listen.is_some();
        let tls_missing = if !tls_on {
            None
        } else if tls_cert.is_none() {
            Some(TLS_CERT.meta.flag)
        } else if tls_key.is_none() {
            Some(TLS_KEY.meta.flag)
        } else {
            None
        };
        if let Some(setting) = tls_missing {
            return Err(ConfigError::Invalid {
                setting,
                value: "(unset)".into(),
                origin: "neither flag, environment nor config file".into(),
                reason: "--tls-listen and --mqtts-listen need --tls-cert and --tls-key".into(),
            });
        }
        let durability = r.pick_or_default(&DURABILITY, &self.durability)?;
        let nats_urls = r.pick(&NATS_URL, &self.nats_url)?;
        match (&durability, &nats_urls) {
            ((Durability::Replicated, origin), None) => {
                return Err(ConfigError::Invalid {
                    setting: DURABILITY.meta.flag,
                    value: "replicated".into(),
                    origin: origin.to_string(),
                    reason: "needs --nats-url (the JetStream cluster's servers)".into(),
                })
            }
            ((d, _), Some((urls, origin))) if *d != Durability::Replicated => {
                return Err(ConfigError::Invalid {
                    setting: NATS_URL.meta.flag,
                    value: urls.0.join(","),
                    origin: origin.to_string(),
                    reason: "is used only with --durability replicated".into(),
                })
            }
            _ => {}
        }
        // `--write-mode dsync` makes the group's write its durability point; relaxed durability
        // acks before any durability point, so the two do not combine: refused, naming the fix,
        // rather than silently running another write mode than the one asked for.
        let write_mode = r.pick_or_default(&WRITE_MODE, &self.write_mode)?;
        if let ((WriteMode::Dsync, origin), (Durability::Relaxed, _)) = (&write_mode, &durability) {
            return Err(ConfigError::Invalid {
                setting: WRITE_MODE.meta.flag,
                value: "dsync".into(),
                origin: origin.to_string(),
                reason: "needs --durability strict or replicated (relaxed acks before any sync; \
                         use --write-mode pwrite or mmap with relaxed)"
                    .into(),
            });
        }
        let linger = r.pick_or_default(&COMMIT_LINGER_US, &self.commit_linger_us)?;
        let adaptive =
            r.pick_or_default(&COMMIT_LINGER_ADAPTIVE_US, &self.commit_linger_adaptive_us)?;
        if adaptive.0 > 0 && linger.0 > 0 {
            return Err(ConfigError::Invalid {
                setting: COMMIT_LINGER_ADAPTIVE_US.meta.flag,
                value: adaptive.0.to_string(),
                origin: adaptive.1.to_string(),
                reason: format!(
                    "cannot be combined with --commit-linger-us {} (a fixed linger); set one of \
                     them to 0",
                    linger.0
                ),
            });
        }
        let node_id = r.pick(&NODE_ID, &self.node_id)?;
        let advertise = r.pick(&ADVERTISE, &self.advertise)?;
        let ownership = match (node_id, advertise) {
            (None, None) => None,
            (Some((id, origin)), None) => {
                return Err(ConfigError::Invalid {
                    setting: NODE_ID.meta.flag,
                    value: id,
                    origin: origin.to_string(),
                    reason: "needs --advertise HOST:PORT too (where devices are redirected for \
                             this node's units)"
                        .into(),
                })
            }
            (None, Some((addr, origin))) => {
                return Err(ConfigError::Invalid {
                    setting: ADVERTISE.meta.flag,
                    value: addr,
                    origin: origin.to_string(),
                    reason: "needs --node-id ID too (this node's name in the cluster)".into(),
                })
            }
            (Some((node_id, origin)), Some((advertise, _))) => {
                if durability.0 != Durability::Replicated {
                    return Err(ConfigError::Invalid {
                        setting: NODE_ID.meta.flag,
                        value: node_id,
                        origin: origin.to_string(),
                        reason: "ownership needs --durability replicated and --nats-url (the \
                                 placement lives in JetStream)"
                            .into(),
                    });
                }
                if r.get(&ENGINE, &self.engine)? == Engine::Ring {
                    return Err(ConfigError::Invalid {
                        setting: ENGINE.meta.flag,
                        value: "ring".into(),
                        origin: origin.to_string(),
                        reason: "cannot redirect devices to a unit's owner (--node-id): use \
                                 --engine glommio in a cluster"
                            .into(),
                    });
                }
                Some(Ownership { node_id, advertise })
            }
        };
        Ok(ServeConfig {
            ownership,
            tls_listen,
            mqtts_listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            init: self.init,
            listen,
            osmand_listen,
            data_dir: r.get(&DATA_DIR, &self.data_dir)?,
            // The computed default: the available cores.
            shards: r
                .pick(&SHARDS, &self.shards)?
                .map_or(sources.cores.clamp(1, SHARDS_MAX), |(n, _)| n),
            secret_file: r.pick(&SECRET_FILE, &self.secret_file)?.map(|(p, _)| p),
            segment_bytes: r.get(&SEGMENT_BYTES, &self.segment_bytes)?,
            commit_interval: Duration::from_millis(
                r.get(&COMMIT_INTERVAL_MS, &self.commit_interval_ms)?,
            ),
            commit_entries_max: r.get(&COMMIT_ENTRIES_MAX_S, &self.commit_entries_max)?,
            commit_linger: Duration::from_micros(linger.0),
            commit_linger_adaptive: Duration::from_micros(adaptive.0),
            routing: r.get(&ROUTING, &self.routing)?,
            durability: durability.0,
            nats_urls: nats_urls.map(|(u, _)| u.0).unwrap_or_default(),
            nats_streams: r.get(&NATS_STREAMS, &self.nats_streams)?,
            nats_replicas: r.get(&NATS_REPLICAS, &self.nats_replicas)?,
            write_mode: write_mode.0,
            audit_chain: r.get(&AUDIT_CHAIN, &self.audit_chain)?,
            engine: r.get(&ENGINE, &self.engine)?,
            retention: match retention {
                Retention::For(d) => Some(d),
                Retention::Forever => None,
            },
            connections_max,
            handshake_timeout: Duration::from_millis(
                r.get(&HANDSHAKE_TIMEOUT_MS, &self.handshake_timeout_ms)?,
            ),
            idle_timeout: Duration::from_secs(r.get(&IDLE_TIMEOUT_S, &self.idle_timeout_s)?),
            frame_bytes_max: r.get(&FRAME_BYTES_MAX_S, &self.frame_bytes_max)?,
            frame_heartbeats_max: r.get(&FRAME_HEARTBEATS_MAX_S, &self.frame_heartbeats_max)?,
            mesh_capacity: r.get(&MESH_CAPACITY, &self.mesh_capacity)?,
            metrics_listen: metrics_addr(metrics),
            mqtt_listen: metrics_addr(mqtt),
            log_level: r.get(&LOG_LEVEL, &self.log_level)?,
            log_format: r.get(&LOG_FORMAT, &self.log_format)?,
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

/// The metrics listener's address, if it has one.
fn metrics_addr(m: MetricsListen) -> Option<SocketAddr> {
    match m {
        MetricsListen::On(a) => Some(a),
        MetricsListen::Off => None,
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
