//! The storage sinks of the TOML file: each `[[sinks]]` table parsed and checked into a
//! [`SinkConfig`] (audit files or PostgreSQL), with its defaults, plus the redaction of database
//! passwords for logs. Sinks come only from the file: a table has several keys, and a URL may
//! carry a password. It does not run sinks (see `flusher`) nor read the flat settings (see
//! `resolve`).
//!
//! Invariant: a `SinkConfig` only exists with a valid unique name, a unique audit `dir`, and
//! every number inside its `limits` range; each error names the table's position and name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::resolve::{ConfigError, FileValues};
use super::settings::parse_size;
use crate::limits::{
    AUDIT_ROTATE_BYTES_RANGE, AUDIT_ROTATE_SECS_RANGE, SINKS_MAX, SINK_BATCH_ROWS_MAX,
    SINK_NAME_BYTES_MAX, SINK_POLL_INTERVAL_MS_RANGE, ZSTD_LEVEL_RANGE,
};

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
    SINK_POLL_INTERVAL_MS_RANGE.0 <= SINK_POLL_INTERVAL_MS_DEFAULT
        && SINK_POLL_INTERVAL_MS_DEFAULT <= SINK_POLL_INTERVAL_MS_RANGE.1
);
const _: () =
    assert!(ZSTD_LEVEL_RANGE.0 <= ZSTD_LEVEL_DEFAULT && ZSTD_LEVEL_DEFAULT <= ZSTD_LEVEL_RANGE.1);
const _: () = assert!(SINK_BATCH_ROWS_DEFAULT <= SINK_BATCH_ROWS_MAX);
const _: () = assert!(
    AUDIT_ROTATE_SECS_RANGE.0 <= AUDIT_ROTATE_SECS_DEFAULT
        && AUDIT_ROTATE_SECS_DEFAULT <= AUDIT_ROTATE_SECS_RANGE.1
);
const _: () = assert!(
    AUDIT_ROTATE_BYTES_RANGE.0 <= AUDIT_ROTATE_BYTES_DEFAULT
        && AUDIT_ROTATE_BYTES_DEFAULT <= AUDIT_ROTATE_BYTES_RANGE.1
);

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
pub(super) fn parse_sinks(path: &Path, value: toml::Value) -> Result<Vec<SinkConfig>, ConfigError> {
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
