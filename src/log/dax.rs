//! The DAX (persistent memory) commit path: a raw `MAP_SHARED_VALIDATE | MAP_SYNC` mapping in its
//! own small unsafe wrapper, the choice of cache-line flush instruction by CPUID, and the flush of
//! a byte range. It does not decide when to commit (that is `Log::commit_begin`) and never falls
//! back silently: `DaxMap::try_map` reports "not supported" so the caller can use an ordinary
//! mapping plus fdatasync instead.
//!
//! Invariant: with MAP_SYNC the file system guarantees that a store is durable once its cache line
//! has been written back, so `flush_range` + `sfence` over every dirty byte makes them durable with
//! no system call. The line arithmetic (`line_span`) is shared with the tests: it must cover the
//! first and last partially dirty lines.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use crate::limits::CACHE_LINE_BYTES;

/// The cache-line write-back instruction used for DAX commits, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushInsn {
    /// `clwb`: writes the line back and may keep it cached (CPUID.7.0:EBX bit 24).
    Clwb,
    /// `clflushopt`: writes back and evicts, weakly ordered (CPUID.7.0:EBX bit 23).
    Clflushopt,
    /// `clflush`: writes back and evicts, strongly ordered (CPUID.1:EDX bit 19).
    Clflush,
}

/// Picks the best flush instruction from the CPUID feature bits: leaf 7 sub-leaf 0 EBX and leaf 1
/// EDX. Split out from [`detect`] so the choice is testable.
pub fn choose_insn(leaf7_ebx: u32, leaf1_edx: u32) -> Option<FlushInsn> {
    if leaf7_ebx & (1 << 24) != 0 {
        Some(FlushInsn::Clwb)
    } else if leaf7_ebx & (1 << 23) != 0 {
        Some(FlushInsn::Clflushopt)
    } else if leaf1_edx & (1 << 19) != 0 {
        Some(FlushInsn::Clflush)
    } else {
        None
    }
}

/// The flush instruction this CPU supports, or `None` (not x86-64, or no flush instruction): then
/// DAX mode is never used.
pub fn detect() -> Option<FlushInsn> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 7 is checked against the maximum
        // basic leaf first. (Newer compilers consider these intrinsics safe; older ones do not.)
        #[allow(unused_unsafe)]
        let (max_leaf, leaf1_edx) = unsafe {
            let l0 = std::arch::x86_64::__cpuid(0);
            (l0.eax, std::arch::x86_64::__cpuid(1).edx)
        };
        let leaf7_ebx = if max_leaf >= 7 {
            // SAFETY: as above, leaf 7 exists.
            #[allow(unused_unsafe)]
            unsafe {
                std::arch::x86_64::__cpuid_count(7, 0).ebx
            }
        } else {
            0
        };
        choose_insn(leaf7_ebx, leaf1_edx)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The cache lines covering bytes `[addr, addr + len)`: (address of the first line, number of
/// lines). Empty ranges cover no line.
#[inline]
pub fn line_span(addr: usize, len: usize) -> (usize, usize) {
    if len == 0 {
        return (addr & !(CACHE_LINE_BYTES - 1), 0);
    }
    let first = addr & !(CACHE_LINE_BYTES - 1);
    let end = addr + len; // exclusive
    let last_end = (end + CACHE_LINE_BYTES - 1) & !(CACHE_LINE_BYTES - 1);
    (first, (last_end - first) / CACHE_LINE_BYTES)
}

/// Writes back every cache line covering `[ptr, ptr + len)` with `insn`, then fences.
///
/// # Safety
/// `ptr..ptr + len` must lie inside one live mapping of this process.
pub unsafe fn flush_range(insn: FlushInsn, ptr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (first, lines) = line_span(ptr as usize, len);
        for i in 0..lines {
            let line = (first + i * CACHE_LINE_BYTES) as *const u8;
            // SAFETY: `line` is the start of a cache line overlapping the caller's range, which the
            // caller guarantees is mapped; flush instructions only write back, never change data.
            unsafe {
                match insn {
                    FlushInsn::Clwb => {
                        std::arch::asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags))
                    }
                    FlushInsn::Clflushopt => std::arch::asm!(
                        "clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags)
                    ),
                    FlushInsn::Clflush => std::arch::x86_64::_mm_clflush(line),
                }
            }
        }
        // SAFETY: sfence has no memory operands; it orders the weakly ordered flushes above before
        // any later store (and before we report the range durable).
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (insn, ptr, len);
        unreachable!("DAX mode is only selected on x86-64");
    }
}

/// A shared, synchronous (`MAP_SYNC`) mapping of a whole segment file on a DAX file system.
/// Unmapped on drop.
#[derive(Debug)]
pub struct DaxMap {
    ptr: NonNull<u8>,
    len: usize,
    insn: FlushInsn,
}

