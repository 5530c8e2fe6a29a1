//! Sink cursors: how far one sink has durably consumed one shard's log, persisted in
//! `<data-dir>/shard-NNNN/cursors/<sink>.cursor` (one line of JSON). It owns the file format and
//! the atomic replacement of a cursor file (write `<sink>.cursor.tmp`, fsync, rename, fsync the
//! directory), and the time names of audit files (`YYYY-MM-DDTHH-MM-SS`, and the hourly
//! `YYYY-MM-DDTHH` of files written before rotation windows existed). It does not decide when a cursor may move (the
//! driver does, only after the sink confirmed the batch).
//!
//! Invariant: a cursor file on disk is always complete (old or new, never torn), and a cursor
//! names only data the sink has made durable: everything before `pos` is in the sink.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::SINK_CURSOR_BYTES_MAX;
use crate::log::LogPos;

use super::FlushError;

/// Directory (inside a shard directory) holding the cursor files.
pub const CURSORS_DIR: &str = "cursors";
/// File name suffix of a cursor file.
pub const CURSOR_SUFFIX: &str = ".cursor";
/// Format version written in every cursor file.
pub const CURSOR_FORMAT: u32 = 1;
/// Milliseconds in an hour (old audit files are hourly).
pub const HOUR_MS: i64 = 3_600_000;

/// The state of an audit sink's current file for one shard, recorded with the cursor so that a
/// restart can cut the file back to exactly what the cursor covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFile {
    /// The time the file is named for: `YYYY-MM-DDTHH-MM-SS` (UTC), or `YYYY-MM-DDTHH` for an
    /// hourly file written before rotation windows existed (whose cursors call this `hour`).
    #[serde(alias = "hour")]
    pub start: String,
    /// The file's final name (`<start>.ndjson` or `<start>.ndjson.zst`); while the file is open
    /// it lives under this name plus `.tmp`.
    pub name: String,
    /// Bytes of the file that hold exactly the heartbeats before `pos`.
    pub bytes: u64,
}

/// One sink's durable position in one shard's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Format version ([`CURSOR_FORMAT`]).
    pub format: u32,
    /// Everything before this log position is in the sink.
    pub pos: u64,
    /// Sequence number of the entry at `pos`, when known (checked on resume).
    pub seq: Option<u64>,
    /// Audit sinks: the current file.
    #[serde(default)]
    pub audit: Option<AuditFile>,
    /// When the cursor was written, ms since the Unix epoch.
    pub updated_ms: i64,
}

impl Cursor {
    /// The cursor of a sink that has consumed nothing.
    pub fn start() -> Cursor {
        Cursor {
            format: CURSOR_FORMAT,
            pos: 0,
            seq: None,
            audit: None,
            updated_ms: 0,
        }
    }

    /// `pos` as a log position.
    pub fn log_pos(&self) -> LogPos {
        LogPos(self.pos)
    }
}

/// The cursor file of sink `sink` in shard directory `shard_dir`.
pub fn cursor_path(shard_dir: &Path, sink: &str) -> PathBuf {
    shard_dir
        .join(CURSORS_DIR)
        .join(format!("{sink}{CURSOR_SUFFIX}"))
}

/// fsyncs a directory so creations, renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), FlushError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FlushError::io("fsync directory", dir, e))
}

/// Creates `dir` (and missing parents) durably: each directory created is followed by an fsync
/// of its parent.
pub(crate) fn create_dir_durable(dir: &Path) -> Result<(), FlushError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match std::fs::DirBuilder::new()
        .mode(crate::datadir::DIR_MODE)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(FlushError::io("create directory", dir, e)),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Reads a cursor file; `Ok(None)` if it does not exist.
