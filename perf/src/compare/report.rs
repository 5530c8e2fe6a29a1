//! Aggregation and tables of a comparison: medians per (workload, system) over rounds, ratios
//! taken within each round and then their median (so a slow round hurts both sides of a ratio
//! alike), the targets of issue 7 checked against those ratios, and the Markdown written to the
//! results directory's README and to the "## Comparison" section of `perf/RESULTS.md`. It owns
//! wording and arithmetic; it runs nothing. Invariant: every number printed comes from the rows
//! passed in, and a target is only called met or missed when both of its sides were measured.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::systems::System;
use super::{thousands, Row, RunInfo, Workload};
use crate::load::Mode;

/// Heading of the section this module owns in `perf/RESULTS.md`.
pub const SECTION_HEADING: &str = "## Comparison";

/// Aggregate of one (workload, system) over its rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Workload name.
    pub workload: String,
    /// The system.
    pub system: System,
    /// Runs made.
    pub runs: usize,
    /// Runs with every measured heartbeat acked and no error.
    pub clean_runs: usize,
    /// Median acked heartbeats per second.
    pub throughput_median: f64,
    /// Lowest run.
    pub throughput_min: f64,
    /// Highest run.
    pub throughput_max: f64,
    /// Median of the runs' p50, µs.
    pub p50_us: f64,
    /// Median of the runs' p99, µs.
    pub p99_us: f64,
    /// Median of the runs' p99.9, µs.
    pub p999_us: f64,
    /// Median server CPU seconds per million acked heartbeats.
    pub server_cpu_per_million: f64,
    /// Median load-generator CPU seconds per million acked heartbeats.
    pub client_cpu_per_million: f64,
    /// Highest peak RSS seen, bytes.
    pub rss_peak_bytes: u64,
    /// Highest anonymous RSS seen at the end of a run, bytes (0: not recorded).
    pub rss_anon_bytes: u64,
    /// Lowest and highest 1-minute load average before a run.
    pub loadavg: (f64, f64),
    /// Lowest share of measured heartbeats acked in a run.
    pub acked_share_min: f64,
    /// Distinct problems seen (first few).
    pub problems: Vec<String>,
    /// Open loop: median of the runs' client send-lag p50, µs.
    pub send_lag_p50_us: f64,
    /// Open loop: median of the runs' client send-lag p99, µs.
    pub send_lag_p99_us: f64,
}

/// One checked target.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The target as stated in the issue.
    pub goal: String,
    /// The figure from this run.
    pub figure: String,
    /// Met, missed, or not measured.
    pub met: Option<bool>,
}

/// Everything the tables need.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Aggregates in workload, then system order.
    pub cells: Vec<Cell>,
    /// Issue-7 targets.
    pub targets: Vec<Target>,
    /// Workloads in run order.
    pub workloads: Vec<Workload>,
}

/// Median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

