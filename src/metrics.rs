//! Metrics: per-executor probes the hot path bumps with plain `Cell`s (no atomics, nothing
//! shared), snapshots that executors hand over on request, and the Prometheus/OpenMetrics text
//! rendered from those snapshots with prometheus-client at scrape time. It owns metric names,
//! help texts, labels and histogram bounds; it does not decide when things happen.
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
    /// Heartbeats rejected, by reason (rare: a small list, searched linearly).
    pub rejected: RefCell<Vec<(&'static str, u64)>>,
    /// Mesh messages sent to each executor.
    pub sent_to: Vec<Cell<u64>>,
    /// Mesh messages received from each executor.
    pub received_from: Vec<Cell<u64>>,
    /// Frame receipt to ack, seconds.
    pub ack_latency: Hist,
}

impl ExecProbe {
    /// Counters for an executor among `executors`.
    pub fn new(executors: usize) -> ExecProbe {
        ExecProbe {
            frames_in: Cell::new(0),
            bytes_in: Cell::new(0),
            accepted: Cell::new(0),
            rejected: RefCell::new(Vec::new()),
            sent_to: (0..executors).map(|_| Cell::new(0)).collect(),
            received_from: (0..executors).map(|_| Cell::new(0)).collect(),
            ack_latency: Hist::new(LATENCY_BOUNDS_S),
        }
    }

    /// Adds `n` to a counter cell.
    pub fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
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
        }
    }
}

/// Process-wide facts for the exposition.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// Seconds since start.
    pub uptime_s: f64,
    /// `strict` or `relaxed`.
    pub durability: &'static str,
    /// Client connections open (all kinds, all executors).
    pub connections_total: usize,
    /// Per sink and shard: unconsumed bytes (filled once sinks exist).
    pub sink_backlog: Vec<(String, u32, u64)>,
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
                .map(|x| (shard_label(x.executor), f(x)))
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
        self.gauge(e, "geobeat_durability_mode", "Durability mode per shard: sync = dax (MAP_SYNC + cache-line flush) or fdatasync; ack = strict or relaxed", &modes)?;
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
        let rejected: Vec<(Labels, u64)> = self
            .execs
            .iter()
            .flat_map(|x| {
                x.rejected.iter().map(move |(r, n)| {
                    (
                        vec![("shard", x.executor.to_string()), ("reason", r.clone())],
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
                            vec![("shard", x.executor.to_string()), ("to", to.to_string())],
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
                            vec![("shard", to.to_string()), ("from", x.executor.to_string())],
                            sent.saturating_sub(got) as i64,
                        )
                    })
            })
            .collect();
        self.gauge(
            e,
            "geobeat_queue_depth",
            "Messages waiting in the channel from executor `from` to executor `shard` (occupancy)",
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
            .map(|x| (shard_label(x.executor), &x.ack_latency))
            .collect();
        self.histogram(
            e,
            "geobeat_ack_latency",
            "From receipt of a frame to its durable ack being queued",
            Some(&Unit::Seconds),
            &acks,
        )?;
        let backlog: Vec<(Labels, i64)> = self
            .process
            .sink_backlog
            .iter()
            .map(|(sink, shard, b)| {
                (
                    vec![("sink", sink.clone()), ("shard", shard.to_string())],
                    *b as i64,
                )
            })
            .collect();
        self.gauge(
            e,
            "geobeat_sink_backlog_bytes",
            "Durable log bytes a downstream sink has not consumed yet",
            &backlog,
        )?;
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

    #[test]
    fn renders_every_family_with_shard_labels() {
        // A rendered exposition has the promised families, a shard label, and ends with # EOF.
        let probe = ExecProbe::new(2);
        probe.reject("lat_out_of_range");
        ExecProbe::add(&probe.sent_to[1], 3);
        probe.ack_latency.observe(0.001);
        let mut snap = probe.snapshot(0, 5);
        let store = StoreProbe::default();
        store.commit_latency.observe(0.0004);
        store.group_entries.observe(10.0);
        snap.shards.push(ShardSnapshot {
            shard: 0,
            executor: 0,
            log_bytes: 1 << 20,
            segments: 1,
            entries: 10,
            written: 100,
            durable: 90,
            devices: 3,
            table_bytes: 500,
            sync_mode: "fdatasync".into(),
            group_entries: store.group_entries.snapshot(),
            commit_latency: store.commit_latency.snapshot(),
            waiters: 0,
        });
        let text = render(
            vec![snap],
            ProcessInfo {
                uptime_s: 3.0,
                durability: "strict",
                connections_total: 5,
                sink_backlog: vec![],
            },
        );
        for family in [
            "geobeat_build_info{version=",
            "geobeat_heartbeats_rejected_total{shard=\"0\",reason=\"lat_out_of_range\"} 1",
            "geobeat_commit_latency_seconds_bucket{le=\"0.0005\",shard=\"0\"} 1",
            "geobeat_queue_depth{shard=\"1\",from=\"0\"} 3",
            "geobeat_durability_mode{shard=\"0\",sync=\"fdatasync\",ack=\"strict\"} 1",
            "geobeat_ack_latency_seconds_count{shard=\"0\"} 1",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
