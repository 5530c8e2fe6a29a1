//! The revocation list: per token subject (a device, a gateway prefix, ops, a subscriber prefix)
//! a *not-before* time; tokens of that subject issued before it are refused, without rotating
//! the secret. It owns the list's file in the data directory (`revocations`, JSON, format in
//! shards/README.md: read, bounded, written atomically under a lock so concurrent `geobeat token
//! revoke` runs never lose an entry), the rule "is this token revoked", the times the command
//! line takes (`--before`: RFC 3339 or Unix seconds), and the server's [`Registry`] (the list a
//! running server enforces, reloaded when the file changes). It does not check tokens (`auth`),
//! answer or close connections (`net`), or parse the command line (`config`, `tokens`).
//!
//! Rules: an entry names a scope and its exact subject (a gateway entry for `fleet-` does not
//! touch a token minted for `fleet-a-`); a token is refused when its subject has an entry and it
//! was issued strictly before the entry's not-before. A `gb1` token (minted before issue times
//! existed) has no issue time and counts as issued before any not-before: a revocation of its
//! subject always refuses it (the safe reading; mint a new token).
//!
//! Invariants: the file is only ever replaced whole (temporary file, fsync, rename, fsync of the
//! directory), so a reader sees the old list or the new one; it never holds more than
//! [`REVOCATIONS_MAX`] entries nor one subject twice; a server whose list cannot be read at
//! start refuses to start, and one whose list becomes unreadable keeps enforcing the last good
//! one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::auth::{scope_kind, Issue, Scope};
use crate::limits::{REVOCATIONS_FILE_BYTES_MAX, REVOCATIONS_MAX};

/// Name of the revocation list inside the data directory.
pub const FILE_NAME: &str = "revocations";
/// Name of the lock file that serializes writers of the list (never replaced, stays empty).
pub const LOCK_FILE_NAME: &str = "revocations.lock";
/// The `format` field of the file.
const FORMAT: &str = "geobeat-revocations";
/// The `version` field written by this build.
const VERSION: u32 = 1;

/// One revoked subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The scope and its exact subject.
    pub scope: Scope,
    /// Tokens of the subject issued strictly before this time (Unix ms) are refused.
    pub not_before_ms: u64,
    /// When the entry was recorded (Unix ms), for people reading the list.
    pub recorded_ms: u64,
}

/// The list: at most one entry per subject, at most [`REVOCATIONS_MAX`] entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    entries: HashMap<Scope, Revocation>,
}

/// Why the list could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("revocation list {}: {op} failed: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a revocation list this build reads.
    #[error(
        "revocation list {}: {reason}; fix the file (format: shards/README.md) or move it away \
         (which lifts every revocation)",
        path.display()
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Recording one more entry would pass the bound.
    #[error(
        "revocation list {} is full ({max} subjects); lift entries that no longer matter with \
         `geobeat token unrevoke`, or rotate the secret to revoke every token at once",
        path.display()
    )]
    Full {
        /// The file.
        path: PathBuf,
        /// The bound.
        max: usize,
    },
}

/// One entry as the file spells it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryJson {
    kind: String,
    subject: String,
    not_before_ms: u64,
    recorded_ms: u64,
}

/// The file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    format: String,
    version: u32,
    revocations: Vec<EntryJson>,
}

/// The scope of a kind name and subject, with the subject checked as `mint` checks it.
pub fn scope_of(kind: &str, subject: &str) -> Result<Scope, String> {
    let scope = match kind {
        "device" => Scope::Device(subject.to_owned()),
        "gateway" => Scope::Gateway(subject.to_owned()),
        "ops" if subject.is_empty() => Scope::Ops,
        "ops" => return Err("an ops entry has an empty subject".into()),
        "subscriber" => Scope::Subscriber(subject.to_owned()),
        other => return Err(format!("unknown kind {other:?}")),
    };
    scope
        .check_subject()
        .map_err(|reason| format!("{kind} subject {subject:?}: {reason}"))?;
    Ok(scope)
}

impl Revocations {
    /// The entry that refuses a token of `scope` issued as `issue` says, if any.
    pub fn refuses(&self, scope: &Scope, issue: &Issue) -> Option<&Revocation> {
        let entry = self.entries.get(scope)?;
        match issue.at_ms {
            Some(at) if at >= entry.not_before_ms => None,
            _ => Some(entry),
        }
    }

