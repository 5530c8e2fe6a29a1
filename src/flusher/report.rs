//! `geobeat sinks`: each sink's cursor and lag per shard, read from the cursor files and the shard
//! logs of a data directory without taking any lock (it works while the server runs, showing a
//! snapshot). It owns the command's collection and rendering (an aligned table for people, or
//! with `--json` one object per sink and shard with machine fields); it never writes.
//!
//! Invariant: read-only. A shard whose log cannot be read still gets its rows, with the error.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{load_sinks, SinksArgs};
use crate::datadir::{shard_dir_name, META_FILE};
use crate::log::tail::log_end;
use crate::route::ShardId;

use super::cursor::{cursor_path, read_cursor, CURSORS_DIR, CURSOR_SUFFIX};
use super::{now_ms, FlushError};

/// One sink on one shard (the JSON form of `geobeat sinks --json`, field for field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CursorRow {
    /// Sink name.
    pub sink: String,
    /// Sink kind (`audit`, `postgres`): from the configuration when given, else `audit` when the
    /// cursor names an audit file; `None` when unknown.
    pub kind: Option<&'static str>,
    /// Shard.
    pub shard: u32,
    /// The sink's cursor, if it has a cursor file.
    pub cursor: Option<u64>,
    /// End of the shard's valid log entries on disk.
    pub log_end: Option<u64>,
    /// `log_end - cursor` (everything when there is no cursor yet).
    pub lag_bytes: Option<u64>,
    /// When the cursor was last written, ms since the Unix epoch.
    pub updated_ms: Option<i64>,
    /// Audit sinks: the cursor's file (its final name; `<file>.tmp` while it is open).
    pub file: Option<String>,
    /// Audit sinks: bytes of `file` that hold exactly the heartbeats before the cursor.
    pub file_bytes: Option<u64>,
    /// Why something could not be read.
    pub error: Option<String>,
}

/// Collects a row per (sink, shard) of the data directory at `data_dir`: every sink that has a
/// cursor file in any shard, plus every sink in `configured`.
pub fn collect(data_dir: &Path, configured: &[String]) -> Result<Vec<CursorRow>, FlushError> {
    if !data_dir.join(META_FILE).is_file() {
        return Err(FlushError::Config(format!(
            "{} is not a geobeat data directory (no {META_FILE})",
            data_dir.display()
        )));
    }
    // Any format (a format-1 directory's sinks must be drained before `geobeat migrate`).
    let layout = crate::datadir::inspect(data_dir)
        .map_err(|e| FlushError::Config(format!("{}: {e}", data_dir.display())))?;
    let shards: Vec<(ShardId, PathBuf)> = (0..layout.shard_count)
        .map(|k| (ShardId(k), data_dir.join(shard_dir_name(ShardId(k)))))
        .collect();
    let mut names: Vec<String> = configured.to_vec();
    for (_, dir) in &shards {
        let Ok(listing) = std::fs::read_dir(dir.join(CURSORS_DIR)) else {
            continue;
        };
        for item in listing.flatten() {
            let name = item.file_name();
            if let Some(sink) = name.to_str().and_then(|n| n.strip_suffix(CURSOR_SUFFIX)) {
                if !names.iter().any(|n| n == sink) {
                    names.push(sink.to_owned());
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (shard, dir) in &shards {
        let (end, end_err) = if dir.is_dir() {
            match log_end(dir, *shard) {
                Ok(e) => (e.map(|p| p.0), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        for sink in &names {
            let (cursor, error) = match read_cursor(&cursor_path(dir, sink)) {
                Ok(c) => (c, end_err.clone()),
                Err(e) => (None, Some(e.to_string())),
            };
            let pos = cursor.as_ref().map(|c| c.pos);
            let audit = cursor.as_ref().and_then(|c| c.audit.as_ref());
            rows.push(CursorRow {
                sink: sink.clone(),
                kind: audit.map(|_| "audit"),
                shard: shard.0,
                cursor: pos,
                log_end: end,
                lag_bytes: end.map(|e| e.saturating_sub(pos.unwrap_or(0))),
                updated_ms: cursor.as_ref().map(|c| c.updated_ms),
                file: audit.map(|a| a.name.clone()),
                file_bytes: audit.map(|a| a.bytes),
                error,
            });
        }
    }
    Ok(rows)
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), |x| x.to_string())
}

/// Renders rows as an aligned text table.
pub fn render_table(rows: &[CursorRow], now_ms: i64) -> String {
    let mut lines = vec![[
        "SINK".to_owned(),
        "SHARD".to_owned(),
        "CURSOR".to_owned(),
        "LOG_END".to_owned(),
        "LAG_BYTES".to_owned(),
        "UPDATED".to_owned(),
        "NOTE".to_owned(),
    ]];
    for r in rows {
        let updated = r.updated_ms.map(|ms| {
            let s = (now_ms - ms).max(0) / 1000;
            format!("{s}s ago")
        });
        let note = r
            .error
            .clone()
            .or_else(|| {
                r.file
                    .as_ref()
                    .map(|f| format!("{f} ({} bytes)", r.file_bytes.unwrap_or(0)))
            })
            .unwrap_or_else(|| {
                if r.cursor.is_none() {
                    "no cursor yet".into()
                } else {
                    String::new()
                }
            });
        lines.push([
            r.sink.clone(),
            r.shard.to_string(),
            opt(&r.cursor),
            opt(&r.log_end),
            opt(&r.lag_bytes),
            opt(&updated),
            note,
        ]);
    }
    let mut widths = [0usize; 7];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut line = String::new();
        for (i, (w, c)) in widths.iter().zip(l.iter()).enumerate() {
            if i + 1 == l.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no sinks: none configured and no cursor files found)\n");
    }
    out
}

/// Runs `geobeat sinks`: returns the text to print.
pub fn run_sinks_command(args: &SinksArgs) -> Result<String, FlushError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| env("GEOBEAT_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(crate::auth::DATA_DIR_DEFAULT));
    let config = args
        .config
        .clone()
        .or_else(|| env("GEOBEAT_CONFIG").map(PathBuf::from));
    let configured = match &config {
        Some(path) => load_sinks(path).map_err(|e| FlushError::Config(e.to_string()))?,
        None => Vec::new(),
    };
    let names: Vec<String> = configured.iter().map(|s| s.name.clone()).collect();
    let mut rows = collect(&data_dir, &names)?;
    for r in &mut rows {
        if let Some(s) = configured.iter().find(|s| s.name == r.sink) {
            r.kind = Some(s.kind.name());
        }
    }
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            sinks: &'a [CursorRow],
        }
        let mut text = serde_json::to_string_pretty(&Out { sinks: &rows }).expect("rows serialize");
        text.push('\n');
        Ok(text)
    } else {
        Ok(render_table(&rows, now_ms()))
    }
}
