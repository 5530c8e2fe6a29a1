//! The follower of one executor on a cluster node (issue 17 item 3; an `impl Core` block like
//! the replication loop): it follows, on a NATS connection of its own, the subjects of the
//! units of this executor's shards, with one ephemeral JetStream pull consumer per stream
//! (`replicate::follow`), and applies every entry another node wrote to the shard's cluster
//! view (`table::view`), feeding subscriptions (`subscribe::Fanout`) as local appends do. It
//! skips fences (empty batches) and batches this node wrote itself (their `Geobeat-Log` is this
//! data directory's: those entries are in the local table already). It does not publish, own
//! units, or answer queries.
//!
//! Why no cross-executor hop: units never span two shards and every node has the same routing
//! table, so filtering each executor's consumers by its own units' subjects delivers every
//! entry to the executor that owns its device's shard.
//!
//! Backpressure: at most one pull per stream is outstanding, each for at most
//! `VIEW_PULL_BATCH_MAX` messages and `VIEW_PULL_BYTES_MAX` bytes, and the next pull is sent
//! only when the previous one ended; a message is applied on arrival, on this executor, before
//! the next is read. A view that cannot keep up therefore stops pulling and the lag grows in
//! JetStream (`pending`, shown in `/v1/stats` and metrics): nothing is buffered without bound,
//! nothing dropped silently (damaged batches and refused devices are logged and counted).
//!
//! Invariant: per stream, messages are applied in stream order, each at most once per
//! consumer; a recreated consumer starts just past the last applied sequence.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::limits::{
    REPLICATE_RETRY_BACKOFF, VIEW_PULL_BATCH_MAX, VIEW_PULL_EXPIRES, VIEW_PULL_GRACE,
};
use crate::log::LogPos;
use crate::replicate::conn::{Conn, Delivered};
use crate::replicate::follow::{self, Delivery, FollowStatus};
use crate::replicate::{self, wire, Plan};
use crate::route::VShard;
use crate::rt;
use crate::shard::core::Core;
use crate::store::Appended;
use crate::table::view::view_wins;

/// One stream this executor follows.
struct Followed {
    /// Stream index.
    k: usize,
    /// Stream name.
    stream: String,
    /// The subjects of this executor's units in it.
    subjects: Vec<String>,
    /// The consumer's name on the current connection (`None`: to be created).
    consumer: Option<String>,
    /// Number of the outstanding pull (its inbox is `<inbox>.<k>.<pull>`), 0: none.
    pull: u64,
    /// Messages the outstanding pull delivered so far.
    delivered: usize,
    /// When the outstanding pull is overdue (expiry plus grace).
    due: Instant,
    /// Consecutive pulls that passed `due` without any answer.
    overdue: u32,
}

/// Why the follower reconnects.
#[derive(Debug)]
enum Restart {
    /// The connection failed.
    Nats(replicate::Error),
    /// A consumer vanished (server restart, leader change): recreate it.
    ConsumerGone(String),
    /// Pulls went unanswered past their expiry twice: the connection is presumed dead.
    Silent,
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::Nats(e) => write!(f, "{e}"),
            Restart::ConsumerGone(why) => write!(f, "consumer gone: {why}"),
            Restart::Silent => write!(f, "pulls unanswered past their expiry"),
        }
    }
}

impl Core {
    fn follow_plan(&self) -> &Plan {
        self.shared
            .replication
            .as_deref()
            .expect("the follower runs only with a plan")
    }

    fn follow_status(&self) -> &FollowStatus {
        self.follow_plan()
            .view
            .as_ref()
            .expect("the follower runs only with a view")
    }

    /// The streams this executor follows and their subjects.
    fn followed_streams(&self) -> Vec<Followed> {
        let plan = self.follow_plan();
        let mut out: Vec<Followed> = Vec::new();
        for u in plan.units() {
            let shard = self.shared.router.shard_of_vshard(VShard(u));
            if self.owner(shard) != self.index {
                continue;
            }
            let k = plan.stream_index(u) as usize;
            let subject = plan.subject(u);
            match out.iter_mut().find(|f| f.k == k) {
                Some(f) => f.subjects.push(subject),
                None => out.push(Followed {
                    k,
                    stream: replicate::stream_name(k as u32),
                    subjects: vec![subject],
                    consumer: None,
                    pull: 0,
                    delivered: 0,
                    due: Instant::now(),
                    overdue: 0,
                }),
            }
        }
        out
    }

