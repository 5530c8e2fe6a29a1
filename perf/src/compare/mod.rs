//! The comparison runner behind `geobeat-compare` (and `perf/compare.sh`): starts geobeat, the
//! null ceiling and the peers people use for this job instead (Redis, PostgreSQL, Mosquitto),
//! drives each with the same `geobeat-load` workloads in interleaved rounds (every system once
//! per round, geobeat next to its ceiling, so ratios taken within a round hold on a noisy
//! machine), measures each server's own CPU and peak memory from `/proc`, and writes a results
//! directory (raw CSV and JSON lines, a README with commands, versions and machine, plots) plus
//! the summary section of `perf/RESULTS.md`. It owns the workloads, the run order and the
//! bookkeeping; servers live in [`systems`], aggregation and tables in [`report`], drawings in
//! [`crate::plot`]. Invariant: every figure in a table is computed from the rows in `raw.jsonl`
//! of the same results directory, and every row records the exact command that produced it.

pub mod report;
pub mod systems;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use thiserror::Error;

use crate::frame::Format;
use crate::load::Mode;
use crate::procfs;
use crate::stats::Summary;
use systems::{Programs, Server, ServerError, ServerKind, System, ALL_SYSTEMS};

/// Extra seconds a load run may take beyond its own timeline before it is killed.
const LOAD_TIMEOUT_SLACK_S: f64 = 90.0;
/// Before a run, the servers together must use less than this share of one core...
const QUIESCE_CPU_SHARE_MAX: f64 = 0.10;
/// ...over one interval of this length...
const QUIESCE_INTERVAL: Duration = Duration::from_millis(500);
/// ...or this much time must have passed (a server busy on its own, e.g. PostgreSQL's
/// autovacuum, must not hold the comparison up for ever).
const QUIESCE_WAIT_MAX: Duration = Duration::from_secs(60);

/// `geobeat-compare`: geobeat vs its ceiling vs Redis, PostgreSQL and Mosquitto, one machine.
#[derive(Debug, Clone, Parser)]
#[command(name = "geobeat-compare", version)]
pub struct CompareArgs {
    /// Quick mode for CI: small fleets, 2-second runs, every system once.
    #[arg(long)]
    pub quick: bool,
    /// Rounds (each runs every workload on every system once); default 3, quick 1.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Measured seconds per run (default 10, quick 2).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Comma-separated systems to run (default all): geobeat, null, floor, redis-always,
    /// redis-everysec, postgres-tx1, postgres-batch, geobeat-mqtt, mosquitto.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Comma-separated workload names to run (default all of the mode).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Results directory (default: perf/runs/<date>-<host>; quick: inside the work dir, removed
    /// at the end unless --keep-data).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Markdown file whose "## Comparison" section is replaced with the summary (default:
    /// perf/RESULTS.md in full mode, none in quick mode).
    #[arg(long)]
    pub results_md: Option<PathBuf>,
    /// Do not touch any RESULTS.md.
    #[arg(long)]
    pub no_results_md: bool,
    /// Directory holding geobeat, geobeat-null and geobeat-load (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where servers keep their data (default /var/tmp/geobeat-compare-<pid>; removed after).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the work dir (server data and logs) after the run.
    #[arg(long)]
    pub keep_data: bool,
    /// Repository root (for the commit id and default paths).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Exit with status 3 if any run failed or was unclean (default in quick mode).
    #[arg(long)]
    pub fail_on_errors: bool,
    /// Run nothing: rebuild the README, plots and RESULTS.md section of an existing results
    /// directory from its info.json and raw.jsonl.
    #[arg(long, value_name = "DIR")]
    pub rereport: Option<PathBuf>,
}

/// Why a comparison could not run.
#[derive(Debug, Error)]
pub enum CompareError {
    /// Flags contradict each other or name unknown things.
    #[error("{0}")]
    Invalid(String),
    /// A server could not be prepared or started.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Writing results failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

/// One load shape, run on several systems.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// Short name (`sat-1k-json`).
    pub name: String,
    /// Sentence for tables.
    pub title: String,
    /// Closed (saturation) or open (fixed rate).
    pub mode: Mode,
    /// Devices, one connection each (WebSocket, MQTT) or sharing the pool (Redis, PostgreSQL).
    pub devices: usize,
    /// Closed loop: heartbeats in flight per device.
    pub window: usize,
    /// Open loop: total heartbeats per second.
    pub rate_per_s: Option<f64>,
    /// Frame format.
    pub format: Format,
    /// Whether the peers run it too (else geobeat and null only).
    pub peers: bool,
}

