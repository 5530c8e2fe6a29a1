//! The one table of `serve` settings. Each row defines a setting once: its field name, flag,
//! environment variable, TOML key, default, value parser and help prose. From the table come the
//! typed [`ServeArgs`] (the flags as clap parsed them), the clap arguments of `serve` and `demo`
//! (help line = prose + `[env: ..]` + `[default: ..]`, parser = the row's parser), the file's key
//! list, and the lookups `resolve` makes. It also holds the value types and the parsers. It does
//! not decide precedence (see `resolve`) nor read any source.
//!
//! Invariant: every row's flag is `--` + its name with `-` for `_`, its env var is `GEOBEAT_` +
//! its name in upper case, its key (if any) is its name, and a fixed default is text that its own
//! parser accepts; no two rows share a flag, variable or key (the tests below check all of it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::parse_ttl;
use crate::limits::{
    COMMIT_INTERVAL_MS_MAX, COMMIT_INTERVAL_MS_MIN, DEMO_DEVICES_MAX, FRAME_BYTES_MAX,
    FRAME_BYTES_MIN, FRAME_HEARTBEATS_MAX, GROUP_ENTRIES_MAX, HANDSHAKE_TIMEOUT_MS_RANGE,
    IDLE_TIMEOUT_S_RANGE, MESH_CAPACITY_MAX, PAGE_BYTES, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
    SHARDS_MAX,
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
/// Default MQTT listen address (the IANA port of unencrypted MQTT, loopback only).
pub const MQTT_LISTEN_DEFAULT: &str = "127.0.0.1:1883";
/// Default log filter.
pub const LOG_LEVEL_DEFAULT: &str = "info";
/// Default simulated devices for `demo`.
pub const DEMO_DEVICES_DEFAULT: u32 = 1000;
/// Default unconsumed log bytes per shard (durable minus the slowest sink's cursor) above which
/// the server warns.
pub const SINK_BACKLOG_WARN_BYTES_DEFAULT: u64 = 1 << 30;

// Every default lies within the bounds `limits` sets for it.
const _: () = assert!(
    HANDSHAKE_TIMEOUT_MS_RANGE.0 <= HANDSHAKE_TIMEOUT_MS_DEFAULT
        && HANDSHAKE_TIMEOUT_MS_DEFAULT <= HANDSHAKE_TIMEOUT_MS_RANGE.1
);
const _: () = assert!(
    IDLE_TIMEOUT_S_RANGE.0 <= IDLE_TIMEOUT_S_DEFAULT
        && IDLE_TIMEOUT_S_DEFAULT <= IDLE_TIMEOUT_S_RANGE.1
);
const _: () = assert!(DEMO_DEVICES_DEFAULT <= DEMO_DEVICES_MAX);
const _: () = assert!(MESH_CAPACITY_DEFAULT <= MESH_CAPACITY_MAX);

/// Where a setting's value comes from when no source gives one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This text, read by the setting's own parser like a value from any source (so the help's
    /// `[default: ..]` is exactly what takes effect).
    Text(&'static str),
    /// Computed at start-up; the text says from what (shown as `[default: ..]`).
    Computed(&'static str),
    /// None: the setting stays unset.
    Unset,
}

/// One setting's names in each source, its default and its help: the untyped half of a row.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Field of [`ServeArgs`] and clap argument id (`data_dir`).
    pub name: &'static str,
    /// Command-line flag.
    pub flag: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// TOML key (`None`: not settable from the file).
    pub key: Option<&'static str>,
    /// Placeholder of the value in `--help` (`SIZE`).
    pub value_name: &'static str,
    /// The value when no source gives one.
    pub default: DefaultValue,
    /// Help prose, without the `[env: ..]` and `[default: ..]` that [`Setting::help_line`] adds.
    pub help: &'static str,
}

impl Setting {
    /// The line `--help` shows for the setting: prose, variable, default.
    pub fn help_line(&self) -> String {
        let mut line = format!("{} [env: {}]", self.help, self.env);
        if let DefaultValue::Text(d) | DefaultValue::Computed(d) = self.default {
            line.push_str(&format!(" [default: {d}]"));
        }
        line
    }

    /// The flag without its leading `--`, as clap's `long` takes it.
    fn long(&self) -> &'static str {
        self.flag.strip_prefix("--").expect("flags start with --")
    }
}

/// A row: the setting and its typed parser (shared by clap, the environment, the file and the
/// default text).
pub(super) struct Typed<T> {
    /// Names, default and help.
    pub(super) meta: Setting,
    /// Text to value, or the reason it is refused.
    pub(super) parse: fn(&str) -> Result<T, String>,
}