    /// Follows the streams until shutdown (see the module comment).
    pub async fn follow_loop(self: Rc<Self>) {
        let mut streams = self.followed_streams();
        if streams.is_empty() {
            return;
        }
        let status = self.follow_status();
        for f in &streams {
            status
                .progress(self.index.0, f.k)
                .following
                .store(true, Ordering::Release);
        }
        let addrs = self.follow_plan().addrs.clone();
        let name = format!("geobeat-view-{}", self.index.0);
        // Start on another server than the replication loop's first choice.
        let mut next_addr = self.index.0 + 1;
        let warn = crate::ratelog::LogEvery::new(Duration::from_secs(5));
        while !self.stopping() {
            let mut conn = match Conn::connect(&addrs, next_addr, &name).await {
                Ok(c) => c,
                Err(e) => {
                    if let Some(n) = warn.check() {
                        tracing::warn!(executor = self.index.0, error = %e, suppressed_since_last = n, "view: NATS unreachable; the view lags");
                    }
                    next_addr += 1;
                    rt::sleep(REPLICATE_RETRY_BACKOFF).await;
                    continue;
                }
            };
            for f in streams.iter_mut() {
                f.consumer = None;
                f.pull = 0;
                f.overdue = 0;
            }
            let why = self.follow_on(&mut conn, &mut streams).await;
            if self.stopping() {
                return;
            }
            if let Some(n) = warn.check() {
                tracing::warn!(executor = self.index.0, server = conn.addr(), reason = %why, suppressed_since_last = n, "view: following again");
            }
            next_addr += 1;
            rt::sleep(REPLICATE_RETRY_BACKOFF).await;
        }
    }

