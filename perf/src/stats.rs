//! Run statistics for the load generator: counters, the HDR latency histogram and the
//! machine-readable summary that child processes print and the parent merges. It owns
//! aggregation and serialization; it does not decide what is measured (the device loop does) nor
//! print human reports (the binary does). Invariant: merging summaries is exact (histograms are
//! merged bucket by bucket, counters summed), so a run split over processes reports the same
//! numbers it would have in one.

use std::collections::BTreeMap;
use std::sync::Mutex;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use thiserror::Error;

use crate::sys::CpuTimes;

/// Highest latency the histogram resolves, in microseconds (one hour); larger values saturate.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits the histogram keeps.
pub const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Most distinct rejection reasons kept; further reasons are counted under [`REASON_OTHER`].
pub const REJECTION_REASONS_MAX: usize = 32;
/// Bucket for rejection reasons beyond [`REJECTION_REASONS_MAX`].
pub const REASON_OTHER: &str = "(other)";
/// Prefix of the one summary line a child process prints on stdout.
pub const SUMMARY_LINE_PREFIX: &str = "GEOBEAT_LOAD_SUMMARY ";

/// A new, empty latency histogram with the run's bounds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Event counts of a run. "Measured" heartbeats are those whose intended send time lies inside
/// the measured window (after ramp and warmup, before the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Devices configured.
    pub devices: u64,
    /// Devices whose WebSocket upgrade succeeded.
    pub connected: u64,
    /// Connection attempts that failed (TCP connect, HTTP upgrade, or 401).
    pub connect_failures: u64,
    /// Connections that ended early (server closed, I/O error) after connecting.
    pub disconnects: u64,
    /// Frames sent during the whole run.
    pub frames_sent_total: u64,
    /// Heartbeats sent during the whole run.
    pub sent_total: u64,
    /// Heartbeats acked during the whole run.
    pub acked_total: u64,
    /// Measured heartbeats sent.
    pub sent: u64,
    /// Measured heartbeats acked (each contributes one latency sample).
    pub acked: u64,
    /// Measured heartbeats neither acked nor rejected by the end of the drain.
    pub unacked: u64,
    /// Heartbeats acked by acks that arrived inside the measured window (throughput numerator).
    pub acked_in_window: u64,
    /// Heartbeat rejections (`{"seq":N,"error":..}`) during the whole run.
    pub rejected: u64,
    /// Frame rejections (`{"seq":null,"error":..}`) during the whole run.
    pub frame_rejections: u64,
    /// Replies that were not an ack or a rejection, acks beyond the last seq sent, and
    /// WebSocket protocol errors.
    pub protocol_errors: u64,
}

impl Counters {
    /// Adds every field of `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        let Counters {
            devices,
            connected,
            connect_failures,
            disconnects,
            frames_sent_total,
            sent_total,
            acked_total,
            sent,
            acked,
            unacked,
            acked_in_window,
            rejected,
            frame_rejections,
            protocol_errors,
        } = other;
        self.devices += devices;
        self.connected += connected;
        self.connect_failures += connect_failures;
        self.disconnects += disconnects;
        self.frames_sent_total += frames_sent_total;
        self.sent_total += sent_total;
        self.acked_total += acked_total;
        self.sent += sent;
        self.acked += acked;
        self.unacked += unacked;
        self.acked_in_window += acked_in_window;
        self.rejected += rejected;
        self.frame_rejections += frame_rejections;
        self.protocol_errors += protocol_errors;
    }
}

/// Mutable statistics of (a part of) a run.
#[derive(Debug)]
pub struct Stats {
    /// Event counts.
    pub counters: Counters,
    /// Ack latency of measured heartbeats, microseconds from intended send to ack.
    pub latency_us: Histogram<u64>,
    /// Open loop: how late each measured frame left relative to its intended time, in
    /// microseconds (the client's own scheduling delay, already included in `latency_us`).
    pub send_lag_us: Histogram<u64>,
    /// Service time of measured heartbeats, microseconds from the ACTUAL send to the ack: the
    /// server's and the network's share of `latency_us`, without the client's pacing delay.
    pub service_us: Histogram<u64>,
    /// Rejections by reason (bounded by [`REJECTION_REASONS_MAX`]).
    pub rejection_reasons: BTreeMap<String, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            counters: Counters::default(),
            latency_us: new_histogram(),
            send_lag_us: new_histogram(),
            service_us: new_histogram(),
            rejection_reasons: BTreeMap::new(),
        }
    }
}

