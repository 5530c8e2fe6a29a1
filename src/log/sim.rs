//! A simulated disk for crash tests of the shard log (the `Sim` arm of [`super::storage::Disk`]):
//! files live in memory, and for each one the simulator keeps the bytes the log wrote (its "page
//! cache", which the log's mapping points into) apart from the bytes that are durable (copied at
//! each fdatasync). Namespace operations (create, rename, delete, copy) are journaled and become
//! durable at the next directory sync. The disk "crashes" at its Nth sync: that sync does not take
//! effect, every later operation fails, and the post-crash image is built from the durable state
//! plus a seeded random tearing of everything not yet durable (see [`SimDisk::crash_now`]).
//! [`SimDisk::reboot`] turns the image into a fresh disk to reopen the log on. It does not model
//! I/O errors other than the crash, space limits, or file locks, and it is for tests and tools
//! only: it runs on the thread that created it (asserted), so the log's writes through the mapping
//! never race with a sync reading them. In the style of TigerBeetle `src/testing/storage.zig` and
//! the redb crash tests. Writes ([`SimFile::write_at`], the log's `pwrite`) can be made to fail with
//! a chosen OS error ([`SimDisk::fail_writes`]), to test what the log does with ENOSPC or EIO.
//!
//! Invariant: a byte is in the crash image with its written value if it was written before a
//! completed sync of its file; any other byte of the image is either its value at the last sync of
//! the file (zero if never synced) or a value the log wrote to it after that. A file exists in the
//! image if a directory sync followed its creation (or any prefix of the unsynced namespace
//! operations, in order, that includes it).

use std::cell::UnsafeCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;

use rand::{Rng, RngCore};

/// Bytes a simulated device writes atomically (the tearing unit).
pub const SIM_SECTOR_BYTES: usize = 512;

/// SplitMix64: a small seeded generator (ChaCha is slow in the debug builds tests run in).
struct SplitMix(u64);

impl RngCore for SplitMix {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Index just past the last non-zero byte of `b` (0 if all zero), comparing 4 KiB blocks.
fn nonzero_end(b: &[u8]) -> usize {
    static ZEROS: [u8; 4096] = [0; 4096];
    let mut end = b.len();
    for block in b.rchunks(ZEROS.len()) {
        if block != &ZEROS[..block.len()] {
            let k = block
                .iter()
                .rposition(|&x| x != 0)
                .expect("a non-zero byte");
            return end - block.len() + k + 1;
        }
        end -= block.len();
    }
    0
}

/// The bytes of one simulated file as the log sees them (page cache). Fixed size while mapped.
struct SimMem {
    bytes: UnsafeCell<Box<[u8]>>,
}

// SAFETY: a `SimMem` is only touched on the thread that created its disk (every `SimDisk`
// operation asserts it); `Send`/`Sync` are needed only because the log holding the mapping is
// `Send` (it may be moved before it is used) and shares nothing across threads.
unsafe impl Send for SimMem {}
// SAFETY: see above.
unsafe impl Sync for SimMem {}

impl SimMem {
    fn new(len: usize) -> Arc<SimMem> {
        Arc::new(SimMem {
            bytes: UnsafeCell::new(vec![0u8; len].into_boxed_slice()),
        })
    }

    /// # Safety
    /// No `&mut` to these bytes (from a [`SimMap`]) may be live.
    unsafe fn get(&self) -> &[u8] {
        // SAFETY: per the caller's promise.
        unsafe { &*self.bytes.get() }
    }

    /// # Safety
    /// No other reference to these bytes may be live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut(&self) -> &mut [u8] {
        // SAFETY: per the caller's promise.
        unsafe { &mut *self.bytes.get() }
    }
}

/// The bytes of a file with its trailing zeros left out (segment files are mostly zeros: this
/// keeps syncs, crashes and reboots from copying megabytes of them).
#[derive(Clone, Default)]
struct Trimmed {
    /// File size.
    len: usize,
    /// The first bytes; every byte from `bytes.len()` to `len` is zero.
    bytes: Vec<u8>,
}