impl Workload {
    fn closed(devices: usize, format: Format, peers: bool) -> Workload {
        let fmt = format_name(format);
        Workload {
            name: format!("sat-{}-{fmt}", short_count(devices)),
            title: format!(
                "saturation: {} devices, closed loop, window 8, {}",
                thousands(devices as u64),
                fmt.to_uppercase()
            ),
            mode: Mode::Closed,
            devices,
            window: 8,
            rate_per_s: None,
            format,
            peers,
        }
    }

    fn open(devices: usize, rate_per_s: f64) -> Workload {
        Workload {
            name: format!("ref-{}-json", short_count(devices)),
            title: format!(
                "reference rate: {} heartbeats/s over {} devices, open loop, JSON",
                thousands(rate_per_s as u64),
                thousands(devices as u64)
            ),
            mode: Mode::Open,
            devices,
            window: 0,
            rate_per_s: Some(rate_per_s),
            format: Format::Json,
            peers: true,
        }
    }

    /// Light load (issue 15): a low open-loop rate where per-message and per-commit fixed costs
    /// dominate; geobeat and its references only.
    fn light(devices: usize, rate_per_s: f64) -> Workload {
        Workload {
            name: format!("light-{}-json", short_count(devices)),
            title: format!(
                "light load: {} heartbeats/s over {} devices, open loop, JSON",
                thousands(rate_per_s as u64),
                thousands(devices as u64)
            ),
            peers: false,
            ..Workload::open(devices, rate_per_s)
        }
    }

    /// Whether `system` runs this workload.
    pub fn runs_on(&self, system: System) -> bool {
        if self.format == Format::Binary && !system.speaks_geobeat() {
            return false;
        }
        self.peers || system.speaks_geobeat()
    }
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::Binary => "bin",
    }
}

/// `1000` -> `1k`, `200` -> `200`.
fn short_count(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// `33334` -> `33,334`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The workloads of full mode: saturation and the reference rate on every system, the issue-3
/// ingest figures (10,000 connections, binary frames) and issue 15's light load on geobeat and
/// its references (null, floor).
pub fn full_workloads() -> Vec<Workload> {
    vec![
        Workload::closed(1000, Format::Json, true),
        Workload::open(10_000, 33_334.0),
        Workload::closed(10_000, Format::Json, false),
        Workload::closed(1000, Format::Binary, false),
        Workload::closed(10_000, Format::Binary, false),
        Workload::light(1000, 2000.0),
    ]
}

/// The workloads of quick mode: the same shapes, small.
pub fn quick_workloads() -> Vec<Workload> {
    vec![
        Workload::closed(100, Format::Json, true),
        Workload::open(200, 2000.0),
        Workload::closed(100, Format::Binary, false),
    ]
}

/// Timeline of every run.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    /// Measured seconds.
    pub duration_s: f64,
    /// Unmeasured seconds after the connection ramp.
    pub warmup_s: f64,
    /// Seconds allowed for outstanding acks after the window.
    pub drain_s: f64,
    /// Pause before each run (after `sync`), seconds.
    pub settle_s: f64,
    /// New connections per second.
    pub connect_rate: f64,
}

