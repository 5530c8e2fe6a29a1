//! [`FenceRegistry`]: the server's fences, persisted in `<data-dir>/geofences.json` and published
//! as immutable [`FenceSet`] snapshots. It owns the file format and its atomic replacement (temp
//! file, fsync, rename, fsync of the directory). It does not know HTTP or subscriptions.
//!
//! Concurrency: one mutex serialises writers (put/put_many/delete hold it across the file write, so two
//! writers never interleave file contents and publication order); a second one guards only the
//! current `(version, Arc<FenceSet>)` pair and is held for a pointer copy, so readers never wait
//! for an fsync. [`FenceRegistry::version`] is a lone atomic load, cheap enough to poll per commit
//! group; a reader that sees a new version then calls [`FenceRegistry::snapshot`].
//!
//! Invariant: a change is published only after the file holding it is durable; the published
//! snapshot always equals the file's content as of the last successful write. If a write fails
//! (the error is returned and nothing is published), the file holds either the old or the new
//! content (rename is atomic); the next successful write rewrites it from the published state.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::{push_json_str, Fence, FenceError, FenceSet};
use crate::limits::{FENCES_MAX, FENCE_VERTICES_TOTAL_MAX};

/// Name of the fences file in the data directory.
pub const FENCES_FILE: &str = "geofences.json";
/// Format version written in the fences file.
const FORMAT_VERSION: u32 = 1;

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> FenceError {
    FenceError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    shape: Box<serde_json::value::RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    format_version: u32,
    fences: Vec<FileEntry>,
}

/// The server's fences: persistence plus the current snapshot. `Send + Sync`.
#[derive(Debug)]
pub struct FenceRegistry {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    /// Serialises put/put_many/delete (held across the file write).
    write: Mutex<()>,
    /// The published snapshot and its version (held only to copy or swap the pair).
    current: Mutex<(u64, Arc<FenceSet>)>,
    /// Mirror of `current.0` for cheap polling.
    version: AtomicU64,
}

