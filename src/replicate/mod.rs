//! `--durability replicated`: every batch of heartbeats a shard makes durable locally is also
//! published to a replicated NATS JetStream stream (R3, Raft) before any heartbeat in it is
//! acked. This module owns the cluster-wide naming (streams, subjects, message ids: [`Plan`]),
//! the NATS protocol ([`wire`]), the batch payload ([`batch`]), the two clients (the executors'
//! [`conn`] on the runtime, the blocking [`blocking`] for start-up, tools and tests), stream
//! setup ([`Plan::prepare`]) and the replication lag every executor publishes
//! ([`ShardStatus`]). It does not decide what to publish or when an ack may go out: that is the
//! shard's replication loop (`shard::replicate`), which reads the log and drives [`conn`].
//!
//! Names (docs/cluster.md): the 4096 vshards are cut into *units*, runs of at most
//! [`REPLICATE_VSHARDS_PER_SUBJECT`] consecutive vshards of one shard (a unit never spans two
//! shards, so one writer publishes on a subject); unit `u` (named by its first vshard) publishes
//! on subject `geobeat.hb.<k>.<u>` of stream `GEOBEAT_HB_<k>`, `k = u * streams / 4096`
//! (streams hold vshard ranges, so their Raft leaders spread over the servers). A batch's
//! `Nats-Msg-Id` is `<u>:<epoch>:<log position of its last entry>`; the epoch is the unit's
//! ownership epoch, 0 until ownership exists (issue 17 item 2 increments it at each takeover).
//!
//! Invariant: per subject, batches are stored in log order with no gap: a unit has at most one
//! batch in flight, publishes carry `Nats-Expected-Last-Subject-Sequence`, and the next batch is
//! formed only after the previous one's PubAck.

pub mod batch;
pub mod blocking;
pub mod conn;
pub mod follow;
pub mod placement;
pub mod wire;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::limits::{REPLICATE_DEDUPE_WINDOW, REPLICATE_VSHARDS_PER_SUBJECT, VSHARDS};
use crate::route::{Router, VShard};

/// The log consumer that keeps retention from deleting entries the streams do not hold yet.
pub const CONSUMER_NAME: &str = "replicate";
/// Prefix of stream names (`GEOBEAT_HB_0`, ...).
pub const STREAM_PREFIX: &str = "GEOBEAT_HB_";
/// Prefix of subjects (`geobeat.hb.<stream>.<unit>`).
pub const SUBJECT_PREFIX: &str = "geobeat.hb.";
/// Header: position just past the batch's last entry in the origin shard's log.
pub const HDR_END: &str = "Geobeat-End";
/// Header: every entry of the origin shard below this position was already in the streams when
/// the batch was formed (where a restarted node resumes scanning).
pub const HDR_REPLICATED: &str = "Geobeat-Replicated";
/// Header: the origin data directory (its creation time in ms, from `geobeat.meta`): log
/// positions mean something only within one data directory.
pub const HDR_LOG: &str = "Geobeat-Log";
/// Header: the origin shard.
pub const HDR_SHARD: &str = "Geobeat-Shard";
/// JetStream's message id header (dedupe within the stream's duplicate window).
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";
/// JetStream's optimistic concurrency header for the subject.
pub const HDR_EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";