/// One run of one workload on one system.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// Round, from 1.
    pub round: usize,
    /// Workload name.
    pub workload: String,
    /// System name.
    pub system: String,
    /// Whether the ack is durable on this system.
    pub durable: bool,
    /// Whether geobeat-load exited successfully.
    pub ok: bool,
    /// What made the run unclean (errors, unacked heartbeats), or why it failed.
    pub problems: Vec<String>,
    /// Heartbeats acked per second inside the measured window.
    pub throughput_per_s: f64,
    /// Measured heartbeats sent.
    pub sent: u64,
    /// Measured heartbeats acked.
    pub acked: u64,
    /// Measured heartbeats never acked.
    pub unacked: u64,
    /// Heartbeats acked over the whole run (CPU-per-heartbeat denominator).
    pub acked_total: u64,
    /// Ack latency percentiles, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
    /// CPU seconds the server's process tree used during the run.
    pub server_cpu_s: f64,
    /// CPU seconds the load generator used.
    pub client_cpu_s: f64,
    /// Server CPU seconds per million heartbeats acked.
    pub server_cpu_s_per_million: f64,
    /// Load-generator CPU seconds per million heartbeats acked.
    pub client_cpu_s_per_million: f64,
    /// Peak resident memory of the server's process tree so far (VmHWM), bytes.
    pub server_rss_peak_bytes: u64,
    /// Anonymous resident memory of the server's process tree at the end of the run (RssAnon,
    /// without file-backed pages such as geobeat's mapped log), bytes.
    #[serde(default)]
    pub server_rss_anon_bytes: u64,
    /// 1-minute load average before the run.
    pub loadavg_before: f64,
    /// 1-minute load average after the run.
    pub loadavg_after: f64,
    /// Start of the run, Unix seconds.
    pub started_unix_s: u64,
    /// Seconds waited before the run for every server to go idle (see [`quiesce`]).
    pub quiesce_s: f64,
    /// Open loop: median delay between a frame's intended and actual send, µs (the client's
    /// own lag; large values mean the load generator was starved and latency is inflated).
    pub send_lag_p50_us: u64,
    /// Open loop: 99th percentile of the send delay, µs.
    pub send_lag_p99_us: u64,
    /// Wall seconds the load generator took.
    pub wall_s: f64,
    /// The exact load command.
    pub command: String,
    /// The load generator's summary, histograms included (raw.jsonl only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

impl Row {
    /// Header of raw.csv.
    pub const CSV_HEADER: &'static str = "round,workload,system,durable,ok,throughput_per_s,sent,\
        acked,unacked,acked_total,p50_us,p90_us,p99_us,p999_us,max_us,server_cpu_s,client_cpu_s,\
        server_cpu_s_per_million,client_cpu_s_per_million,server_rss_peak_bytes,server_rss_anon_bytes,loadavg_before,\
        loadavg_after,started_unix_s,quiesce_s,send_lag_p50_us,send_lag_p99_us,wall_s,problems";

    /// One raw.csv line (problems joined with `;`, quoted).
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{},{},{},{:.1},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{:.2},{:.2},{},{:.2},{},{},{:.2},\"{}\"",
            self.round,
            self.workload,
            self.system,
            self.durable,
            self.ok,
            self.throughput_per_s,
            self.sent,
            self.acked,
            self.unacked,
            self.acked_total,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.server_cpu_s,
            self.client_cpu_s,
            self.server_cpu_s_per_million,
            self.client_cpu_s_per_million,
            self.server_rss_peak_bytes,
            self.server_rss_anon_bytes,
            self.loadavg_before,
            self.loadavg_after,
            self.started_unix_s,
            self.quiesce_s,
            self.send_lag_p50_us,
            self.send_lag_p99_us,
            self.wall_s,
            self.problems.join("; ").replace('"', "'")
        )
    }

    /// Whether the run completed with every measured heartbeat acked and no error.
    pub fn clean(&self) -> bool {
        self.ok && self.problems.is_empty()
    }
}

/// Everything a results directory describes besides the rows.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// `YYYY-MM-DD HH:MM:SS UTC` at the start.
    pub started_utc: String,
    /// Host name.
    pub host: String,
    /// CPU model, cores, memory, kernel.
    pub machine: String,
    /// `git rev-parse --short HEAD` (plus `-dirty` when the tree has changes).
    pub commit: String,
    /// Quick or full.
    pub quick: bool,
    /// Rounds run.
    pub rounds: usize,
    /// The runner's own command line.
    pub command: String,
    /// Timeline of every run.
    pub timing: Option<Timing>,
    /// Workloads in run order.
    pub workloads: Vec<Workload>,
    /// Systems in run order.
    pub systems: Vec<String>,
    /// Server name -> version, start command, non-default settings.
    pub servers: BTreeMap<String, ServerInfo>,
    /// Tool versions (rustc, load generator).
    pub tools: BTreeMap<String, String>,
    /// Load average at start and end.
    pub loadavg: Vec<String>,
    /// Median time of one 4 KiB write + fdatasync in the work directory, µs, measured before
    /// the runs (issue 15's light-load latency target: floor p50 + one fdatasync).
    #[serde(default)]
    pub fdatasync_p50_us: Option<f64>,
}

/// How one server was run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerInfo {
    /// Version string.
    pub version: String,
    /// Start command.
    pub command: String,
    /// Settings that differ from the defaults.
    pub settings: Vec<String>,
}

