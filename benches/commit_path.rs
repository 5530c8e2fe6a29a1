//! What one durable group commit costs on this disk, per way of writing it (issue 15 §3): the
//! log's way before issue 15 §3 (a memcpy into a shared mapping, then `fdatasync`), `msync` of the
//! range, `pwrite` + `fdatasync`, the log's way since (`pwrite` + `fdatasync` while the file is also
//! mapped read-only and each group is read back through that mapping, as queries do),
//! `pwritev2(RWF_DSYNC)`, and a `pwrite` on an `O_DSYNC` descriptor. Each
//! writes groups of `G` heartbeat-sized entries (140 bytes) one after another into a
//! preallocated, zero-filled 64 MiB file (like a log segment), waiting for each group to be
//! durable before the next, and prints per variant and group size: groups per second, p50 and p99
//! latency of a group, this process's CPU per group (user + system, from `getrusage`), and the
//! whole machine's busy CPU per group (from `/proc/stat`, which also counts the kernel's flush
//! workers; run on a quiet machine). Blocking calls on purpose: this compares the kernel's cost
//! of each way, not the runtime's.
//!
//! Run: `cargo bench --bench commit_path` (about 30 s; `COMMIT_PATH_GROUPS=N` groups per cell,
//! default 400; the file lives in `COMMIT_PATH_DIR`, default the system temp dir, which must be
//! on the data disk to mean anything).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

const FILE_BYTES: usize = 64 << 20;
const ENTRY_BYTES: usize = 140;

#[derive(Clone, Copy, Debug)]
enum Way {
    MmapFdatasync,
    MmapMsync,
    PwriteFdatasync,
    /// `pwrite` + `fdatasync` with a read-only shared mapping of the file whose pages the group's
    /// bytes land in are read through it after each write (`log::WriteMode::Pwrite`).
    PwriteMappedFdatasync,
    PwritevDsync,
    ODsync,
}

fn cpu_self() -> Duration {
    // SAFETY: getrusage fills a plain struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Busy jiffies of the whole machine (everything but idle and iowait).
fn cpu_machine() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return 0;
    }
    v.iter().sum::<u64>() - v[3] - v[4]
}

fn zero_file(path: &std::path::Path, flags: i32) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .open(path)
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..FILE_BYTES >> 20 {
        f.write_all(&zeros).unwrap();
    }
    f.sync_all().unwrap();
    f
}

fn run(way: Way, group: usize, groups: usize, dir: &std::path::Path) -> String {
    let path = dir.join(format!("commit-path-{}.seg", std::process::id()));
    let dsync = if matches!(way, Way::ODsync) {
        libc::O_DSYNC
    } else {
        0
    };
    let file = zero_file(&path, dsync);
    let fd = file.as_raw_fd();
    let map = match way {
        Way::MmapFdatasync | Way::MmapMsync | Way::PwriteMappedFdatasync => {
            let prot = if matches!(way, Way::PwriteMappedFdatasync) {
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            // SAFETY: a shared mapping of a file we own, unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    FILE_BYTES,
                    prot,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Some(p as *mut u8)
        }
        _ => None,
    };
    let mut buf = vec![0u8; group * ENTRY_BYTES];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let mut lat = Vec::with_capacity(groups);
    let (cpu0, mach0, t0) = (cpu_self(), cpu_machine(), Instant::now());
    let mut off = 0usize;
    let mut read_back = 0u64;
    for _ in 0..groups {
        let start = Instant::now();
        match way {
            Way::MmapFdatasync | Way::MmapMsync => {
                let p = map.unwrap();
                // SAFETY: `off + len` stays inside the mapping (checked by the group count).
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p.add(off), buf.len()) };
                if matches!(way, Way::MmapFdatasync) {
                    // SAFETY: fdatasync on our descriptor.
                    assert_eq!(unsafe { libc::fdatasync(fd) }, 0);
                } else {
                    let page = off & !4095;
                    // SAFETY: a page-aligned range inside the mapping.
                    let r = unsafe {
                        libc::msync(p.add(page) as *mut _, off + buf.len() - page, libc::MS_SYNC)
                    };
                    assert_eq!(r, 0);
                }
            }
            Way::PwriteFdatasync => {
                file.write_all_at(&buf, off as u64).unwrap();
                // SAFETY: fdatasync on our descriptor.
                assert_eq!(unsafe { libc::fdatasync(fd) }, 0);
            }
            Way::PwriteMappedFdatasync => {
                file.write_all_at(&buf, off as u64).unwrap();
                // SAFETY: fdatasync on our descriptor.
                assert_eq!(unsafe { libc::fdatasync(fd) }, 0);
                let p = map.unwrap();
                // Read every entry's first byte back through the mapping (faults its pages in,
                // as the log's reads do), and check the page cache and the mapping agree.
                for e in (0..buf.len()).step_by(ENTRY_BYTES) {
                    // SAFETY: inside the mapping; the file is never truncated while mapped.
                    let b = unsafe { std::ptr::read_volatile(p.add(off + e)) };
                    assert_eq!(b, buf[e]);
                    read_back += u64::from(b);
                }
            }
            Way::PwritevDsync => {
                let iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut _,
                    iov_len: buf.len(),
                };
                // SAFETY: one valid iovec over `buf`.
                let n = unsafe { libc::pwritev2(fd, &iov, 1, off as i64, libc::RWF_DSYNC) };
                assert_eq!(n as usize, buf.len());
            }
            Way::ODsync => file.write_all_at(&buf, off as u64).unwrap(),
        }
        lat.push(start.elapsed());
        off += buf.len();
    }
    let wall = t0.elapsed();
    std::hint::black_box(read_back);
    let cpu = cpu_self() - cpu0;
    let mach = cpu_machine().saturating_sub(mach0);
    // SAFETY: sysconf is always safe.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    if let Some(p) = map {
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p as *mut _, FILE_BYTES) };
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    lat.sort();
    let q = |f: f64| lat[((lat.len() - 1) as f64 * f) as usize].as_secs_f64() * 1e6;
    format!(
        "| {way:?} | {group} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
        groups as f64 / wall.as_secs_f64(),
        q(0.5),
        q(0.99),
        cpu.as_secs_f64() * 1e6 / groups as f64,
        mach as f64 / hz * 1e6 / groups as f64,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either way:
    // run only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = std::env::var_os("COMMIT_PATH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let groups: usize = std::env::var("COMMIT_PATH_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    println!("| way | entries per group | groups/s | p50 µs | p99 µs | process CPU µs/group | machine CPU µs/group |");
    println!("|---|---|---|---|---|---|---|");
    for group in [1usize, 16, 256] {
        let groups = groups.min(FILE_BYTES / (group * ENTRY_BYTES));
        for way in [
            Way::MmapFdatasync,
            Way::MmapMsync,
            Way::PwriteFdatasync,
            Way::PwriteMappedFdatasync,
            Way::PwritevDsync,
            Way::ODsync,
        ] {
            println!("{}", run(way, group, groups, &dir));
        }
    }
}
