//! Ownership of replication units in a cluster (`--node-id`, `--advertise`; issue 17 item 2):
//! which node is the one writer of each unit, kept in the JetStream KV bucket
//! [`BUCKET`] (`GEOBEAT_PLACEMENT`). It owns the bucket's keys, the liveness rule, the
//! assignment rule, the claims (compare-and-set on the KV revision) and the *fence* a new owner
//! puts on a unit's subject, and [`Placement`], the table every executor reads (which units this
//! node owns, at which epoch; where another unit's devices must go). It does not publish
//! batches, nor decide what a stepped-down unit's heartbeats become (`shard::replicate`), nor
//! answer devices (`net::owner`).
//!
//! Keys: `lease.<node>` holds the node's advertise address, re-put every
//! [`PLACEMENT_LEASE_INTERVAL`]; a node whose lease revision has not moved for
//! [`PLACEMENT_DEAD_AFTER`] (by the observer's own monotonic clock: no wall clocks are compared)
//! is dead (a lease holding [`LEAVING`] is dead at once: a clean shutdown). `claim.<unit>` holds
//! `{"node":..,"epoch":..}`. Assignment: unit number `i` (its rank among the units) belongs to
//! live node `i mod n` over the `n` live node ids in sorted order. A node claims each unit
//! assigned to it that it does not hold (epoch + 1, written with
//! `Nats-Expected-Last-Subject-Sequence` = the revision it read, so of two claimants one wins),
//! then fences the unit's subject with an empty batch (expected last subject sequence = the
//! tail it read), and only then publishes on it. A unit no longer assigned to this node, or
//! whose claim names another node, is released at once (stepped down).
//!
//! Invariant: a unit's epoch only grows; this node publishes on a unit only at the epoch of a
//! claim it won, and only after its fence was stored, so any publish of an earlier owner formed
//! before the fence carries an expected subject sequence the stream no longer has and is
//! refused (error 10071): at most one writer's batches land per subject after a takeover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::blocking::Client;
use super::{Error, Plan};
use crate::limits::{
    PLACEMENT_DEAD_AFTER, PLACEMENT_LEASE_INTERVAL, PLACEMENT_NODES_MAX, REPLICATE_DEDUPE_WINDOW,
    REPLICATE_REQUEST_TIMEOUT, VSHARDS,
};

/// The KV bucket's name.
pub const BUCKET: &str = "GEOBEAT_PLACEMENT";
/// The lease value of a node that shut down cleanly (its units move at once).
pub const LEAVING: &str = "-";
/// Header of a fence: the epoch of the claim it follows.
pub const HDR_EPOCH: &str = "Geobeat-Epoch";
/// Header of a fence and of batches under ownership: the node that published it.
pub const HDR_NODE: &str = "Geobeat-Node";

/// The stream behind the bucket.
pub fn bucket_stream() -> String {
    format!("KV_{BUCKET}")
}

/// The subject of KV key `key`.
pub fn key_subject(key: &str) -> String {
    format!("$KV.{BUCKET}.{key}")
}

/// The stream configuration of the bucket (a JetStream KV bucket: one value per key).
pub fn bucket_config(replicas: u32) -> serde_json::Value {
    serde_json::json!({
        "name": bucket_stream(),
        "subjects": [format!("$KV.{BUCKET}.>")],
        "retention": "limits",
        "max_msgs_per_subject": 1,
        "discard": "new",
        "storage": "file",
        "num_replicas": replicas,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "allow_direct": true,
        "duplicate_window": REPLICATE_DEDUPE_WINDOW.as_nanos() as u64,
    })
}

/// Unit rank `i`'s node among `live` live nodes: `i mod live`.
pub fn assigned(rank: usize, live: usize) -> Option<usize> {
    (live > 0).then(|| rank % live)
}

/// A live node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its id.
    pub id: String,
    /// Its advertise address.
    pub addr: String,
}

/// Where a unit's devices belong now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node owns it (at this epoch): serve here.
    Local(u64),
    /// Another live node is assigned it: redirect there.
    Remote(Node),
    /// Assigned here but not claimed yet, or no placement read yet: retry shortly.
    Pending,
}

/// The live nodes as last read.
#[derive(Debug, Default)]
struct View {
    /// Sorted by id.
    live: Vec<Node>,
}

/// One claim as read from the bucket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    /// The owner.
    pub node: String,
    /// Its epoch.
    pub epoch: u64,
}