impl FenceRegistry {
    /// Opens the fences of the data directory `data_dir`: reads `geofences.json` (a missing file
    /// means no fences; a corrupt one is an error naming the file) and removes a temp file left
    /// by a crash during a write. The first snapshot has version 1.
    pub fn open(data_dir: &Path) -> Result<FenceRegistry, FenceError> {
        let path = data_dir.join(FENCES_FILE);
        let tmp = data_dir.join(format!("{FENCES_FILE}.tmp"));
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale temp file", &tmp, e)),
        }
        let fences = match std::fs::read(&path) {
            Ok(bytes) => load(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("read fences file", &path, e)),
        };
        Ok(FenceRegistry {
            dir: data_dir.to_path_buf(),
            path,
            tmp,
            write: Mutex::new(()),
            current: Mutex::new((1, Arc::new(FenceSet::new(fences)))),
            version: AtomicU64::new(1),
        })
    }

    /// The fences file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates or replaces the fence named `fence.name`; `Ok(true)` when it is new. Persists,
    /// then publishes a new snapshot. Refuses a new fence beyond [`FENCES_MAX`], and a fence that
    /// would take all fences beyond [`FENCE_VERTICES_TOTAL_MAX`] polygon positions.
    pub fn put(&self, fence: Fence) -> Result<bool, FenceError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (_, cur) = self.snapshot();
        let existing = cur.id(&fence.name);
        if existing.is_none() && cur.len() >= FENCES_MAX {
            return Err(FenceError::TooManyFences);
        }
        let total = cur.vertices_total() + fence.shape.vertices()
            - existing.map_or(0, |id| cur.get(id).shape.vertices());
        if total > FENCE_VERTICES_TOTAL_MAX {
            return Err(FenceError::TooManyVerticesTotal(total));
        }
        let mut fences: Vec<Fence> = Vec::with_capacity(cur.len() + 1);
        fences.extend(
            cur.iter()
                .filter(|(_, f)| f.name != fence.name)
                .map(|(_, f)| f.clone()),
        );
        fences.push(fence);
        self.commit(fences)?;
        Ok(existing.is_none())
    }

    /// Creates or replaces every fence of `batch` at once, all or nothing: one file write, one
    /// published snapshot (none for an empty batch). Returns `(created, replaced)`: how many
    /// names were new and how many replaced a fence. Refuses, changing nothing, a batch that
    /// names a fence twice ([`FenceError::DuplicateName`]) or that would take the registry
    /// beyond [`FENCES_MAX`] fences or [`FENCE_VERTICES_TOTAL_MAX`] polygon positions.
    pub fn put_many(&self, batch: Vec<Fence>) -> Result<(usize, usize), FenceError> {
        let mut names = std::collections::HashSet::with_capacity(batch.len());
        if let Some(dup) = batch.iter().find(|f| !names.insert(f.name.as_str())) {
            return Err(FenceError::DuplicateName(dup.name.clone()));
        }
        if batch.is_empty() {
            return Ok((0, 0));
        }
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (_, cur) = self.snapshot();
        let replaced = batch.iter().filter(|f| cur.id(&f.name).is_some()).count();
        let created = batch.len() - replaced;
        if cur.len() + created > FENCES_MAX {
            return Err(FenceError::TooManyFences);
        }
        let total = cur.vertices_total() + batch.iter().map(|f| f.shape.vertices()).sum::<usize>()
            - batch
                .iter()
                .filter_map(|f| cur.by_name(&f.name))
                .map(|f| f.shape.vertices())
                .sum::<usize>();
        if total > FENCE_VERTICES_TOTAL_MAX {
            return Err(FenceError::TooManyVerticesTotal(total));
        }
        let mut fences: Vec<Fence> = Vec::with_capacity(cur.len() + created);
        fences.extend(
            cur.iter()
                .filter(|(_, f)| !names.contains(f.name.as_str()))
                .map(|(_, f)| f.clone()),
        );
        drop(names);
        fences.extend(batch);
        self.commit(fences)?;
        Ok((created, replaced))
    }

    /// Deletes the fence called `name`; `Ok(false)` when there is none (nothing is written).
    pub fn delete(&self, name: &str) -> Result<bool, FenceError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (_, cur) = self.snapshot();
        if cur.id(name).is_none() {
            return Ok(false);
        }
        let fences: Vec<Fence> = cur
            .iter()
            .filter(|(_, f)| f.name != name)
            .map(|(_, f)| f.clone())
            .collect();
        self.commit(fences)?;
        Ok(true)
    }

    /// The current snapshot's version (one atomic load). It grows by one per published change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current snapshot and its version.
    pub fn snapshot(&self) -> (u64, Arc<FenceSet>) {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (cur.0, Arc::clone(&cur.1))
    }

    /// Writes `fences` durably, then publishes them. Caller holds `self.write`.
    fn commit(&self, fences: Vec<Fence>) -> Result<(), FenceError> {
        let set = FenceSet::new(fences);
        self.write_file(&render(&set))?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let v = cur.0 + 1;
        *cur = (v, Arc::new(set));
        self.version.store(v, Ordering::Release);
        Ok(())
    }

    /// Replaces the fences file atomically and durably; removes the temp file on failure.
    fn write_file(&self, text: &str) -> Result<(), FenceError> {
        let r = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(crate::datadir::FILE_MODE)
                .open(&self.tmp)
                .map_err(|e| io_err("create fences temp file", &self.tmp, e))?;
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| io_err("write fences temp file", &self.tmp, e))?;
            drop(f);
            std::fs::rename(&self.tmp, &self.path)
                .map_err(|e| io_err("rename fences file", &self.tmp, e))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        r?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("fsync directory", &self.dir, e))
    }
}

/// The file text of `set`: `{"format_version":1,"fences":[{"name":..,"shape":..},..]}`, one fence
/// per line, in name order.
fn render(set: &FenceSet) -> String {
    let mut s = format!("{{\"format_version\":{FORMAT_VERSION},\"fences\":[");
    for (i, (_, f)) in set.iter().enumerate() {
        s.push_str(if i == 0 { "\n" } else { ",\n" });
        s.push_str("{\"name\":");
        push_json_str(&mut s, &f.name);
        s.push_str(",\"shape\":");
        s.push_str(&f.to_json());
        s.push('}');
    }
    s.push_str("\n]}\n");
    s
}