impl Summary {
    /// Aggregates `rows`.
    pub fn of(rows: &[Row], workloads: &[Workload], systems: &[System]) -> Summary {
        let mut cells = Vec::new();
        for workload in workloads {
            for &system in systems {
                let runs: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.workload == workload.name && r.system == system.name())
                    .collect();
                if runs.is_empty() {
                    continue;
                }
                let pick =
                    |f: fn(&Row) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
                // A run whose measured heartbeats were never acked has no latency at all (not a
                // latency of zero): leave it out of the latency medians.
                let pick_latency = |f: fn(&Row) -> f64| {
                    median(
                        &runs
                            .iter()
                            .filter(|r| r.acked > 0)
                            .map(|r| f(r))
                            .collect::<Vec<_>>(),
                    )
                };
                let throughputs: Vec<f64> = runs.iter().map(|r| r.throughput_per_s).collect();
                let loads: Vec<f64> = runs.iter().map(|r| r.loadavg_before).collect();
                let mut problems: Vec<String> = Vec::new();
                for problem in runs.iter().flat_map(|r| r.problems.iter()) {
                    let kind = problem.split(" = ").next().unwrap_or(problem).to_owned();
                    if !problems.contains(&kind) && problems.len() < 4 {
                        problems.push(kind);
                    }
                }
                cells.push(Cell {
                    workload: workload.name.clone(),
                    system,
                    runs: runs.len(),
                    clean_runs: runs.iter().filter(|r| r.clean()).count(),
                    throughput_median: median(&throughputs),
                    throughput_min: throughputs.iter().copied().fold(f64::INFINITY, f64::min),
                    throughput_max: throughputs.iter().copied().fold(0.0, f64::max),
                    p50_us: pick_latency(|r| r.p50_us as f64),
                    p99_us: pick_latency(|r| r.p99_us as f64),
                    p999_us: pick_latency(|r| r.p999_us as f64),
                    server_cpu_per_million: pick(|r| r.server_cpu_s_per_million),
                    client_cpu_per_million: pick(|r| r.client_cpu_s_per_million),
                    rss_peak_bytes: runs
                        .iter()
                        .map(|r| r.server_rss_peak_bytes)
                        .max()
                        .unwrap_or(0),
                    rss_anon_bytes: runs
                        .iter()
                        .map(|r| r.server_rss_anon_bytes)
                        .max()
                        .unwrap_or(0),
                    loadavg: (
                        loads.iter().copied().fold(f64::INFINITY, f64::min),
                        loads.iter().copied().fold(0.0, f64::max),
                    ),
                    acked_share_min: runs
                        .iter()
                        .map(|r| {
                            if r.sent > 0 {
                                r.acked as f64 / r.sent as f64
                            } else {
                                0.0
                            }
                        })
                        .fold(1.0, f64::min),
                    problems,
                    send_lag_p50_us: pick(|r| r.send_lag_p50_us as f64),
                    send_lag_p99_us: pick(|r| r.send_lag_p99_us as f64),
                });
            }
        }
        let targets = targets(rows, workloads);
        Summary {
            cells,
            targets,
            workloads: workloads.to_vec(),
        }
    }

    /// Adds issue 15's light-load latency target (geobeat's ack p50 within the floor's p50 plus
    /// one median fdatasync of the data disk, both from this run) when a light workload ran.
    pub fn with_light_latency_target(
        mut self,
        rows: &[Row],
        workloads: &[Workload],
        fdatasync_p50_us: Option<f64>,
    ) -> Summary {
        for w in workloads.iter().filter(|w| w.name.starts_with("light-")) {
            let gap = paired_median(rows, &w.name, System::Geobeat, System::Floor, |g, f| {
                g.p50_us as f64 - f.p50_us as f64
            });
            let figure = match (gap, fdatasync_p50_us) {
                (Some(gap), Some(sync)) => format!(
                    "geobeat p50 − floor p50 = {} ms; one fdatasync (median) = {} ms",
                    ms(gap),
                    ms(sync)
                ),
                (Some(gap), None) => format!("geobeat p50 − floor p50 = {} ms", ms(gap)),
                (None, _) => "not measured".into(),
            };
            self.targets.push(Target {
                goal: format!(
                    "`{}`: geobeat ack p50 ≤ floor p50 + one median fdatasync",
                    w.name
                ),
                figure,
                met: gap.zip(fdatasync_p50_us).map(|(gap, sync)| gap <= sync),
            });
        }
        self
    }

    /// The aggregate of (workload, system), if it ran.
    pub fn cell(&self, workload: &str, system: System) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.workload == workload && c.system == system)
    }
}

/// Per-round `f(a, b)` on `workload`, then their median; `None` if no round has both. A run that
/// acked none of its measured heartbeats has no latency and is not comparable, so its round is
/// left out, as are non-finite values.
fn paired_median(
    rows: &[Row],
    workload: &str,
    a: System,
    b: System,
    f: impl Fn(&Row, &Row) -> f64,
) -> Option<f64> {
    let rounds = rows.iter().map(|r| r.round).max().unwrap_or(0);
    let find = |round: usize, system: System| {
        rows.iter().find(|r| {
            r.round == round && r.workload == workload && r.system == system.name() && r.acked > 0
        })
    };
    let values: Vec<f64> = (1..=rounds)
        .filter_map(|round| Some(f(find(round, a)?, find(round, b)?)))
        .collect();
    let m = median(&values);
    m.is_finite().then_some(m)
}

/// Per-round ratios `f(a) / f(b)` on `workload`, then their median (see [`paired_median`]).
pub fn paired_ratio(
    rows: &[Row],
    workload: &str,
    a: System,
    b: System,
    f: fn(&Row) -> f64,
) -> Option<f64> {
    paired_median(rows, workload, a, b, |x, y| {
        let (x, y) = (f(x), f(y));
        if y > 0.0 && x.is_finite() {
            x / y
        } else {
            f64::NAN
        }
    })
}

fn throughput(r: &Row) -> f64 {
    r.throughput_per_s
}