/// This node's ownership table (see the module comment), shared by the placement thread (the
/// only writer of claims) and every executor.
#[derive(Debug)]
pub struct Placement {
    /// This node's id.
    pub node_id: String,
    /// Where devices reach this node.
    pub advertise: String,
    /// Units, ascending (a unit's rank is its index here).
    units: Vec<u16>,
    /// Per vshard index of a unit's first vshard: the epoch this node owns it at (0: not owned).
    owned: Vec<AtomicU64>,
    /// Per unit as `owned`: the epoch the shard's replication loop has taken up (read the
    /// unit's stream tail and noted the log position its writes start from). Devices are served
    /// here only once it equals `owned`: a heartbeat appended between a claim and its take-up
    /// would lie before the position the loop publishes from and never be acked.
    adopted: Vec<AtomicU64>,
    /// Live nodes.
    view: RwLock<Arc<View>>,
    /// Whether placement has been read at least once.
    pub ready: AtomicBool,
    /// Units this node stopped writing because its claim was lost or a publish was refused as
    /// stale (`geobeat_ownership_stepdowns_total`).
    pub stepdowns: AtomicU64,
    /// Units taken over (claims won).
    pub claims: AtomicU64,
    /// Wall-clock ms of this node's last stored lease (0: none yet). Read by `/readyz`: a node
    /// whose lease stands still is about to be seen dead by the others.
    pub renewed_ms: AtomicI64,
}

impl Placement {
    /// The table for `plan`'s units, owning nothing yet.
    pub fn new(plan: &Plan, node_id: &str, advertise: &str) -> Placement {
        Placement {
            node_id: node_id.to_string(),
            advertise: advertise.to_string(),
            units: plan.units().collect(),
            owned: (0..VSHARDS).map(|_| AtomicU64::new(0)).collect(),
            adopted: (0..VSHARDS).map(|_| AtomicU64::new(0)).collect(),
            view: RwLock::new(Arc::new(View::default())),
            ready: AtomicBool::new(false),
            stepdowns: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            renewed_ms: AtomicI64::new(0),
        }
    }

    /// The epoch this node owns unit `u` at, 0 if it does not own it.
    pub fn epoch(&self, u: u16) -> u64 {
        self.owned[u as usize].load(Ordering::Acquire)
    }

    /// Units this node owns now and serves (claimed and taken up by its replication loop).
    pub fn owned_count(&self) -> usize {
        self.units.iter().filter(|&&u| self.serving(u) != 0).count()
    }

    /// Records that the replication loop writes unit `u` from `epoch` on (0: no longer).
    pub fn adopt(&self, u: u16, epoch: u64) {
        self.adopted[u as usize].store(epoch, Ordering::Release);
    }

    /// The epoch this node serves unit `u`'s devices at: owned and taken up, else 0.
    pub fn serving(&self, u: u16) -> u64 {
        let e = self.epoch(u);
        if e != 0 && self.adopted[u as usize].load(Ordering::Acquire) == e {
            e
        } else {
            0
        }
    }

    /// Stops writing unit `u` if it is still owned at `epoch` (a publish was refused as stale:
    /// another node fenced it). Counted once.
    pub fn step_down(&self, u: u16, epoch: u64) -> bool {
        let done = self.owned[u as usize]
            .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if done {
            self.stepdowns.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(unit = u, epoch, "stepped down: the unit's subject was fenced by a newer owner; its unacked heartbeats here are not acked");
        }
        done
    }

    /// Where the devices of unit `u` belong now.
    pub fn owner(&self, u: u16) -> Owner {
        let e = self.epoch(u);
        if e != 0 {
            // Claimed: served once the replication loop took the claim up.
            return if self.serving(u) == e {
                Owner::Local(e)
            } else {
                Owner::Pending
            };
        }
        let view = self.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Ok(rank) = self.units.binary_search(&u) else {
            return Owner::Pending;
        };
        match assigned(rank, view.live.len()) {
            Some(i) if view.live[i].id != self.node_id => Owner::Remote(view.live[i].clone()),
            _ => Owner::Pending,
        }
    }

