//! Metrics: per-executor probes the hot path bumps with plain `Cell`s (no atomics, nothing
//! shared), snapshots that executors hand over on request, the process's own figures read from
//! `/proc` at scrape time, and the Prometheus/OpenMetrics text rendered from all of them with
//! prometheus-client. It owns metric names, help texts, labels and histogram bounds; it does not
//! decide when things happen, and it does not own the sinks' status rows (the flusher does; a
//! scrape renders a copy).
//!
//! Labels: a series counted by an executor (connections, frames, heartbeats, mesh traffic, ack
//! latency) carries `executor` (the executor index); a series about a logical shard (its log,
//! commits, last-location table, sink progress) carries `shard` (the shard number). Executors and
//! shards are different things: shard `k` lives on executor `k % executors`.
//!
//! Invariant: the hot path never touches memory another thread writes. A scrape asks every
//! executor for a snapshot over the channel mesh (like any query), so collecting metrics costs
//! the ingest path nothing but its own counter increments.

use std::cell::{Cell, RefCell};
use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use serde::Serialize;

/// Latency bounds in seconds: 50 µs .. 1 s.
pub const LATENCY_BOUNDS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Group-size bounds in entries.
pub const GROUP_BOUNDS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

/// A histogram with fixed bounds, written by one thread.
#[derive(Debug)]
pub struct Hist {
    bounds: &'static [f64],
    /// One count per bound plus the +Inf bucket.
    counts: Vec<Cell<u64>>,
    sum: Cell<f64>,
}

impl Hist {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Hist {
        Hist {
            bounds,
            counts: (0..=bounds.len()).map(|_| Cell::new(0)).collect(),
            sum: Cell::new(0.0),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        let c = &self.counts[i];
        c.set(c.get() + 1);
        self.sum.set(self.sum.get() + v);
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> HistSnap {
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .zip(self.counts.iter().map(Cell::get))
            .collect();
        buckets.push((f64::MAX, self.counts[self.bounds.len()].get()));
        HistSnap {
            sum: self.sum.get(),
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
        }
    }
}

/// A histogram's state: per-bucket (not cumulative) counts, the last bound `f64::MAX` (+Inf).
#[derive(Debug, Clone, Serialize, Default)]
pub struct HistSnap {
    /// Sum of observed values.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// `(upper bound, count in this bucket)`.
    #[serde(skip)]
    pub buckets: Vec<(f64, u64)>,
}

impl HistSnap {
    /// The value below which a fraction `q` of observations fall (bucket upper bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let target = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (bound, n) in &self.buckets {
            seen += n;
            if seen >= target && self.count > 0 {
                return Some(*bound);
            }
        }
        None
    }
}