/// Runs the comparison described by `args`; returns whether every run was clean.
pub fn run(args: &CompareArgs) -> Result<bool, CompareError> {
    if let Some(dir) = &args.rereport {
        return rereport(args, dir);
    }
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 3 });
    if rounds == 0 {
        return Err(CompareError::Invalid("--rounds must be at least 1".into()));
    }
    let timing = Timing {
        duration_s: args.duration.unwrap_or(if quick { 2.0 } else { 10.0 }),
        warmup_s: if quick { 0.5 } else { 2.0 },
        drain_s: if quick { 5.0 } else { 10.0 },
        settle_s: if quick { 0.2 } else { 2.0 },
        connect_rate: 2000.0,
    };
    let systems = select_systems(&args.systems)?;
    let workloads = select_workloads(quick, &args.workloads)?;
    let _ = crate::sys::raise_nofile_limit();

    let repo = args.repo.clone();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .ok_or_else(|| CompareError::Invalid("cannot find the binaries' directory".into()))?,
    };
    let programs = Programs { bin_dir };
    let load_bin = programs.ours("geobeat-load")?;
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!("/var/tmp/geobeat-compare-{}", std::process::id()))
    });
    fs::create_dir_all(&work_dir).map_err(io_err(format!("create {}", work_dir.display())))?;

    let mut info = RunInfo {
        started_utc: shell(&["date", "-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        host: fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".into()),
        machine: machine_description(),
        commit: commit_id(&repo),
        quick,
        rounds,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        timing: Some(timing),
        workloads: workloads.clone(),
        systems: systems.iter().map(|s| s.name().to_owned()).collect(),
        ..RunInfo::default()
    };
    info.tools.insert("rustc".into(), shell(&["rustc", "-V"]));
    info.tools.insert(
        "geobeat-load".into(),
        systems::capture(&load_bin, &["--version"]),
    );
    info.loadavg.push(format!("start: {}", loadavg_text()));

    let out_dir = match &args.out {
        Some(dir) => dir.clone(),
        None if quick => work_dir.join("results"),
        None => unique_dir(&repo.join("perf/runs").join(format!(
            "{}-{}",
            shell(&["date", "-u", "+%Y-%m-%d"]),
            info.host
        ))),
    };
    fs::create_dir_all(out_dir.join("logs"))
        .map_err(io_err(format!("create {}", out_dir.display())))?;
    eprintln!("geobeat-compare: results in {}", out_dir.display());

    info.fdatasync_p50_us = match fdatasync_median_us(&work_dir) {
        Ok(us) => Some(us),
        Err(e) => {
            eprintln!(
                "geobeat-compare: could not time fdatasync in {}: {e}",
                work_dir.display()
            );
            None
        }
    };
    // Start every server needed, once; they stay up for all rounds.
    let mut servers: BTreeMap<ServerKind, Server> = BTreeMap::new();
    for system in &systems {
        let kind = system.server();
        if servers.contains_key(&kind) {
            continue;
        }
        eprintln!("geobeat-compare: starting {}", kind.name());
        let server = systems::start(kind, &work_dir, &programs)?;
        info.servers.insert(
            kind.name().into(),
            ServerInfo {
                version: if matches!(
                    kind,
                    ServerKind::Geobeat
                        | ServerKind::GeobeatMqtt
                        | ServerKind::Null
                        | ServerKind::Floor
                ) {
                    format!("{} at {}", kind.name(), info.commit)
                } else {
                    server.version.clone()
                },
                command: server.command.clone(),
                settings: server.settings.clone(),
            },
        );
        servers.insert(kind, server);
    }
    let geobeat_secret = servers
        .get(&ServerKind::Geobeat)
        .and_then(|s| s.secret_file.clone());
    let geobeat_mqtt_secret = servers
        .get(&ServerKind::GeobeatMqtt)
        .and_then(|s| s.secret_file.clone());

    let mut csv = fs::File::create(out_dir.join("raw.csv")).map_err(io_err("create raw.csv"))?;
    writeln!(csv, "{}", Row::CSV_HEADER).map_err(io_err("write raw.csv"))?;
    let mut jsonl =
        fs::File::create(out_dir.join("raw.jsonl")).map_err(io_err("create raw.jsonl"))?;
    let mut rows = Vec::new();
    for round in 1..=rounds {
        for workload in &workloads {
            for &system in &systems {
                if !workload.runs_on(system) {
                    continue;
                }
                let server = &servers[&system.server()];
                let mut target_args = system.load_args(server);
                if matches!(system, System::Null | System::Floor) {
                    if let Some(secret) = &geobeat_secret {
                        target_args.push("--secret-file".into());
                        target_args.push(secret.display().to_string());
                    } else {
                        target_args.push("--gateway-token".into());
                        target_args.push("ignored-by-null".into());
                    }
                }
                if system == System::Mosquitto {
                    // Mosquitto accepts any user name and password (allow_anonymous, no password
                    // file): with geobeat's minted tokens it gets the very CONNECT and PUBLISH
                    // bytes geobeat-mqtt gets. Without a geobeat server the devices connect
                    // anonymously and name themselves in the payload (`"id"`).
                    if let Some(secret) = geobeat_mqtt_secret.as_ref().or(geobeat_secret.as_ref()) {
                        target_args.push("--secret-file".into());
                        target_args.push(secret.display().to_string());
                    }
                }
                let quiesce_s = quiesce(&servers);
                let mut row = run_one(RunSpec {
                    round,
                    workload,
                    system,
                    server,
                    target_args: &target_args,
                    timing: &timing,
                    load_bin: &load_bin,
                    log_dir: &out_dir.join("logs"),
                });
                row.quiesce_s = quiesce_s;
                eprintln!(
                    "geobeat-compare: round {round} {:<13} {:<15} {:>9.0} hb/s  p50 {:>8} us  p99 {:>8} us  \
                     server {:>6.2} cpu-s/M  load {:.1}{}",
                    workload.name,
                    system.name(),
                    row.throughput_per_s,
                    row.p50_us,
                    row.p99_us,
                    row.server_cpu_s_per_million,
                    row.loadavg_before,
                    if row.clean() {
                        String::new()
                    } else {
                        format!("  [{}]", row.problems.join("; "))
                    }
                );
                writeln!(csv, "{}", row.csv_line()).map_err(io_err("write raw.csv"))?;
                let line = serde_json::to_string(&row).expect("rows serialize");
                writeln!(jsonl, "{line}").map_err(io_err("write raw.jsonl"))?;
                rows.push(row);
            }
        }
    }
    info.loadavg.push(format!("end: {}", loadavg_text()));
    drop(servers);

    let info_json = serde_json::to_string_pretty(&info).expect("info serializes");
    fs::write(out_dir.join("info.json"), info_json + "\n").map_err(io_err("write info.json"))?;
    publish(args, &info, &rows, &out_dir)?;
    if !args.keep_data && args.work_dir.is_none() {
        // Quick mode's results (inside the work dir unless --out was given) go too: CI reads
        // the summary printed above and the exit code, and repeated runs must not fill /var/tmp.
        let _ = fs::remove_dir_all(&work_dir);
    }
    Ok(rows.iter().all(Row::clean))
}