    /// The entry of `scope`, if any.
    pub fn get(&self, scope: &Scope) -> Option<&Revocation> {
        self.entries.get(scope)
    }

    /// Entries, sorted by kind and subject.
    pub fn sorted(&self) -> Vec<&Revocation> {
        let mut v: Vec<&Revocation> = self.entries.values().collect();
        v.sort_by(|a, b| {
            (scope_kind(&a.scope), a.scope.subject())
                .cmp(&(scope_kind(&b.scope), b.scope.subject()))
        });
        v
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that tokens of `scope` issued before `not_before_ms` are refused. An existing
    /// entry only ever moves later (a revocation never un-revokes a token; lift it with
    /// [`Revocations::lift`] first). Returns the entry now in force. `path` names the file in
    /// the error when the list is full.
    pub fn revoke(
        &mut self,
        scope: Scope,
        not_before_ms: u64,
        recorded_ms: u64,
        path: &Path,
    ) -> Result<Revocation, Error> {
        if let Some(e) = self.entries.get_mut(&scope) {
            if not_before_ms > e.not_before_ms {
                e.not_before_ms = not_before_ms;
                e.recorded_ms = recorded_ms;
            }
            return Ok(e.clone());
        }
        if self.entries.len() >= REVOCATIONS_MAX {
            return Err(Error::Full {
                path: path.to_owned(),
                max: REVOCATIONS_MAX,
            });
        }
        let e = Revocation {
            scope: scope.clone(),
            not_before_ms,
            recorded_ms,
        };
        self.entries.insert(scope, e.clone());
        Ok(e)
    }

    /// Removes the entry of `scope`; the removed entry, if there was one.
    pub fn lift(&mut self, scope: &Scope) -> Option<Revocation> {
        self.entries.remove(scope)
    }

    /// Parses the file's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Revocations, Error> {
        let bad = |reason: String| Error::Format {
            path: path.to_owned(),
            reason,
        };
        let file: FileJson =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if file.format != FORMAT {
            return Err(bad(format!("format is {:?}, not {FORMAT:?}", file.format)));
        }
        if file.version != VERSION {
            return Err(bad(format!(
                "version {} is not one this build reads ({VERSION})",
                file.version
            )));
        }
        if file.revocations.len() > REVOCATIONS_MAX {
            return Err(bad(format!(
                "{} entries, more than the {REVOCATIONS_MAX} allowed",
                file.revocations.len()
            )));
        }
        let mut out = Revocations::default();
        for (i, e) in file.revocations.into_iter().enumerate() {
            let scope =
                scope_of(&e.kind, &e.subject).map_err(|r| bad(format!("entry {i}: {r}")))?;
            if out.entries.contains_key(&scope) {
                return Err(bad(format!(
                    "entry {i}: {} {:?} appears twice",
                    e.kind, e.subject
                )));
            }
            out.entries.insert(
                scope.clone(),
                Revocation {
                    scope,
                    not_before_ms: e.not_before_ms,
                    recorded_ms: e.recorded_ms,
                },
            );
        }
        Ok(out)
    }

