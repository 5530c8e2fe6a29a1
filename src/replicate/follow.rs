//! Following the streams for the cluster-wide view (issue 17 item 3): the JetStream side of it.
//! It owns the pull consumers' configuration ([`consumer_config`]), the pull request
//! ([`pull_request`]), the parsing of a delivered message's `$JS.ACK` reply subject
//! ([`Delivery`]: stream sequence, pending count, stream time) and the view's lag bookkeeping
//! ([`FollowStatus`], read by `/v1/stats` and metrics). It does not connect, pull or apply
//! anything (`shard::follow` does, on each executor) and holds no view (`table::view`).
//!
//! Topology: every executor of a cluster node follows the subjects of the units of its own
//! shards (units never span two shards, and every node has the same routing table), one pull
//! consumer per stream with those subjects as `filter_subjects`: an entry arrives on the
//! executor that owns its device's shard, so no cross-executor hop is needed to apply it.
//! Consumers are ephemeral (R1, in memory, `ack_policy: none`, deleted by the server after
//! [`VIEW_CONSUMER_INACTIVE`] unused) and start at the stream's first message, or just past the
//! last one applied when recreated: the view is rebuilt by following, never from local files.
//!
//! Invariant: a stream's `applied` sequence only grows, and `pending` is what JetStream reported
//! with the newest delivery (messages of the follower's subjects not yet delivered), so the
//! lag shown is the server's count, never a local guess.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::limits::{
    VIEW_CONSUMER_INACTIVE, VIEW_PULL_BATCH_MAX, VIEW_PULL_BYTES_MAX, VIEW_PULL_EXPIRES,
};

/// The request creating an executor's ephemeral pull consumer on `stream`
/// (`$JS.API.CONSUMER.CREATE.<stream>`): the subjects it
/// follows, starting just past stream sequence `after` (0: from the first message).
pub fn consumer_config(stream: &str, subjects: &[String], after: u64) -> serde_json::Value {
    assert!(
        !subjects.is_empty(),
        "a consumer follows at least one subject"
    );
    let mut cfg = serde_json::json!({
        "ack_policy": "none",
        "replay_policy": "instant",
        "mem_storage": true,
        "num_replicas": 1,
        "inactive_threshold": VIEW_CONSUMER_INACTIVE.as_nanos() as u64,
    });
    if subjects.len() == 1 {
        cfg["filter_subject"] = subjects[0].clone().into();
    } else {
        cfg["filter_subjects"] = subjects.to_vec().into();
    }
    if after == 0 {
        cfg["deliver_policy"] = "all".into();
    } else {
        cfg["deliver_policy"] = "by_start_sequence".into();
        cfg["opt_start_seq"] = (after + 1).into();
    }
    serde_json::json!({ "stream_name": stream, "config": cfg })
}

/// The body of one pull (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`): at most
/// [`VIEW_PULL_BATCH_MAX`] messages and [`VIEW_PULL_BYTES_MAX`] bytes, expiring after
/// [`VIEW_PULL_EXPIRES`].
pub fn pull_request() -> serde_json::Value {
    serde_json::json!({
        "batch": VIEW_PULL_BATCH_MAX,
        "max_bytes": VIEW_PULL_BYTES_MAX,
        "expires": VIEW_PULL_EXPIRES.as_nanos() as u64,
    })
}

/// What a delivered message's reply subject says about it. (A pulled message arrives on its
/// own subject, not on the pull's inbox: the reply subject is what names its stream.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its stream.
    pub stream: String,
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Messages of the consumer's subjects after it, not yet delivered.
    pub pending: u64,
    /// When the stream stored it, ns since the Unix epoch.
    pub ts_ns: i64,
}

impl Delivery {
    /// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (9 tokens)
    /// or the newer `$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
    /// <pending>[.<token>]` (11 or 12 tokens).
    pub fn parse(reply: &str) -> Option<Delivery> {
        let t: Vec<&str> = reply.split('.').collect();
        if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
            return None;
        }
        // Index of `<delivered>`.
        let d = match t.len() {
            9 => 4,
            11 | 12 => 6,
            _ => return None,
        };
        Some(Delivery {
            stream: t[d - 2].to_string(),
            stream_seq: t[d + 1].parse().ok()?,
            ts_ns: t[d + 3].parse().ok()?,
            pending: t[d + 4].parse().ok()?,
        })
    }
}