impl Trimmed {
    /// Sets it to a copy of `b`.
    fn set(&mut self, b: &[u8]) {
        self.len = b.len();
        self.bytes.clear();
        self.bytes.extend_from_slice(&b[..nonzero_end(b)]);
    }
}

/// One simulated file (an inode): what the log wrote and what is durable.
struct Inode {
    mem: Arc<SimMem>,
    durable: Trimmed,
}

/// A namespace operation not yet made durable by a directory sync.
#[derive(Clone)]
enum NsOp {
    Link(PathBuf, usize),
    Unlink(PathBuf),
    /// Atomic, as in a journaling file system: both names change or neither.
    Rename(PathBuf, PathBuf, usize),
}

fn apply(ns: &mut BTreeMap<PathBuf, usize>, op: &NsOp) {
    match op {
        NsOp::Link(p, ino) => {
            ns.insert(p.clone(), *ino);
        }
        NsOp::Unlink(p) => {
            ns.remove(p);
        }
        NsOp::Rename(from, to, ino) => {
            ns.remove(from);
            ns.insert(to.clone(), *ino);
        }
    }
}

/// The files of a crashed disk: path to bytes.
type Image = BTreeMap<PathBuf, Trimmed>;

struct State {
    thread: ThreadId,
    rng: SplitMix,
    inodes: Vec<Inode>,
    /// Path to inode, as the running process sees it.
    live: BTreeMap<PathBuf, usize>,
    /// Path to inode as of the last directory sync.
    durable_ns: BTreeMap<PathBuf, usize>,
    /// Namespace operations since the last directory sync, oldest first.
    journal: Vec<NsOp>,
    /// Directories (durable as soon as created: the log syncs the parent right after anyway).
    dirs: BTreeSet<PathBuf>,
    /// Syncs attempted so far (file and directory).
    syncs: u64,
    /// Crash when the sync count reaches this.
    crash_at: Option<u64>,
    /// Set once crashed: the post-crash image.
    image: Option<Image>,
    /// While set, every [`SimFile::write_at`] fails with this OS error and writes nothing.
    write_error: Option<i32>,
}

/// A simulated disk, shared by handle (cloning shares the disk).
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock().expect("sim disk lock");
        f.debug_struct("SimDisk")
            .field("files", &s.live.len())
            .field("syncs", &s.syncs)
            .field("crash_at", &s.crash_at)
            .field("crashed", &s.image.is_some())
            .finish()
    }
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated disk crashed")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such simulated file", path.display()),
    )
}