    /// The live nodes as last read.
    pub fn live(&self) -> Vec<Node> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .clone()
    }

    /// How long ago (ms, at `now_ms`) this node last stored its lease; `None` before the first.
    pub fn lease_age_ms(&self, now_ms: i64) -> Option<u64> {
        match self.renewed_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some(now_ms.saturating_sub(at).max(0) as u64),
        }
    }

    /// The ownership section of `/v1/stats`.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "node_id": self.node_id,
            "advertise": self.advertise,
            "live": self.live().iter().map(|n| serde_json::json!({"id": n.id, "addr": n.addr})).collect::<Vec<_>>(),
            "units_owned": self.owned_count(),
            "units": self.units.len(),
            "stepdowns": self.stepdowns.load(Ordering::Relaxed),
            "claims": self.claims.load(Ordering::Relaxed),
        })
    }
}

/// Creates the bucket if it is missing (beside [`Plan::prepare`]).
pub fn prepare_bucket(client: &mut Client, replicas: u32) -> Result<(), Error> {
    let name = bucket_stream();
    match client.stream_info(&name) {
        Ok(_) => Ok(()),
        Err(Error::Api {
            err_code: 10059, ..
        }) => match client.stream_create(&bucket_config(replicas)) {
            Ok(_) => {
                tracing::info!(bucket = BUCKET, replicas, "created the placement bucket");
                Ok(())
            }
            // Another node created it first.
            Err(Error::Api {
                err_code: 10058, ..
            }) => Ok(()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// A JetStream publish through the blocking client: `Ok(seq)` once stored, `Err(Api)` with the
/// refusal (10071: wrong last subject sequence).
fn publish(
    client: &mut Client,
    subject: &str,
    headers: &[(&str, &str)],
    payload: &[u8],
) -> Result<u64, Error> {
    let r = client.request(subject, headers, payload, REPLICATE_REQUEST_TIMEOUT)?;
    let v = r.api_json(subject)?;
    Ok(v["seq"].as_u64().unwrap_or(0))
}

/// The last value of KV key `key` and its revision (`None`: never written).
pub fn kv_get(client: &mut Client, key: &str) -> Result<Option<(u64, Vec<u8>)>, Error> {
    let req = serde_json::json!({ "last_by_subj": key_subject(key) });
    Ok(client
        .msg_get(&bucket_stream(), &req)?
        .map(|m| (m.seq, m.data)))
}

/// The lease keys present (`lease.<node>`), at most [`PLACEMENT_NODES_MAX`].
fn lease_nodes(client: &mut Client) -> Result<Vec<String>, Error> {
    let mut nodes = kv_keys(client, "lease.")?;
    nodes.truncate(PLACEMENT_NODES_MAX);
    Ok(nodes)
}

/// The keys of the bucket that start with `prefix` (`lease.`, `claim.`), without it, sorted.
pub fn kv_keys(client: &mut Client, prefix: &str) -> Result<Vec<String>, Error> {
    let prefix = key_subject(prefix);
    let v = client.api(
        &format!("$JS.API.STREAM.INFO.{}", bucket_stream()),
        &serde_json::json!({ "subjects_filter": format!("{prefix}>") }),
    )?;
    let mut keys: Vec<String> = v["state"]["subjects"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter_map(|s| s.strip_prefix(&prefix).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    Ok(keys)
}

/// The placement thread's state between ticks.
struct Tracker {
    /// Per node: the lease revision last seen, when it last moved (this clock), its address.
    leases: HashMap<String, (u64, Instant, String)>,
    /// When this node's own lease was last stored.
    renewed: Option<Instant>,
}

impl Tracker {
    /// Stores this node's lease (`value`: its advertise address, or [`LEAVING`]). A failure is
    /// the tick's failure: ownership is left as it is, never released because one put timed out.
    fn renew(&mut self, client: &mut Client, p: &Placement, value: &str) -> Result<(), Error> {
        publish(
            client,
            &key_subject(&format!("lease.{}", p.node_id)),
            &[],
            value.as_bytes(),
        )?;
        self.renewed = Some(Instant::now());
        p.renewed_ms.store(crate::rt::now_ms(), Ordering::Release);
        Ok(())
    }

    /// Renews the lease if a lease interval has passed since the last put: a tick that claims
    /// and fences many units (each a fsynced publish on every NATS replica) can outlast
    /// [`PLACEMENT_DEAD_AFTER`] on a loaded machine, and a lease left unmoved that long makes
    /// the other nodes take this node's units, which it then claims back: churn.
    fn keep_alive(&mut self, client: &mut Client, p: &Placement) -> Result<(), Error> {
        if self
            .renewed
            .is_some_and(|at| at.elapsed() < PLACEMENT_LEASE_INTERVAL)
        {
            return Ok(());
        }
        self.renew(client, p, &p.advertise)
    }

    /// Reads every lease and returns the live nodes, sorted by id (this node included: its own
    /// lease was just put).
    fn live(&mut self, client: &mut Client, me: &Node) -> Result<Vec<Node>, Error> {
        let now = Instant::now();
        let mut live = Vec::new();
        for id in lease_nodes(client)? {
            if id == me.id {
                continue;
            }
            let Some((rev, value)) = kv_get(client, &format!("lease.{id}"))? else {
                continue;
            };
            let addr = String::from_utf8_lossy(&value).into_owned();
            let e = self
                .leases
                .entry(id.clone())
                .or_insert((rev, now, addr.clone()));
            if e.0 != rev {
                *e = (rev, now, addr.clone());
            }
            if addr != LEAVING && now.duration_since(e.1) < PLACEMENT_DEAD_AFTER {
                live.push(Node { id, addr });
            }
        }
        live.push(me.clone());
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }
}

/// Puts the fence of unit `u` at `epoch` on its subject: an empty batch whose expected last
/// subject sequence is the tail just read; retried on a moved tail (the old owner's last batch
/// landing first is fine: it was in the stream before the fence).
fn fence(client: &mut Client, plan: &Plan, me: &str, u: u16, epoch: u64) -> Result<(), Error> {
    let subject = plan.subject(u);
    let empty = super::batch::Builder::new();
    for _ in 0..8 {
        let req = serde_json::json!({ "last_by_subj": subject });
        let tail = client
            .msg_get(&plan.stream_of(u), &req)?
            .map_or(0, |m| m.seq);
        let tail_s = tail.to_string();
        let epoch_s = epoch.to_string();
        let id = format!("{u}:{epoch}:fence");
        let log = plan.log_id.to_string();
        let headers = [
            (super::HDR_MSG_ID, id.as_str()),
            (super::HDR_EXPECTED_LAST_SUBJECT_SEQ, tail_s.as_str()),
            (HDR_EPOCH, epoch_s.as_str()),
            (HDR_NODE, me),
            (super::HDR_LOG, log.as_str()),
            (super::HDR_END, "0"),
        ];
        match publish(client, &subject, &headers, empty.bytes()) {
            Ok(_) => return Ok(()),
            Err(Error::Api {
                err_code: super::wire::ERR_WRONG_LAST_SEQUENCE,
                ..
            }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Api {
        subject,
        err_code: super::wire::ERR_WRONG_LAST_SEQUENCE,
        description: "the subject's tail kept moving while fencing".into(),
    })
}

/// One tick: put the lease, read the live nodes, claim what is assigned here, release the rest.
fn tick(
    client: &mut Client,
    plan: &Plan,
    p: &Placement,
    tracker: &mut Tracker,
    leaving: bool,
) -> Result<(), Error> {
    let me = Node {
        id: p.node_id.clone(),
        addr: p.advertise.clone(),
    };
    if leaving {
        return tracker.renew(client, p, LEAVING);
    }
    tracker.renew(client, p, &p.advertise)?;
    let live = tracker.live(client, &me)?;
    *p.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(View { live: live.clone() });
    for (rank, &u) in p.units.iter().enumerate() {
        tracker.keep_alive(client, p)?;
        let mine = assigned(rank, live.len()).is_some_and(|i| live[i].id == p.node_id);
        let held = p.epoch(u);
        let key = format!("claim.{u}");
        let (rev, claim) = match kv_get(client, &key)? {
            Some((rev, data)) => (rev, serde_json::from_slice::<Claim>(&data).ok()),
            None => (0, None),
        };
        let current = claim.as_ref().map_or(0, |c| c.epoch);
        if held != 0 {
            let still = claim
                .as_ref()
                .is_some_and(|c| c.node == p.node_id && c.epoch == held);
            if !still || !mine {
                // Lost (another node claimed it) or moved away (a node joined or came back):
                // stop writing now; the new owner's fence refuses anything already in flight.
                if p.owned[u as usize]
                    .compare_exchange(held, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    p.stepdowns.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(unit = u, epoch = held, lost = !still, "released a unit");
                }
            }
            continue;
        }
        if !mine {
            continue;
        }
        let next = Claim {
            node: p.node_id.clone(),
            epoch: current + 1,
        };
        let rev_s = rev.to_string();
        let body = serde_json::to_vec(&next).expect("a claim serializes");
        match publish(
            client,
            &key_subject(&key),
            &[(super::HDR_EXPECTED_LAST_SUBJECT_SEQ, rev_s.as_str())],
            &body,
        ) {
            Ok(_) => {}
            // Another node claimed it between our read and our write: read again next tick.
            Err(Error::Api {
                err_code: super::wire::ERR_WRONG_LAST_SEQUENCE,
                ..
            }) => continue,
            Err(e) => return Err(e),
        }
        fence(client, plan, &p.node_id, u, next.epoch)?;
        p.owned[u as usize].store(next.epoch, Ordering::Release);
        p.claims.fetch_add(1, Ordering::Relaxed);
        tracing::info!(unit = u, epoch = next.epoch, previous = ?claim.map(|c| c.node), "claimed a unit");
    }
    p.ready.store(true, Ordering::Release);
    Ok(())
}

/// Runs the placement loop on a thread of its own until `stop`; on stop, puts the
/// [`LEAVING`] lease so the other nodes take the units over at once.
pub fn start(
    plan: Arc<Plan>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("geobeat-placement".into())
        .spawn(move || {
            let p = plan
                .placement
                .as_ref()
                .expect("the placement thread runs only with ownership")
                .clone();
            let mut tracker = Tracker {
                leases: HashMap::new(),
                renewed: None,
            };
            let mut client: Option<Client> = None;
            let warn = crate::ratelog::LogEvery::new(Duration::from_secs(5));
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                if client.is_none() {
                    match Client::connect_until(&plan.addrs, Instant::now()) {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            if let Some(n) = warn.check() {
                                tracing::warn!(error = %e, suppressed_since_last = n, "placement: NATS unreachable");
                            }
                        }
                    }
                }
                if let Some(c) = client.as_mut() {
                    if let Err(e) = tick(c, &plan, &p, &mut tracker, false) {
                        if let Some(n) = warn.check() {
                            tracing::warn!(error = %e, suppressed_since_last = n, "placement: tick failed; reconnecting");
                        }
                        client = None;
                    } else if started.elapsed() > 2 * PLACEMENT_LEASE_INTERVAL {
                        // The lease was renewed inside it; slow NATS round trips are worth a line.
                        tracing::info!(took_ms = started.elapsed().as_millis() as u64, "placement: slow tick");
                    }
                }
                let left = PLACEMENT_LEASE_INTERVAL.saturating_sub(started.elapsed());
                let until = Instant::now() + left;
                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50).min(left));
                }
            }
            if let Some(c) = client.as_mut() {
                let _ = tick(c, &plan, &p, &mut tracker, true);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_rank_mod_live_and_spreads_evenly() {
        assert_eq!(assigned(5, 0), None);
        assert_eq!(assigned(5, 3), Some(2));
        let mut per = [0usize; 3];
        for rank in 0..64 {
            per[assigned(rank, 3).unwrap()] += 1;
        }
        assert!(per.iter().all(|&n| (21..=22).contains(&n)));
    }

    #[test]
    fn a_fresh_table_owns_nothing_and_knows_no_owner() {
        let router = crate::route::Router::contiguous(2).unwrap();
        let plan = Plan::new(&router, &["h:1".into()], 1, 1);
        let p = Placement::new(&plan, "a", "127.0.0.1:1");
        assert_eq!(p.owned_count(), 0);
        assert_eq!(p.owner(0), Owner::Pending);
        p.owned[64].store(3, Ordering::Release);
        // Claimed but not yet taken up by the replication loop: devices wait.
        assert_eq!(p.owner(64), Owner::Pending);
        assert_eq!(p.owned_count(), 0);
        p.adopt(64, 3);
        assert_eq!(p.owner(64), Owner::Local(3));
        assert_eq!(p.owned_count(), 1);
        assert!(!p.step_down(64, 2));
        assert!(p.step_down(64, 3));
        assert_eq!(p.stepdowns.load(Ordering::Relaxed), 1);
        *p.view.write().unwrap() = Arc::new(View {
            live: vec![
                Node {
                    id: "a".into(),
                    addr: "x:1".into(),
                },
                Node {
                    id: "b".into(),
                    addr: "y:2".into(),
                },
            ],
        });
        // Rank 1 (unit 64) goes to the second live node.
        assert_eq!(
            p.owner(64),
            Owner::Remote(Node {
                id: "b".into(),
                addr: "y:2".into()
            })
        );
        assert_eq!(p.owner(0), Owner::Pending);
    }
}