/// One executor's progress on one stream.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// Stream sequence of the last message applied (0: none yet).
    pub applied: AtomicU64,
    /// Messages of this executor's subjects in the stream not applied yet (JetStream's count
    /// with the newest delivery, or the consumer's `num_pending` when it was created).
    pub pending: AtomicU64,
    /// Stream time of the last message applied, ms since the Unix epoch (0: none).
    pub applied_ts_ms: AtomicI64,
    /// Whether this executor follows the stream at all (it has units in it).
    pub following: std::sync::atomic::AtomicBool,
}

/// The view's progress on a node: per executor and stream, plus counters (see the module
/// comment). Written by the executors' followers, read by `/v1/stats` and metrics.
#[derive(Debug)]
pub struct FollowStatus {
    /// `progress[executor * streams + stream]`.
    progress: Vec<StreamProgress>,
    /// Number of streams.
    streams: usize,
    /// Entries applied to the view (heartbeats of devices written by other nodes).
    pub applied_entries: AtomicU64,
    /// Batches skipped because this node wrote them (their entries are in its local tables).
    pub skipped_own: AtomicU64,
    /// Fences skipped (empty batches).
    pub skipped_fences: AtomicU64,
    /// Batches that failed to decode (CRC, framing): logged and counted, their entries not
    /// applied.
    pub damaged: AtomicU64,
    /// Heartbeats the view refused (its device bound): logged and counted.
    pub refused: AtomicU64,
    /// Consumers created (a recreation after a lost connection or consumer counts again).
    pub consumers_created: AtomicU64,
}

impl FollowStatus {
    /// Status for `executors` executors following `streams` streams.
    pub fn new(executors: usize, streams: usize) -> FollowStatus {
        FollowStatus {
            progress: (0..executors * streams)
                .map(|_| StreamProgress::default())
                .collect(),
            streams,
            applied_entries: AtomicU64::new(0),
            skipped_own: AtomicU64::new(0),
            skipped_fences: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            consumers_created: AtomicU64::new(0),
        }
    }

    /// Executor `exec`'s progress on stream `k`.
    pub fn progress(&self, exec: usize, k: usize) -> &StreamProgress {
        &self.progress[exec * self.streams + k]
    }

    /// Per stream: (messages not applied yet, seconds the view is behind, last sequence
    /// applied), over every executor following it, at wall time `now_ms`. The seconds are 0
    /// when nothing is pending, else the age of the oldest executor's last applied message (or
    /// `None` if one of them has applied nothing yet).
    pub fn lag(&self, now_ms: i64) -> Vec<StreamLag> {
        let executors = self.progress.len() / self.streams.max(1);
        (0..self.streams)
            .map(|k| {
                let mut lag = StreamLag {
                    stream: k,
                    messages: 0,
                    seconds: Some(0.0),
                    applied: 0,
                };
                for e in 0..executors {
                    let p = self.progress(e, k);
                    if !p.following.load(Ordering::Acquire) {
                        continue;
                    }
                    let pending = p.pending.load(Ordering::Acquire);
                    lag.messages += pending;
                    lag.applied = lag.applied.max(p.applied.load(Ordering::Acquire));
                    if pending > 0 {
                        let ts = p.applied_ts_ms.load(Ordering::Acquire);
                        let s = (ts > 0).then(|| (now_ms - ts).max(0) as f64 / 1000.0);
                        lag.seconds = match (lag.seconds, s) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        };
                    }
                }
                lag
            })
            .collect()
    }

    /// The `view` object of `/v1/stats`' `replication` section.
    pub fn report(&self, now_ms: i64) -> serde_json::Value {
        let lag = self.lag(now_ms);
        let total: u64 = lag.iter().map(|l| l.messages).sum();
        let seconds = lag
            .iter()
            .map(|l| l.seconds)
            .try_fold(0.0f64, |a, s| s.map(|s| a.max(s)));
        serde_json::json!({
            "lag_messages": total,
            "lag_seconds": seconds,
            "streams": lag.iter().map(|l| serde_json::json!({
                "stream": super::stream_name(l.stream as u32),
                "applied_seq": l.applied,
                "lag_messages": l.messages,
                "lag_seconds": l.seconds,
            })).collect::<Vec<_>>(),
            "applied_entries": self.applied_entries.load(Ordering::Relaxed),
            "skipped_own_batches": self.skipped_own.load(Ordering::Relaxed),
            "skipped_fences": self.skipped_fences.load(Ordering::Relaxed),
            "damaged_batches": self.damaged.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "consumers_created": self.consumers_created.load(Ordering::Relaxed),
        })
    }
}