/// Counters of one executor (connections, frames, heartbeats, mesh traffic, ack latency).
#[derive(Debug)]
pub struct ExecProbe {
    /// Frames received from devices.
    pub frames_in: Cell<u64>,
    /// Payload bytes of those frames.
    pub bytes_in: Cell<u64>,
    /// Heartbeats accepted (handed to a shard).
    pub accepted: Cell<u64>,
    /// Heartbeats acknowledged but not stored again: duplicates (issue 18).
    pub duplicates: Cell<u64>,
    /// Heartbeats rejected, by reason (rare: a small list, searched linearly).
    pub rejected: RefCell<Vec<(&'static str, u64)>>,
    /// Mesh messages sent to each executor.
    pub sent_to: Vec<Cell<u64>>,
    /// Mesh messages received from each executor.
    pub received_from: Vec<Cell<u64>>,
    /// Frame receipt to ack, seconds.
    pub ack_latency: Hist,
    /// MQTT connections held (see `net::mqtt`).
    pub mqtt_connections_open: Cell<u64>,
    /// MQTT protocol events by name (connects, refusals, take-overs; a small fixed set).
    pub mqtt_events: RefCell<Vec<(&'static str, u64)>>,
    /// TLS events by name (handshakes, failures, timeouts, refusals over the rate; a small
    /// fixed set, see `net::tls`).
    pub tls_events: RefCell<Vec<(&'static str, u64)>>,
}

impl ExecProbe {
    /// Counters for an executor among `executors`.
    pub fn new(executors: usize) -> ExecProbe {
        ExecProbe {
            frames_in: Cell::new(0),
            bytes_in: Cell::new(0),
            accepted: Cell::new(0),
            duplicates: Cell::new(0),
            rejected: RefCell::new(Vec::new()),
            sent_to: (0..executors).map(|_| Cell::new(0)).collect(),
            received_from: (0..executors).map(|_| Cell::new(0)).collect(),
            ack_latency: Hist::new(LATENCY_BOUNDS_S),
            mqtt_connections_open: Cell::new(0),
            mqtt_events: RefCell::new(Vec::new()),
            tls_events: RefCell::new(Vec::new()),
        }
    }

    /// Adds `n` to a counter cell.
    pub fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
    }

    /// Counts `n` MQTT events named `event`.
    pub fn mqtt_event(&self, event: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let mut r = self.mqtt_events.borrow_mut();
        match r.iter_mut().find(|(k, _)| *k == event) {
            Some((_, c)) => *c += n,
            None => r.push((event, n)),
        }
    }

    /// Counts `n` TLS events named `event`.
    pub fn tls_event(&self, event: &'static str, n: u64) {
        let mut r = self.tls_events.borrow_mut();
        match r.iter_mut().find(|(k, _)| *k == event) {
            Some((_, c)) => *c += n,
            None => r.push((event, n)),
        }
    }

    /// Counts one duplicate dropped by the append path.
    pub fn duplicate(&self) {
        Self::add(&self.duplicates, 1);
    }

    /// Counts one rejected heartbeat.
    pub fn reject(&self, reason: &'static str) {
        let mut r = self.rejected.borrow_mut();
        match r.iter_mut().find(|(k, _)| *k == reason) {
            Some((_, n)) => *n += 1,
            None => r.push((reason, 1)),
        }
    }
}

/// Commit counters of one shard store.
#[derive(Debug)]
pub struct StoreProbe {
    /// Entries per group commit.
    pub group_entries: Hist,
    /// Duration of a commit (fdatasync or DAX flush), seconds.
    pub commit_latency: Hist,
}

impl Default for StoreProbe {
    fn default() -> Self {
        StoreProbe {
            group_entries: Hist::new(GROUP_BOUNDS),
            commit_latency: Hist::new(LATENCY_BOUNDS_S),
        }
    }
}

/// One shard's figures at scrape time.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSnapshot {
    /// Logical shard.
    pub shard: u32,
    /// Executor that owns it.
    pub executor: usize,
    /// Log bytes on disk (segment files).
    pub log_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Entries in the log.
    pub entries: u64,
    /// End of appended data (log position).
    pub written: u64,
    /// End of durable data (log position).
    pub durable: u64,
    /// Devices in the last-location table.
    pub devices: usize,
    /// Bytes the last-location table holds.
    pub table_bytes: usize,
    /// Devices with exactly-once state (issue 18).
    pub seq_devices: usize,
    /// Sequence numbers skipped, summed over the shard's devices.
    pub seq_gaps: u64,
    /// Duplicates dropped, summed over the shard's devices (including those restored from the
    /// exactly-once snapshot).
    pub duplicates_dropped: u64,
    /// `dax` or `fdatasync`.
    pub sync_mode: String,
    /// Entries per commit.
    pub group_entries: HistSnap,
    /// Commit duration, seconds.
    pub commit_latency: HistSnap,
    /// Groups waiting for durability.
    pub waiters: usize,
}

/// One executor's figures at scrape time.
#[derive(Debug, Clone, Serialize)]
pub struct ExecSnapshot {
    /// Executor index.
    pub executor: usize,
    /// Device WebSocket connections held.
    pub connections_open: usize,
    /// Frames received.
    pub frames_in: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Heartbeats accepted.
    pub accepted: u64,
    /// Duplicates dropped since start.
    pub duplicates: u64,
    /// Heartbeats rejected by reason.
    pub rejected: Vec<(String, u64)>,
    /// Mesh messages sent, per destination executor.
    pub sent_to: Vec<u64>,
    /// Mesh messages received, per source executor.
    pub received_from: Vec<u64>,
    /// Frame receipt to ack, seconds.
    pub ack_latency: HistSnap,
    /// Owned shards.
    pub shards: Vec<ShardSnapshot>,
    /// Subscriber WebSocket connections held.
    pub subscribers_open: usize,
    /// Subscription events written to subscribers held here.
    pub events_delivered: u64,
    /// Subscription events dropped for subscribers held here (full queues or channels).
    pub events_missed: u64,
    /// MQTT connections held.
    pub mqtt_connections_open: u64,
    /// MQTT protocol events by name.
    pub mqtt_events: Vec<(String, u64)>,
    /// TLS events by name.
    pub tls_events: Vec<(String, u64)>,
}

impl ExecProbe {
    /// The executor-level part of a snapshot (shards are filled in by the caller).
    pub fn snapshot(&self, executor: usize, connections_open: usize) -> ExecSnapshot {
        ExecSnapshot {
            executor,
            connections_open,
            frames_in: self.frames_in.get(),
            bytes_in: self.bytes_in.get(),
            accepted: self.accepted.get(),
            duplicates: self.duplicates.get(),
            rejected: self
                .rejected
                .borrow()
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            sent_to: self.sent_to.iter().map(Cell::get).collect(),
            received_from: self.received_from.iter().map(Cell::get).collect(),
            ack_latency: self.ack_latency.snapshot(),
            shards: Vec::new(),
            subscribers_open: 0,
            events_delivered: 0,
            events_missed: 0,
            mqtt_connections_open: self.mqtt_connections_open.get(),
            mqtt_events: self
                .mqtt_events
                .borrow()
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            tls_events: self
                .tls_events
                .borrow()
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
        }
    }
}

/// Process-wide facts for the exposition.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// Seconds since start.
    pub uptime_s: f64,
    /// `strict`, `relaxed` or `replicated`.
    pub durability: &'static str,
    /// Client connections open (all kinds, all executors).
    pub connections_total: usize,
    /// The sinks' status rows, one per sink and shard (empty without sinks).
    pub sinks: Vec<crate::flusher::SinkStatus>,
    /// The process's CPU, memory and file descriptors (`None` where `/proc` is unreadable).
    pub os: Option<ProcStats>,
    /// `--durability replicated`: per logical shard, durable log bytes not yet stored by the
    /// JetStream streams (empty in the other modes).
    pub replication_lag: Vec<(u32, u64)>,
    /// Ownership (`--node-id`): units this node stopped writing (claim lost or publish fenced);
    /// `None` without ownership.
    pub ownership_stepdowns: Option<u64>,
    /// The cluster-wide view (issue 17 item 3), per stream: its name, messages not applied yet
    /// and seconds behind (NaN: nothing applied yet while messages are pending); empty on a
    /// node that does not follow the streams.
    pub view_lag: Vec<(String, u64, f64)>,
    /// The view's damaged batches and refused heartbeats (`None`: no view).
    pub view_problems: Option<(u64, u64)>,
}