impl SimDisk {
    /// An empty disk whose tearing is drawn from `seed`; it crashes at its `crash_at`th sync
    /// (1-based; `None`: only when [`SimDisk::crash_now`] is called).
    pub fn new(seed: u64, crash_at: Option<u64>) -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(State {
                thread: std::thread::current().id(),
                rng: SplitMix(seed),
                inodes: Vec::new(),
                live: BTreeMap::new(),
                durable_ns: BTreeMap::new(),
                journal: Vec::new(),
                dirs: BTreeSet::new(),
                syncs: 0,
                crash_at,
                image: None,
                write_error: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let s = self.state.lock().expect("sim disk lock");
        assert_eq!(
            s.thread,
            std::thread::current().id(),
            "a simulated disk is used on the thread that created it"
        );
        s
    }

    /// Locks the state for an operation; fails if the disk crashed.
    fn op(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.lock();
        if s.image.is_some() {
            return Err(crashed_error());
        }
        Ok(s)
    }

    /// Counts a sync; crashes instead if it is the chosen one.
    fn sync_point(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut s = self.op()?;
        s.syncs += 1;
        if s.crash_at.is_some_and(|n| s.syncs >= n) {
            s.crash();
            return Err(crashed_error());
        }
        Ok(s)
    }

    /// Makes every later write ([`SimFile::write_at`]) fail with OS error `errno` and write
    /// nothing, until called with `None`. Preallocation and syncs are not affected.
    pub fn fail_writes(&self, errno: Option<i32>) {
        self.lock().write_error = errno;
    }

    /// Syncs attempted so far (the crash point, if reached, included).
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Whether the disk has crashed.
    pub fn crashed(&self) -> bool {
        self.lock().image.is_some()
    }

    /// Crashes now (if not already crashed): the world stops and the post-crash image is built.
    pub fn crash_now(&self) {
        let mut s = self.lock();
        if s.image.is_none() {
            s.crash();
        }
    }

    /// A fresh disk holding the post-crash image (crashing at its `crash_at`th sync, tearing from
    /// `seed`). Panics if the disk has not crashed.
    pub fn reboot(&self, seed: u64, crash_at: Option<u64>) -> SimDisk {
        let s = self.lock();
        let image = s
            .image
            .as_ref()
            .expect("reboot of a disk that did not crash");
        let disk = SimDisk::new(seed, crash_at);
        {
            let mut n = disk.lock();
            n.dirs = s.dirs.clone();
            for (path, file) in image {
                let ino = n.inodes.len();
                let mem = SimMem::new(file.len);
                // SAFETY: just created, nothing else refers to it.
                let dst = unsafe { mem.get_mut() };
                dst[..file.bytes.len()].copy_from_slice(&file.bytes);
                n.inodes.push(Inode {
                    mem,
                    durable: file.clone(),
                });
                n.live.insert(path.clone(), ino);
            }
            n.durable_ns = n.live.clone();
        }
        disk
    }

    /// The current bytes of a file as the process sees them (for checks).
    pub fn file_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let ino = *s.live.get(path)?;
        // SAFETY: single thread (asserted by `lock`); no mapping write is in progress during this
        // call.
        Some(unsafe { s.inodes[ino].mem.get() }.to_vec())
    }

    /// Paths of the files the process sees.
    pub fn files(&self) -> Vec<PathBuf> {
        self.lock().live.keys().cloned().collect()
    }

    pub(crate) fn is_dir(&self, dir: &Path) -> bool {
        self.lock().dirs.contains(dir)
    }

    pub(crate) fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.op()?;
        s.dirs.insert(dir.to_path_buf());
        Ok(())
    }

    pub(crate) fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        // Like an ext4 journal commit: every pending namespace operation becomes durable.
        let mut s = self.sync_point()?;
        let journal = std::mem::take(&mut s.journal);
        for op in &journal {
            apply(&mut s.durable_ns, op);
        }
        Ok(())
    }

    pub(crate) fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.op()?;
        if !s.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(s.live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    /// Opens `path`; creates an empty file if `create` and it does not exist; empties it if
    /// `truncate`.
    pub(crate) fn open(&self, path: &Path, create: bool, truncate: bool) -> io::Result<SimFile> {
        let mut s = self.op()?;
        let ino = match s.live.get(path) {
            Some(&ino) => ino,
            None if create => {
                let ino = s.inodes.len();
                s.inodes.push(Inode {
                    mem: SimMem::new(0),
                    durable: Trimmed::default(),
                });
                s.live.insert(path.to_path_buf(), ino);
                s.journal.push(NsOp::Link(path.to_path_buf(), ino));
                ino
            }
            None => return Err(not_found(path)),
        };
        if truncate {
            s.resize(ino, 0);
        }
        Ok(SimFile {
            disk: self.clone(),
            ino,
        })
    }

    pub(crate) fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.op()?;
        if s.live.remove(path).is_none() {
            return Err(not_found(path));
        }
        s.journal.push(NsOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.op()?;
        let ino = s.live.remove(from).ok_or_else(|| not_found(from))?;
        s.live.insert(to.to_path_buf(), ino);
        s.journal
            .push(NsOp::Rename(from.to_path_buf(), to.to_path_buf(), ino));
        Ok(())
    }

    /// Copies a file's current bytes to a new file (not synced, like `std::fs::copy`).
    pub(crate) fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.op()?;
        let src = *s.live.get(from).ok_or_else(|| not_found(from))?;
        // SAFETY: single thread; no mapping write in progress.
        let bytes = unsafe { s.inodes[src].mem.get() }.to_vec();
        let ino = s.inodes.len();
        let mem = SimMem::new(bytes.len());
        // SAFETY: just created.
        unsafe { mem.get_mut() }.copy_from_slice(&bytes);
        s.inodes.push(Inode {
            mem,
            durable: Trimmed::default(),
        });
        s.live.insert(to.to_path_buf(), ino);
        s.journal.push(NsOp::Link(to.to_path_buf(), ino));
        Ok(())
    }
}