// SAFETY: the mapping is owned exclusively by this value (like memmap2::MmapMut, which is Send);
// nothing in it is tied to the creating thread.
unsafe impl Send for DaxMap {}

impl DaxMap {
    /// Maps `len` bytes of `file` with MAP_SHARED_VALIDATE | MAP_SYNC. `Ok(None)` when the file
    /// system or kernel does not support it (EOPNOTSUPP or EINVAL), or when this CPU has no flush
    /// instruction; other failures are errors.
    pub fn try_map(file: &File, len: usize) -> io::Result<Option<DaxMap>> {
        let Some(insn) = detect() else {
            return Ok(None);
        };
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        {
            // SAFETY: a fresh mapping at a kernel-chosen address; the fd is valid for the call.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
                    file.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(None),
                    _ => Err(err),
                };
            }
            let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
            Ok(Some(DaxMap { ptr, len, insn }))
        }
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            let _ = (file, len, insn);
            Ok(None)
        }
    }

    /// An ordinary shared mapping dressed up as a DAX one, so unit tests can drive the DAX commit
    /// path (the flushes run; nothing is made durable by them on a normal file system).
    ///
    /// # Safety
    /// Same contract as any shared file mapping: the file must not be truncated while mapped.
    #[cfg(test)]
    pub unsafe fn fake_from_file(file: &File, len: usize) -> DaxMap {
        // SAFETY: a fresh mapping at a kernel-chosen address; the fd is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        DaxMap {
            ptr: NonNull::new(ptr.cast::<u8>()).expect("non-null"),
            len,
            insn: detect().expect("x86-64 has clflush"),
        }
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live mapping owned by self; the segment file is locked against
        // other writers (shard LOCK file), and `&self` excludes our own writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Makes bytes `[start, end)` of the mapping durable (cache-line write-back plus fence).
    pub fn flush(&self, start: usize, end: usize) {
        assert!(
            start <= end && end <= self.len,
            "flush range out of the mapping"
        );
        // SAFETY: the range was just checked to lie inside this live mapping.
        unsafe { flush_range(self.insn, self.ptr.as_ptr().add(start), end - start) }
    }
}

impl Drop for DaxMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `try_map`; no slice borrowed from it can
        // outlive `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_span_covers_partial_first_and_last_lines() {
        // Checks the flush-range arithmetic against a brute-force count of touched lines for many
        // (start, len) pairs around line boundaries.
        for start in 0..200usize {
            for len in 0..200usize {
                let (first, n) = line_span(start, len);
                let touched: std::collections::BTreeSet<usize> =
                    (start..start + len).map(|b| b / CACHE_LINE_BYTES).collect();
                assert_eq!(n, touched.len(), "start {start} len {len}");
                if let Some(&lo) = touched.iter().next() {
                    assert_eq!(first, lo * CACHE_LINE_BYTES);
                }
            }
        }
        assert_eq!(line_span(64, 64), (64, 1));
        assert_eq!(line_span(63, 2), (0, 2));
        assert_eq!(line_span(4096, 0).1, 0);
    }

    #[test]
    fn insn_choice_prefers_clwb_then_clflushopt_then_clflush() {
        // The CPUID bit positions select the documented preference order.
        assert_eq!(
            choose_insn(1 << 24 | 1 << 23, 1 << 19),
            Some(FlushInsn::Clwb)
        );
        assert_eq!(choose_insn(1 << 23, 1 << 19), Some(FlushInsn::Clflushopt));
        assert_eq!(choose_insn(0, 1 << 19), Some(FlushInsn::Clflush));
        assert_eq!(choose_insn(0, 0), None);
    }

    #[test]
    fn flush_range_runs_on_ordinary_memory() {
        // The flush instructions are legal on any cacheable memory, so the real code path runs here
        // (on a heap buffer) even though no DAX device exists: data must be unchanged afterwards.
        let Some(insn) = detect() else {
            eprintln!("skipped: no cache-line flush instruction on this CPU");
            return;
        };
        let buf: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for (start, len) in [(0usize, 1000usize), (3, 1), (63, 2), (100, 0)] {
            // SAFETY: the range lies inside `buf`.
            unsafe { flush_range(insn, buf.as_ptr().add(start), len) };
        }
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn map_sync_is_refused_cleanly_on_a_non_dax_file() {
        // On an ordinary file system MAP_SYNC must come back as "not supported" (Ok(None)), which is
        // what makes the Fdatasync fallback happen.
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("x"))
            .unwrap();
        f.set_len(8192).unwrap();
        assert!(DaxMap::try_map(&f, 8192).unwrap().is_none());
    }
}