/// Why replication could not be set up or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No configured server accepted a connection in time.
    #[error("NATS unreachable at {urls}: {reason}")]
    Unreachable {
        /// The configured URLs.
        urls: String,
        /// The last failure.
        reason: String,
    },
    /// I/O on an established connection.
    #[error("NATS connection to {addr}: {source}")]
    Io {
        /// The server.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The server broke the protocol.
    #[error("NATS connection to {addr}: {source}")]
    Wire {
        /// The server.
        addr: String,
        /// The error.
        source: wire::WireError,
    },
    /// The server sent `-ERR`.
    #[error("NATS server {addr} said: {text}")]
    Server {
        /// The server.
        addr: String,
        /// Its message.
        text: String,
    },
    /// No reply in time.
    #[error("no reply to {subject} within {timeout:?}")]
    Timeout {
        /// The request subject.
        subject: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// A JetStream API error reply.
    #[error("JetStream {subject}: error {err_code}: {description}")]
    Api {
        /// The request subject.
        subject: String,
        /// JetStream's error code.
        err_code: u32,
        /// Its text.
        description: String,
    },
    /// A subject holds batches of another data directory: its positions are not this log's.
    #[error(
        "subject {subject} holds batches of the data directory created at {theirs} ms, this one \
         was created at {ours} ms: the streams belong to another data directory (rebuilding a \
         node from the streams is issue 17 item 4); use that data directory or delete the streams"
    )]
    ForeignLog {
        /// The subject.
        subject: String,
        /// The `Geobeat-Log` of its last batch.
        theirs: i64,
        /// This data directory's.
        ours: i64,
    },
    /// A subject's stream holds entries past the shard's durable log end.
    #[error(
        "subject {subject} holds entries up to position {stream_end} but shard {shard}'s log ends \
         at {durable}: the local log went back (an older backup restored, or a lost tail); \
         nothing more is replicated or acked for it (rebuilding from the streams is issue 17 \
         item 4)"
    )]
    LogBehind {
        /// The subject.
        subject: String,
        /// Its last batch's `Geobeat-End`.
        stream_end: u64,
        /// The shard.
        shard: u32,
        /// The shard's durable position.
        durable: u64,
    },
    /// A stream exists with another configuration than geobeat needs.
    #[error(
        "stream {stream} exists but {reason}; delete it or fix --nats-streams/--nats-replicas"
    )]
    StreamMismatch {
        /// The stream.
        stream: String,
        /// What differs.
        reason: String,
    },
}

/// A host:port from a `nats://host:port` URL (or a bare `host:port`).
pub fn url_addr(url: &str) -> String {
    let s = url.trim();
    let s = s.strip_prefix("nats://").unwrap_or(s);
    s.trim_end_matches('/').to_string()
}

/// Replication lag of one shard, written by its executor, read by `/v1/stats` and metrics.
#[derive(Debug, Default)]
pub struct ShardStatus {
    /// Everything below this log position is in the streams (PubAck received).
    pub replicated: AtomicU64,
    /// Batches published and acknowledged.
    pub batches: AtomicU64,
    /// Publishes retried (timeout, no responders, reconnect).
    pub retries: AtomicU64,
    /// Publishes JetStream reported as duplicates (a retry whose first try had landed).
    pub duplicates: AtomicU64,
    /// Wall-clock ms since which the shard's replication loop has had no working NATS
    /// connection (0: it has one). Read by `/readyz`.
    pub unreachable_since_ms: AtomicI64,
}

