//! Reading other processes' costs from `/proc`: the CPU time of a whole process tree (a server
//! and every process it started, e.g. PostgreSQL's backends), its peak resident memory, and the
//! machine's load average. It owns parsing of `/proc/<pid>/stat`, `/proc/<pid>/status` and
//! `/proc/loadavg`; it does not start or stop processes. Invariant: a tree's CPU time counts
//! every process once — live descendants by their own `utime + stime`, and descendants that have
//! exited and been reaped through their parent's `cutime + cstime` — so taking the difference of
//! two readings gives the CPU the tree used in between, even if backends came and went.

use std::collections::HashMap;
use std::fs;

/// One process's line of `/proc/<pid>/stat`, the fields we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// User-mode CPU, clock ticks.
    pub utime_ticks: u64,
    /// Kernel-mode CPU, clock ticks.
    pub stime_ticks: u64,
    /// User-mode CPU of reaped children, clock ticks.
    pub cutime_ticks: u64,
    /// Kernel-mode CPU of reaped children, clock ticks.
    pub cstime_ticks: u64,
}

impl ProcStat {
    /// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may contain spaces
    /// and parentheses, so fields are counted from its last `)`.
    pub fn parse(text: &str) -> Option<ProcStat> {
        let pid = text.split_whitespace().next()?.parse().ok()?;
        let rest = &text[text.rfind(')')? + 1..];
        // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        Some(ProcStat {
            pid,
            ppid: u32::try_from(field(4)?).ok()?,
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            cutime_ticks: field(16)?,
            cstime_ticks: field(17)?,
        })
    }

    /// Own plus reaped children's CPU, in ticks.
    fn total_ticks(&self) -> u64 {
        self.utime_ticks + self.stime_ticks + self.cutime_ticks + self.cstime_ticks
    }
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn all_stats() -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry.file_name().to_str()?.parse::<u32>().ok()?;
            let text = fs::read_to_string(entry.path().join("stat")).ok()?;
            ProcStat::parse(&text)
        })
        .collect()
}

/// `root` and all its live descendants, from one snapshot of `stats`.
pub fn tree(stats: &[ProcStat], root: u32) -> Vec<ProcStat> {
    let mut children: HashMap<u32, Vec<&ProcStat>> = HashMap::new();
    for stat in stats {
        children.entry(stat.ppid).or_default().push(stat);
    }
    let mut out = Vec::new();
    let mut stack: Vec<&ProcStat> = stats.iter().filter(|s| s.pid == root).collect();
    while let Some(stat) = stack.pop() {
        out.push(*stat);
        if let Some(kids) = children.get(&stat.pid) {
            stack.extend(kids.iter().copied());
        }
    }
    out
}

/// CPU seconds used so far by the process tree rooted at `root` (see the module invariant).
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = tree(&all_stats(), root)
        .iter()
        .map(ProcStat::total_ticks)
        .sum();
    ticks as f64 / ticks_per_second() as f64
}

/// Peak resident set (`VmHWM`) of one process, bytes.
pub fn vm_hwm_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, "VmHWM:").map(|kib| kib * 1024)
}

/// A `Name:   123 kB` line of `/proc/<pid>/status`, in KiB.
pub fn parse_status_kib(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// Sum of `VmHWM` over the live tree rooted at `root`, bytes. For a single-process server this
/// is its peak RSS; for a multi-process server (PostgreSQL) shared memory is counted once per
/// process that touched it, so the sum is an upper bound.
pub fn tree_vm_hwm_bytes(root: u32) -> u64 {
    tree(&all_stats(), root)
        .iter()
        .filter_map(|s| vm_hwm_bytes(s.pid))
        .sum()
}

/// Sum of `RssAnon` (anonymous resident memory, now) over the live tree rooted at `root`, bytes.
/// Unlike `VmHWM` it leaves out file-backed pages such as a memory-mapped log, which are page
/// cache the kernel can write back and drop.
pub fn tree_rss_anon_bytes(root: u32) -> u64 {
    tree(&all_stats(), root)
        .iter()
        .filter_map(|s| {
            let text = fs::read_to_string(format!("/proc/{}/status", s.pid)).ok()?;
            parse_status_kib(&text, "RssAnon:").map(|kib| kib * 1024)
        })
        .sum()
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> Option<[f64; 3]> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_and_parens_in_the_name_parses() {
        // Checks field counting from the last ')' with a hostile command name.
        let line = "4242 (post gres) (x)) S 17 4242 4242 0 -1 4194560 1 2 3 4 \
                    150 25 7 3 20 0 1 0 100 1000 10";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 4242,
                ppid: 17,
                utime_ticks: 150,
                stime_ticks: 25,
                cutime_ticks: 7,
                cstime_ticks: 3
            }
        );
        assert_eq!(stat.total_ticks(), 185);
    }

    #[test]
    fn tree_collects_descendants_only() {
        // Checks that the tree of 10 holds 10, its child 11 and grandchild 12, not sibling 20.
        let s = |pid, ppid| ProcStat {
            pid,
            ppid,
            utime_ticks: 1,
            stime_ticks: 0,
            cutime_ticks: 0,
            cstime_ticks: 0,
        };
        let stats = [s(1, 0), s(10, 1), s(11, 10), s(12, 11), s(20, 1)];
        let mut pids: Vec<u32> = tree(&stats, 10).iter().map(|p| p.pid).collect();
        pids.sort_unstable();
        assert_eq!(pids, vec![10, 11, 12]);
    }

    #[test]
    fn own_process_reads_cpu_and_peak_rss() {
        // Checks the live readers against this test process: after spinning until getrusage
        // shows 50 ms of CPU (bounded by 20 s of wall time), /proc shows CPU too; VmHWM is
        // non-zero; the load average parses.
        let me = std::process::id();
        let before = crate::sys::cpu_times(crate::sys::Who::SelfProcess);
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while crate::sys::cpu_times(crate::sys::Who::SelfProcess)
            .minus(&before)
            .total_s()
            < 0.05
            && start.elapsed() < std::time::Duration::from_secs(20)
        {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
        }
        assert!(tree_cpu_seconds(me) > 0.0);
        assert!(vm_hwm_bytes(me).unwrap() > 0);
        assert!(tree_vm_hwm_bytes(me) >= vm_hwm_bytes(me).unwrap());
        assert!(tree_rss_anon_bytes(me) > 0);
        assert!(loadavg().is_some());
        assert_eq!(
            parse_status_kib("VmHWM:\t  1234 kB\nVmRSS: 1 kB\n", "VmHWM:"),
            Some(1234)
        );
    }
}