impl State {
    fn resize(&mut self, ino: usize, len: usize) {
        let inode = &mut self.inodes[ino];
        assert_eq!(
            Arc::strong_count(&inode.mem),
            1,
            "a mapped simulated file is never resized"
        );
        // SAFETY: not mapped (checked above), single thread.
        let old = unsafe { inode.mem.get() };
        let new = SimMem::new(len);
        let keep = old.len().min(len);
        // SAFETY: just created.
        let dst = unsafe { new.get_mut() };
        dst[..keep].copy_from_slice(&old[..keep]);
        inode.mem = new;
    }

    /// Builds the post-crash image: the durable namespace plus a random prefix of the pending
    /// namespace operations; for each file its durable bytes, with every sector that differs
    /// from what the process wrote torn at random (kept old, taken new, or split).
    fn crash(&mut self) {
        let mut ns = self.durable_ns.clone();
        let k = self.rng.gen_range(0..=self.journal.len());
        for op in &self.journal[..k] {
            apply(&mut ns, op);
        }
        let mut image = Image::new();
        for (path, &ino) in &ns {
            let inode = &self.inodes[ino];
            // SAFETY: single thread; the crash happens inside a disk call, not during a write.
            let mem = unsafe { inode.mem.get() };
            let old = &inode.durable;
            // An unsynced size change may or may not have reached the disk.
            let len = if old.len == mem.len() || self.rng.gen_bool(0.5) {
                mem.len()
            } else {
                old.len
            };
            // Past both non-zero ends old and new bytes are zeros: nothing to tear there.
            let out_len = len.min(nonzero_end(mem).max(old.bytes.len()));
            let mut out = vec![0u8; out_len];
            let keep = old.bytes.len().min(out_len);
            out[..keep].copy_from_slice(&old.bytes[..keep]);
            let torn_end = out_len.min(mem.len());
            let mut at = 0;
            while at < torn_end {
                let end = (at + SIM_SECTOR_BYTES).min(torn_end);
                if out[at..end] != mem[at..end] {
                    match self.rng.gen_range(0..4u32) {
                        // Kept old (or zero, if never written before).
                        0 => {}
                        // Split: a new prefix, old suffix (a torn sector).
                        1 => {
                            let cut = self.rng.gen_range(at..end);
                            out[at..cut].copy_from_slice(&mem[at..cut]);
                        }
                        // Written.
                        _ => out[at..end].copy_from_slice(&mem[at..end]),
                    }
                }
                at = end;
            }
            out.truncate(nonzero_end(&out));
            image.insert(path.clone(), Trimmed { len, bytes: out });
        }
        self.image = Some(image);
    }
}

/// An open simulated file.
#[derive(Clone)]
pub struct SimFile {
    disk: SimDisk,
    ino: usize,
}

impl std::fmt::Debug for SimFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFile").field("ino", &self.ino).finish()
    }
}

impl SimFile {
    pub(crate) fn len(&self) -> io::Result<u64> {
        let s = self.disk.op()?;
        // SAFETY: single thread; only the length is read.
        Ok(unsafe { s.inodes[self.ino].mem.get() }.len() as u64)
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.disk.op()?;
        s.resize(self.ino, len as usize);
        Ok(())
    }