/// Median of 200 rounds of "write 4 KiB at the end of a file, then fdatasync" in `dir`, in µs:
/// what one durable group costs the data disk at the least.
fn fdatasync_median_us(dir: &Path) -> std::io::Result<f64> {
    use std::os::unix::fs::FileExt as _;
    const ROUNDS: usize = 200;
    let path = dir.join("fdatasync-probe");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let mut times = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        file.write_all_at(&block, (i * block.len()) as u64)?;
        let t = std::time::Instant::now();
        file.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    let _ = fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    Ok(times[ROUNDS / 2])
}

/// Writes plots, the results README and (unless disabled, or in quick mode without
/// `--results-md`) the "## Comparison" section of RESULTS.md, and prints the summary.
fn publish(
    args: &CompareArgs,
    info: &RunInfo,
    rows: &[Row],
    out_dir: &Path,
) -> Result<(), CompareError> {
    let systems: Vec<System> = info
        .systems
        .iter()
        .filter_map(|s| System::from_name(s))
        .collect();
    let summary = report::Summary::of(rows, &info.workloads, &systems).with_light_latency_target(
        rows,
        &info.workloads,
        info.fdatasync_p50_us,
    );
    let plots = match crate::plot::draw_all(out_dir, rows, &info.workloads, &systems) {
        Ok(plots) => plots,
        Err(e) => {
            eprintln!("geobeat-compare: plots failed: {e}");
            Vec::new()
        }
    };
    let readme = report::readme(info, &summary, rows, &plots);
    fs::write(out_dir.join("README.md"), readme).map_err(io_err("write README.md"))?;
    let results_md = if args.no_results_md {
        None
    } else {
        args.results_md
            .clone()
            .or_else(|| (!info.quick).then(|| args.repo.join("perf/RESULTS.md")))
    };
    if let Some(path) = results_md {
        let perf_dir = args.repo.join("perf");
        let rel = out_dir
            .strip_prefix(&perf_dir)
            .or_else(|_| {
                // `--rereport perf/runs/x` and `--repo .` name the same place differently.
                out_dir.strip_prefix(perf_dir.strip_prefix("./").unwrap_or(&perf_dir))
            })
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| out_dir.to_path_buf());
        let section = report::results_section(info, &summary, &rel, &plots);
        let old = fs::read_to_string(&path).unwrap_or_default();
        fs::write(&path, report::replace_section(&old, &section))
            .map_err(io_err(format!("write {}", path.display())))?;
        eprintln!("geobeat-compare: updated {}", path.display());
    }
    print!("{}", report::console(&summary));
    Ok(())
}