/// The standard Prometheus process figures, read from `/proc/self` when scraped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    /// User plus system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: u64,
    /// Process start time, seconds since the Unix epoch.
    pub start_time_s: f64,
}

impl ProcStats {
    /// Reads the figures of this process (a few small procfs reads; called once per scrape).
    pub fn read() -> Option<ProcStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf and getrlimit only read process parameters; `lim` is a valid out
        // pointer for the duration of the call.
        let (tick, page, max_fds) = unsafe {
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur
            } else {
                0
            };
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
                max,
            )
        };
        let mut s = Self::parse(&stat, &boot, tick, page)?;
        s.open_fds = open_fds.saturating_sub(1); // read_dir's own descriptor
        s.max_fds = max_fds;
        Some(s)
    }

    /// Parses `/proc/self/stat` and the `btime` line of `/proc/stat` (`tick`: clock ticks per
    /// second, `page`: page size in bytes); the descriptor figures are left 0.
    fn parse(stat: &str, proc_stat: &str, tick: i64, page: i64) -> Option<ProcStats> {
        // Fields after the command name, which is in parentheses and may itself contain spaces
        // or parentheses: split after its last ')'. `rest[0]` is field 3 (state).
        let rest: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let field = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
        let (tick, page) = (u64::try_from(tick).ok()?, u64::try_from(page).ok()?);
        if tick == 0 {
            return None;
        }
        let btime: u64 = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(ProcStats {
            cpu_s: (field(14)? + field(15)?) as f64 / tick as f64,
            start_time_s: btime as f64 + field(22)? as f64 / tick as f64,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds: 0,
            max_fds: 0,
        })
    }
}

/// The whole exposition, rendered from snapshots.
#[derive(Debug)]
struct Exposition {
    execs: Vec<ExecSnapshot>,
    process: ProcessInfo,
}