/// Parses and validates the fences file's content.
fn load(path: &Path, bytes: &[u8]) -> Result<Vec<Fence>, FenceError> {
    let corrupt = |detail: String| FenceError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let body: FileBody =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a fences file: {e}")))?;
    if body.format_version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format_version {} is not supported (this build reads {FORMAT_VERSION})",
            body.format_version
        )));
    }
    if body.fences.len() > FENCES_MAX {
        return Err(corrupt(format!(
            "{} fences, at most {FENCES_MAX} allowed",
            body.fences.len()
        )));
    }
    let mut fences = Vec::with_capacity(body.fences.len());
    let mut seen = std::collections::HashSet::with_capacity(body.fences.len());
    let mut total = 0usize;
    for (i, e) in body.fences.iter().enumerate() {
        let f = Fence::parse(&e.name, e.shape.get().as_bytes())
            .map_err(|err| corrupt(format!("fence {i} ({:?}): {err}", e.name)))?;
        if !seen.insert(e.name.clone()) {
            return Err(corrupt(format!("fence name {:?} appears twice", e.name)));
        }
        total += f.shape.vertices();
        fences.push(f);
    }
    if total > FENCE_VERTICES_TOTAL_MAX {
        return Err(FenceError::OverBudget {
            path: path.to_path_buf(),
            detail: format!(
                "its fences hold {total} polygon positions in all, more than \
                 FENCE_VERTICES_TOTAL_MAX = {FENCE_VERTICES_TOTAL_MAX}; start a build with a \
                 larger limit and delete or simplify fences, or edit the file"
            ),
        });
    }
    Ok(fences)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(name: &str, body: &str) -> Fence {
        Fence::parse(name, body.as_bytes()).unwrap()
    }

    const CIRCLE: &str = r#"{"center":[13.4,52.5],"radius_m":500}"#;
    const SQUARE: &str = r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1],[0,0]]]}"#;

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn put_delete_persist_and_reopen() {
        // Puts and deletes bump the version, publish snapshots and survive a reopen; no temp
        // file is left behind; a missing file means no fences.
        let dir = tempfile::tempdir().unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        assert_eq!(reg.version(), 1);
        assert!(reg.snapshot().1.is_empty());
        assert!(reg.put(fence("depot", CIRCLE)).unwrap());
        assert!(reg.put(fence("area", SQUARE)).unwrap());
        assert!(
            !reg.put(fence("depot", SQUARE)).unwrap(),
            "replacing is not creating"
        );
        assert_eq!(reg.version(), 4);
        let (v, set) = reg.snapshot();
        assert_eq!(v, 4);
        assert_eq!(set.names().collect::<Vec<_>>(), ["area", "depot"]);
        assert_eq!(
            set.by_name("depot").unwrap().shape,
            fence("x", SQUARE).shape
        );
        assert!(!reg.delete("nope").unwrap());
        assert_eq!(reg.version(), 4, "a no-op delete publishes nothing");
        assert!(reg.put(fence("gone", CIRCLE)).unwrap());
        assert!(reg.delete("gone").unwrap());
        assert_eq!(files(dir.path()), [FENCES_FILE]);
        drop(reg);
        let reg = FenceRegistry::open(dir.path()).unwrap();
        let (v, set) = reg.snapshot();
        assert_eq!(v, 1);
        assert_eq!(set.names().collect::<Vec<_>>(), ["area", "depot"]);
        assert_eq!(set.by_name("area").unwrap(), &fence("area", SQUARE));
        assert_eq!(set.by_name("depot").unwrap(), &fence("depot", SQUARE));
        // An old snapshot stays valid after later changes.
        assert!(reg.delete("area").unwrap());
        assert_eq!(set.len(), 2);
        assert_eq!(reg.snapshot().1.len(), 1);
    }

    /// A valid polygon of exactly `n` positions (a ring of `n - 1` points around `(lon, 0)`).
    fn polygon(name: &str, n: usize, lon: f64) -> Fence {
        let mut ring: Vec<(f64, f64)> = (0..n - 1)
            .map(|i| {
                let a = i as f64 / (n - 1) as f64 * std::f64::consts::TAU;
                (lon + a.cos(), a.sin())
            })
            .collect();
        ring.push(ring[0]);
        Fence::new(name, super::super::Shape::Polygon { rings: vec![ring] }).unwrap()
    }

    #[test]
    fn the_total_vertex_budget_is_enforced_by_put_put_many_and_open() {
        // Fences up to FENCE_VERTICES_TOTAL_MAX positions are stored; one more position, by PUT
        // or bulk import, is refused with too_many_vertices_total and changes nothing; replacing
        // a fence counts its new size only; a file over the budget fails to open, naming the
        // file and the limit.
        use crate::limits::FENCE_VERTICES_MAX;
        let dir = tempfile::tempdir().unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        let full = FENCE_VERTICES_TOTAL_MAX / FENCE_VERTICES_MAX;
        let batch: Vec<Fence> = (0..full)
            .map(|i| polygon(&format!("p{i:03}"), FENCE_VERTICES_MAX, i as f64 * 0.001))
            .collect();
        assert_eq!(reg.put_many(batch).unwrap(), (full, 0));
        assert_eq!(reg.snapshot().1.vertices_total(), FENCE_VERTICES_TOTAL_MAX);
        let v = reg.version();
        let e = reg.put(polygon("one-more", 4, 50.0)).unwrap_err();
        assert_eq!(e.reason(), "too_many_vertices_total");
        assert!(e.to_string().contains("FENCE_VERTICES_TOTAL_MAX"), "{e}");
        let e = reg
            .put_many(vec![
                polygon("p000", FENCE_VERTICES_MAX, 0.0),
                polygon("x", 4, 9.0),
            ])
            .unwrap_err();
        assert_eq!(e.reason(), "too_many_vertices_total", "{e}");
        assert_eq!(reg.version(), v, "nothing published");
        // Circles cost no positions; a smaller replacement makes room.
        assert!(reg.put(fence("c", CIRCLE)).unwrap());
        assert!(!reg.put(polygon("p000", 4, 0.0)).unwrap());
        assert!(reg.put(polygon("new", 5, 9.0)).unwrap());
        drop(reg);
        // The same file with one position over the budget: open refuses it with a clear error.
        let path = dir.path().join(FENCES_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let over = text.replacen(
            "\n]}",
            &format!(
                ",\n{{\"name\":\"zz\",\"shape\":{}}}\n]}}",
                polygon("zz", FENCE_VERTICES_MAX - 4, 20.0).to_json()
            ),
            1,
        );
        std::fs::write(&path, over).unwrap();
        let e = FenceRegistry::open(dir.path()).unwrap_err();
        assert_eq!(e.reason(), "over_budget");
        let msg = e.to_string();
        assert!(
            msg.contains(FENCES_FILE) && msg.contains("FENCE_VERTICES_TOTAL_MAX"),
            "{msg}"
        );
    }

    #[test]
    fn corrupt_files_are_refused_naming_the_file() {
        // Garbage, a wrong format version, an invalid shape and a duplicate name are each an
        // error naming the fences file; a stale temp file is removed at open.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FENCES_FILE);
        for (text, needle) in [
            ("{not json", "not a fences file"),
            (r#"{"format_version":2,"fences":[]}"#, "format_version 2"),
            (
                r#"{"format_version":1,"fences":[{"name":"a","shape":{"center":[0,0],"radius_m":-1}}]}"#,
                "fence 0 (\"a\")",
            ),
            (
                r#"{"format_version":1,"fences":[{"name":"a","shape":{"center":[0,0],"radius_m":1}},
                   {"name":"a","shape":{"center":[0,0],"radius_m":1}}]}"#,
                "appears twice",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = FenceRegistry::open(dir.path()).unwrap_err();
            assert_eq!(e.reason(), "corrupt");
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains(needle),
                "{msg}"
            );
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join(format!("{FENCES_FILE}.tmp")), "half a fi").unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        assert!(reg.snapshot().1.is_empty());
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn failed_write_publishes_nothing_and_leaves_no_temp_file() {
        // When the fences file cannot be replaced (a directory sits at its path), put fails with
        // an io error, the version and snapshot stay, and the temp file is removed.
        let dir = tempfile::tempdir().unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        assert!(reg.put(fence("a", CIRCLE)).unwrap());
        std::fs::remove_file(reg.path()).unwrap();
        std::fs::create_dir(reg.path()).unwrap();
        std::fs::write(reg.path().join("x"), "keep the directory non-empty").unwrap();
        let e = reg.put(fence("b", CIRCLE)).unwrap_err();
        assert_eq!(e.reason(), "io", "{e}");
        assert_eq!(reg.version(), 2);
        assert_eq!(reg.snapshot().1.names().collect::<Vec<_>>(), ["a"]);
        assert_eq!(files(dir.path()), [FENCES_FILE]);
    }

    /// The text of a fences file in the format [`render`] writes (`format_version` 1, one
    /// `{"name":..,"shape":..}` per line) holding `n` small circles named `f000000`, `f000001`, ...
    /// spread over a 400 x 250 grid of distinct centres. Written by hand rather than by `render`,
    /// so loading it checks the reader against the documented format.
    fn fences_file_text(n: usize) -> String {
        let mut s = String::with_capacity(n * 80);
        s.push_str("{\"format_version\":1,\"fences\":[");
        for i in 0..n {
            s.push_str(if i == 0 { "\n" } else { ",\n" });
            let lon = -170.0 + (i % 400) as f64 * 0.85;
            let lat = -80.0 + (i / 400 % 250) as f64 * 0.64;
            s.push_str(&format!(
                "{{\"name\":\"f{i:06}\",\"shape\":{{\"center\":[{lon},{lat}],\"radius_m\":50}}}}"
            ));
        }
        s.push_str("\n]}\n");
        s
    }

    #[test]
    fn at_fences_max_a_new_name_is_refused_and_a_replacement_is_not() {
        // Writes a fences file with exactly FENCES_MAX circles, opens the registry from it (all
        // load), then: a PUT of a new name fails with TooManyFences and changes neither the
        // snapshot, the version nor the file; a PUT replacing an existing name succeeds (still
        // FENCES_MAX fences, the new shape published and persisted); after one delete, a new
        // name fits again. The last reopen checks the rewritten file loads at the limit.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FENCES_FILE);
        std::fs::write(&path, fences_file_text(FENCES_MAX)).unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        assert_eq!(reg.snapshot().1.len(), FENCES_MAX);
        let before = std::fs::read(&path).unwrap();

        let e = reg.put(fence("one-more", CIRCLE)).unwrap_err();
        assert!(matches!(e, FenceError::TooManyFences), "{e}");
        assert_eq!(e.reason(), "too_many_fences");
        assert!(e.to_string().contains(&FENCES_MAX.to_string()), "{e}");
        assert_eq!(reg.version(), 1, "a refused put publishes nothing");
        assert_eq!(reg.snapshot().1.len(), FENCES_MAX);
        assert!(reg.snapshot().1.id("one-more").is_none());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "a refused put writes nothing"
        );

        assert!(
            !reg.put(fence("f000000", SQUARE)).unwrap(),
            "replacing is not creating"
        );
        assert_eq!(reg.version(), 2);
        let (_, set) = reg.snapshot();
        assert_eq!(set.len(), FENCES_MAX);
        assert_eq!(set.by_name("f000000").unwrap(), &fence("f000000", SQUARE));

        let last = format!("f{:06}", FENCES_MAX - 1);
        assert!(reg.delete(&last).unwrap());
        assert!(
            reg.put(fence("one-more", CIRCLE)).unwrap(),
            "below the limit again"
        );
        assert!(matches!(
            reg.put(fence("two-more", CIRCLE)),
            Err(FenceError::TooManyFences)
        ));
        drop(reg);
        let reg = FenceRegistry::open(dir.path()).unwrap();
        let (_, set) = reg.snapshot();
        assert_eq!(set.len(), FENCES_MAX);
        assert_eq!(set.by_name("f000000").unwrap(), &fence("f000000", SQUARE));
        assert!(set.id("one-more").is_some() && set.id(&last).is_none());
    }

    #[test]
    fn a_file_with_more_than_fences_max_is_refused() {
        // A fences file holding FENCES_MAX + 1 valid, distinctly named circles (the same
        // generator as the at-limit test, one more entry) is refused at open with a corrupt
        // error naming the file, the count found and the limit.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FENCES_FILE);
        std::fs::write(&path, fences_file_text(FENCES_MAX + 1)).unwrap();
        let e = FenceRegistry::open(dir.path()).unwrap_err();
        assert_eq!(e.reason(), "corrupt", "{e}");
        let msg = e.to_string();
        let needle = format!("{} fences, at most {FENCES_MAX} allowed", FENCES_MAX + 1);
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(&needle),
            "{msg}"
        );
    }

    #[test]
    fn put_many_is_one_write_one_snapshot_and_counts_replacements() {
        // A batch of three (one replacing an existing fence) publishes exactly one new version
        // with the union, reports (created 2, replaced 1), and survives a reopen; the result
        // equals what the same fences put one by one give. An empty batch publishes nothing.
        let dir = tempfile::tempdir().unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        assert!(reg.put(fence("depot", CIRCLE)).unwrap());
        assert!(reg.put(fence("keep", CIRCLE)).unwrap());
        let batch = vec![
            fence("a", SQUARE),
            fence("depot", SQUARE),
            fence("z", CIRCLE),
        ];
        assert_eq!(reg.put_many(batch.clone()).unwrap(), (2, 1));
        assert_eq!(reg.version(), 4, "one snapshot for the whole batch");
        assert_eq!(reg.put_many(Vec::new()).unwrap(), (0, 0));
        assert_eq!(reg.version(), 4, "an empty batch publishes nothing");
        let (_, set) = reg.snapshot();
        assert_eq!(set.names().collect::<Vec<_>>(), ["a", "depot", "keep", "z"]);
        assert_eq!(set.by_name("depot").unwrap(), &fence("depot", SQUARE));

        let one_by_one = tempfile::tempdir().unwrap();
        let reg2 = FenceRegistry::open(one_by_one.path()).unwrap();
        for f in [fence("depot", CIRCLE), fence("keep", CIRCLE)]
            .into_iter()
            .chain(batch)
        {
            reg2.put(f).unwrap();
        }
        assert_eq!(
            std::fs::read(reg.path()).unwrap(),
            std::fs::read(reg2.path()).unwrap(),
            "the same file as the equivalent PUTs"
        );
        drop(reg);
        let (_, set2) = FenceRegistry::open(dir.path()).unwrap().snapshot();
        let names: Vec<&str> = set2.names().collect();
        assert_eq!(names, ["a", "depot", "keep", "z"]);
        assert_eq!(set2.by_name("depot").unwrap(), &fence("depot", SQUARE));
    }

    #[test]
    fn a_refused_batch_changes_nothing() {
        // A batch with a duplicate name, and a batch that would exceed FENCES_MAX (registry
        // loaded at FENCES_MAX - 1; two new names, one replacement), are refused with
        // duplicate_name / too_many_fences; version, snapshot and file bytes stay as they
        // were. A batch reaching exactly FENCES_MAX (one new name plus a replacement) is taken.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FENCES_FILE);
        std::fs::write(&path, fences_file_text(FENCES_MAX - 1)).unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let e = reg
            .put_many(vec![
                fence("n1", CIRCLE),
                fence("n2", SQUARE),
                fence("n1", SQUARE),
            ])
            .unwrap_err();
        assert!(
            matches!(&e, FenceError::DuplicateName(n) if n == "n1"),
            "{e}"
        );
        assert_eq!(e.reason(), "duplicate_name");
        let e = reg
            .put_many(vec![
                fence("f000000", SQUARE),
                fence("n1", CIRCLE),
                fence("n2", CIRCLE),
            ])
            .unwrap_err();
        assert_eq!(e.reason(), "too_many_fences", "{e}");
        assert_eq!(reg.version(), 1);
        let (_, set) = reg.snapshot();
        assert_eq!(set.len(), FENCES_MAX - 1);
        assert!(set.id("n1").is_none());
        assert_eq!(
            set.by_name("f000000").unwrap().to_json(),
            r#"{"center":[-170.0,-80.0],"radius_m":50.0}"#,
            "not replaced"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
        assert_eq!(files(dir.path()), [FENCES_FILE]);

        assert_eq!(
            reg.put_many(vec![fence("f000000", SQUARE), fence("n1", CIRCLE)])
                .unwrap(),
            (1, 1)
        );
        assert_eq!(reg.version(), 2);
        assert_eq!(reg.snapshot().1.len(), FENCES_MAX);
    }

    #[test]
    fn registry_is_send_and_sync_and_serialises_writers() {
        // Concurrent puts from several threads all land, each version exactly once.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FenceRegistry>();
        assert_send_sync::<FenceSet>();
        let dir = tempfile::tempdir().unwrap();
        let reg = FenceRegistry::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let reg = &reg;
                s.spawn(move || {
                    for i in 0..5 {
                        assert!(reg.put(fence(&format!("t{t}-{i}"), CIRCLE)).unwrap());
                    }
                });
            }
        });
        assert_eq!(reg.version(), 21);
        drop(reg);
        assert_eq!(
            FenceRegistry::open(dir.path()).unwrap().snapshot().1.len(),
            20
        );
    }
}