fn targets(rows: &[Row], workloads: &[Workload]) -> Vec<Target> {
    let mut out = Vec::new();
    let ratio_target = |goal: String, ratio: Option<f64>, min: f64, what: &str| Target {
        goal,
        figure: ratio.map_or_else(|| "not measured".into(), |r| format!("{r:.2}× {what}")),
        met: ratio.map(|r| r >= min),
    };
    for w in workloads.iter().filter(|w| w.mode == Mode::Closed) {
        let r = paired_ratio(rows, &w.name, System::Geobeat, System::Null, throughput);
        out.push(ratio_target(
            format!("`{}`: geobeat ≥ 70% of the ceiling's throughput", w.name),
            r,
            0.70,
            "(geobeat / null)",
        ));
    }
    let Some(sat) = workloads.iter().find(|w| w.mode == Mode::Closed && w.peers) else {
        return out;
    };
    for (peer, factor, label) in [
        (System::RedisAlways, 10.0, "Redis (appendfsync always)"),
        (
            System::PostgresBatch,
            20.0,
            "PostgreSQL (batched transactions)",
        ),
        (
            System::PostgresTx1,
            20.0,
            "PostgreSQL (one heartbeat per transaction)",
        ),
    ] {
        let r = paired_ratio(rows, &sat.name, System::Geobeat, peer, throughput);
        out.push(ratio_target(
            format!("`{}`: geobeat ≥ {factor:.0}× {label}", sat.name),
            r,
            factor,
            &format!("(geobeat / {})", peer.name()),
        ));
    }
    if let Some(reference) = workloads.iter().find(|w| w.mode == Mode::Open) {
        for (label, f) in [
            ("p50", (|r: &Row| r.p50_us as f64) as fn(&Row) -> f64),
            ("p99", |r: &Row| r.p99_us as f64),
        ] {
            let r = paired_ratio(rows, &reference.name, System::Geobeat, System::Null, f);
            out.push(Target {
                goal: format!(
                    "`{}`: geobeat {label} within 1.5× of the ceiling's",
                    reference.name
                ),
                figure: r.map_or_else(
                    || "not measured".into(),
                    |r| format!("{r:.2}× (geobeat / null)"),
                ),
                met: r.map(|r| r <= 1.5),
            });
        }
    }
    for w in workloads.iter().filter(|w| w.peers) {
        let cpu = |r: &Row| r.server_cpu_s_per_million;
        let mut worst: Option<(f64, System)> = None;
        let mut measured = false;
        for peer in [
            System::RedisAlways,
            System::PostgresTx1,
            System::PostgresBatch,
        ] {
            if let Some(r) = paired_ratio(rows, &w.name, System::Geobeat, peer, cpu) {
                measured = true;
                if worst.is_none_or(|(x, _)| r > x) {
                    worst = Some((r, peer));
                }
            }
        }
        out.push(Target {
            goal: format!(
                "`{}`: server CPU seconds per million durable heartbeats lowest of all",
                w.name
            ),
            figure: match worst {
                Some((r, peer)) => format!(
                    "geobeat uses {r:.2}× the CPU per heartbeat of the closest durable peer ({})",
                    peer.name()
                ),
                None => "not measured".into(),
            },
            met: measured.then(|| worst.is_some_and(|(r, _)| r < 1.0)),
        });
    }
    out.extend(floor_targets(rows, workloads));
    out.extend(mqtt_targets(rows, workloads));
    out
}

