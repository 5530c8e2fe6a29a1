//! Start-up checks of the platform, run by `serve` and `demo` before any executor starts and
//! before anything is written: io_uring must be allowed (Docker ≥ 25 and containerd 2 block it
//! in their default seccomp profiles; `kernel.io_uring_disabled` can switch it off) and the
//! locked-memory limit must cover what each executor registers with its rings. Without these
//! checks glommio panics ("kernel should be at least 5.8") or fails with an opaque
//! `MemLockLimit(65536/524288)`. It owns only the checks and their messages; the runtime
//! settings they compare against come from [`crate::rt`].
//!
//! Invariant: every refusal is one line that says what is blocked and the exact fix.
//! See: issue 13 §4.

use crate::limits::PROBE_RING_ENTRIES;
use std::io;

/// Why the platform cannot run geobeat.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// `io_uring_setup` is refused: a seccomp filter (containers) or the sysctl.
    #[error(
        "io_uring is blocked on this system (io_uring_setup failed: {source}){sysctl}; geobeat \
         needs it. In Docker (>= 25) or containerd 2, whose default seccomp profile blocks it, run \
         with `--security-opt seccomp=unconfined` or a seccomp profile that allows io_uring_setup, \
         io_uring_enter and io_uring_register (Kubernetes: securityContext.seccompProfile)"
    )]
    IoUringBlocked {
        /// The error of `io_uring_setup`.
        source: io::Error,
        /// A note on `kernel.io_uring_disabled` when it is set, else empty.
        sysctl: String,
    },
    /// io_uring exists but lacks the probe interface glommio needs (kernel older than 5.8).
    #[error(
        "io_uring on this kernel ({kernel}) cannot be probed ({source}); geobeat needs Linux 5.8 \
         or newer"
    )]
    KernelTooOld {
        /// `uname -r`.
        kernel: String,
        /// The error of `IORING_REGISTER_PROBE`.
        source: io::Error,
    },
    /// The locked-memory limit is below what the executors need.
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {limit} bytes, geobeat needs at least \
         {needed} bytes ({needed_kib} KiB) for its io_uring executors; raise it: Docker \
         `--ulimit memlock=-1` (or `--ulimit memlock={needed}`), systemd `LimitMEMLOCK=infinity` \
         in the unit, a shell `ulimit -l unlimited`, or memlock in /etc/security/limits.conf"
    )]
    MemLock {
        /// The soft limit after trying to raise it to the hard limit.
        limit: u64,
        /// What is needed.
        needed: u64,
        /// `needed` in KiB (for the message).
        needed_kib: u64,
    },
    /// io_uring setup failed for another reason.
    #[error("io_uring could not be set up: {0}")]
    IoUring(io::Error),
}

/// Runs every check: the locked-memory limit first (raising the soft limit to what is needed
/// when the hard limit allows), then an io_uring ring set up and torn down.
pub fn check() -> Result<(), PreflightError> {
    check_memlock(crate::limits::MEMLOCK_BYTES_MIN)?;
    check_io_uring()
}

/// Refuses a locked-memory limit below `needed`, after raising the soft limit towards the hard
/// one (an unprivileged process may do that).
pub fn check_memlock(needed: u64) -> Result<(), PreflightError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        // Unknown: let the runtime report whatever it finds.
        return Ok(());
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < needed && lim.rlim_max > lim.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: if lim.rlim_max == libc::RLIM_INFINITY {
                needed
            } else {
                lim.rlim_max.min(needed.max(lim.rlim_cur))
            },
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard
        // limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < needed {
        return Err(PreflightError::MemLock {
            limit: lim.rlim_cur,
            needed,
            needed_kib: needed / 1024,
        });
    }
    Ok(())
}

/// Sets up a small io_uring and asks for its probe (what glommio does first, and panics on).
pub fn check_io_uring() -> Result<(), PreflightError> {
    let ring = match io_uring::IoUring::new(PROBE_RING_ENTRIES) {
        Ok(r) => r,
        Err(e) => return Err(classify_setup_error(e)),
    };
    let mut probe = io_uring::Probe::new();
    if let Err(source) = ring.submitter().register_probe(&mut probe) {
        return Err(PreflightError::KernelTooOld {
            kernel: kernel_release(),
            source,
        });
    }
    Ok(())
}

fn classify_setup_error(e: io::Error) -> PreflightError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) => {
            let sysctl = match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .map(|s| s.trim().to_owned())
            {
                Some(v) if v != "0" => format!(
                    "; sysctl kernel.io_uring_disabled is {v}: set it to 0 \
                     (`sysctl -w kernel.io_uring_disabled=0`)"
                ),
                _ => String::new(),
            };
            PreflightError::IoUringBlocked { source: e, sysctl }
        }
        // Older kernels charge ring memory to RLIMIT_MEMLOCK.
        Some(libc::ENOMEM) => {
            let needed = crate::limits::MEMLOCK_BYTES_MIN;
            PreflightError::MemLock {
                limit: memlock_limit(),
                needed,
                needed_kib: needed / 1024,
            }
        }
        _ => PreflightError::IoUring(e),
    }
}

fn memlock_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    lim.rlim_cur
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_block_and_the_fix() {
        // Each refusal is one line naming what is blocked and how to fix it.
        let blocked = classify_setup_error(io::Error::from_raw_os_error(libc::EPERM)).to_string();
        assert!(blocked.contains("io_uring is blocked"), "{blocked}");
        assert!(blocked.contains("seccomp=unconfined"), "{blocked}");
        assert!(!blocked.contains('\n'));
        let mem = PreflightError::MemLock {
            limit: 65536,
            needed: 524288,
            needed_kib: 512,
        }
        .to_string();
        for needle in ["65536", "524288", "--ulimit memlock=", "LimitMEMLOCK="] {
            assert!(mem.contains(needle), "{needle}: {mem}");
        }
        assert!(!mem.contains('\n'));
    }

    #[test]
    fn this_machine_passes() {
        // The test machine runs the integration tests, so io_uring works here.
        check_io_uring().unwrap();
    }
}