type Labels = Vec<(&'static str, String)>;

fn shard_label(n: impl ToString) -> Labels {
    vec![("shard", n.to_string())]
}

fn executor_label(n: impl ToString) -> Labels {
    vec![("executor", n.to_string())]
}

fn sink_labels(row: &crate::flusher::SinkStatus) -> Labels {
    vec![("sink", row.name.clone()), ("shard", row.shard.to_string())]
}

impl Exposition {
    fn counter(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        series: &[(Labels, u64)],
    ) -> fmt::Result {
        let mut me = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (labels, v) in series {
            ConstCounter::new(*v).encode(me.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn counter_f64(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        v: f64,
    ) -> fmt::Result {
        let me = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
        ConstCounter::new(v).encode(me)
    }

    fn gauge_f64(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: f64,
    ) -> fmt::Result {
        let me = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(me)
    }

    fn gauge(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        series: &[(Labels, i64)],
    ) -> fmt::Result {
        let mut me = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        if let [(labels, v)] = series {
            if labels.is_empty() {
                // One unlabelled series: no `{}` in the exposition.
                return ConstGauge::new(*v).encode(me);
            }
        }
        for (labels, v) in series {
            ConstGauge::new(*v).encode(me.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge_f64_series(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        series: &[(Labels, f64)],
    ) -> fmt::Result {
        let mut me = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in series {
            ConstGauge::new(*v).encode(me.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn histogram(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        series: &[(Labels, &HistSnap)],
    ) -> fmt::Result {
        let mut me = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
        for (labels, h) in series {
            me.encode_family(labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum, h.count, &h.buckets, None,
                )?;
        }
        Ok(())
    }

    fn shards(&self) -> impl Iterator<Item = &ShardSnapshot> {
        self.execs.iter().flat_map(|e| e.shards.iter())
    }
}

impl prometheus_client::collector::Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        let per_exec = |f: &dyn Fn(&ExecSnapshot) -> u64| -> Vec<(Labels, u64)> {
            self.execs
                .iter()
                .map(|x| (executor_label(x.executor), f(x)))
                .collect()
        };
        let per_shard = |f: &dyn Fn(&ShardSnapshot) -> i64| -> Vec<(Labels, i64)> {
            self.shards()
                .map(|s| (shard_label(s.shard), f(s)))
                .collect()
        };
        // A gauge fixed at 1 (the classic `_info` idiom): an OpenMetrics `info` type would not
        // parse as Prometheus text format (promtool, older scrapers).
        self.gauge(
            e,
            "geobeat_build_info",
            "Build information",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        self.gauge(
            e,
            "geobeat_uptime_seconds",
            "Seconds since the process started",
            &[(vec![], self.process.uptime_s as i64)],
        )?;
        let modes: Vec<(Labels, i64)> = self
            .shards()
            .map(|s| {
                (
                    vec![
                        ("shard", s.shard.to_string()),
                        ("sync", s.sync_mode.clone()),
                        ("ack", self.process.durability.to_string()),
                    ],
                    1,
                )
            })
            .collect();
        self.gauge(e, "geobeat_durability_mode", "Durability mode per shard: sync = dax (MAP_SYNC + cache-line flush), fdatasync, or dsync (--write-mode dsync: O_DSYNC writes); ack = strict, relaxed or replicated", &modes)?;
        self.gauge(
            e,
            "geobeat_connections_open",
            "Device WebSocket connections held by the executor (label: executor index)",
            &per_exec(&|x| x.connections_open as u64)
                .into_iter()
                .map(|(l, v)| (l, v as i64))
                .collect::<Vec<_>>(),
        )?;
        self.gauge(
            e,
            "geobeat_subscribers_connected",
            "Subscriber WebSocket connections held by the executor (label: executor index)",
            &per_exec(&|x| x.subscribers_open as u64)
                .into_iter()
                .map(|(l, v)| (l, v as i64))
                .collect::<Vec<_>>(),
        )?;
        self.counter(
            e,
            "geobeat_subscription_events_delivered",
            "Subscription events written to subscribers (label: executor holding the subscriber)",
            None,
            &per_exec(&|x| x.events_delivered),
        )?;
        self.counter(
            e,
            "geobeat_subscription_events_missed",
            "Subscription events dropped because a subscriber's queue or channel was full (each reported to it as {\"missed\":N})",
            None,
            &per_exec(&|x| x.events_missed),
        )?;
        self.gauge(
            e,
            "geobeat_mqtt_connections_open",
            "MQTT device connections held by the executor (label: executor index)",
            &per_exec(&|x| x.mqtt_connections_open)
                .into_iter()
                .map(|(l, v)| (l, v as i64))
                .collect::<Vec<_>>(),
        )?;
        let mqtt: Vec<(Labels, u64)> = self
            .execs
            .iter()
            .flat_map(|x| {
                x.mqtt_events.iter().map(move |(ev, n)| {
                    (
                        vec![("executor", x.executor.to_string()), ("event", ev.clone())],
                        *n,
                    )
                })
            })
            .collect();
        self.counter(
            e,
            "geobeat_mqtt_events",
            "MQTT protocol events, by event (docs/MQTT.md: connects, refusals, take-overs, keep-alive expiries)",
            None,
            &mqtt,
        )?;
        let tls: Vec<(Labels, u64)> = self
            .execs
            .iter()
            .flat_map(|x| {
                x.tls_events.iter().map(move |(ev, n)| {
                    (
                        vec![("executor", x.executor.to_string()), ("event", ev.clone())],
                        *n,
                    )
                })
            })
            .collect();
        self.counter(
            e,
            "geobeat_tls_events",
            "TLS events, by event: handshake (completed), handshake_failed, handshake_timeout, rate_refused (closed unread over the per-executor handshake rate), cap_refused",
            None,
            &tls,
        )?;
        self.gauge(
            e,
            "geobeat_client_connections",
            "Client connections of every kind across the process (bounded by --connections-max)",
            &[(vec![], self.process.connections_total as i64)],
        )?;
        self.counter(
            e,
            "geobeat_frames_in",
            "WebSocket messages received from devices",
            None,
            &per_exec(&|x| x.frames_in),
        )?;
        self.counter(
            e,
            "geobeat_received",
            "Payload bytes of device messages",
            Some(&Unit::Bytes),
            &per_exec(&|x| x.bytes_in),
        )?;
        self.counter(
            e,
            "geobeat_heartbeats_accepted",
            "Heartbeats accepted for storage",
            None,
            &per_exec(&|x| x.accepted),
        )?;
        self.counter(
            e,
            "geobeat_heartbeats_duplicate",
            "Heartbeats acknowledged without being stored again (device-sequence or device-time duplicates)",
            None,
            &per_exec(&|x| x.duplicates),
        )?;
        let rejected: Vec<(Labels, u64)> = self
            .execs
            .iter()
            .flat_map(|x| {
                x.rejected.iter().map(move |(r, n)| {
                    (
                        vec![("executor", x.executor.to_string()), ("reason", r.clone())],
                        *n,
                    )
                })
            })
            .collect();
        self.counter(
            e,
            "geobeat_heartbeats_rejected",
            "Heartbeats rejected, by reason",
            None,
            &rejected,
        )?;
        let cross: Vec<(Labels, u64)> = self
            .execs
            .iter()
            .flat_map(|x| {
                x.sent_to
                    .iter()
                    .enumerate()
                    .filter(move |(to, _)| *to != x.executor)
                    .map(move |(to, n)| {
                        (
                            vec![("executor", x.executor.to_string()), ("to", to.to_string())],
                            *n,
                        )
                    })
            })
            .collect();
        self.counter(
            e,
            "geobeat_cross_shard_messages",
            "Messages sent over the channel mesh to another executor",
            None,
            &cross,
        )?;
        let depth: Vec<(Labels, i64)> = self
            .execs
            .iter()
            .flat_map(|x| {
                let execs = &self.execs;
                x.sent_to
                    .iter()
                    .enumerate()
                    .filter(move |(to, _)| *to != x.executor)
                    .map(move |(to, sent)| {
                        let got = execs
                            .get(to)
                            .and_then(|d| d.received_from.get(x.executor))
                            .copied()
                            .unwrap_or(0);
                        (
                            vec![
                                ("executor", to.to_string()),
                                ("from", x.executor.to_string()),
                            ],
                            sent.saturating_sub(got) as i64,
                        )
                    })
            })
            .collect();
        self.gauge(
            e,
            "geobeat_queue_depth",
            "Messages waiting in the channel from executor `from` to executor `executor` (occupancy)",
            &depth,
        )?;
        self.gauge(
            e,
            "geobeat_log_bytes",
            "Bytes of log segment files",
            &per_shard(&|s| s.log_bytes as i64),
        )?;
        self.gauge(
            e,
            "geobeat_log_segments",
            "Log segment files",
            &per_shard(&|s| s.segments as i64),
        )?;
        self.gauge(
            e,
            "geobeat_log_entries",
            "Entries in the log",
            &per_shard(&|s| s.entries as i64),
        )?;
        self.gauge(
            e,
            "geobeat_log_unsynced_bytes",
            "Bytes appended but not yet durable",
            &per_shard(&|s| (s.written - s.durable) as i64),
        )?;
        self.gauge(
            e,
            "geobeat_commit_waiters",
            "Groups waiting for their commit",
            &per_shard(&|s| s.waiters as i64),
        )?;
        self.gauge(
            e,
            "geobeat_last_location_devices",
            "Devices in the last-location table",
            &per_shard(&|s| s.devices as i64),
        )?;
        self.gauge(
            e,
            "geobeat_last_location_table_bytes",
            "Memory held by the last-location table",
            &per_shard(&|s| s.table_bytes as i64),
        )?;
        self.gauge(
            e,
            "geobeat_device_seq_devices",
            "Devices with a device-sequence high-water mark or dropped duplicates",
            &per_shard(&|s| s.seq_devices as i64),
        )?;
        self.gauge(
            e,
            "geobeat_device_seq_gaps",
            "Device sequence numbers skipped (numbered by a device, never stored), summed over devices",
            &per_shard(&|s| s.seq_gaps as i64),
        )?;
        self.gauge(
            e,
            "geobeat_device_duplicates_dropped",
            "Duplicates dropped, summed over devices (kept across restarts)",
            &per_shard(&|s| s.duplicates_dropped as i64),
        )?;
        let groups: Vec<(Labels, &HistSnap)> = self
            .shards()
            .map(|s| (shard_label(s.shard), &s.group_entries))
            .collect();
        self.histogram(
            e,
            "geobeat_commit_group_entries",
            "Entries made durable by one group commit",
            None,
            &groups,
        )?;
        let commits: Vec<(Labels, &HistSnap)> = self
            .shards()
            .map(|s| (shard_label(s.shard), &s.commit_latency))
            .collect();
        self.histogram(
            e,
            "geobeat_commit_latency",
            "Duration of one group commit (fdatasync or DAX flush)",
            Some(&Unit::Seconds),
            &commits,
        )?;
        let acks: Vec<(Labels, &HistSnap)> = self
            .execs
            .iter()
            .map(|x| (executor_label(x.executor), &x.ack_latency))
            .collect();
        self.histogram(
            e,
            "geobeat_ack_latency",
            "From receipt of a frame to its durable ack being queued",
            Some(&Unit::Seconds),
            &acks,
        )?;
        if !self.process.replication_lag.is_empty() {
            let lag: Vec<(Labels, i64)> = self
                .process
                .replication_lag
                .iter()
                .map(|&(k, v)| (vec![("shard", k.to_string())], v as i64))
                .collect();
            self.gauge(
                e,
                "geobeat_replication_lag_bytes",
                "Replicated durability: durable log bytes of the shard not yet stored by NATS JetStream (acks wait for them)",
                &lag,
            )?;
        }
        if let Some(n) = self.process.ownership_stepdowns {
            self.counter(
                e,
                "geobeat_ownership_stepdowns",
                "Ownership: units this node stopped writing because another node claimed them or fenced their subject (their unreplicated heartbeats are not acked)",
                None,
                &[(vec![], n)],
            )?;
        }
        if !self.process.view_lag.is_empty() {
            let label = |s: &str| vec![("stream", s.to_string())];
            let messages: Vec<(Labels, i64)> = self
                .process
                .view_lag
                .iter()
                .map(|(s, m, _)| (label(s), *m as i64))
                .collect();
            self.gauge(
                e,
                "geobeat_view_lag_messages",
                "Cluster view: messages (batches) of the stream this node's followers have not applied yet",
                &messages,
            )?;
            let seconds: Vec<(Labels, f64)> = self
                .process
                .view_lag
                .iter()
                .map(|(s, _, secs)| (label(s), *secs))
                .collect();
            self.gauge_f64_series(
                e,
                "geobeat_view_lag_seconds",
                "Cluster view: 0 when caught up, else the age of the newest applied message of a follower that is behind (NaN: none applied yet)",
                &seconds,
            )?;
        }
        if let Some((damaged, refused)) = self.process.view_problems {
            self.counter(
                e,
                "geobeat_view_problems",
                "Cluster view: batches that failed their checks (kind=damaged) and heartbeats the view refused (kind=refused), each logged",
                None,
                &[
                    (vec![("kind", "damaged".to_string())], damaged),
                    (vec![("kind", "refused".to_string())], refused),
                ],
            )?;
        }
        let sinks = &self.process.sinks;
        let per_sink_gauge =
            |f: &dyn Fn(&crate::flusher::SinkStatus) -> i64| -> Vec<(Labels, i64)> {
                sinks.iter().map(|r| (sink_labels(r), f(r))).collect()
            };
        let per_sink_counter =
            |f: &dyn Fn(&crate::flusher::SinkStatus) -> u64| -> Vec<(Labels, u64)> {
                sinks.iter().map(|r| (sink_labels(r), f(r))).collect()
            };
        self.gauge(
            e,
            "geobeat_sink_backlog_bytes",
            "Durable log bytes a downstream sink has not consumed yet (its lag)",
            &per_sink_gauge(&|r| r.lag_bytes as i64),
        )?;
        self.counter(
            e,
            "geobeat_sink_failures",
            "Failed sink attempts (connection, write or confirmation errors) since the server started",
            None,
            &per_sink_counter(&|r| r.errors_total),
        )?;
        self.gauge(
            e,
            "geobeat_sink_consecutive_failures",
            "Failed sink attempts since the last one that worked (0: the sink is healthy)",
            &per_sink_gauge(&|r| i64::from(r.failures)),
        )?;
        self.counter(
            e,
            "geobeat_sink_rows",
            "Heartbeats the sink confirmed since the server started",
            None,
            &per_sink_counter(&|r| r.rows_total),
        )?;
        self.counter(
            e,
            "geobeat_sink_skipped",
            "Log bytes a sink skipped because retention deleted them before it read them",
            Some(&Unit::Bytes),
            &per_sink_counter(&|r| r.skipped_bytes),
        )?;
        let last_ok: Vec<(Labels, i64)> = sinks
            .iter()
            .filter_map(|r| Some((sink_labels(r), r.last_ok_ms? / 1000)))
            .collect();
        self.gauge(
            e,
            "geobeat_sink_last_success_timestamp_seconds",
            "When the sink last confirmed a batch or found nothing to do, seconds since the Unix epoch",
            &last_ok,
        )?;
        if let Some(os) = &self.process.os {
            self.counter_f64(
                e,
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                os.cpu_s,
            )?;
            self.gauge_f64(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                os.resident_bytes as f64,
            )?;
            self.gauge_f64(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                os.virtual_bytes as f64,
            )?;
            self.gauge_f64(
                e,
                "process_open_fds",
                "Number of open file descriptors",
                os.open_fds as f64,
            )?;
            self.gauge_f64(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors",
                os.max_fds as f64,
            )?;
            self.gauge_f64(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                os.start_time_s,
            )?;
        }
        Ok(())
    }
}

/// Rewrites an OpenMetrics exposition into the classic Prometheus text format (0.0.4) for
/// scrapers that do not ask for OpenMetrics: counter families are named with their `_total`
/// suffix, and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
pub fn to_classic(openmetrics: &str) -> String {
    let mut counters: Vec<&str> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.push(name);
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Renders the OpenMetrics text exposition.
pub fn render(execs: Vec<ExecSnapshot>, process: ProcessInfo) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Exposition { execs, process }));
    let mut out = String::with_capacity(16 << 10);
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        // Values land in the first bucket whose bound is >= the value; quantiles read bounds.
        let h = Hist::new(LATENCY_BOUNDS_S);
        for v in [0.00004, 0.0003, 0.0003, 0.002, 5.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets[0], (0.00005, 1));
        assert_eq!(s.buckets[3], (0.0005, 2));
        assert_eq!(s.buckets.last().unwrap(), &(f64::MAX, 1));
        assert_eq!(s.quantile(0.5), Some(0.0005));
        assert_eq!(s.quantile(1.0), Some(f64::MAX));
    }

    fn sample_exposition(sinks: Vec<crate::flusher::SinkStatus>, os: Option<ProcStats>) -> String {
        let probe = ExecProbe::new(2);
        probe.reject("lat_out_of_range");
        ExecProbe::add(&probe.sent_to[0], 3);
        ExecProbe::add(&probe.accepted, 7);
        probe.ack_latency.observe(0.001);
        // Executor 1 owns shard 3 (of 4 on 2 executors): labels must not mix them up.
        let mut snap = probe.snapshot(1, 5);
        let store = StoreProbe::default();
        store.commit_latency.observe(0.0004);
        store.group_entries.observe(10.0);
        snap.shards.push(ShardSnapshot {
            shard: 3,
            executor: 1,
            log_bytes: 1 << 20,
            segments: 1,
            entries: 10,
            written: 100,
            durable: 90,
            devices: 3,
            table_bytes: 500,
            seq_devices: 0,
            seq_gaps: 0,
            duplicates_dropped: 0,
            sync_mode: "fdatasync".into(),
            group_entries: store.group_entries.snapshot(),
            commit_latency: store.commit_latency.snapshot(),
            waiters: 0,
        });
        let mut other = ExecProbe::new(2).snapshot(0, 0);
        other.received_from = vec![0, 0];
        render(
            vec![other, snap],
            ProcessInfo {
                uptime_s: 3.0,
                durability: "strict",
                connections_total: 5,
                sinks,
                os,
                replication_lag: vec![(3, 4096)],
                ownership_stepdowns: None,
                view_lag: vec![("GEOBEAT_HB_0".into(), 2, 1.5)],
                view_problems: Some((0, 1)),
            },
        )
    }

    #[test]
    fn executor_series_carry_executor_and_shard_series_carry_shard() {
        // A rendered exposition has the promised families, ends with # EOF, and labels each
        // series with what it counts: executor 1's counters say executor="1", shard 3's
        // figures say shard="3" (before, executor counters were labelled shard=<executor>).
        let text = sample_exposition(vec![], None);
        for family in [
            "geobeat_build_info{version=",
            "geobeat_heartbeats_accepted_total{executor=\"1\"} 7",
            "geobeat_heartbeats_rejected_total{executor=\"1\",reason=\"lat_out_of_range\"} 1",
            "geobeat_commit_latency_seconds_bucket{le=\"0.0005\",shard=\"3\"} 1",
            "geobeat_queue_depth{executor=\"0\",from=\"1\"} 3",
            "geobeat_cross_shard_messages_total{executor=\"1\",to=\"0\"} 3",
            "geobeat_durability_mode{shard=\"3\",sync=\"fdatasync\",ack=\"strict\"} 1",
            "geobeat_view_lag_messages{stream=\"GEOBEAT_HB_0\"} 2",
            "geobeat_view_lag_seconds{stream=\"GEOBEAT_HB_0\"} 1.5",
            "geobeat_view_problems_total{kind=\"refused\"} 1",
            "geobeat_ack_latency_seconds_count{executor=\"1\"} 1",
            "geobeat_connections_open{executor=\"1\"} 5",
            "geobeat_log_bytes{shard=\"3\"} 1048576",
            "geobeat_replication_lag_bytes{shard=\"3\"} 4096",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
        let executor_families = [
            "geobeat_connections_open",
            "geobeat_subscribers_connected",
            "geobeat_subscription_events",
            "geobeat_frames_in",
            "geobeat_received",
            "geobeat_heartbeats_",
            "geobeat_cross_shard_messages",
            "geobeat_queue_depth",
            "geobeat_ack_latency",
        ];
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if executor_families.iter().any(|f| line.starts_with(f)) {
                assert!(
                    !line.contains("shard="),
                    "executor series with a shard label: {line}"
                );
            }
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn sink_status_and_process_figures_are_exposed() {
        let row = crate::flusher::SinkStatus {
            name: "pg".into(),
            kind: "postgres",
            shard: 3,
            cursor: 10,
            durable: 50,
            lag_bytes: 40,
            rows_total: 12,
            skipped_bytes: 0,
            failures: 2,
            errors_total: 5,
            last_error: Some("connection refused".into()),
            last_error_ms: Some(1_700_000_001_000),
            last_ok_ms: Some(1_700_000_000_000),
        };
        let os = ProcStats {
            cpu_s: 1.5,
            resident_bytes: 4096,
            virtual_bytes: 8192,
            open_fds: 9,
            max_fds: 1024,
            start_time_s: 1_700_000_000.25,
        };
        let text = sample_exposition(vec![row], Some(os));
        for series in [
            "geobeat_sink_failures_total{sink=\"pg\",shard=\"3\"} 5",
            "geobeat_sink_consecutive_failures{sink=\"pg\",shard=\"3\"} 2",
            "geobeat_sink_rows_total{sink=\"pg\",shard=\"3\"} 12",
            "geobeat_sink_backlog_bytes{sink=\"pg\",shard=\"3\"} 40",
            "geobeat_sink_skipped_bytes_total{sink=\"pg\",shard=\"3\"} 0",
            "geobeat_sink_last_success_timestamp_seconds{sink=\"pg\",shard=\"3\"} 1700000000",
            "process_cpu_seconds_total 1.5",
            "process_resident_memory_bytes 4096",
            "process_open_fds 9",
            "process_max_fds 1024",
            "process_start_time_seconds 1700000000.25",
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
    }

    #[test]
    fn proc_stat_parses_with_a_hostile_command_name() {
        // The command name may hold spaces and ')': fields are counted after the last ')'.
        let stat = "4242 (geo) beat x) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 150 0 0 20 0 3 0 \
                    1000 123456789 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let s = ProcStats::parse(stat, proc_stat, 100, 4096).unwrap();
        assert_eq!(s.cpu_s, 4.0);
        assert_eq!(s.start_time_s, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 300 * 4096);
        let live = ProcStats::read().expect("/proc is readable on Linux");
        assert!(
            live.open_fds >= 3 && live.max_fds >= live.open_fds,
            "{live:?}"
        );
        assert!(live.resident_bytes > 0 && live.start_time_s > 1_600_000_000.0);
    }
}
