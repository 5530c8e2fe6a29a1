//! Process-level knobs and meters: raising the open-file soft limit to the hard limit (so one
//! process can hold ~20,000 sockets) and reading CPU time via `getrusage` (so runners can
//! subtract the client's share of a shared machine). It owns no sockets and no policy about how
//! many files a run may open. Invariant: functions here never lower a limit.

use std::io;

/// CPU time used, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuTimes {
    /// Time spent in user mode.
    pub user_s: f64,
    /// Time spent in the kernel on the process's behalf.
    pub sys_s: f64,
}

impl CpuTimes {
    /// Sum of user and system time.
    pub fn total_s(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// Component-wise sum.
    pub fn plus(&self, other: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user_s: self.user_s + other.user_s,
            sys_s: self.sys_s + other.sys_s,
        }
    }

    /// Component-wise difference, floored at zero.
    pub fn minus(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user_s: (self.user_s - earlier.user_s).max(0.0),
            sys_s: (self.sys_s - earlier.sys_s).max(0.0),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. Returns the (soft, hard) limits now in force.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that only raises the soft limit up to the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Which processes' CPU time to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// This process (all threads).
    SelfProcess,
    /// Terminated and waited-for children of this process.
    Children,
}

/// CPU time used so far by `who`.
pub fn cpu_times(who: Who) -> CpuTimes {
    let which = match who {
        Who::SelfProcess => libc::RUSAGE_SELF,
        Who::Children => libc::RUSAGE_CHILDREN,
    };
    // SAFETY: rusage is plain old data; all-zero is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage and `which` is a valid selector.
    if unsafe { libc::getrusage(which, &mut usage) } != 0 {
        return CpuTimes::default();
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    CpuTimes {
        user_s: seconds(usage.ru_utime),
        sys_s: seconds(usage.ru_stime),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_limit_is_raised_to_hard() {
        // Checks that after the call the soft limit equals the hard limit.
        let (soft, hard) = raise_nofile_limit().unwrap();
        assert_eq!(soft, hard);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        // Checks that busy work shows up as more CPU time for this process. It spins until the
        // reading grows by 20 ms (bounded by 20 s of wall time), so a loaded machine that gives
        // this thread little CPU slows the test down instead of failing it.
        let before = cpu_times(Who::SelfProcess);
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut used = CpuTimes::default();
        while start.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            used = cpu_times(Who::SelfProcess).minus(&before);
            if used.total_s() >= 0.02 {
                break;
            }
        }
        assert!(used.total_s() >= 0.02, "{used:?}");
        assert!(used.user_s > 0.0, "{used:?}");
    }
}