impl<T: Clone + Send + Sync + 'static> Typed<T> {
    /// The clap argument of this row.
    fn arg(&self) -> clap::Arg {
        clap::Arg::new(self.meta.name)
            .long(self.meta.long())
            .value_name(self.meta.value_name)
            .help(self.meta.help_line())
            .action(clap::ArgAction::Set)
            .value_parser(clap::builder::ValueParser::new(self.parse))
    }

    /// The fixed default, read by the row's parser; `None` for computed and unset defaults.
    pub(super) fn fixed_default(&self) -> Option<T> {
        match self.meta.default {
            DefaultValue::Text(text) => Some((self.parse)(text).unwrap_or_else(|e| {
                panic!("default {text:?} of {} does not parse: {e}", self.meta.flag)
            })),
            DefaultValue::Computed(_) | DefaultValue::Unset => None,
        }
    }
}

/// Generates, from the rows, one `Typed` constant per setting, [`SETTINGS`], the struct
/// [`ServeArgs`] and its clap `Args` implementation (the rows' arguments in table order, then
/// the switch).
macro_rules! settings {
    (
        $(
            setting $id:ident $field:ident: $ty:ty {
                flag: $flag:literal,
                env: $env:literal,
                key: $key:expr,
                value: $value_name:literal,
                default: $default:expr,
                parse: $parse:path,
                help: $help:literal $(,)?
            }
        )*
        switch $sw_field:ident {
            flag: $sw_flag:literal,
            help: $sw_help:literal $(,)?
        }
    ) => {
        $(
            pub(super) const $id: Typed<$ty> = Typed {
                meta: Setting {
                    name: stringify!($field),
                    flag: $flag,
                    env: $env,
                    key: $key,
                    value_name: $value_name,
                    default: $default,
                    help: $help,
                },
                parse: $parse,
            };
        )*

        /// Every `serve` setting that takes a value, in `--help` order.
        pub const SETTINGS: &[Setting] = &[$($id.meta),*];

        /// `serve` settings as given on the command line (`None`: not given). Every one may also
        /// come from a `GEOBEAT_*` environment variable or the TOML file; a flag always wins.
        #[derive(Debug, Clone, Default)]
        pub struct ServeArgs {
            $(
                #[doc = $help]
                pub $field: Option<$ty>,
            )*
            #[doc = $sw_help]
            pub $sw_field: bool,
        }

        impl clap::FromArgMatches for ServeArgs {
            fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
                Ok(ServeArgs {
                    $($field: m.get_one::<$ty>(stringify!($field)).cloned(),)*
                    $sw_field: m.get_flag(stringify!($sw_field)),
                })
            }

            fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
                *self = Self::from_arg_matches(m)?;
                Ok(())
            }
        }

        impl clap::Args for ServeArgs {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                cmd $(.arg($id.arg()))*
                    .arg(
                        clap::Arg::new(stringify!($sw_field))
                            .long(&$sw_flag[2..])
                            .help($sw_help)
                            .action(clap::ArgAction::SetTrue),
                    )
            }

            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                Self::augment_args(cmd)
            }
        }

        /// The switch's flag and help, for the table test.
        #[cfg(test)]
        const SWITCH: (&str, &str) = ($sw_flag, $sw_help);

        /// Reads every fixed default with its row's parser (panics naming the first that does
        /// not parse); returns how many rows have one.
        #[cfg(test)]
        fn fixed_defaults_parsed() -> usize {
            0 $(+ usize::from($id.fixed_default().is_some()))*
        }
    };
}

use DefaultValue::{Computed, Text, Unset};