/// `--rereport DIR`: rebuilds a results directory's README, plots and the RESULTS.md section
/// from its `info.json` and `raw.jsonl`, without running anything.
pub fn rereport(args: &CompareArgs, dir: &Path) -> Result<bool, CompareError> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name))
            .map_err(io_err(format!("read {}", dir.join(name).display())))
    };
    let info: RunInfo = serde_json::from_str(&read("info.json")?)
        .map_err(|e| CompareError::Invalid(format!("info.json: {e}")))?;
    let mut rows = Vec::new();
    for (n, line) in read("raw.jsonl")?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        rows.push(
            serde_json::from_str::<Row>(line)
                .map_err(|e| CompareError::Invalid(format!("raw.jsonl line {}: {e}", n + 1)))?,
        );
    }
    publish(args, &info, &rows, dir)?;
    Ok(rows.iter().all(Row::clean))
}

/// Waits until the servers together use less than [`QUIESCE_CPU_SHARE_MAX`] of a core over
/// [`QUIESCE_INTERVAL`] (at most [`QUIESCE_WAIT_MAX`]), so that no server's leftover work (a
/// database's backlog, a checkpoint, autovacuum) lands in the next system's run. Returns the
/// seconds waited.
fn quiesce(servers: &BTreeMap<ServerKind, Server>) -> f64 {
    let start = Instant::now();
    let total = || -> f64 {
        servers
            .values()
            .map(|s| procfs::tree_cpu_seconds(s.pid))
            .sum()
    };
    let mut before = total();
    while start.elapsed() < QUIESCE_WAIT_MAX {
        std::thread::sleep(QUIESCE_INTERVAL);
        let now = total();
        if now - before < QUIESCE_CPU_SHARE_MAX * QUIESCE_INTERVAL.as_secs_f64() {
            break;
        }
        before = now;
    }
    start.elapsed().as_secs_f64()
}

fn select_systems(names: &[String]) -> Result<Vec<System>, CompareError> {
    if names.is_empty() {
        return Ok(ALL_SYSTEMS.to_vec());
    }
    let mut chosen = Vec::new();
    for name in names {
        let system = System::from_name(name)
            .ok_or_else(|| CompareError::Invalid(format!("unknown system {name:?}")))?;
        chosen.push(system);
    }
    // Keep the canonical interleaving order whatever order the flag gave.
    Ok(ALL_SYSTEMS
        .into_iter()
        .filter(|s| chosen.contains(s))
        .collect())
}