/// Issue 16's targets for geobeat over MQTT against Mosquitto on the peer workloads (saturation
/// and the reference rate): durable QoS 1 throughput ≥ Mosquitto's non-durable one at
/// saturation, and server CPU per message ≤ Mosquitto's at both.
fn mqtt_targets(rows: &[Row], workloads: &[Workload]) -> Vec<Target> {
    /// What is compared, how a row gives it, and whether geobeat-mqtt must be at least (else at
    /// most) Mosquitto's figure.
    type Check = (&'static str, fn(&Row) -> f64, bool);
    let cpu = |r: &Row| r.server_cpu_s_per_million;
    let mut out = Vec::new();
    for w in workloads.iter().filter(|w| w.peers) {
        let mut checks: Vec<Check> = Vec::new();
        if w.mode == Mode::Closed {
            checks.push(("durable QoS 1 messages/s", throughput, true));
        }
        checks.push(("server CPU per message", cpu, false));
        for (what, f, at_least) in checks {
            let r = paired_ratio(rows, &w.name, System::GeobeatMqtt, System::Mosquitto, f);
            out.push(Target {
                goal: format!(
                    "`{}`: geobeat-mqtt {what} {} Mosquitto's (issue 16)",
                    w.name,
                    if at_least { "≥" } else { "≤" }
                ),
                figure: r.map_or_else(
                    || "not measured".into(),
                    |r| format!("{r:.2}× (geobeat-mqtt / mosquitto)"),
                ),
                met: r.map(|r| if at_least { r >= 1.0 } else { r <= 1.0 }),
            });
        }
    }
    out
}

/// Issue 15's targets against the floor server: saturation at 1,000 connections (throughput ≥
/// 0.8×, server CPU per heartbeat ≤ 1.5×), the reference rate (CPU ≤ 1.25×) and light load
/// (CPU ≤ 2.5×).
fn floor_targets(rows: &[Row], workloads: &[Workload]) -> Vec<Target> {
    let cpu = |r: &Row| r.server_cpu_s_per_million;
    let mut out = Vec::new();
    let mut push = |w: &Workload, what: &str, f: fn(&Row) -> f64, bound: f64, at_least: bool| {
        let r = paired_ratio(rows, &w.name, System::Geobeat, System::Floor, f);
        out.push(Target {
            goal: format!(
                "`{}`: geobeat {what} {} {bound:.2}× the floor's",
                w.name,
                if at_least { "≥" } else { "≤" }
            ),
            figure: r.map_or_else(
                || "not measured".into(),
                |r| format!("{r:.2}× (geobeat / floor)"),
            ),
            met: r.map(|r| if at_least { r >= bound } else { r <= bound }),
        });
    };
    for w in workloads {
        match w.mode {
            Mode::Closed if w.devices == 1000 => {
                push(w, "heartbeats/s", throughput, 0.8, true);
                push(w, "server CPU per heartbeat", cpu, 1.5, false);
            }
            Mode::Open if w.name.starts_with("light-") => {
                push(w, "server CPU per heartbeat", cpu, 2.5, false);
            }
            Mode::Open if w.peers => {
                push(w, "server CPU per heartbeat", cpu, 1.25, false);
            }
            _ => {}
        }
    }
    out
}

fn ms(us: f64) -> String {
    if !us.is_finite() {
        return "–".into();
    }
    let ms = us / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn per_s(v: f64) -> String {
    if v.is_finite() {
        thousands(v.round() as u64)
    } else {
        "–".into()
    }
}

/// Whether the system reaches its server through the load generator's connection pool (so the
/// cost of terminating device connections is not on its server).
fn pooled(system: System) -> bool {
    matches!(
        system,
        System::RedisAlways | System::RedisEverysec | System::PostgresTx1 | System::PostgresBatch
    )
}

/// The results table of one workload.
pub fn workload_table(summary: &Summary, workload: &Workload) -> String {
    let open = workload.mode == Mode::Open;
    let null_cpu = summary
        .cell(&workload.name, System::Null)
        .map(|c| c.server_cpu_per_million);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| system | what an ack means | heartbeats/s, median [min–max] | p50 ms | p99 ms | p99.9 ms | \
         server CPU s / M hb | same + device connections¹ | client CPU s / M hb | server peak RSS MiB (anonymous at end)³ | \
         load avg before |{} clean runs |",
        if open { " client send lag p50 / p99 ms² |" } else { "" }
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|{}---|",
        if open { "---|" } else { "" }
    );
    for cell in summary.cells.iter().filter(|c| c.workload == workload.name) {
        let with_connections = match (pooled(cell.system), null_cpu) {
            (true, Some(null)) => format!("≈ {:.2}", cell.server_cpu_per_million + null),
            (true, None) => "–".to_owned(),
            (false, _) => format!("{:.2}", cell.server_cpu_per_million),
        };
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let rss = if cell.rss_anon_bytes > 0 {
            format!(
                "{:.0} ({:.0})",
                mib(cell.rss_peak_bytes),
                mib(cell.rss_anon_bytes)
            )
        } else {
            format!("{:.0}", mib(cell.rss_peak_bytes))
        };
        let lag = if open {
            format!(
                " {} / {} |",
                ms(cell.send_lag_p50_us),
                ms(cell.send_lag_p99_us)
            )
        } else {
            String::new()
        };
        let mut clean = format!("{}/{}", cell.clean_runs, cell.runs);
        if cell.clean_runs < cell.runs {
            let _ = write!(
                clean,
                " ({}; acked ≥ {:.0}% of sent)",
                cell.problems.join(", "),
                cell.acked_share_min * 100.0
            );
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} [{}–{}] | {} | {} | {} | {:.2} | {} | {:.2} | {} | {:.1}–{:.1} |{lag} {} |",
            cell.system.name(),
            cell.system.ack_meaning(),
            per_s(cell.throughput_median),
            per_s(cell.throughput_min),
            per_s(cell.throughput_max),
            ms(cell.p50_us),
            ms(cell.p99_us),
            ms(cell.p999_us),
            cell.server_cpu_per_million,
            with_connections,
            cell.client_cpu_per_million,
            rss,
            cell.loadavg.0,
            cell.loadavg.1,
            clean,
        );
    }
    let _ = writeln!(
        out,
        "\n¹ Redis and PostgreSQL are fed through the load generator's pool, so terminating the \
         devices' connections costs their server nothing; this column adds the null server's CPU \
         per heartbeat on the same workload (the cost of exactly that on geobeat's own stack) as \
         an estimate of a gateway in front of them. For the other systems it is their own figure."
    );
    let _ = writeln!(
        out,
        "\n³ Peak `VmHWM` over the comparison so far. It counts file-backed pages too: geobeat's \
         log is memory-mapped, so every heartbeat it has stored since it started (all rounds) \
         shows up there as page cache the kernel may drop; the anonymous figure in brackets \
         (`RssAnon` at the end of the run, when recorded) leaves those out."
    );
    if open {
        let _ = writeln!(
            out,
            "\n² How late the load generator itself sent (already inside the latency): hundreds of \
             ms mean the client was starved of CPU, and the latencies of that system say more \
             about the machine than about the server."
        );
    }
    out
}