settings! {
    setting LISTEN listen: SocketAddr {
        flag: "--listen",
        env: "GEOBEAT_LISTEN",
        key: Some("listen"),
        value: "ADDR",
        default: Text(LISTEN_DEFAULT),
        parse: parse_socket_addr,
        help: "Address for devices and the HTTP API",
    }
    setting OSMAND_LISTEN osmand_listen: Option<SocketAddr> {
        flag: "--osmand-listen",
        env: "GEOBEAT_OSMAND_LISTEN",
        key: Some("osmand_listen"),
        value: "ADDR",
        default: Text("off"),
        parse: parse_osmand_listen,
        help: "Address for a listener serving only the OsmAnd protocol (Traccar Client, OsmAnd, \
               GPSLogger) at any path, so an app's server URL can be http://host:port (Traccar \
               uses port 5055), or `off`; the main listener serves it at /v1/osmand",
    }
    setting TLS_LISTEN tls_listen: Option<SocketAddr> {
        flag: "--tls-listen",
        env: "GEOBEAT_TLS_LISTEN",
        key: Some("tls_listen"),
        value: "ADDR",
        default: Text("off"),
        parse: parse_osmand_listen,
        help: "Address for TLS: devices on wss://host:port/v1/ingest, subscribers and the HTTP                API on https (needs --tls-cert and --tls-key), or `off`",
    }
    setting MQTTS_LISTEN mqtts_listen: Option<SocketAddr> {
        flag: "--mqtts-listen",
        env: "GEOBEAT_MQTTS_LISTEN",
        key: Some("mqtts_listen"),
        value: "ADDR",
        default: Text("off"),
        parse: parse_osmand_listen,
        help: "Address for MQTT 3.1.1/5 device ingest over TLS, mqtts:// (the IANA port is                8883; needs --tls-cert and --tls-key), or `off`",
    }
    setting TLS_CERT tls_cert: PathBuf {
        flag: "--tls-cert",
        env: "GEOBEAT_TLS_CERT",
        key: Some("tls_cert"),
        value: "FILE",
        default: Unset,
        parse: parse_path,
        help: "PEM certificate chain (leaf first) for --tls-listen and --mqtts-listen; ECDSA                P-256 is recommended (cheaper handshakes than RSA); re-read on SIGHUP",
    }
    setting TLS_KEY tls_key: PathBuf {
        flag: "--tls-key",
        env: "GEOBEAT_TLS_KEY",
        key: Some("tls_key"),
        value: "FILE",
        default: Unset,
        parse: parse_path,
        help: "PEM private key of --tls-cert (PKCS#8, SEC1 or PKCS#1); re-read on SIGHUP",
    }
    setting TLS_CLIENT_CA tls_client_ca: PathBuf {
        flag: "--tls-client-ca",
        env: "GEOBEAT_TLS_CLIENT_CA",
        key: Some("tls_client_ca"),
        value: "FILE",
        default: Unset,
        parse: parse_path,
        help: "PEM CA certificates for client certificates (mTLS): device connections over TLS                must then present one naming the token's device id (CN or a DNS/URI SAN) or                gateway prefix, besides the token",
    }
    setting DATA_DIR data_dir: PathBuf {
        flag: "--data-dir",
        env: "GEOBEAT_DATA_DIR",
        key: Some("data_dir"),
        value: "DIR",
        default: Text(crate::auth::DATA_DIR_DEFAULT),
        parse: parse_path,
        help: "Directory holding the shard logs and the secret",
    }
    setting SHARDS shards: usize {
        flag: "--shards",
        env: "GEOBEAT_SHARDS",
        key: Some("shards"),
        value: "N",
        default: Computed("available cores"),
        parse: parse_shards,
        help: "Executors (threads, one per core), 1..=256",
    }
    setting CONFIG config: PathBuf {
        flag: "--config",
        env: "GEOBEAT_CONFIG",
        key: None,
        value: "FILE",
        default: Unset,
        parse: parse_path,
        help: "TOML file with settings (flat keys named like the flags, `_` for `-`)",
    }
    setting SECRET_FILE secret_file: PathBuf {
        flag: "--secret-file",
        env: "GEOBEAT_SECRET_FILE",
        key: Some("secret_file"),
        value: "FILE",
        default: Unset,
        parse: parse_path,
        help: "File holding the token secret; otherwise GEOBEAT_SECRET, otherwise \
               <data-dir>/secret (created, mode 0600)",
    }
    setting SEGMENT_BYTES segment_bytes: u64 {
        flag: "--segment-bytes",
        env: "GEOBEAT_SEGMENT_BYTES",
        key: Some("segment_bytes"),
        value: "SIZE",
        default: Text("64MiB"),
        parse: parse_segment_bytes,
        help: "Size of each log segment file: bytes or KiB/MiB/GiB, a multiple of 4 KiB in \
               1 MiB..=4 GiB",
    }
    setting COMMIT_INTERVAL_MS commit_interval_ms: u64 {
        flag: "--commit-interval-ms",
        env: "GEOBEAT_COMMIT_INTERVAL_MS",
        key: Some("commit_interval_ms"),
        value: "MS",
        default: Text("2"),
        parse: parse_commit_interval_ms,
        help: "Relaxed durability: background sync interval in ms, 1..=5. Strict durability: \
               the longest a group waits when --commit-linger-us is set",
    }
    setting COMMIT_ENTRIES_MAX_S commit_entries_max: usize {
        flag: "--commit-entries-max",
        env: "GEOBEAT_COMMIT_ENTRIES_MAX",
        key: Some("commit_entries_max"),
        value: "N",
        default: Text("1000"),
        parse: parse_commit_entries_max,
        help: "Most heartbeats per group commit, 1..=100000",
    }
    setting COMMIT_LINGER_US commit_linger_us: u64 {
        flag: "--commit-linger-us",
        env: "GEOBEAT_COMMIT_LINGER_US",
        key: Some("commit_linger_us"),
        value: "US",
        default: Text("0"),
        parse: parse_commit_linger_us,
        help: "Strict durability: how long a group may wait to grow before its fdatasync \
               starts, in µs, 0..=5000. 0 (adaptive): the next fdatasync starts as soon as the \
               previous one completes, so a group is whatever arrived meanwhile — lowest \
               latency, and groups grow with load",
    }
    setting COMMIT_LINGER_ADAPTIVE_US commit_linger_adaptive_us: u64 {
        flag: "--commit-linger-adaptive-us",
        env: "GEOBEAT_COMMIT_LINGER_ADAPTIVE_US",
        key: Some("commit_linger_adaptive_us"),
        value: "US",
        default: Text("0"),
        parse: parse_commit_linger_adaptive_us,
        help: "Strict durability: adaptive group commit. While the recent groups were small (a \
               running average below 8 heartbeats per group) a group waits up to this many µs \
               for company before its sync starts; large groups, and a group that reaches \
               --commit-entries-max, never wait. 0..=1000, 0 = off. Not with --commit-linger-us",
    }
    setting ROUTING routing: Routing {
        flag: "--routing",
        env: "GEOBEAT_ROUTING",
        key: Some("routing"),
        value: "MODE",
        default: Text("migrate"),
        parse: parse_routing,
        help: "Where a device connection lives: `migrate` hands its socket once to the executor \
               that owns the device's shard; `forward` keeps it where it was accepted and \
               forwards every frame over the channel mesh (gateways always forward)",
    }
    setting ENGINE engine: Engine {
        flag: "--engine",
        env: "GEOBEAT_ENGINE",
        key: Some("engine"),
        value: "ENGINE",
        default: Text("glommio"),
        parse: parse_engine,
        help: "What drives device WebSocket connections after the upgrade: `glommio` (a reader \
               and a writer task per connection) or `ring` (one io_uring engine per executor: \
               multishot receives into shared buffers, acks of all connections sent together)",
    }
    setting DURABILITY durability: Durability {
        flag: "--durability",
        env: "GEOBEAT_DURABILITY",
        key: Some("durability"),
        value: "MODE",
        default: Text("strict"),
        parse: parse_durability,
        help: "strict: ack only once data is on stable storage; relaxed: ack once written to \
               the mapped log (survives a process crash, not a power loss); replicated: ack once \
               on stable storage and stored by NATS JetStream (--nats-url, docs/cluster.md)",
    }
    setting NATS_URL nats_url: NatsUrls {
        flag: "--nats-url",
        env: "GEOBEAT_NATS_URL",
        key: Some("nats_url"),
        value: "URLS",
        default: Unset,
        parse: parse_nats_urls,
        help: "NATS servers of the JetStream cluster for --durability replicated, comma-separated \
               (nats://host:port); tried in turn",
    }
    setting NATS_STREAMS nats_streams: u32 {
        flag: "--nats-streams",
        env: "GEOBEAT_NATS_STREAMS",
        key: Some("nats_streams"),
        value: "N",
        default: Text("3"),
        parse: parse_nats_streams,
        help: "Replicated mode: number of JetStream streams the vshards are spread over (each \
               holds a vshard range; their Raft leaders spread over the servers), 1..=64; the same \
               on every node",
    }
    setting NATS_REPLICAS nats_replicas: u32 {
        flag: "--nats-replicas",
        env: "GEOBEAT_NATS_REPLICAS",
        key: Some("nats_replicas"),
        value: "N",
        default: Text("3"),
        parse: parse_nats_replicas,
        help: "Replicated mode: replicas of each stream geobeat creates, 1..=5 (R3: a stream \
               survives the loss of one server)",
    }
    setting NODE_ID node_id: String {
        flag: "--node-id",
        env: "GEOBEAT_NODE_ID",
        key: Some("node_id"),
        value: "ID",
        default: Unset,
        parse: parse_node_id,
        help: "Replicated mode: this node's name in the cluster (letters, digits, `-`, `_`; \
               unique per node, stable across restarts). With --advertise it turns on ownership: \
               each unit of vshards has one writer, placed in the GEOBEAT_PLACEMENT bucket \
               (docs/cluster.md)",
    }
    setting ADVERTISE advertise: String {
        flag: "--advertise",
        env: "GEOBEAT_ADVERTISE",
        key: Some("advertise"),
        value: "HOST:PORT",
        default: Unset,
        parse: parse_advertise,
        help: "Replicated mode with --node-id: the address devices are redirected to for the \
               units this node owns (its --listen as reachable from devices)",
    }
    setting WRITE_MODE write_mode: WriteMode {
        flag: "--write-mode",
        env: "GEOBEAT_WRITE_MODE",
        key: Some("write_mode"),
        value: "MODE",
        default: Text("mmap"),
        parse: parse_write_mode,
        help: "How heartbeats reach the log's files: mmap writes them into a shared mapping \
               (fdatasync writes the mapping back); pwrite stages each group and writes it \
               with one pwrite before the fdatasync (the files mapped read-only); dsync stages \
               each group and writes it through io_uring on an O_DSYNC descriptor, the write's \
               completion being the durability point (no fdatasync; files mapped read-only; \
               strict or replicated durability only: refused with relaxed). All keep \
               --durability's meaning; see perf/RESULTS.md \"Commit path by pwrite\" and \
               \"Commit path: dsync and adaptive linger\"",
    }
    setting AUDIT_CHAIN audit_chain: bool {
        flag: "--audit-chain",
        env: "GEOBEAT_AUDIT_CHAIN",
        key: Some("audit_chain"),
        value: "on|off",
        default: Text("on"),
        parse: parse_on_off,
        help: "Whether each shard's log gets its hash chain (`.chain` sidecars written by a helper \
               thread off the ack's path; `geobeat audit verify`): off writes none, and the next \
               start with it on chains what it finds from the newest sealed sidecar on (for \
               measuring its cost; see perf/RESULTS.md \"Hash chain on vs off\")",
    }
    setting RETENTION retention: Retention {
        flag: "--retention",
        env: "GEOBEAT_RETENTION",
        key: Some("retention"),
        value: "AGE",
        default: Text("7d"),
        parse: parse_retention,
        help: "How long log data is kept: e.g. 12h, 7d, or `forever`",
    }
    setting CONNECTIONS_MAX connections_max: usize {
        flag: "--connections-max",
        env: "GEOBEAT_CONNECTIONS_MAX",
        key: Some("connections_max"),
        value: "N",
        default: Text("16000"),
        parse: parse_connections_max,
        help: "Most concurrent client connections; must leave 512 file descriptors under the \
               open-file limit (ulimit -n)",
    }
    setting HANDSHAKE_TIMEOUT_MS handshake_timeout_ms: u64 {
        flag: "--handshake-timeout-ms",
        env: "GEOBEAT_HANDSHAKE_TIMEOUT_MS",
        key: Some("handshake_timeout_ms"),
        value: "MS",
        default: Text("5000"),
        parse: parse_handshake_timeout_ms,
        help: "Time from TCP accept to a completed WebSocket upgrade, in ms, 100..=60000",
    }
    setting IDLE_TIMEOUT_S idle_timeout_s: u64 {
        flag: "--idle-timeout-s",
        env: "GEOBEAT_IDLE_TIMEOUT_S",
        key: Some("idle_timeout_s"),
        value: "S",
        default: Text("60"),
        parse: parse_idle_timeout_s,
        help: "Close connections silent this long, in s, 2..=3600; the server pings at half of \
               it",
    }
    setting FRAME_BYTES_MAX_S frame_bytes_max: usize {
        flag: "--frame-bytes-max",
        env: "GEOBEAT_FRAME_BYTES_MAX",
        key: Some("frame_bytes_max"),
        value: "SIZE",
        default: Text("64KiB"),
        parse: parse_frame_bytes_max,
        help: "Largest WebSocket message accepted (larger: close 1009): bytes or KiB, \
               1KiB..=64KiB",
    }
    setting FRAME_HEARTBEATS_MAX_S frame_heartbeats_max: usize {
        flag: "--frame-heartbeats-max",
        env: "GEOBEAT_FRAME_HEARTBEATS_MAX",
        key: Some("frame_heartbeats_max"),
        value: "N",
        default: Text("1000"),
        parse: parse_frame_heartbeats_max,
        help: "Most heartbeats in one message, 1..=1000",
    }
    setting MESH_CAPACITY mesh_capacity: usize {
        flag: "--mesh-capacity",
        env: "GEOBEAT_MESH_CAPACITY",
        key: Some("mesh_capacity"),
        value: "N",
        default: Text("1024"),
        parse: parse_mesh_capacity,
        help: "Capacity of each channel between executors, 1..=65536",
    }
    setting METRICS_LISTEN metrics_listen: MetricsListen {
        flag: "--metrics-listen",
        env: "GEOBEAT_METRICS_LISTEN",
        key: Some("metrics_listen"),
        value: "ADDR",
        default: Text("off"),
        parse: parse_metrics_listen,
        help: "Address for the Prometheus /metrics endpoint, or `off`",
    }
    setting MQTT_LISTEN mqtt_listen: MetricsListen {
        flag: "--mqtt-listen",
        env: "GEOBEAT_MQTT_LISTEN",
        key: Some("mqtt_listen"),
        value: "ADDR",
        default: Text(MQTT_LISTEN_DEFAULT),
        parse: parse_mqtt_listen,
        help: "Address for MQTT 3.1.1/5 device ingest over TCP (docs/MQTT.md), or `off`",
    }
    setting LOG_LEVEL log_level: String {
        flag: "--log-level",
        env: "GEOBEAT_LOG_LEVEL",
        key: Some("log_level"),
        value: "FILTER",
        default: Text(LOG_LEVEL_DEFAULT),
        parse: parse_log_level,
        help: "Log filter: a level (error, warn, info, debug, trace) or tracing directives such \
               as `info,geobeat=debug`",
    }
    setting LOG_FORMAT log_format: LogFormat {
        flag: "--log-format",
        env: "GEOBEAT_LOG_FORMAT",
        key: Some("log_format"),
        value: "FORMAT",
        default: Text("text"),
        parse: parse_log_format,
        help: "Log line format on stderr: `text` (colours only when stderr is a terminal and \
               NO_COLOR is unset) or `json` (one object per line, for log shippers)",
    }
    setting SINK_BACKLOG_WARN_BYTES sink_backlog_warn_bytes: ByteLimit {
        flag: "--sink-backlog-warn-bytes",
        env: "GEOBEAT_SINK_BACKLOG_WARN_BYTES",
        key: Some("sink_backlog_warn_bytes"),
        value: "SIZE",
        default: Text("1GiB"),
        parse: parse_byte_limit,
        help: "Warn when a shard's log holds more than this many bytes not yet consumed by \
               every sink: bytes or KiB/MiB/GiB, or `off`",
    }
    setting SINK_BACKLOG_MAX_BYTES sink_backlog_max_bytes: ByteLimit {
        flag: "--sink-backlog-max-bytes",
        env: "GEOBEAT_SINK_BACKLOG_MAX_BYTES",
        key: Some("sink_backlog_max_bytes"),
        value: "SIZE",
        default: Text("off"),
        parse: parse_byte_limit,
        help: "Stop acknowledging heartbeats of a shard whose log holds more than this many \
               bytes not yet consumed by every sink: bytes or KiB/MiB/GiB, or `off`",
    }
    switch init {
        flag: "--init",
        help: "Create a new data directory (and its secret) if DIR has no `geobeat.meta`. \
               Without it a missing data directory, or a secret missing from an existing one, \
               is an error: a removed or unmounted directory never silently becomes an empty \
               one. Idempotent, but meant for the first start only (a flag, never read from the \
               environment or the file)",
    }
}