fn select_workloads(quick: bool, names: &[String]) -> Result<Vec<Workload>, CompareError> {
    let all = if quick {
        quick_workloads()
    } else {
        full_workloads()
    };
    if names.is_empty() {
        return Ok(all);
    }
    for name in names {
        if !all.iter().any(|w| &w.name == name) {
            return Err(CompareError::Invalid(format!(
                "unknown workload {name:?}; this mode has {}",
                all.iter()
                    .map(|w| w.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(all
        .into_iter()
        .filter(|w| names.contains(&w.name))
        .collect())
}

struct RunSpec<'a> {
    round: usize,
    workload: &'a Workload,
    system: System,
    server: &'a Server,
    target_args: &'a [String],
    timing: &'a Timing,
    load_bin: &'a Path,
    log_dir: &'a Path,
}

/// The `geobeat-load` arguments of one run (without the output file).
pub fn load_args(workload: &Workload, timing: &Timing, target_args: &[String]) -> Vec<String> {
    let mut args: Vec<String> = target_args.to_vec();
    let mut push = |name: &str, value: String| {
        args.push(name.into());
        args.push(value);
    };
    push("--devices", workload.devices.to_string());
    let format = match workload.format {
        Format::Json => "json",
        Format::Binary => "binary",
    };
    push("--format", format.into());
    match workload.mode {
        Mode::Closed => {
            push("--mode", "closed".into());
            push("--window", workload.window.to_string());
        }
        Mode::Open => {
            push("--mode", "open".into());
            push("--rate", workload.rate_per_s.unwrap_or(0.0).to_string());
        }
    }
    push("--duration", timing.duration_s.to_string());
    push("--warmup", timing.warmup_s.to_string());
    push("--drain", timing.drain_s.to_string());
    push("--connect-rate", timing.connect_rate.to_string());
    args
}

fn run_one(spec: RunSpec<'_>) -> Row {
    let RunSpec {
        round,
        workload,
        system,
        server,
        target_args,
        timing,
        load_bin,
        log_dir,
    } = spec;
    let stem = format!("r{round}-{}-{}", workload.name, system.name());
    let json_path = log_dir.join(format!("{stem}.json"));
    let log_path = log_dir.join(format!("{stem}.log"));
    let mut args = load_args(workload, timing, target_args);
    args.push("--json-out".into());
    args.push(json_path.display().to_string());
    args.push("--json-histograms".into());
    let command = std::iter::once(load_bin.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut row = Row {
        round,
        workload: workload.name.clone(),
        system: system.name().into(),
        durable: system.durable(),
        command,
        ..Row::default()
    };

    // Start from a clean page cache state: no other system's dirty pages get written back
    // during this run at this run's expense.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_secs_f64(timing.settle_s));

    row.loadavg_before = procfs::loadavg().map_or(0.0, |l| l[0]);
    row.started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cpu_before = procfs::tree_cpu_seconds(server.pid);
    let start = Instant::now();
    let log = fs::File::create(&log_path).ok();
    let mut command = Command::new(load_bin);
    command.args(&args).stdin(Stdio::null());
    match log.and_then(|f| f.try_clone().ok().map(|g| (f, g))) {
        Some((out, err)) => command.stdout(out).stderr(err),
        None => command.stdout(Stdio::null()).stderr(Stdio::null()),
    };
    let ramp_s = workload.devices as f64 / timing.connect_rate;
    let limit = Duration::from_secs_f64(
        ramp_s + timing.warmup_s + timing.duration_s + timing.drain_s + LOAD_TIMEOUT_SLACK_S,
    );
    let status = match command.spawn() {
        Ok(mut child) => loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() > limit => {
                    let _ = child.kill();
                    let _ = child.wait();
                    row.problems.push(format!("killed after {limit:?}"));
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    row.problems.push(format!("wait: {e}"));
                    break None;
                }
            }
        },
        Err(e) => {
            row.problems.push(format!("cannot start geobeat-load: {e}"));
            None
        }
    };
    row.wall_s = start.elapsed().as_secs_f64();
    row.server_cpu_s = (procfs::tree_cpu_seconds(server.pid) - cpu_before).max(0.0);
    row.server_rss_peak_bytes = procfs::tree_vm_hwm_bytes(server.pid);
    row.server_rss_anon_bytes = procfs::tree_rss_anon_bytes(server.pid);
    row.loadavg_after = procfs::loadavg().map_or(0.0, |l| l[0]);
    row.ok = status.is_some_and(|s| s.success());
    if let Some(status) = status.filter(|s| !s.success()) {
        row.problems.push(format!(
            "geobeat-load exited with {status}; see {}",
            log_path.display()
        ));
    }
    let summary = fs::read_to_string(&json_path)
        .ok()
        .and_then(|text| serde_json::from_str::<Summary>(&text).ok());
    match summary {
        Some(summary) => {
            let c = &summary.counters;
            row.throughput_per_s = summary.throughput_acked_per_s;
            row.sent = c.sent;
            row.acked = c.acked;
            row.unacked = c.unacked;
            row.acked_total = c.acked_total;
            row.p50_us = summary.latency.p50_us;
            row.p90_us = summary.latency.p90_us;
            row.p99_us = summary.latency.p99_us;
            row.p999_us = summary.latency.p999_us;
            row.max_us = summary.latency.max_us;
            row.client_cpu_s = summary.client_cpu.total_s();
            row.send_lag_p50_us = summary.send_lag.p50_us;
            row.send_lag_p99_us = summary.send_lag.p99_us;
            if c.acked_total > 0 {
                let millions = c.acked_total as f64 / 1e6;
                row.server_cpu_s_per_million = row.server_cpu_s / millions;
                row.client_cpu_s_per_million = row.client_cpu_s / millions;
            }
            row.problems.extend(summary.problems());
            row.summary = Some(summary);
        }
        None => row
            .problems
            .push(format!("no summary; see {}", log_path.display())),
    }
    row
}

/// Output of a command, trimmed (empty if it cannot run).
fn shell(argv: &[&str]) -> String {
    systems::capture(Path::new(argv[0]), &argv[1..])
}

fn loadavg_text() -> String {
    procfs::loadavg().map_or_else(
        || "unknown".into(),
        |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]),
    )
}

fn machine_description() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib =
        procfs::parse_status_kib(&meminfo, "MemTotal:").unwrap_or(0) as f64 / (1024.0 * 1024.0);
    let disk = shell(&["df", "-h", "--output=source,fstype,size", "/var/tmp"])
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}, data on {disk}",
        shell(&["uname", "-r"])
    )
}