impl Stats {
    /// Counts one rejection under `reason`, keeping the reason map bounded.
    pub fn count_reason(&mut self, reason: &str) {
        count_reason_into(&mut self.rejection_reasons, reason, 1);
    }

    /// Folds `other` into `self`.
    pub fn merge(&mut self, other: &Stats) {
        self.counters.add(&other.counters);
        self.send_lag_us
            .add(&other.send_lag_us)
            .expect("histograms share bounds");
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share bounds");
        self.service_us
            .add(&other.service_us)
            .expect("histograms share bounds");
        for (reason, count) in &other.rejection_reasons {
            count_reason_into(&mut self.rejection_reasons, reason, *count);
        }
    }
}

fn count_reason_into(reasons: &mut BTreeMap<String, u64>, reason: &str, count: u64) {
    if let Some(slot) = reasons.get_mut(reason) {
        *slot += count;
    } else if reasons.len() < REJECTION_REASONS_MAX {
        reasons.insert(reason.to_owned(), count);
    } else {
        *reasons.entry(REASON_OTHER.to_owned()).or_default() += count;
    }
}

/// Statistics split into independently locked shards, so each runtime thread records into its
/// own shard without contention.
#[derive(Debug)]
pub struct ShardedStats {
    /// One slot per recording thread (or group of devices).
    shards: Vec<Mutex<Stats>>,
}

impl ShardedStats {
    /// `count` empty shards.
    pub fn new(count: usize) -> Self {
        assert!(count > 0);
        Self {
            shards: (0..count).map(|_| Mutex::new(Stats::default())).collect(),
        }
    }

    /// Runs `f` on shard `index % shard_count`.
    pub fn with<R>(&self, index: usize, f: impl FnOnce(&mut Stats) -> R) -> R {
        let mut guard = self.shards[index % self.shards.len()]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    /// All shards merged into one.
    pub fn merged(&self) -> Stats {
        let mut total = Stats::default();
        for shard in &self.shards {
            total.merge(
                &shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
        }
        total
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    /// Number of samples (heartbeats).
    pub count: u64,
    /// Smallest sample.
    pub min_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// Percentiles of `histogram` (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            min_us: histogram.min(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        }
    }
}

/// Why a summary could not be decoded or merged.
#[derive(Debug, Error)]
pub enum SummaryError {
    /// The summary line is not valid JSON of the expected shape.
    #[error("summary is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The embedded histogram is not valid base64.
    #[error("summary histogram is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The embedded histogram is not a valid V2 HDR histogram.
    #[error("summary histogram does not decode: {0}")]
    Histogram(String),
    /// A summary to merge carries no histogram.
    #[error("summary from {source_name} has no histogram to merge")]
    MissingHistogram {
        /// Which summary (e.g. "child 2").
        source_name: String,
    },
}

/// The machine-readable result of a run (or of one child process of a run).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Event counts.
    pub counters: Counters,
    /// Length of the measured window, in seconds.
    pub measured_s: f64,
    /// Heartbeats acked per second inside the measured window.
    pub throughput_acked_per_s: f64,
    /// Ack latency percentiles of measured heartbeats.
    pub latency: LatencySummary,
    /// Rejections by reason.
    pub rejection_reasons: BTreeMap<String, u64>,
    /// CPU time the load generator itself used (all processes), to subtract from machine totals.
    pub client_cpu: CpuTimes,
    /// The latency histogram, V2-serialized and base64-encoded (for merging across processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram_v2_base64: Option<String>,
    /// Open loop: send lag percentiles (client scheduling delay; part of `latency`).
    #[serde(default)]
    pub send_lag: LatencySummary,
    /// The send-lag histogram, V2-serialized and base64-encoded (for merging across processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_lag_v2_base64: Option<String>,
    /// Service time percentiles (actual send to ack; the server's and network's share).
    #[serde(default)]
    pub service: LatencySummary,
    /// The service-time histogram, V2-serialized and base64-encoded (for merging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_v2_base64: Option<String>,
}

impl Summary {
    /// Builds a summary of `stats` over a measured window of `measured_s` seconds.
    pub fn from_stats(stats: &Stats, measured_s: f64, client_cpu: CpuTimes) -> Self {
        let throughput = if measured_s > 0.0 {
            stats.counters.acked_in_window as f64 / measured_s
        } else {
            0.0
        };
        Self {
            counters: stats.counters,
            measured_s,
            throughput_acked_per_s: throughput,
            latency: LatencySummary::of(&stats.latency_us),
            rejection_reasons: stats.rejection_reasons.clone(),
            client_cpu,
            histogram_v2_base64: Some(encode_histogram(&stats.latency_us)),
            send_lag: LatencySummary::of(&stats.send_lag_us),
            send_lag_v2_base64: Some(encode_histogram(&stats.send_lag_us)),
            service: LatencySummary::of(&stats.service_us),
            service_v2_base64: Some(encode_histogram(&stats.service_us)),
        }
    }