    /// Creates the consumers and pulls on one connection until it fails or shutdown.
    async fn follow_on(&self, conn: &mut Conn, streams: &mut [Followed]) -> Restart {
        let status = self.follow_status();
        for f in streams.iter_mut() {
            let p = status.progress(self.index.0, f.k);
            let after = p.applied.load(Ordering::Acquire);
            let req = follow::consumer_config(&f.stream, &f.subjects, after);
            match conn
                .api(&format!("$JS.API.CONSUMER.CREATE.{}", f.stream), &req)
                .await
            {
                Ok(v) => {
                    let Some(name) = v["name"].as_str() else {
                        return Restart::ConsumerGone(format!("no name in {v}"));
                    };
                    f.consumer = Some(name.to_string());
                    p.pending
                        .store(v["num_pending"].as_u64().unwrap_or(0), Ordering::Release);
                    status.consumers_created.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(executor = self.index.0, stream = %f.stream, consumer = name, after, "view: consumer created");
                }
                Err(e) => return Restart::Nats(e),
            }
        }
        for f in streams.iter_mut() {
            if let Err(e) = self.send_pull(conn, f).await {
                return Restart::Nats(e);
            }
        }
        let inbox = conn.inbox().to_string();
        let warn = crate::ratelog::LogEvery::new(Duration::from_secs(5));
        loop {
            if self.stopping() {
                return Restart::Silent;
            }
            let deadline = streams
                .iter()
                .map(|f| f.due)
                .min()
                .expect("at least one stream")
                .min(Instant::now() + crate::limits::STOP_POLL_INTERVAL * 25);
            let got = match conn.next_delivered(deadline).await {
                Ok(g) => g,
                Err(e) => return Restart::Nats(e),
            };
            let Some(m) = got else {
                // A pull overdue: re-pull once; twice in a row means the connection is dead.
                let now = Instant::now();
                for f in streams.iter_mut().filter(|f| f.due <= now) {
                    f.overdue += 1;
                    if f.overdue >= 2 {
                        return Restart::Silent;
                    }
                    if let Err(e) = self.send_pull(conn, f).await {
                        return Restart::Nats(e);
                    }
                }
                continue;
            };
            // A pulled message arrives on its own subject (its reply subject names its
            // stream); a pull's status on the pull's inbox, `<inbox>.<k>.<pull>`.
            let Some(rest) = m
                .subject
                .strip_prefix(&inbox)
                .and_then(|r| r.strip_prefix('.'))
            else {
                let Some(d) = m.reply.as_deref().and_then(Delivery::parse) else {
                    if let Some(n) = warn.check() {
                        tracing::warn!(executor = self.index.0, subject = %m.subject, reply = ?m.reply, suppressed_since_last = n, "view: a message without JetStream delivery info; skipped");
                    }
                    continue;
                };
                let Some(f) = streams.iter_mut().find(|f| f.stream == d.stream) else {
                    continue;
                };
                f.overdue = 0;
                self.apply_delivered(f, &m, &d);
                f.delivered += 1;
                if f.delivered >= VIEW_PULL_BATCH_MAX {
                    if let Err(e) = self.send_pull(conn, f).await {
                        return Restart::Nats(e);
                    }
                }
                rt::yield_if_needed().await;
                continue;
            };
            let Some((k, pull)) = rest
                .split_once('.')
                .and_then(|(k, p)| Some((k.parse::<usize>().ok()?, p.parse::<u64>().ok()?)))
            else {
                continue;
            };
            let Some(f) = streams.iter_mut().find(|f| f.k == k) else {
                continue;
            };
            f.overdue = 0;
            let code = m.headers.as_deref().and_then(wire::status);
            match code {
                // Idle heartbeat / flow control: nothing to do.
                Some(100) => continue,
                // The pull ended (no messages, expired, batch or bytes complete): pull again.
                Some(404 | 408 | 409 | 503) if pull == f.pull => {
                    let text = String::from_utf8_lossy(m.headers.as_deref().unwrap_or_default())
                        .into_owned();
                    // No responders: the consumer (one replica, in memory) went with its server;
                    // a deleted consumer says so. Recreate it past what was applied.
                    if code == Some(503) || (code == Some(409) && text.contains("Deleted")) {
                        return Restart::ConsumerGone(text);
                    }
                    if let Err(e) = self.send_pull(conn, f).await {
                        return Restart::Nats(e);
                    }
                    continue;
                }
                Some(c) => {
                    if pull == f.pull {
                        let text =
                            String::from_utf8_lossy(m.headers.as_deref().unwrap_or_default())
                                .into_owned();
                        if let Some(n) = warn.check() {
                            tracing::warn!(executor = self.index.0, stream = %f.stream, status = c, text = %text.trim(), suppressed_since_last = n, "view: a pull was refused; pulling again");
                        }
                        rt::sleep(REPLICATE_RETRY_BACKOFF).await;
                        if let Err(e) = self.send_pull(conn, f).await {
                            return Restart::Nats(e);
                        }
                    }
                    continue;
                }
                None => {}
            }
            // Anything else on the inbox (a late API reply) is not the follower's.
        }
    }

    async fn send_pull(&self, conn: &mut Conn, f: &mut Followed) -> Result<(), replicate::Error> {
        let consumer = f.consumer.as_deref().expect("pulls follow the consumer");
        f.pull += 1;
        f.delivered = 0;
        f.due = Instant::now() + VIEW_PULL_EXPIRES + VIEW_PULL_GRACE;
        let reply = format!("{}.{}.{}", conn.inbox(), f.k, f.pull);
        let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{consumer}", f.stream);
        conn.send(
            &subject,
            &reply,
            follow::pull_request().to_string().as_bytes(),
        )
        .await
    }

    /// Applies one pulled message (a batch) and records the progress.
    fn apply_delivered(&self, f: &Followed, m: &Delivered, d: &Delivery) {
        let status = self.follow_status();
        let p = status.progress(self.index.0, f.k);
        if d.stream_seq <= p.applied.load(Ordering::Acquire) {
            // A redelivery after a consumer was recreated: applied already.
            return;
        }
        self.apply_batch(f, m, status);
        p.applied.store(d.stream_seq, Ordering::Release);
        p.applied_ts_ms
            .store(d.ts_ns / 1_000_000, Ordering::Release);
        p.pending.store(d.pending, Ordering::Release);
    }