/// The TOML key of the sink tables (an array of tables, not a flat setting).
pub const SINKS_KEY: &str = "sinks";

/// The keys the TOML file accepts, for messages.
pub(super) fn known_keys() -> String {
    let mut keys = SETTINGS.iter().filter_map(|s| s.key).collect::<Vec<_>>();
    keys.push("[[sinks]]");
    keys.join(", ")
}

/// When an ingest is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Ack once the data is on stable storage.
    Strict,
    /// Ack once written to the mapped log (survives a process crash, not a power loss).
    Relaxed,
    /// Ack once on stable storage and stored by the NATS JetStream streams (docs/cluster.md).
    Replicated,
}

/// The NATS servers of `--nats-url`, as given (`nats://host:port` or `host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls(pub Vec<String>);

/// How heartbeats are written to the log's segment files (`--write-mode`; the log's own
/// `WriteMode` below this layer mirrors it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Into a shared read-write mapping of the segment.
    Mmap,
    /// Staged per group and written with one `pwrite`.
    Pwrite,
    /// Staged per group and written with one `O_DSYNC` write through io_uring (no fdatasync).
    Dsync,
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

/// What drives device WebSocket connections (see `--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A reader and a writer task per connection, over glommio's TcpStream.
    Glommio,
    /// The per-executor io_uring connection engine (`net::engine`).
    Ring,
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
    /// The budget in bytes; `None` when off.
    pub(super) fn bytes(self) -> Option<u64> {
        match self {
            ByteLimit::Bytes(b) => Some(b),
            ByteLimit::Off => None,
        }
    }
}