fn commit_id(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// `base`, or `base-2`, `base-3`... whichever does not exist yet.
fn unique_dir(base: &Path) -> PathBuf {
    if !base.exists() {
        return base.to_path_buf();
    }
    (2..)
        .map(|n| PathBuf::from(format!("{}-{n}", base.display())))
        .find(|p| !p.exists())
        .expect("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_have_the_documented_shapes() {
        // Checks names and shapes of the full-mode workloads, that binary workloads and light
        // load run only on geobeat and its references (null, floor), and that the reference rate is 33,334/s over 10,000 devices.
        let full = full_workloads();
        let names: Vec<&str> = full.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "sat-1k-json",
                "ref-10k-json",
                "sat-10k-json",
                "sat-1k-bin",
                "sat-10k-bin",
                "light-1k-json"
            ]
        );
        let light = &full[5];
        assert_eq!((light.devices, light.rate_per_s), (1000, Some(2000.0)));
        assert_eq!(light.mode, Mode::Open);
        assert!(light.runs_on(System::Floor));
        assert!(!light.runs_on(System::RedisAlways));
        let reference = &full[1];
        assert_eq!(reference.rate_per_s, Some(33_334.0));
        assert_eq!(reference.devices, 10_000);
        assert!(reference.runs_on(System::RedisAlways));
        assert!(!full[3].runs_on(System::PostgresBatch));
        assert!(full[3].runs_on(System::Null));
        assert!(!full[2].runs_on(System::Mosquitto));
        assert_eq!(thousands(33_334), "33,334");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn load_args_describe_the_workload() {
        // Checks that a run's geobeat-load arguments carry the workload's shape and timing.
        let timing = Timing {
            duration_s: 10.0,
            warmup_s: 2.0,
            drain_s: 10.0,
            settle_s: 1.0,
            connect_rate: 4000.0,
        };
        let open = load_args(
            &full_workloads()[1],
            &timing,
            &["--target".into(), "ws".into()],
        );
        let text = open.join(" ");
        assert!(
            text.starts_with("--target ws --devices 10000 --format json --mode open --rate 33334")
        );
        let closed = load_args(&full_workloads()[3], &timing, &[]);
        assert!(closed
            .join(" ")
            .contains("--format binary --mode closed --window 8"));
    }

    #[test]
    fn csv_lines_match_the_header() {
        // Checks that a row has as many CSV fields as the header names (problems quoted).
        let row = Row {
            problems: vec!["a, b".into()],
            ..Row::default()
        };
        let fields_in_header = Row::CSV_HEADER.split(',').count();
        let line = row.csv_line();
        let unquoted = &line[..line.find('"').unwrap()];
        assert_eq!(unquoted.split(',').count(), fields_in_header);
    }
}