    /// What makes this run unclean: no acks at all, or any rejection, protocol error,
    /// connection failure, disconnect or unacked measured heartbeat. Empty for a clean run.
    pub fn problems(&self) -> Vec<String> {
        let c = &self.counters;
        let mut problems = Vec::new();
        if c.acked == 0 {
            problems.push("no measured heartbeat was acked".to_owned());
        }
        for (name, value) in [
            ("rejected", c.rejected),
            ("frame_rejections", c.frame_rejections),
            ("protocol_errors", c.protocol_errors),
            ("connect_failures", c.connect_failures),
            ("disconnects", c.disconnects),
            ("unacked", c.unacked),
        ] {
            if value > 0 {
                problems.push(format!("{name} = {value}"));
            }
        }
        problems
    }

    /// The single stdout line a child process prints.
    pub fn to_line(&self) -> String {
        let json = serde_json::to_string(self).expect("summaries always serialize");
        format!("{SUMMARY_LINE_PREFIX}{json}")
    }

    /// Parses a line printed by [`Summary::to_line`]; `None` if the line is something else.
    pub fn from_line(line: &str) -> Option<Result<Self, SummaryError>> {
        let json = line.strip_prefix(SUMMARY_LINE_PREFIX)?;
        Some(serde_json::from_str(json).map_err(SummaryError::from))
    }