/// Whether and where to serve a listener that may be switched off (`--metrics-listen`,
/// `--mqtt-listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Serve `/metrics` on this address.
    On(SocketAddr),
    /// No metrics listener.
    Off,
}

// ---- per-setting parsers (shared by clap, the environment, the file and the defaults) ----

pub(super) fn parse_int<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
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

pub(super) fn parse_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        Err("empty path".into())
    } else {
        Ok(PathBuf::from(text))
    }
}

pub(super) fn parse_shards(text: &str) -> Result<usize, String> {
    parse_int(text, 1, SHARDS_MAX)
}

pub(super) fn parse_segment_bytes(text: &str) -> Result<u64, String> {
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

fn parse_commit_linger_adaptive_us(text: &str) -> Result<u64, String> {
    parse_int(text, 0, crate::limits::COMMIT_LINGER_ADAPTIVE_US_MAX)
}

fn parse_routing(text: &str) -> Result<Routing, String> {
    match text.trim() {
        "migrate" => Ok(Routing::Migrate),
        "forward" => Ok(Routing::Forward),
        _ => Err("expected `migrate` or `forward`".into()),
    }
}

fn parse_engine(text: &str) -> Result<Engine, String> {
    match text.trim() {
        "glommio" => Ok(Engine::Glommio),
        "ring" => Ok(Engine::Ring),
        _ => Err("expected `glommio` or `ring`".into()),
    }
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    match text.trim() {
        "strict" => Ok(Durability::Strict),
        "relaxed" => Ok(Durability::Relaxed),
        "replicated" => Ok(Durability::Replicated),
        _ => Err("expected `strict`, `relaxed` or `replicated`".into()),
    }
}

pub(super) fn parse_nats_urls(text: &str) -> Result<NatsUrls, String> {
    let mut urls = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr = part.strip_prefix("nats://").unwrap_or(part);
        if addr.contains("://") {
            return Err(format!("{part}: only nats:// URLs (no TLS yet)"));
        }
        let (host, port) = addr
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or_else(|| format!("{part}: expected nats://host:port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{part}: expected nats://host:port"));
        }
        urls.push(part.to_string());
    }
    if urls.is_empty() || urls.len() > crate::limits::NATS_URLS_MAX {
        return Err(format!(
            "expected 1..={} comma-separated nats://host:port",
            crate::limits::NATS_URLS_MAX
        ));
    }
    Ok(NatsUrls(urls))
}