    fn apply_batch(&self, f: &Followed, m: &Delivered, status: &FollowStatus) {
        let plan = self.follow_plan();
        let headers = m.headers.as_deref().unwrap_or_default();
        let log = wire::header(headers, replicate::HDR_LOG).and_then(|v| v.parse::<i64>().ok());
        if log == Some(plan.log_id) {
            status.skipped_own.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let entries = match replicate::batch::decode(&m.payload) {
            Ok(e) => e,
            Err(e) => {
                status.damaged.fetch_add(1, Ordering::Relaxed);
                tracing::error!(executor = self.index.0, stream = %f.stream, error = %e, reply = ?m.reply, "view: a batch in the stream failed its checks; its entries are not in the view");
                return;
            }
        };
        if entries.is_empty() {
            status.skipped_fences.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for e in &entries {
            self.apply_followed(&e.hb, status);
        }
        if self.fanout.active() {
            // Followed heartbeats are durable (in the streams): their events, queued at
            // position 0, leave now, in order behind any local event still pending.
            for (local, slot) in self.stores.iter().enumerate() {
                let durable = slot.store.borrow().durable().max(LogPos(1));
                self.fanout.durable(local, durable);
            }
        }
    }

    /// Applies one heartbeat another node wrote to its shard's view, and feeds subscriptions.
    fn apply_followed(&self, hb: &crate::record::Heartbeat, status: &FollowStatus) {
        let shard = self.shared.router.shard_of(&hb.device_id);
        let (exec, local) = self.shared.owner(shard);
        if exec != self.index {
            // Only a node with another routing table (another --shards) can publish this.
            status.refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(executor = self.index.0, device = %hb.device_id, "view: a followed heartbeat routes to another executor's shard (do all nodes use the same --shards?); not applied");
            return;
        }
        let slot = &self.stores[local];
        let store = slot.store.borrow();
        let mut view = slot.view.borrow_mut();
        let local_last = store.last(&hb.device_id);
        let observed = match view.observe(hb) {
            Ok(o) => o,
            Err(e) => {
                status.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(executor = self.index.0, shard = %shard, error = %e, device = %hb.device_id, "view: device refused");
                return;
            }
        };
        status.applied_entries.fetch_add(1, Ordering::Relaxed);
        if !self.fanout.active() {
            return;
        }
        // The device's last location before this heartbeat, across the local table and the
        // view, and whether this heartbeat is now its last.
        let prev_view = observed.prev;
        let prev = match (local_last, prev_view) {
            (Some(l), Some((lat, lon, ts, rcv))) => {
                if (ts, rcv) > (l.ts_ms, l.received_ms) {
                    Some((lat, lon))
                } else {
                    Some((l.lat, l.lon))
                }
            }
            (Some(l), None) => Some((l.lat, l.lon)),
            (None, Some((lat, lon, _, _))) => Some((lat, lon)),
            (None, None) => None,
        };
        let became_last = observed.became_last && view_wins(local_last.as_ref(), hb);
        self.fanout.poll_fences();
        self.fanout.on_append(
            local,
            hb,
            &Appended {
                pos: LogPos(0),
                prev_last: prev,
                became_last,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_append_after_a_takeover_starts_its_transitions_at_the_views_location() {
        let hb = crate::record::Heartbeat {
            device_id: "d".into(),
            lat: 3.0,
            lon: 4.0,
            ts_ms: 100,
            received_ms: 100,
            ..Default::default()
        };
        let first_here = Appended {
            pos: LogPos(64),
            prev_last: None,
            became_last: true,
        };
        // No view entry newer than the local table: unchanged.
        assert_eq!(first_here.with_view(None, &hb), first_here);
        // The view knew the device at (1, 2), older: transitions start there.
        let a = first_here.with_view(Some((1.0, 2.0, 90, 95)), &hb);
        assert_eq!((a.prev_last, a.became_last), (Some((1.0, 2.0)), true));
        // The view's entry is newer: this heartbeat is late, no transition.
        let a = first_here.with_view(Some((1.0, 2.0, 150, 160)), &hb);
        assert_eq!((a.prev_last, a.became_last), (Some((1.0, 2.0)), false));
    }
}