pub fn read_cursor(path: &Path) -> Result<Option<Cursor>, FlushError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FlushError::io("open cursor", path, e)),
    };
    let len = file
        .metadata()
        .map_err(|e| FlushError::io("stat cursor", path, e))?
        .len();
    let bad = |reason: String| FlushError::Cursor {
        path: path.to_path_buf(),
        reason,
    };
    if len > SINK_CURSOR_BYTES_MAX {
        return Err(bad(format!("{len} bytes, larger than any cursor file")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| FlushError::io("read cursor", path, e))?;
    let cursor: Cursor =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a cursor: {e}")))?;
    if cursor.format != CURSOR_FORMAT {
        return Err(bad(format!(
            "format {} (this build reads {CURSOR_FORMAT})",
            cursor.format
        )));
    }
    if let Some(a) = &cursor.audit {
        if parse_file_start(&a.start).is_none() || !a.name.starts_with(&a.start) {
            return Err(bad(format!("bad audit file {:?} / {:?}", a.start, a.name)));
        }
    }
    Ok(Some(cursor))
}

/// Replaces the cursor file at `path` atomically and durably (temp file, fsync, rename, fsync of
/// the directory). Creates the `cursors` directory on first use.
pub fn write_cursor(path: &Path, cursor: &Cursor) -> Result<(), FlushError> {
    let dir = path.parent().expect("cursor paths have a directory");
    create_dir_durable(dir)?;
    let mut text = serde_json::to_string(cursor).expect("a cursor serializes");
    text.push('\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::datadir::FILE_MODE)
        .open(&tmp)
        .map_err(|e| FlushError::io("create cursor", &tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| FlushError::io("write cursor", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| FlushError::io("rename cursor", &tmp, e))?;
    sync_dir(dir)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01 (inverse of `civil_from_days`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The hour (hours since the Unix epoch) containing `ms`.
pub fn hour_of_ms(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// The UTC name of an hour: `YYYY-MM-DDTHH`.
pub fn hour_name(hour: i64) -> String {
    let days = hour.div_euclid(24);
    let h = hour.rem_euclid(24);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{h:02}")
}

/// Parses an hour name back into hours since the epoch; `None` for anything else.
pub fn parse_hour_name(name: &str) -> Option<i64> {
    let b = name.as_bytes();
    if b.len() != 13 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = name.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, m, d, h) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 {
        return None;
    }
    let days = days_from_civil(i64::from(y), m, d);
    let hour = days * 24 + i64::from(h);
    // Reject dates like 02-31 that normalise to another day.
    (hour_name(hour) == name).then_some(hour)
}

/// The UTC name of a second since the epoch: `YYYY-MM-DDTHH-MM-SS` (`:` is avoided: it is not
/// portable in file names).
pub fn second_name(sec: i64) -> String {
    let hour = sec.div_euclid(3600);
    let rest = sec.rem_euclid(3600);
    format!("{}-{:02}-{:02}", hour_name(hour), rest / 60, rest % 60)
}

/// The time an audit file is named for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStart {
    /// `YYYY-MM-DDTHH-MM-SS`: seconds since the epoch.
    Second(i64),
    /// `YYYY-MM-DDTHH` (files written before rotation windows existed): hours since the epoch.
    Hour(i64),
}

/// Parses an audit file's start name (either form); `None` for anything else.
pub fn parse_file_start(name: &str) -> Option<FileStart> {
    if name.len() == 13 {
        return parse_hour_name(name).map(FileStart::Hour);
    }
    let b = name.as_bytes();
    if b.len() != 19 || b[13] != b'-' || b[16] != b'-' {
        return None;
    }
    let hour = parse_hour_name(&name[..13])?;
    let num = |s: &str| -> Option<i64> {
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (m, sec) = (num(&name[14..16])?, num(&name[17..19])?);
    (m < 60 && sec < 60).then_some(FileStart::Second(hour * 3600 + m * 60 + sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_names_round_trip() {
        // Known instants name the right UTC hour, and every hour over 400 years (sampled) parses
        // back to itself; malformed names and impossible dates are refused.
        assert_eq!(hour_name(0), "1970-01-01T00");
        assert_eq!(hour_name(hour_of_ms(1_732_200_000_000)), "2024-11-21T14");
        assert_eq!(hour_name(hour_of_ms(951_782_400_000)), "2000-02-29T00");
        assert_eq!(hour_name(hour_of_ms(-1)), "1969-12-31T23");
        for hour in (0..400 * 366 * 24).step_by(7919) {
            assert_eq!(parse_hour_name(&hour_name(hour)), Some(hour));
        }
        assert_eq!(second_name(1_732_200_000), "2024-11-21T14-40-00");
        assert_eq!(second_name(-1), "1969-12-31T23-59-59");
        for sec in (0..400 * 366 * 86_400i64).step_by(7_919_993) {
            assert_eq!(
                parse_file_start(&second_name(sec)),
                Some(FileStart::Second(sec))
            );
        }
        assert_eq!(
            parse_file_start("2024-11-21T14"),
            Some(FileStart::Hour(hour_of_ms(1_732_200_000_000)))
        );
        for bad in [
            "2024-11-21T14-60-00",
            "2024-11-21T14-00-0x",
            "2024-11-21T14:00:00",
        ] {
            assert_eq!(parse_file_start(bad), None, "{bad}");
        }
        for bad in [
            "2024-02-30T00",
            "2024-13-01T00",
            "2024-01-01T24",
            "2024-01-01 00",
            "2024-1-01T000",
            "",
            "+024-01-01T00",
        ] {
            assert_eq!(parse_hour_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn cursor_files_replace_atomically_and_reject_garbage() {
        // Writes two cursors in turn to the same path: the file always reads back as the last one
        // written and no temp file is left; a missing file is None; garbage and a future format
        // are errors naming the path.
        let dir = tempfile::tempdir().unwrap();
        let path = cursor_path(&dir.path().join("shard-0001"), "pg");
        assert_eq!(read_cursor(&path).unwrap(), None);
        let mut c = Cursor::start();
        c.pos = 4096 + 80;
        c.seq = Some(2);
        write_cursor(&path, &c).unwrap();
        assert_eq!(read_cursor(&path).unwrap(), Some(c.clone()));
        c.pos = 1 << 40;
        c.audit = Some(AuditFile {
            start: "2026-11-22T13-05-00".into(),
            name: "2026-11-22T13-05-00.ndjson.zst".into(),
            bytes: 77,
        });
        write_cursor(&path, &c).unwrap();
        assert_eq!(read_cursor(&path).unwrap(), Some(c.clone()));
        // A cursor written before rotation windows existed (`hour`, an hourly file) still reads.
        std::fs::write(
            &path,
            br#"{"format":1,"pos":5,"seq":2,"audit":{"hour":"2026-11-22T13","name":"2026-11-22T13.ndjson","bytes":9},"updated_ms":1}"#,
        )
        .unwrap();
        let old = read_cursor(&path).unwrap().unwrap();
        assert_eq!(old.audit.unwrap().start, "2026-11-22T13");
        write_cursor(&path, &c).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["pg.cursor".to_string()]);
        std::fs::write(&path, b"{nope").unwrap();
        let err = read_cursor(&path).unwrap_err().to_string();
        assert!(err.contains("pg.cursor"), "{err}");
        std::fs::write(&path, br#"{"format":9,"pos":1,"seq":null,"updated_ms":0}"#).unwrap();
        assert!(read_cursor(&path).is_err());
        std::fs::write(&path, vec![b' '; 5000]).unwrap();
        assert!(read_cursor(&path).is_err());
    }
}