    /// Merges child summaries (each with a histogram) into one, adding `parent_cpu` to their CPU.
    pub fn merge(parts: &[Summary], parent_cpu: CpuTimes) -> Result<Summary, SummaryError> {
        let mut stats = Stats::default();
        let mut cpu = parent_cpu;
        let mut measured_s: f64 = 0.0;
        for (index, part) in parts.iter().enumerate() {
            let encoded = part.histogram_v2_base64.as_deref().ok_or_else(|| {
                SummaryError::MissingHistogram {
                    source_name: format!("child {index}"),
                }
            })?;
            let child = Stats {
                counters: part.counters,
                latency_us: decode_histogram(encoded)?,
                send_lag_us: match part.send_lag_v2_base64.as_deref() {
                    Some(lag) => decode_histogram(lag)?,
                    None => new_histogram(),
                },
                service_us: match part.service_v2_base64.as_deref() {
                    Some(service) => decode_histogram(service)?,
                    None => new_histogram(),
                },
                rejection_reasons: part.rejection_reasons.clone(),
            };
            stats.merge(&child);
            cpu = cpu.plus(&part.client_cpu);
            measured_s = measured_s.max(part.measured_s);
        }
        Ok(Summary::from_stats(&stats, measured_s, cpu))
    }
}

/// `histogram` in HDR V2 format, base64 (standard alphabet).
pub fn encode_histogram(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .expect("serializing into a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Inverse of [`encode_histogram`], re-bounded to the run's histogram bounds.
pub fn decode_histogram(encoded: &str) -> Result<Histogram<u64>, SummaryError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
    let decoded: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| SummaryError::Histogram(format!("{e:?}")))?;
    let mut histogram = new_histogram();
    histogram
        .add(&decoded)
        .map_err(|e| SummaryError::Histogram(format!("{e:?}")))?;
    Ok(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_with(samples: &[u64], acked_in_window: u64) -> Stats {
        let mut stats = Stats::default();
        for &s in samples {
            stats.latency_us.record(s).unwrap();
        }
        stats.counters.acked = samples.len() as u64;
        stats.counters.acked_in_window = acked_in_window;
        stats
    }

    #[test]
    fn child_summaries_merge_exactly() {
        // Checks that two child summaries, passed through their text lines, merge to the same
        // percentiles and counts as one summary built from all samples directly.
        let a = stats_with(&[100, 200, 300], 3);
        let b = stats_with(&[1_000, 50_000], 2);
        let cpu = CpuTimes {
            user_s: 1.0,
            sys_s: 0.5,
        };
        let lines = [
            Summary::from_stats(&a, 10.0, cpu).to_line(),
            Summary::from_stats(&b, 10.0, cpu).to_line(),
        ];
        let parts: Vec<Summary> = lines
            .iter()
            .map(|l| Summary::from_line(l).unwrap().unwrap())
            .collect();
        let merged = Summary::merge(
            &parts,
            CpuTimes {
                user_s: 0.25,
                sys_s: 0.0,
            },
        )
        .unwrap();
        let mut all = stats_with(&[100, 200, 300, 1_000, 50_000], 5);
        all.counters.acked = 5;
        let direct = Summary::from_stats(&all, 10.0, CpuTimes::default());
        assert_eq!(merged.latency, direct.latency);
        assert_eq!(merged.counters.acked, 5);
        assert_eq!(merged.throughput_acked_per_s, 0.5);
        assert_eq!(
            merged.client_cpu,
            CpuTimes {
                user_s: 2.25,
                sys_s: 1.0
            }
        );
        assert!(Summary::from_line("unrelated output").is_none());
    }

    #[test]
    fn problems_flag_unclean_runs() {
        // Checks that a run with acks and no errors is clean, and that no acks or any error
        // counter is reported by name.
        let mut clean = Summary::default();
        clean.counters.acked = 10;
        assert!(clean.problems().is_empty());
        assert_eq!(
            Summary::default().problems(),
            vec!["no measured heartbeat was acked"]
        );
        let mut dirty = clean.clone();
        dirty.counters.protocol_errors = 2;
        dirty.counters.unacked = 1;
        assert_eq!(dirty.problems(), vec!["protocol_errors = 2", "unacked = 1"]);
    }

    #[test]
    fn rejection_reasons_stay_bounded() {
        // Checks that distinct reasons beyond the bound fold into the "(other)" bucket and that
        // no count is lost.
        let mut stats = Stats::default();
        for i in 0..REJECTION_REASONS_MAX + 10 {
            stats.count_reason(&format!("reason-{i}"));
        }
        stats.count_reason("reason-0");
        assert_eq!(stats.rejection_reasons.len(), REJECTION_REASONS_MAX + 1);
        assert_eq!(stats.rejection_reasons[REASON_OTHER], 10);
        assert_eq!(stats.rejection_reasons["reason-0"], 2);
        let total: u64 = stats.rejection_reasons.values().sum();
        assert_eq!(total, REJECTION_REASONS_MAX as u64 + 11);
    }

    #[test]
    fn sharded_stats_merge_all_shards() {
        // Checks that records made through different shard indexes all appear in the merge.
        let sharded = ShardedStats::new(3);
        for i in 0..9 {
            sharded.with(i, |s| {
                s.counters.sent += 1;
                s.latency_us.record(10 + i as u64).unwrap();
            });
        }
        let merged = sharded.merged();
        assert_eq!(merged.counters.sent, 9);
        assert_eq!(merged.latency_us.len(), 9);
        assert_eq!(merged.latency_us.max(), 18);
    }

    #[test]
    fn corrupt_histograms_are_errors() {
        // Checks that bad base64 and bad histogram bytes are reported, not panicked on.
        assert!(matches!(
            decode_histogram("***"),
            Err(SummaryError::Base64(_))
        ));
        assert!(matches!(
            decode_histogram("AAAA"),
            Err(SummaryError::Histogram(_))
        ));
    }
}