/// One stream's lag as [`FollowStatus::lag`] computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamLag {
    /// Stream index.
    pub stream: usize,
    /// Messages not applied yet.
    pub messages: u64,
    /// Seconds behind (`None`: an executor with pending messages has applied none yet).
    pub seconds: Option<f64>,
    /// Highest stream sequence applied by any executor.
    pub applied: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_of_both_formats_parse_and_others_do_not() {
        assert_eq!(
            Delivery::parse("$JS.ACK.GEOBEAT_HB_0.c1.1.42.7.1700000000000000000.3"),
            Some(Delivery {
                stream: "GEOBEAT_HB_0".into(),
                stream_seq: 42,
                pending: 3,
                ts_ns: 1_700_000_000_000_000_000
            })
        );
        assert_eq!(
            Delivery::parse("$JS.ACK.dom.hash.GEOBEAT_HB_0.c1.1.42.7.1700.0.tok"),
            Some(Delivery {
                stream: "GEOBEAT_HB_0".into(),
                stream_seq: 42,
                pending: 0,
                ts_ns: 1700
            })
        );
        assert_eq!(Delivery::parse("_INBOX.x.1"), None);
        assert_eq!(Delivery::parse("$JS.ACK.S.c.1.x.7.1700.0"), None);
        assert_eq!(Delivery::parse("$JS.ACK.S.c.1.2.3.4"), None);
    }

    #[test]
    fn consumer_config_filters_and_starts_past_the_applied_sequence() {
        let one = consumer_config("S", &["geobeat.hb.0.0".into()], 0);
        assert_eq!(one["config"]["filter_subject"], "geobeat.hb.0.0");
        assert_eq!(one["config"]["deliver_policy"], "all");
        assert_eq!(one["config"]["ack_policy"], "none");
        assert!(one["config"].get("filter_subjects").is_none());
        let two = consumer_config("S", &["a.1".into(), "a.2".into()], 41);
        assert_eq!(two["stream_name"], "S");
        assert_eq!(two["config"]["filter_subjects"][1], "a.2");
        assert_eq!(two["config"]["deliver_policy"], "by_start_sequence");
        assert_eq!(two["config"]["opt_start_seq"], 42);
        let pull = pull_request();
        assert_eq!(pull["batch"], VIEW_PULL_BATCH_MAX);
        assert_eq!(pull["max_bytes"], VIEW_PULL_BYTES_MAX);
    }

    #[test]
    fn lag_sums_pending_over_executors_and_ages_only_what_is_behind() {
        let s = FollowStatus::new(2, 2);
        let now = 100_000;
        // Stream 0: executor 0 caught up, executor 1 three behind since 4 s.
        for e in 0..2 {
            s.progress(e, 0).following.store(true, Ordering::Release);
        }
        s.progress(0, 0).applied.store(10, Ordering::Release);
        s.progress(0, 0).applied_ts_ms.store(1, Ordering::Release);
        s.progress(1, 0).applied.store(8, Ordering::Release);
        s.progress(1, 0).pending.store(3, Ordering::Release);
        s.progress(1, 0)
            .applied_ts_ms
            .store(96_000, Ordering::Release);
        // Stream 1: followed by executor 1 only, pending but nothing applied yet.
        s.progress(1, 1).following.store(true, Ordering::Release);
        s.progress(1, 1).pending.store(5, Ordering::Release);
        // Executor 0 does not follow stream 1: its numbers do not count.
        s.progress(0, 1).pending.store(99, Ordering::Release);
        let lag = s.lag(now);
        assert_eq!(lag[0].messages, 3);
        assert_eq!(lag[0].seconds, Some(4.0));
        assert_eq!(lag[0].applied, 10);
        assert_eq!(lag[1].messages, 5);
        assert_eq!(lag[1].seconds, None);
        let r = s.report(now);
        assert_eq!(r["lag_messages"], 8);
        assert!(r["lag_seconds"].is_null());
        s.progress(1, 1).pending.store(0, Ordering::Release);
        s.progress(1, 0).pending.store(0, Ordering::Release);
        let r = s.report(now);
        assert_eq!(r["lag_messages"], 0);
        assert_eq!(r["lag_seconds"], 0.0);
        assert_eq!(r["streams"][0]["stream"], "GEOBEAT_HB_0");
    }
}