    /// The file's text: one entry per line, sorted, so the file reads (and diffs) well.
    pub fn to_text(&self) -> String {
        let mut out = format!("{{\"format\":\"{FORMAT}\",\"version\":{VERSION},\"revocations\":[");
        for (i, e) in self.sorted().into_iter().enumerate() {
            let json = EntryJson {
                kind: scope_kind(&e.scope).to_owned(),
                subject: e.scope.subject().to_owned(),
                not_before_ms: e.not_before_ms,
                recorded_ms: e.recorded_ms,
            };
            out.push_str(if i == 0 { "\n  " } else { ",\n  " });
            out.push_str(&serde_json::to_string(&json).expect("plain fields serialize"));
        }
        out.push_str(if self.is_empty() { "]}\n" } else { "\n]}\n" });
        out
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Reads the list at `path`; a missing file is an empty list.
pub fn load_file(path: &Path) -> Result<Revocations, Error> {
    let mut file = match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Revocations::default()),
        r => r.map_err(io_err(path, "open"))?,
    };
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    if len > REVOCATIONS_FILE_BYTES_MAX {
        return Err(Error::Format {
            path: path.to_owned(),
            reason: format!("{len} bytes, larger than any revocation list"),
        });
    }
    let mut text = String::new();
    (&mut file)
        .take(REVOCATIONS_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .map_err(io_err(path, "read"))?;
    Revocations::parse(&text, path)
}

/// Reads the list of the data directory `dir`.
pub fn load(dir: &Path) -> Result<Revocations, Error> {
    load_file(&dir.join(FILE_NAME))
}

/// Changes the list of the data directory `dir`: takes the writers' lock (waiting for another
/// `geobeat token` run to finish), reads the list, lets `change` edit it, and, if `change`
/// returns `Ok` with `true` (something changed), replaces the file atomically and durably. The
/// server, if one runs, picks the new file up within `REVOCATIONS_POLL_INTERVAL`.
pub fn update<T>(
    dir: &Path,
    change: impl FnOnce(&mut Revocations, &Path) -> Result<(T, bool), Error>,
) -> Result<T, Error> {
    let lock_path = dir.join(LOCK_FILE_NAME);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::datadir::FILE_MODE)
        .open(&lock_path)
        .map_err(io_err(&lock_path, "open lock file"))?;
    // SAFETY: flock on a descriptor this function owns; it is released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::Io {
            path: lock_path,
            op: "lock",
            source: io::Error::last_os_error(),
        });
    }
    let path = dir.join(FILE_NAME);
    let mut list = load_file(&path)?;
    let (out, changed) = change(&mut list, &path)?;
    if changed {
        write_atomic(dir, &list.to_text())?;
    }
    drop(lock);
    Ok(out)
}

/// Replaces `<dir>/revocations` with `text`: a temporary file (mode 0600) written and synced,
/// renamed over the list, then the directory synced.
fn write_atomic(dir: &Path, text: &str) -> Result<(), Error> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let path = dir.join(FILE_NAME);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::datadir::FILE_MODE)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io {
            path: tmp,
            op: "write",
            source: e,
        });
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path, "rename"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync directory"))
}

/// Why a `--before` time was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid time {input:?}: {reason} (expected RFC 3339 such as 2026-12-05T13:00:00Z, or Unix \
     seconds such as 1796475600)"
)]
pub struct TimeError {
    /// The text given.
    pub input: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Parses a time given on the command line: Unix seconds (digits only) or an RFC 3339 date-time
/// with `Z` or a `±hh:mm` offset (fractions of a second kept to the millisecond). Unix ms.
pub fn parse_time(text: &str) -> Result<u64, TimeError> {
    let err = |reason| TimeError {
        input: text.to_owned(),
        reason,
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(err("empty"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        if t.len() > 11 {
            return Err(err(
                "too large for Unix seconds (milliseconds are not accepted)",
            ));
        }
        let s: u64 = t.parse().map_err(|_| err("not a number"))?;
        return Ok(s * 1000);
    }
    let b = t.as_bytes();
    let num = |at: usize, len: usize| -> Option<i64> {
        let d = b.get(at..at + len)?;
        d.iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let shape = || err("not RFC 3339 (YYYY-MM-DDTHH:MM:SS with Z or an offset)");
    let (y, mo, d) = (
        num(0, 4).ok_or_else(shape)?,
        num(5, 2).ok_or_else(shape)?,
        num(8, 2).ok_or_else(shape)?,
    );
    let (h, mi, s) = (
        num(11, 2).ok_or_else(shape)?,
        num(14, 2).ok_or_else(shape)?,
        num(17, 2).ok_or_else(shape)?,
    );
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(shape());
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(err("a field is out of range"));
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                frac_ms = frac_ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(shape());
        }
        for _ in (i - start)..3 {
            frac_ms *= 10;
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (
                num(i + 1, 2).ok_or_else(shape)?,
                num(i + 4, 2).ok_or_else(shape)?,
            );
            if oh > 23 || om > 59 {
                return Err(err("offset out of range"));
            }
            if sign == b'+' {
                oh * 60 + om
            } else {
                -(oh * 60 + om)
            }
        }
        _ => return Err(err("missing or malformed zone (Z or ±hh:mm)")),
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset_min * 60;
    if secs < 0 {
        return Err(err("before 1970"));
    }
    Ok(secs as u64 * 1000 + frac_ms as u64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms as RFC 3339 UTC with milliseconds (how the command line shows times).
pub fn format_time(ms: u64) -> String {
    crate::logging::rfc3339_ms(ms.min(i64::MAX as u64) as i64)
}

/// What identifies one version of the file (a replacement by rename changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp_of(path: &Path) -> Result<Option<Stamp>, Error> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "stat")(e)),
        Ok(m) => Ok(Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })),
    }
}

/// The list a running server enforces, shared by its executors: loaded at start, reloaded by
/// [`Registry::refresh`] when the file changed (each executor calls it on a bounded interval),
/// with a generation number that moves at every reload so executors know to re-check their
/// live connections.
pub struct Registry {
    /// `<data-dir>/revocations`.
    path: PathBuf,
    /// The list in force.
    current: RwLock<Arc<Revocations>>,
    /// The file version last loaded (or found unreadable): the same stamp is not read again.
    seen: Mutex<Option<Stamp>>,
    /// Moves at every reload.
    generation: AtomicU64,
}

impl Registry {
    /// Loads the list of the data directory `dir` (none there: an empty list). An unreadable
    /// list is an error: a server must not start without the revocations it was given.
    pub fn open(dir: &Path) -> Result<Registry, Error> {
        let path = dir.join(FILE_NAME);
        let stamp = stamp_of(&path)?;
        let list = load_file(&path)?;
        Ok(Registry {
            path,
            current: RwLock::new(Arc::new(list)),
            seen: Mutex::new(stamp),
            generation: AtomicU64::new(0),
        })
    }

