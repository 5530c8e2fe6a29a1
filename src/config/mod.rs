//! Command line and configuration: the clap `Cli` (`serve`, `token`, `demo`, `sinks`, ...) and the
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
//! The files: `settings` holds the one table of `serve` settings (each row: name, flag, env var,
//! file key, default, parser, help) from which the `serve` flags, their `--help` lines, the file's
//! key list and [`ServeArgs`] are all generated; `resolve` turns flags plus sources into a
//! [`ServeConfig`]; `cli` holds the other subcommands' clap types; `sinks` the `[[sinks]]` tables.
//!
//! Invariant: a `ServeConfig` only exists with every value inside its bounds (the `limits`
//! constants, the open-file limit for `connections_max`); each error names the setting, the bad
//! value and where it came from.

mod cli;
mod resolve;
mod settings;
mod sinks;
#[cfg(test)]
mod tests;

pub use crate::limits::{AUDIT_ROTATE_BYTES_RANGE, AUDIT_ROTATE_SECS_RANGE};
pub use cli::{
    offline_data_dir, AuditArgs, AuditCommand, Cli, ClusterArgs, ClusterCommand, ClusterStatusArgs,
    Command, DemoArgs, MigrateArgs, ReconcileArgs, ReshardArgs, SinksArgs, TokenArgs, TokenKind,
    TokenSubject, VerifyArgs,
};
pub use resolve::{raise_open_files_limit, ConfigError, Ownership, ServeConfig, Sources};
pub use settings::{
    parse_size, ByteLimit, DefaultValue, Durability, Engine, LogFormat, MetricsListen, NatsUrls,
    Retention, Routing, ServeArgs, Setting, WriteMode, CONNECTIONS_MAX_DEFAULT,
    DEMO_DEVICES_DEFAULT, HANDSHAKE_TIMEOUT_MS_DEFAULT, IDLE_TIMEOUT_S_DEFAULT, LISTEN_DEFAULT,
    LOG_LEVEL_DEFAULT, MESH_CAPACITY_DEFAULT, RETENTION_DEFAULT, SETTINGS, SINKS_KEY,
    SINK_BACKLOG_WARN_BYTES_DEFAULT,
};
pub use sinks::{
    load_sinks, parse_rotate, redact_url, valid_sink_name, Compression, Rotation, SinkConfig,
    SinkKind, AUDIT_ROTATE_BYTES_DEFAULT, AUDIT_ROTATE_SECS_DEFAULT, PG_SCHEMA_DEFAULT,
    SINK_BATCH_ROWS_DEFAULT, SINK_POLL_INTERVAL_MS_DEFAULT, ZSTD_LEVEL_DEFAULT,
};