    /// Writes zeros to `from..len`, growing the file to `len` if shorter (a preallocation).
    pub(crate) fn write_zeros(&self, from: u64, len: u64) -> io::Result<()> {
        let mut s = self.disk.op()?;
        // SAFETY: single thread; only the length is read.
        let cur = unsafe { s.inodes[self.ino].mem.get() }.len() as u64;
        if cur < len {
            s.resize(self.ino, len as usize);
        }
        // Bytes past the old size are zero already (and left untouched: no page is dirtied).
        let upto = cur.min(len);
        if from < upto {
            // SAFETY: single thread; a mapped file is never preallocated again (resize asserts
            // the growth case; the log never zero-fills a mapped range).
            let mem = unsafe { s.inodes[self.ino].mem.get_mut() };
            mem[from as usize..upto as usize].fill(0);
        }
        Ok(())
    }

    /// `pwrite`: copies `buf` into the file's bytes at `off` (the page cache; durable at the next
    /// sync). The file does not grow: a write past its end is refused. Fails without writing
    /// while [`SimDisk::fail_writes`] is set.
    pub(crate) fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let s = self.disk.op()?;
        if let Some(errno) = s.write_error {
            return Err(io::Error::from_raw_os_error(errno));
        }
        // SAFETY: single thread (asserted by `op`); the log calls this with `&mut` access to the
        // segment, so no borrow of the mapped bytes (`SimMap::as_slice`) is live.
        let mem = unsafe { s.inodes[self.ino].mem.get_mut() };
        let (off, len) = (off as usize, mem.len());
        let dst = mem.get_mut(off..off + buf.len()).ok_or_else(|| {
            io::Error::other(format!(
                "write of {}..{} past the end of a {len}-byte simulated file",
                off,
                off + buf.len(),
            ))
        })?;
        dst.copy_from_slice(buf);
        Ok(())
    }

    pub(crate) fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let s = self.disk.op()?;
        // SAFETY: single thread; no mapping write in progress.
        let mem = unsafe { s.inodes[self.ino].mem.get() };
        let off = off as usize;
        let src = mem
            .get(off..off + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// fdatasync: the file's current bytes become durable (a crash point).
    pub fn sync_data(&self) -> io::Result<()> {
        let mut s = self.disk.sync_point()?;
        let inode = &mut s.inodes[self.ino];
        // SAFETY: single thread; no mapping write in progress during a sync call.
        let mem = unsafe { inode.mem.get() };
        inode.durable.set(mem);
        Ok(())
    }

    /// Maps the first `len` bytes (the file is at least that long).
    pub(crate) fn map(&self, len: usize) -> io::Result<SimMap> {
        let s = self.disk.op()?;
        let mem = Arc::clone(&s.inodes[self.ino].mem);
        // SAFETY: single thread; only the length is read.
        let have = unsafe { mem.get() }.len();
        if have < len {
            return Err(io::Error::other(format!(
                "map of {len} bytes of a {have}-byte simulated file"
            )));
        }
        Ok(SimMap { mem, len })
    }
}

/// A shared "mapping" of a simulated file: the log's writes land in the file's page cache.
pub struct SimMap {
    mem: Arc<SimMem>,
    len: usize,
}

impl std::fmt::Debug for SimMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimMap").field("len", &self.len).finish()
    }
}

impl SimMap {
    /// The mapped bytes.
    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping's owner (one segment) hands out `&`/`&mut` through `&self`/`&mut
        // self`, so the borrow checker orders them; the disk reads the bytes only inside its own
        // calls, on the same thread (asserted), never while such a borrow is in use.
        unsafe { &self.mem.get()[..self.len] }
    }

    /// The mapped bytes, writable.
    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: see `as_slice`.
        unsafe { &mut self.mem.get_mut()[..self.len] }
    }
}