fn parse_nats_streams(text: &str) -> Result<u32, String> {
    parse_int(text, 1, crate::limits::NATS_STREAMS_MAX)
}

fn parse_nats_replicas(text: &str) -> Result<u32, String> {
    parse_int(text, 1, 5)
}

fn parse_node_id(text: &str) -> Result<String, String> {
    let t = text.trim();
    let ok = !t.is_empty()
        && t.len() <= crate::limits::NODE_ID_BYTES_MAX
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(t.to_string())
    } else {
        Err(format!(
            "expected 1..={} letters, digits, `-` or `_`",
            crate::limits::NODE_ID_BYTES_MAX
        ))
    }
}

fn parse_advertise(text: &str) -> Result<String, String> {
    let t = text.trim();
    match t.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains('/')
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(t.to_string())
        }
        _ => Err("expected host:port (the address devices can reach this node at)".into()),
    }
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

fn parse_write_mode(text: &str) -> Result<WriteMode, String> {
    match text.trim() {
        "mmap" => Ok(WriteMode::Mmap),
        "pwrite" => Ok(WriteMode::Pwrite),
        "dsync" => Ok(WriteMode::Dsync),
        _ => Err("expected `mmap`, `pwrite` or `dsync`".into()),
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

fn parse_mqtt_listen(text: &str) -> Result<MetricsListen, String> {
    // The same shape as `--metrics-listen`: an address, or `off`.
    parse_metrics_listen(text)
}

fn parse_osmand_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.trim() == "off" {
        return Ok(None);
    }
    parse_socket_addr(text)
        .map(Some)
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use clap::CommandFactory as _;

    use super::*;
    use crate::config::Cli;
    use crate::limits::{
        COMMIT_ENTRIES_MAX_DEFAULT, COMMIT_INTERVAL_MS_DEFAULT, SEGMENT_BYTES_DEFAULT,
    };

    #[test]
    fn table_rows_follow_the_naming_rules_and_never_collide() {
        // Each row's flag, variable and key are its name spelled per source, and no two rows
        // (nor the switch, nor the sinks key) share one: a typo in a row fails here.
        let mut flags = HashSet::from([SWITCH.0]);
        let mut envs = HashSet::new();
        let mut keys = HashSet::from([SINKS_KEY]);
        for s in SETTINGS {
            assert_eq!(s.flag, format!("--{}", s.name.replace('_', "-")), "{s:?}");
            assert_eq!(s.env, format!("GEOBEAT_{}", s.name.to_uppercase()), "{s:?}");
            assert!(s.key.is_none_or(|k| k == s.name), "{s:?}");
            assert!(flags.insert(s.flag), "two settings use {}", s.flag);
            assert!(envs.insert(s.env), "two settings use {}", s.env);
            if let Some(k) = s.key {
                assert!(keys.insert(k), "two settings use key {k}");
            }
            assert!(
                !s.help.contains("[env:") && !s.help.contains("[default:"),
                "{s:?}"
            );
        }
        // Only `--config` is not a file key (the file cannot name itself).
        let keyless: Vec<_> = SETTINGS
            .iter()
            .filter(|s| s.key.is_none())
            .map(|s| s.flag)
            .collect();
        assert_eq!(keyless, ["--config"]);
    }

    #[test]
    fn clap_exposes_each_row_as_defined() {
        // `serve` and `demo` (which flattens the same arguments) show each row's flag, value
        // name and help line (prose, variable, default) and nothing else besides --init, --help
        // and demo's own two flags.
        let cli = Cli::command();
        for (sub, extra) in [("serve", 0), ("demo", 2)] {
            let cmd = cli.find_subcommand(sub).unwrap();
            for s in SETTINGS {
                let arg = cmd
                    .get_arguments()
                    .find(|a| a.get_id() == s.name)
                    .unwrap_or_else(|| panic!("{sub}: no argument {}", s.name));
                assert_eq!(
                    arg.get_long().map(|l| format!("--{l}")).as_deref(),
                    Some(s.flag)
                );
                let names: Vec<_> = arg
                    .get_value_names()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str())
                    .collect();
                assert_eq!(names, [s.value_name], "{sub} {}", s.flag);
                let help = arg.get_help().unwrap().to_string();
                assert_eq!(help, s.help_line(), "{sub} {}", s.flag);
                assert!(help.contains(&format!("[env: {}]", s.env)), "{help}");
                match s.default {
                    DefaultValue::Text(d) | DefaultValue::Computed(d) => {
                        assert!(help.ends_with(&format!("[default: {d}]")), "{help}")
                    }
                    DefaultValue::Unset => assert!(!help.contains("[default:"), "{help}"),
                }
            }
            let init = cmd.get_arguments().find(|a| a.get_id() == "init").unwrap();
            assert_eq!(
                init.get_long().map(|l| format!("--{l}")).as_deref(),
                Some(SWITCH.0)
            );
            assert_eq!(init.get_help().unwrap().to_string(), SWITCH.1);
            let shown = cmd.get_arguments().filter(|a| a.get_id() != "help").count();
            assert_eq!(shown, SETTINGS.len() + 1 + extra, "{sub}");
        }
    }

    #[test]
    fn fixed_defaults_parse_and_match_the_constants() {
        // Every fixed default is text its own parser accepts, and where a constant names the
        // default too, both agree (so the help's `[default: ..]` is the value that applies).
        let fixed = SETTINGS
            .iter()
            .filter(|s| matches!(s.default, DefaultValue::Text(_)));
        assert_eq!(fixed_defaults_parsed(), fixed.count());
        assert_eq!(LISTEN.fixed_default(), LISTEN_DEFAULT.parse().ok());
        assert_eq!(
            DATA_DIR.fixed_default(),
            Some(PathBuf::from(crate::auth::DATA_DIR_DEFAULT))
        );
        assert_eq!(SEGMENT_BYTES.fixed_default(), Some(SEGMENT_BYTES_DEFAULT));
        assert_eq!(
            COMMIT_INTERVAL_MS.fixed_default(),
            Some(COMMIT_INTERVAL_MS_DEFAULT)
        );
        assert_eq!(
            COMMIT_ENTRIES_MAX_S.fixed_default(),
            Some(COMMIT_ENTRIES_MAX_DEFAULT)
        );
        assert_eq!(
            RETENTION.fixed_default(),
            Some(Retention::For(RETENTION_DEFAULT))
        );
        assert_eq!(
            CONNECTIONS_MAX.fixed_default(),
            Some(CONNECTIONS_MAX_DEFAULT)
        );
        assert_eq!(
            HANDSHAKE_TIMEOUT_MS.fixed_default(),
            Some(HANDSHAKE_TIMEOUT_MS_DEFAULT)
        );
        assert_eq!(IDLE_TIMEOUT_S.fixed_default(), Some(IDLE_TIMEOUT_S_DEFAULT));
        assert_eq!(FRAME_BYTES_MAX_S.fixed_default(), Some(FRAME_BYTES_MAX));
        assert_eq!(
            FRAME_HEARTBEATS_MAX_S.fixed_default(),
            Some(FRAME_HEARTBEATS_MAX)
        );
        assert_eq!(MESH_CAPACITY.fixed_default(), Some(MESH_CAPACITY_DEFAULT));
        assert_eq!(
            LOG_LEVEL.fixed_default().as_deref(),
            Some(LOG_LEVEL_DEFAULT)
        );
        assert_eq!(
            SINK_BACKLOG_WARN_BYTES.fixed_default(),
            Some(ByteLimit::Bytes(SINK_BACKLOG_WARN_BYTES_DEFAULT))
        );
        assert_eq!(
            MQTT_LISTEN.fixed_default(),
            MQTT_LISTEN_DEFAULT.parse().ok().map(MetricsListen::On)
        );
        assert_eq!(SHARDS.fixed_default(), None);
    }
}