impl ShardStatus {
    /// Notes that the loop lost (or could not make) its NATS connection at `now_ms`; the first
    /// failure's time stays until [`ShardStatus::reachable`].
    pub fn unreachable(&self, now_ms: i64) {
        let _ = self.unreachable_since_ms.compare_exchange(
            0,
            now_ms.max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Notes a NATS round trip that worked.
    pub fn reachable(&self) {
        if self.unreachable_since_ms.load(Ordering::Relaxed) != 0 {
            self.unreachable_since_ms.store(0, Ordering::Release);
        }
    }

    /// For how long (ms) the shard has had no working NATS connection at `now_ms`, 0 if it has.
    pub fn unreachable_for_ms(&self, now_ms: i64) -> u64 {
        match self.unreachable_since_ms.load(Ordering::Acquire) {
            0 => 0,
            since => now_ms.saturating_sub(since).max(0) as u64,
        }
    }
}

/// The cluster-wide naming and settings of replication (see the module comment), shared by
/// every executor.
#[derive(Debug)]
pub struct Plan {
    /// Server addresses (`host:port`), tried in order.
    pub addrs: Vec<String>,
    /// Number of streams.
    pub streams: u32,
    /// Replicas per stream.
    pub replicas: u32,
    /// Ownership epoch in message ids (0: no ownership yet; issue 17 item 2).
    pub epoch: u64,
    /// This data directory's identity in every batch (`Geobeat-Log`: its creation time, ms).
    pub log_id: i64,
    /// `unit[v]`: the first vshard of vshard `v`'s unit.
    unit: Vec<u16>,
    /// Per logical shard, its replication progress.
    pub status: Vec<ShardStatus>,
    /// Ownership of units (`--node-id`/`--advertise`): `None` on a node without a cluster,
    /// where every unit is written at epoch 0 (see [`placement`]).
    pub placement: Option<std::sync::Arc<placement::Placement>>,
    /// The cluster-wide view's progress (issue 17 item 3): set with ownership, where every
    /// executor follows the streams ([`follow`]); `None` otherwise.
    pub view: Option<follow::FollowStatus>,
}

impl Plan {
    /// The plan for `router`'s table with the given servers and stream settings.
    pub fn new(router: &Router, urls: &[String], streams: u32, replicas: u32) -> Plan {
        assert!(streams >= 1 && (streams as usize) <= VSHARDS);
        let mut unit = Vec::with_capacity(VSHARDS);
        for v in 0..VSHARDS {
            let start = v == 0
                || v % REPLICATE_VSHARDS_PER_SUBJECT == 0
                || router.shard_of_vshard(VShard(v as u16))
                    != router.shard_of_vshard(VShard(v as u16 - 1));
            unit.push(if start { v as u16 } else { unit[v - 1] });
        }
        Plan {
            addrs: urls.iter().map(|u| url_addr(u)).collect(),
            streams,
            replicas,
            epoch: 0,
            log_id: 0,
            unit,
            status: (0..router.shard_count())
                .map(|_| ShardStatus::default())
                .collect(),
            placement: None,
            view: None,
        }
    }

    /// The unit (first vshard of its run) of vshard `v`.
    pub fn unit_of(&self, v: VShard) -> u16 {
        self.unit[v.0 as usize]
    }

    /// Every unit (ascending).
    pub fn units(&self) -> impl Iterator<Item = u16> + '_ {
        self.unit
            .iter()
            .enumerate()
            .filter(|(v, u)| *v == **u as usize)
            .map(|(_, u)| *u)
    }

    /// The stream index of unit `u`.
    pub fn stream_index(&self, u: u16) -> u32 {
        (u as u64 * self.streams as u64 / VSHARDS as u64) as u32
    }

    /// The subject of unit `u`.
    pub fn subject(&self, u: u16) -> String {
        format!("{SUBJECT_PREFIX}{}.{u}", self.stream_index(u))
    }

    /// The stream holding unit `u`.
    pub fn stream_of(&self, u: u16) -> String {
        stream_name(self.stream_index(u))
    }

    /// The message id of unit `u`'s batch whose last entry is at log position `last`.
    pub fn msg_id(&self, u: u16, last: crate::log::LogPos) -> String {
        self.msg_id_at(u, self.epoch, last)
    }

    /// The message id of unit `u`'s batch at ownership epoch `epoch`.
    pub fn msg_id_at(&self, u: u16, epoch: u64, last: crate::log::LogPos) -> String {
        format!("{u}:{epoch}:{}", last.0)
    }

    /// Replicated position of logical shard `k`.
    pub fn replicated(&self, k: usize) -> u64 {
        self.status[k].replicated.load(Ordering::Relaxed)
    }

    /// The replication section of `/v1/stats`: per shard its durable position (`durable(k)`),
    /// replicated position, lag in bytes and counters, and the total lag.
    pub fn report(&self, durable: impl Fn(usize) -> u64) -> serde_json::Value {
        let mut lag_total = 0u64;
        let shards: Vec<serde_json::Value> = self
            .status
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let d = durable(k);
                let r = s.replicated.load(Ordering::Relaxed);
                let lag = d.saturating_sub(r);
                lag_total += lag;
                serde_json::json!({
                    "shard": k,
                    "durable": d,
                    "replicated": r,
                    "lag_bytes": lag,
                    "batches": s.batches.load(Ordering::Relaxed),
                    "retries": s.retries.load(Ordering::Relaxed),
                    "duplicates": s.duplicates.load(Ordering::Relaxed),
                    "nats_unreachable_ms": s.unreachable_for_ms(crate::rt::now_ms()),
                })
            })
            .collect();
        serde_json::json!({
            "servers": self.addrs,
            "streams": self.streams,
            "replicas": self.replicas,
            "epoch": self.epoch,
            "ownership": self.placement.as_ref().map(|p| p.report()),
            "view": self.view.as_ref().map(|v| v.report(crate::rt::now_ms())),
            "lag_bytes": lag_total,
            "shards": shards,
        })
    }

    /// The JetStream configuration of stream `k`.
    pub fn stream_config(&self, k: u32) -> serde_json::Value {
        serde_json::json!({
            "name": stream_name(k),
            "subjects": [format!("{SUBJECT_PREFIX}{k}.*")],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas,
            "discard": "old",
            "duplicate_window": REPLICATE_DEDUPE_WINDOW.as_nanos() as u64,
            "allow_direct": true,
        })
    }

    /// Checks that the last batch of unit `u`'s subject (its `headers`) comes from this data
    /// directory.
    pub fn check_log(&self, u: u16, headers: &[u8]) -> Result<(), Error> {
        match wire::header(headers, HDR_LOG).and_then(|v| v.parse::<i64>().ok()) {
            Some(theirs) if theirs != self.log_id => Err(Error::ForeignLog {
                subject: self.subject(u),
                theirs,
                ours: self.log_id,
            }),
            _ => Ok(()),
        }
    }

    /// Connects (waiting up to `wait` for a server and a JetStream meta leader) and creates the
    /// streams that are missing; refuses streams that exist with other subjects or replicas, and
    /// subjects whose last batch comes from another data directory.
    pub fn prepare(&self, wait: Duration) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + wait;
        let mut client = blocking::Client::connect_until(&self.addrs, deadline)?;
        for k in 0..self.streams {
            let name = stream_name(k);
            loop {
                match client.stream_info(&name) {
                    Ok(info) => {
                        let cfg = &info["config"];
                        let want = self.stream_config(k);
                        if cfg["subjects"] != want["subjects"] {
                            return Err(Error::StreamMismatch {
                                stream: name,
                                reason: format!("has subjects {}", cfg["subjects"]),
                            });
                        }
                        if cfg["num_replicas"] != want["num_replicas"] {
                            return Err(Error::StreamMismatch {
                                stream: name,
                                reason: format!("has {} replicas", cfg["num_replicas"]),
                            });
                        }
                        break;
                    }
                    Err(Error::Api {
                        err_code: 10059, ..
                    }) => match client.stream_create(&self.stream_config(k)) {
                        Ok(_) => {
                            tracing::info!(stream = %name, replicas = self.replicas, "created JetStream stream");
                            break;
                        }
                        Err(e) if std::time::Instant::now() < deadline => {
                            tracing::debug!(stream = %name, error = %e, "stream create: retrying");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Err(e) => return Err(e),
                    },
                    // No meta leader yet (a cluster still forming): 503 / timeouts.
                    Err(e) if std::time::Instant::now() < deadline => {
                        tracing::debug!(stream = %name, error = %e, "stream info: retrying");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if self.placement.is_some() {
            // Units move between nodes: a subject's last batch may be another node's.
            return placement::prepare_bucket(&mut client, self.replicas);
        }
        for u in self.units() {
            let req = serde_json::json!({ "last_by_subj": self.subject(u) });
            if let Some(m) = client.msg_get(&self.stream_of(u), &req)? {
                self.check_log(u, &m.headers)?;
            }
        }
        Ok(())
    }
}

/// The name of stream `k`.
pub fn stream_name(k: u32) -> String {
    format!("{STREAM_PREFIX}{k}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_never_span_two_shards_and_cover_every_vshard() {
        for shards in [1u32, 2, 3, 7, 64] {
            let router = Router::contiguous(shards).unwrap();
            let plan = Plan::new(&router, &["nats://127.0.0.1:4222".into()], 3, 3);
            for v in 0..VSHARDS as u16 {
                let u = plan.unit_of(VShard(v));
                assert!(u <= v && ((v - u) as usize) < REPLICATE_VSHARDS_PER_SUBJECT);
                assert_eq!(
                    router.shard_of_vshard(VShard(u)),
                    router.shard_of_vshard(VShard(v))
                );
            }
            let units: Vec<u16> = plan.units().collect();
            assert!(units.len() >= VSHARDS / REPLICATE_VSHARDS_PER_SUBJECT);
            assert!(units.len() <= VSHARDS / REPLICATE_VSHARDS_PER_SUBJECT + shards as usize);
            // Streams hold ascending vshard ranges.
            let ks: Vec<u32> = units.iter().map(|&u| plan.stream_index(u)).collect();
            assert!(ks.windows(2).all(|w| w[0] <= w[1]) && *ks.last().unwrap() == 2);
        }
        let plan = Plan::new(&Router::contiguous(2).unwrap(), &["h:1".into()], 4, 3);
        assert_eq!(plan.subject(2048), "geobeat.hb.2.2048");
        assert_eq!(plan.msg_id(2048, crate::log::LogPos(4096)), "2048:0:4096");
        assert_eq!(url_addr("nats://127.0.0.2:4222"), "127.0.0.2:4222");
    }
}