    /// The list in force.
    pub fn current(&self) -> Arc<Revocations> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The entry that refuses a token of `scope` issued as `issue`, if any.
    pub fn refuses(&self, scope: &Scope, issue: &Issue) -> Option<Revocation> {
        let list = self.current.read().unwrap_or_else(|p| p.into_inner());
        list.refuses(scope, issue).cloned()
    }

    /// Moves at every reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads the list if the file changed since the last look (one `stat` otherwise): `true`
    /// if a new list is in force. An unreadable file is reported once (until it changes again)
    /// and the previous list stays in force. A removed file is an empty list.
    pub fn refresh(&self) -> Result<bool, Error> {
        let stamp = stamp_of(&self.path)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == stamp {
            return Ok(false);
        }
        *seen = stamp;
        let list = load_file(&self.path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenId;

    fn issue(at_ms: Option<u64>) -> Issue {
        Issue {
            at_ms,
            id: TokenId::of("t"),
        }
    }

    #[test]
    fn refusal_rule() {
        // Exact subject; strictly before the not-before; no issue time counts as before.
        let mut l = Revocations::default();
        let p = Path::new("r");
        l.revoke(Scope::Gateway("fleet-".into()), 1000, 5, p)
            .unwrap();
        let gw = Scope::Gateway("fleet-".into());
        assert!(l.refuses(&gw, &issue(Some(999))).is_some());
        assert!(l.refuses(&gw, &issue(Some(1000))).is_none());
        assert!(l.refuses(&gw, &issue(None)).is_some(), "gb1: revoked");
        assert!(l
            .refuses(&Scope::Gateway("fleet-a-".into()), &issue(Some(1)))
            .is_none());
        assert!(l
            .refuses(&Scope::Subscriber("fleet-".into()), &issue(Some(1)))
            .is_none());
        // Only ever later; lift removes.
        assert_eq!(l.revoke(gw.clone(), 500, 6, p).unwrap().not_before_ms, 1000);
        assert_eq!(
            l.revoke(gw.clone(), 2000, 7, p).unwrap().not_before_ms,
            2000
        );
        assert!(l.lift(&gw).is_some());
        assert!(l.refuses(&gw, &issue(None)).is_none());
    }

    #[test]
    fn text_round_trips_and_bad_files_are_named() {
        // Every kind, odd subjects; the text parses back to the same list. Broken files are
        // refused with the reason.
        let mut l = Revocations::default();
        let p = Path::new("/d/revocations");
        for (i, s) in [
            Scope::Device("truck \"7\"/ü".into()),
            Scope::Gateway(String::new()),
            Scope::Ops,
            Scope::Subscriber("a-".into()),
        ]
        .into_iter()
        .enumerate()
        {
            l.revoke(s, 1_796_475_600_000 + i as u64, 1, p).unwrap();
        }
        let text = l.to_text();
        assert_eq!(Revocations::parse(&text, p).unwrap(), l);
        let empty = Revocations::default();
        assert_eq!(Revocations::parse(&empty.to_text(), p).unwrap(), empty);
        for (bad, needle) in [
            ("", "not valid JSON"),
            (r#"{"format":"x","version":1,"revocations":[]}"#, "format"),
            (
                r#"{"format":"geobeat-revocations","version":2,"revocations":[]}"#,
                "version 2",
            ),
            (
                r#"{"format":"geobeat-revocations","version":1,"revocations":[{"kind":"ops","subject":"x","not_before_ms":1,"recorded_ms":1}]}"#,
                "empty subject",
            ),
            (
                r#"{"format":"geobeat-revocations","version":1,"revocations":[{"kind":"device","subject":"","not_before_ms":1,"recorded_ms":1}]}"#,
                "entry 0",
            ),
            (
                r#"{"format":"geobeat-revocations","version":1,"revocations":[{"kind":"ops","subject":"","not_before_ms":1,"recorded_ms":1},{"kind":"ops","subject":"","not_before_ms":2,"recorded_ms":1}]}"#,
                "twice",
            ),
        ] {
            let e = Revocations::parse(bad, p).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains("/d/revocations"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_bound_holds() {
        // REVOCATIONS_MAX subjects fit; one more is refused, naming the fix; an existing subject
        // can still move.
        let mut l = Revocations::default();
        let p = Path::new("r");
        for i in 0..REVOCATIONS_MAX {
            l.revoke(Scope::Device(format!("d-{i}")), 1, 1, p).unwrap();
        }
        let e = l
            .revoke(Scope::Device("one-more".into()), 1, 1, p)
            .unwrap_err();
        assert!(e.to_string().contains("unrevoke"), "{e}");
        l.revoke(Scope::Device("d-7".into()), 9, 1, p).unwrap();
        assert!((l.to_text().len() as u64) < REVOCATIONS_FILE_BYTES_MAX);
    }

    #[test]
    fn times() {
        // Unix seconds and RFC 3339 forms of one instant; garbage refused.
        let ms = 1_796_475_600_000;
        for t in [
            "1796475600",
            "2026-12-05T13:00:00Z",
            "2026-12-05T13:00:00.000Z",
            "2026-12-05t14:00:00+01:00",
            "2026-12-05T08:30:00-04:30",
        ] {
            assert_eq!(parse_time(t), Ok(ms), "{t}");
        }
        assert_eq!(parse_time("2026-12-05T13:00:00.25Z"), Ok(ms + 250));
        assert_eq!(format_time(ms + 250), "2026-12-05T13:00:00.250Z");
        for bad in [
            "",
            "now",
            "1796475600000",
            "2026-12-05",
            "2026-12-05T13:00:00",
            "2026-12-05 13:00:00Z",
            "2026-13-05T13:00:00Z",
            "2026-12-05T13:00:00+0100",
            "-5",
            "1.5",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn update_and_registry_reload() {
        // Writes go through the lock and the atomic replace; the registry sees each new
        // version once, keeps the last good list when the file breaks, and reads no file as
        // empty.
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        assert!(reg.current().is_empty());
        assert!(!reg.refresh().unwrap());
        update(dir.path(), |l, p| {
            l.revoke(Scope::Ops, 10, 1, p)?;
            Ok(((), true))
        })
        .unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(reg.refresh().unwrap());
        assert!(!reg.refresh().unwrap());
        assert_eq!(reg.generation(), 1);
        assert!(reg.refuses(&Scope::Ops, &issue(Some(9))).is_some());
        std::fs::write(dir.path().join(FILE_NAME), "{broken").unwrap();
        assert!(reg.refresh().is_err());
        assert!(!reg.refresh().unwrap(), "reported once");
        assert!(
            reg.refuses(&Scope::Ops, &issue(Some(9))).is_some(),
            "last good list"
        );
        assert!(Registry::open(dir.path()).is_err(), "a start refuses it");
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        assert!(reg.refresh().unwrap());
        assert!(reg.current().is_empty());
    }
}