fn targets_table(summary: &Summary) -> String {
    let mut out = String::from("| target | this run | met? |\n|---|---|---|\n");
    for t in &summary.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(out, "| {} | {} | {met} |", t.goal, t.figure);
    }
    out
}

/// The issue-3 ingest figures: geobeat and null side by side on every workload.
fn ingest_table(summary: &Summary) -> String {
    let mut out = String::from(
        "| workload | geobeat heartbeats/s | null heartbeats/s | geobeat / null | geobeat p50 / p99 / p99.9 ms | null p50 / p99 / p99.9 ms |\n|---|---|---|---|---|---|\n",
    );
    for w in &summary.workloads {
        let (Some(g), Some(n)) = (
            summary.cell(&w.name, System::Geobeat),
            summary.cell(&w.name, System::Null),
        ) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {} / {} / {} | {} / {} / {} |",
            w.title,
            per_s(g.throughput_median),
            per_s(n.throughput_median),
            g.throughput_median / n.throughput_median,
            ms(g.p50_us),
            ms(g.p99_us),
            ms(g.p999_us),
            ms(n.p50_us),
            ms(n.p99_us),
            ms(n.p999_us),
        );
    }
    out
}

/// How the peers are set up, and what that does to the figures.
const SETUP_NOTES: &str = "\
- **Same heartbeats for everyone.** Every system gets the same stream from `geobeat-load`: the same
  devices (`sim-<n>`), the same random-walk positions, the same closed-loop window or open-loop
  schedule, latency from the intended send time (no coordinated omission), HDR histograms.
- **geobeat and null**: one WebSocket per device, device tokens minted from geobeat's secret
  (the null server ignores them, so both get byte-identical frames).
- **geobeat-mqtt and Mosquitto** (issue 16): one MQTT 3.1.1 connection per device (clean
  session, client id and user name = device id, the minted device token as password), one QoS 1
  PUBLISH per heartbeat on `geobeat/<id>` with the JSON heartbeat without `seq` as payload; the
  ack is the PUBACK. Both get byte-identical packets. geobeat-mqtt is a second `geobeat serve`
  (strict durability, MQTT listener on): its PUBACK follows the fdatasync. Mosquitto runs with
  persistence off (its default; nothing is written to disk) and, with no subscriber, keeps
  neither history nor last location: it is a relay, not a store.
- **Redis and PostgreSQL**: a gateway process (inside `geobeat-load`) holds 16 connections per
  server and pins each device to one of them; each connection sends everything queued as one
  pipeline (Redis: `GEOADD last` + `XADD h:<id>` per heartbeat) or one transaction
  (`postgres-batch`: `unnest` arrays, history insert + last-location upsert), or pipelines one
  transaction per heartbeat (`postgres-tx1`). Devices do **not** hold network connections to
  these two; the gateway's work (fan-in of the device connections, which geobeat does itself) is
  on the client's CPU, not the server's, so Redis and PostgreSQL are flattered in both
  throughput (more CPU left for the server on a shared machine) and server CPU per heartbeat.
- PostgreSQL keeps an index on `history (id, ts)` (per-device history reads, which geobeat
  serves from its log); `max_wal_size=8GB`, `checkpoint_timeout=30min` so no checkpoint runs
  during the measurement (flatters PostgreSQL). Redis runs without RDB snapshots and AOF
  rewrites (their forks would land in other systems' runs; flatters Redis).
- CPU is each server's process tree (`utime + stime` of the process and its live descendants
  plus reaped children's, from `/proc`) over the whole run (ramp, warmup, window, drain),
  divided by all heartbeats acked in the run. Peak RSS is `VmHWM`; for PostgreSQL the sum over
  its processes (shared buffers counted once per process: an upper bound), shared by
  `postgres-tx1` and `postgres-batch`. Servers stay up across rounds, so peak RSS is over the
  whole comparison so far.
- Before each run: `sync`, then a pause, so no system pays for another's dirty pages.
";

fn plot_links(plots: &[PathBuf], prefix: &Path) -> String {
    let mut out = String::new();
    for plot in plots {
        let name = plot
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(out, "![{name}]({})", prefix.join(&name).display());
    }
    out
}

/// The section that replaces "## Comparison" in `perf/RESULTS.md`.
pub fn results_section(
    info: &RunInfo,
    summary: &Summary,
    run_dir: &Path,
    plots: &[PathBuf],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{SECTION_HEADING}\n");
    let _ = writeln!(
        out,
        "Written by `bash perf/compare.sh` (do not edit by hand; notes go in the next section). \
         Run of {} at commit `{}` on {}: {} round(s) × every workload × every system, \
         interleaved (each round runs every system once, geobeat next to its ceiling), runs of \
         {:.0} s measured. Load average {}. Raw data, per-run commands, versions and plots: \
         [{}]({}).\n",
        info.started_utc,
        info.commit,
        info.machine,
        info.rounds,
        info.timing.map_or(0.0, |t| t.duration_s),
        info.loadavg.join(", "),
        run_dir.display(),
        run_dir.join("README.md").display(),
    );
    let _ = writeln!(
        out,
        "**Read first:** the machine has 2 cores, shared by the server, the load generator and \
         other work; figures are medians of interleaved runs and ratios are taken within a \
         round, but absolute numbers are noisy and depressed by the client's own CPU use.\n"
    );
    for w in summary.workloads.iter().filter(|w| w.peers) {
        let _ = writeln!(
            out,
            "### {}\n\n{}",
            capitalize(&w.title),
            workload_table(summary, w)
        );
    }
    let _ = writeln!(
        out,
        "### Targets (issue 7), ratios within rounds, median\n\n{}",
        targets_table(summary)
    );
    let _ = writeln!(
        out,
        "### geobeat ingest figures (issue 3), with the ceiling from the same rounds\n\n{}",
        ingest_table(summary)
    );
    let _ = writeln!(out, "### How the systems are run\n\n{SETUP_NOTES}");
    let _ = writeln!(out, "### Plots\n\n{}", plot_links(plots, run_dir));
    out
}

/// The results directory's README.
pub fn readme(info: &RunInfo, summary: &Summary, rows: &[Row], plots: &[PathBuf]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# geobeat comparison run, {}\n", info.started_utc);
    let _ = writeln!(out, "- command: `{}`", info.command);
    let _ = writeln!(out, "- commit: `{}`", info.commit);
    let _ = writeln!(out, "- machine: {} (host `{}`)", info.machine, info.host);
    let _ = writeln!(out, "- load average: {}", info.loadavg.join(", "));
    if let Some(t) = info.timing {
        let _ = writeln!(
            out,
            "- every run: connection ramp at {:.0}/s, {:.1} s warmup, {:.1} s measured, up to {:.1} s \
             drain; `sync` and {:.1} s pause before each run",
            t.connect_rate, t.warmup_s, t.duration_s, t.drain_s, t.settle_s
        );
    }
    let _ = writeln!(
        out,
        "- rounds: {} (mode: {})",
        info.rounds,
        if info.quick { "quick" } else { "full" }
    );
    for (tool, version) in &info.tools {
        let _ = writeln!(out, "- {tool}: {version}");
    }
    let _ = writeln!(out, "\n## Servers\n");
    for (name, server) in &info.servers {
        let _ = writeln!(
            out,
            "- **{name}** ({}): `{}`",
            server.version, server.command
        );
        if !server.settings.is_empty() {
            let _ = writeln!(out, "  settings: {}", server.settings.join("; "));
        }
    }
    let _ = writeln!(out, "\n## Results (medians over rounds)\n");
    for w in &summary.workloads {
        let _ = writeln!(
            out,
            "### {} (`{}`)\n\n{}",
            capitalize(&w.title),
            w.name,
            workload_table(summary, w)
        );
    }
    let _ = writeln!(out, "## Targets\n\n{}", targets_table(summary));
    let _ = writeln!(out, "## geobeat vs ceiling\n\n{}", ingest_table(summary));
    let _ = writeln!(out, "## How the systems are run\n\n{SETUP_NOTES}");
    let _ = writeln!(out, "## Plots\n\n{}", plot_links(plots, Path::new(".")));
    let _ = writeln!(out, "## Exact load commands (round 1)\n");
    for row in rows.iter().filter(|r| r.round == 1) {
        let _ = writeln!(
            out,
            "- `{}` / `{}`:\n  `{}`",
            row.workload, row.system, row.command
        );
    }
    let _ = writeln!(
        out,
        "\n## Files\n\n- `raw.csv`: one line per run (all rounds).\n- `raw.jsonl` (not \
         committed: written by the run, `bash perf/compare.sh`): the same rows with the load \
         generator's full summary, HDR histograms included (base64 V2).\n- `info.json`: machine, \
         versions, settings.\n- `logs/` (not committed: written by the run): each run's \
         load-generator output and summary.\n- redraw the plots: `target/release/geobeat-plot \
         <this directory>` (needs the run's `raw.jsonl`)."
    );
    out
}

/// A plain-text summary for the terminal.
pub fn console(summary: &Summary) -> String {
    let mut out = String::new();
    for w in &summary.workloads {
        let _ = writeln!(out, "\n{} ({})", capitalize(&w.title), w.name);
        for c in summary.cells.iter().filter(|c| c.workload == w.name) {
            let _ = writeln!(
                out,
                "  {:<15} {:>10} hb/s  p50 {:>7} ms  p99 {:>7} ms  p99.9 {:>7} ms  server {:>6.2} cpu-s/M  clean {}/{}",
                c.system.name(),
                per_s(c.throughput_median),
                ms(c.p50_us),
                ms(c.p99_us),
                ms(c.p999_us),
                c.server_cpu_per_million,
                c.clean_runs,
                c.runs
            );
        }
    }
    let _ = writeln!(out, "\nTargets:");
    for t in &summary.targets {
        let met = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(out, "  [{met}] {} — {}", t.goal, t.figure);
    }
    out
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `old` with its "## Comparison" section (up to the next `## ` heading) replaced by
/// `section`, or with `section` appended if it has none.
pub fn replace_section(old: &str, section: &str) -> String {
    let section = section.trim_end().to_owned() + "\n";
    let start = if old.starts_with(SECTION_HEADING) {
        Some(0)
    } else {
        old.find(&format!("\n{SECTION_HEADING}\n")).map(|i| i + 1)
    };
    match start {
        None => {
            let mut out = old.trim_end().to_owned();
            out.push_str("\n\n");
            out.push_str(&section);
            out
        }
        Some(start) => {
            let after = start + SECTION_HEADING.len();
            let end = old[after..]
                .find("\n## ")
                .map_or(old.len(), |i| after + i + 1);
            let mut out = old[..start].to_owned();
            out.push_str(&section);
            if end < old.len() {
                out.push('\n');
                out.push_str(&old[end..]);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: usize, system: System, throughput: f64, p50_us: u64) -> Row {
        Row {
            round,
            workload: "sat-1k-json".into(),
            system: system.name().into(),
            ok: true,
            throughput_per_s: throughput,
            p50_us,
            sent: 10,
            acked: 10,
            server_cpu_s_per_million: 1.0,
            ..Row::default()
        }
    }

    #[test]
    fn medians_and_paired_ratios() {
        // Checks the median (odd and even counts) and that ratios are taken within rounds: a
        // round where both sides are slow gives the same ratio as a fast one.
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let rows = [
            row(1, System::Geobeat, 100.0, 10),
            row(1, System::Null, 125.0, 8),
            row(2, System::Geobeat, 50.0, 10),
            row(2, System::Null, 62.5, 8),
            row(3, System::Geobeat, 90.0, 10),
        ];
        let r = paired_ratio(
            &rows,
            "sat-1k-json",
            System::Geobeat,
            System::Null,
            throughput,
        );
        assert_eq!(r, Some(0.8));
        assert_eq!(
            paired_ratio(
                &rows,
                "sat-1k-json",
                System::Geobeat,
                System::Mosquitto,
                throughput
            ),
            None
        );
    }

    #[test]
    fn targets_are_met_or_missed_from_ratios() {
        // Checks the ceiling target (0.8 ≥ 0.7: met), the Redis one (2× < 10×: missed) and that
        // an unmeasured peer is reported as not measured rather than met.
        let workloads = vec![super::super::full_workloads()[0].clone()];
        let rows = [
            row(1, System::Geobeat, 100.0, 10),
            row(1, System::Null, 125.0, 8),
            row(1, System::RedisAlways, 50.0, 8),
        ];
        let summary = Summary::of(&rows, &workloads, &super::super::systems::ALL_SYSTEMS);
        let find = |needle: &str| {
            summary
                .targets
                .iter()
                .find(|t| t.goal.contains(needle))
                .unwrap_or_else(|| panic!("no target {needle}"))
                .clone()
        };
        assert_eq!(find("70%").met, Some(true));
        assert_eq!(find("Redis").met, Some(false));
        assert_eq!(find("batched").met, None);
        assert_eq!(summary.cell("sat-1k-json", System::Null).unwrap().runs, 1);
    }

    #[test]
    fn mqtt_targets_compare_geobeat_mqtt_with_mosquitto() {
        // Issue 16: at saturation geobeat-mqtt's throughput ≥ Mosquitto's (0.9×: missed) and
        // CPU per message ≤ Mosquitto's (0.8×: met); at the reference rate only CPU is checked,
        // and without Mosquitto rows the target is "not measured", never met.
        let full = super::super::full_workloads();
        let (sat, reference) = (full[0].clone(), full[1].clone());
        let mut rows = vec![
            Row {
                server_cpu_s_per_million: 0.8,
                ..row(1, System::GeobeatMqtt, 90.0, 10)
            },
            row(1, System::Mosquitto, 100.0, 8),
        ];
        rows.push(Row {
            workload: reference.name.clone(),
            ..row(1, System::GeobeatMqtt, 100.0, 10)
        });
        let summary = Summary::of(
            &rows,
            &[sat, reference],
            &super::super::systems::ALL_SYSTEMS,
        );
        let mqtt: Vec<&Target> = summary
            .targets
            .iter()
            .filter(|t| t.goal.contains("issue 16"))
            .collect();
        assert_eq!(mqtt.len(), 3, "{mqtt:?}");
        assert!(mqtt[0].goal.contains("sat-1k-json") && mqtt[0].goal.contains("messages/s"));
        assert_eq!(mqtt[0].met, Some(false));
        assert_eq!(mqtt[0].figure, "0.90× (geobeat-mqtt / mosquitto)");
        assert!(mqtt[1].goal.contains("CPU"));
        assert_eq!(mqtt[1].met, Some(true));
        assert!(mqtt[2].goal.contains("ref-10k-json"));
        assert_eq!(mqtt[2].met, None);
    }

    #[test]
    fn floor_targets_and_light_latency() {
        // Issue 15: saturation throughput 0.8× the floor (met at 0.8, missed at 0.5), CPU per
        // heartbeat 1.5× (missed at 2×), and the light-load p50 gap measured against one
        // fdatasync (2 ms gap vs 1 ms sync: missed; unknown sync: not measured).
        let full = super::super::full_workloads();
        let (sat, light) = (full[0].clone(), full[5].clone());
        let mut rows = vec![
            row(1, System::Geobeat, 80.0, 10),
            Row {
                server_cpu_s_per_million: 0.5,
                ..row(1, System::Floor, 100.0, 8)
            },
        ];
        for (system, p50_us) in [(System::Geobeat, 2500), (System::Floor, 500)] {
            rows.push(Row {
                workload: light.name.clone(),
                ..row(1, system, 2000.0, p50_us)
            });
        }
        let workloads = vec![sat, light];
        let all = super::super::systems::ALL_SYSTEMS;
        let find = |summary: &Summary, needle: &str| {
            summary
                .targets
                .iter()
                .find(|t| t.goal.contains(needle))
                .unwrap_or_else(|| panic!("no target {needle}"))
                .clone()
        };
        let summary = Summary::of(&rows, &workloads, &all).with_light_latency_target(
            &rows,
            &workloads,
            Some(1000.0),
        );
        assert_eq!(
            find(&summary, "sat-1k-json`: geobeat heartbeats/s ≥ 0.80").met,
            Some(true)
        );
        let cpu = find(
            &summary,
            "sat-1k-json`: geobeat server CPU per heartbeat ≤ 1.50",
        );
        assert_eq!(
            (cpu.met, cpu.figure.as_str()),
            (Some(false), "2.00× (geobeat / floor)")
        );
        assert_eq!(
            find(&summary, "light-1k-json`: geobeat server CPU").met,
            Some(true)
        );
        let lat = find(&summary, "ack p50 ≤ floor p50");
        assert_eq!(lat.met, Some(false), "{}", lat.figure);
        assert!(lat.figure.contains("2.00 ms"), "{}", lat.figure);
        let unknown =
            Summary::of(&rows, &workloads, &all).with_light_latency_target(&rows, &workloads, None);
        assert_eq!(find(&unknown, "ack p50 ≤ floor p50").met, None);
        rows[0].throughput_per_s = 50.0;
        let slow = Summary::of(&rows, &workloads, &all);
        assert_eq!(find(&slow, "heartbeats/s ≥ 0.80").met, Some(false));
    }

    #[test]
    fn section_replacement_keeps_other_sections() {
        // Checks that the Comparison section is replaced in place (other sections kept, before
        // and after), and appended when missing.
        let old = "# R\n\n## Shard log\nA\n\n## Comparison\nold\n\n## Comparison notes\nB\n";
        let new = replace_section(old, "## Comparison\nnew\n");
        assert_eq!(
            new,
            "# R\n\n## Shard log\nA\n\n## Comparison\nnew\n\n## Comparison notes\nB\n"
        );
        let appended = replace_section("# R\n\n## Shard log\nA\n", "## Comparison\nnew\n");
        assert_eq!(appended, "# R\n\n## Shard log\nA\n\n## Comparison\nnew\n");
        assert_eq!(
            replace_section(&appended, "## Comparison\nx\n"),
            "# R\n\n## Shard log\nA\n\n## Comparison\nx\n"
        );
    }
}
