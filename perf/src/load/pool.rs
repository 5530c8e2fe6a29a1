//! Pooled database targets: Redis and PostgreSQL as people use them for this job today, behind
//! a gateway that holds a few connections and funnels every device's heartbeats through them.
//! Devices are pinned to a pool connection (device index mod pool size) so one device's writes
//! stay in order and no two connections write the same rows. Each pool connection drains its
//! queue into one round trip at a time:
//!
//! - **Redis**: per heartbeat `GEOADD last <lon> <lat> <id>` (last location) and
//!   `XADD h:<id> * seq .. lat .. lon .. ts ..` (history), everything queued sent as one pipeline.
//!   Acks go out when Redis has answered the whole pipeline; with `appendfsync always` Redis
//!   answers only after the AOF write and fsync that cover the commands.
//! - **PostgreSQL**, [`PgCommit::Heartbeat`]: one statement — an insert into `history` plus an
//!   upsert of `last` — per heartbeat, each its own transaction, up to `--pipeline-max`
//!   statements pipelined on the connection; acked as each commit returns.
//! - **PostgreSQL**, [`PgCommit::Batch`]: everything queued (up to `--pipeline-max` heartbeats)
//!   in one statement and so one transaction (`unnest` of parameter arrays; the upsert keeps each
//!   device's highest seq).
//!
//! This module owns the workers and the schema; it does not own pacing or statistics.
//! Invariant: a device gets `Reply::Ack(n)` only after the database has confirmed the request
//! that carried seq n (and, the device being pinned to one connection, everything before it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use super::config::{PgCommit, Target};
use crate::frame::Sample;
use crate::reply::Reply;

/// Most requests one pool connection's queue may hold. The queue is sized so that handing over
/// a frame never waits (devices on a connection × frames each may have in flight), like a
/// WebSocket whose socket buffer never fills before the in-flight window does: the device's
/// in-flight cap is what pauses a device, and the pause shows up as latency.
pub const POOL_QUEUE_REQUESTS_MAX: usize = 10_000_000;
/// How long pool workers may go on after the last device has finished before they are dropped
/// (the run is over; what is still queued is counted as unacked by the devices).
pub const POOL_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a pool connection waits for the database's answer before it gives up on a request.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Rejection reason a device sees when the database refused or failed a request.
pub const REASON_BACKEND_ERROR: &str = "backend_error";
/// Rejection reason a device sees when its pool connection never connected.
pub const REASON_BACKEND_UNAVAILABLE: &str = "backend_unavailable";
/// Advisory lock key that serializes schema creation among concurrent load processes.
const SCHEMA_LOCK_KEY: i64 = 0x0067_656f_6265_6174;

/// One frame handed to a pool connection.
#[derive(Debug)]
pub struct PoolRequest {
    /// Device id (database key).
    pub device_id: Arc<str>,
    /// The frame's heartbeats, seq increasing.
    pub samples: Vec<Sample>,
    /// Where the ack (or rejection) goes.
    pub reply: mpsc::Sender<Reply>,
}

impl PoolRequest {
    fn last_seq(&self) -> u64 {
        self.samples.last().map_or(0, |s| s.seq)
    }

    fn ack(&self) {
        // The device's reply channel holds one reply per frame it has in flight, so it is never
        // full; a closed channel means the device has finished and needs no answer.
        let _ = self.reply.try_send(Reply::Ack(self.last_seq()));
    }

    fn reject(&self, reason: &str) {
        let _ = self.reply.try_send(Reply::Rejected {
            seq: None,
            reason: reason.to_owned(),
        });
    }
}

/// What every worker of one run shares.
#[derive(Debug)]
pub struct PoolSettings {
    /// Redis or Postgres.
    pub target: Target,
    /// Connection URL.
    pub url: String,
    /// Most heartbeats per pipeline / batch transaction, or statements in flight.
    pub pipeline_max: usize,
    /// PostgreSQL commit granularity.
    pub pg_commit: PgCommit,
    /// Whether an error has been printed already (one message per process is enough).
    pub error_reported: AtomicBool,
}

impl PoolSettings {
    fn report(&self, message: &str) {
        if !self.error_reported.swap(true, Ordering::Relaxed) {
            eprintln!("geobeat-load: {message} (further backend errors are only counted)");
        }
    }
}

/// Creates the PostgreSQL schema if it is missing (idempotent; safe with concurrent callers).
pub async fn prepare(settings: &PoolSettings) -> Result<(), String> {
    if settings.target != Target::Postgres {
        return Ok(());
    }
    let client = pg_connect(&settings.url).await?;
    // The history index makes per-device history reads possible, as geobeat's per-device
    // back-pointers do; without it the comparison would favour PostgreSQL unfairly.
    let ddl = format!(
        "SELECT pg_advisory_lock({SCHEMA_LOCK_KEY});
         CREATE TABLE IF NOT EXISTS history (
             id text NOT NULL, seq bigint NOT NULL, lat float8 NOT NULL, lon float8 NOT NULL,
             ts bigint NOT NULL, received_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX IF NOT EXISTS history_id_ts ON history (id, ts);
         CREATE TABLE IF NOT EXISTS last (
             id text PRIMARY KEY, lat float8 NOT NULL, lon float8 NOT NULL, ts bigint NOT NULL,
             received_at timestamptz NOT NULL);
         SELECT pg_advisory_unlock({SCHEMA_LOCK_KEY});"
    );
    client
        .batch_execute(&ddl)
        .await
        .map_err(|e| format!("create schema: {e}"))
}

/// Serves one pool connection until every sender of `requests` is gone.
pub async fn run_worker(settings: Arc<PoolSettings>, mut requests: mpsc::Receiver<PoolRequest>) {
    let result = match settings.target {
        Target::Redis => redis_worker(&settings, &mut requests).await,
        Target::Postgres => match settings.pg_commit {
            PgCommit::Heartbeat => pg_heartbeat_worker(&settings, &mut requests).await,
            PgCommit::Batch => pg_batch_worker(&settings, &mut requests).await,
        },
        Target::Ws | Target::Mqtt => unreachable!("only pooled targets run pool workers"),
    };
    if let Err(message) = result {
        settings.report(&message);
        // Answer everything that still comes so devices account for it instead of hanging.
        while let Some(request) = requests.recv().await {
            request.reject(REASON_BACKEND_UNAVAILABLE);
        }
    }
}

/// Waits for the first queued request and takes more, up to `heartbeats_max` heartbeats.
async fn next_batch(
    requests: &mut mpsc::Receiver<PoolRequest>,
    heartbeats_max: usize,
    batch: &mut Vec<PoolRequest>,
) -> bool {
    batch.clear();
    let Some(first) = requests.recv().await else {
        return false;
    };
    let mut heartbeats = first.samples.len();
    batch.push(first);
    while heartbeats < heartbeats_max {
        match requests.try_recv() {
            Ok(request) => {
                heartbeats += request.samples.len();
                batch.push(request);
            }
            Err(_) => break,
        }
    }
    true
}

async fn redis_worker(
    settings: &PoolSettings,
    requests: &mut mpsc::Receiver<PoolRequest>,
) -> Result<(), String> {
    let client = redis::Client::open(settings.url.as_str())
        .map_err(|e| format!("redis url {}: {e}", settings.url))?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("connect to redis {}: {e}", settings.url))?;
    let mut batch = Vec::new();
    let mut stream_key = String::new();
    while next_batch(requests, settings.pipeline_max, &mut batch).await {
        let mut pipe = redis::pipe();
        for request in &batch {
            stream_key.clear();
            stream_key.push_str("h:");
            stream_key.push_str(&request.device_id);
            for s in &request.samples {
                pipe.cmd("GEOADD")
                    .arg("last")
                    .arg(s.lon)
                    .arg(s.lat)
                    .arg(&*request.device_id)
                    .ignore();
                pipe.cmd("XADD")
                    .arg(stream_key.as_str())
                    .arg("*")
                    .arg("seq")
                    .arg(s.seq)
                    .arg("lat")
                    .arg(s.lat)
                    .arg("lon")
                    .arg(s.lon)
                    .arg("ts")
                    .arg(s.ts_ms)
                    .ignore();
            }
        }
        match pipe.query_async::<()>(&mut connection).await {
            Ok(()) => batch.iter().for_each(PoolRequest::ack),
            Err(e) => {
                settings.report(&format!("redis pipeline: {e}"));
                batch.iter().for_each(|r| r.reject(REASON_BACKEND_ERROR));
            }
        }
    }
    Ok(())
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to postgres {url}: {e}"))?;
    tokio::spawn(async move {
        // The connection future ends when the client is dropped or the server goes away; the
        // latter shows up as failed queries.
        let _ = connection.await;
    });
    Ok(client)
}

/// One heartbeat: its history row and its device's last location, one implicit transaction.
const PG_HEARTBEAT_SQL: &str = "WITH h AS (
        INSERT INTO history (id, seq, lat, lon, ts) VALUES ($1, $2, $3, $4, $5))
    INSERT INTO last (id, lat, lon, ts, received_at) VALUES ($1, $3, $4, $5, now())
    ON CONFLICT (id) DO UPDATE SET lat = EXCLUDED.lat, lon = EXCLUDED.lon, ts = EXCLUDED.ts,
        received_at = EXCLUDED.received_at";

/// Many heartbeats in one statement (and one transaction); each device's highest seq wins.
const PG_BATCH_SQL: &str = "WITH b AS (
        SELECT * FROM unnest($1::text[], $2::int8[], $3::float8[], $4::float8[], $5::int8[])
            AS t(id, seq, lat, lon, ts)),
    h AS (INSERT INTO history (id, seq, lat, lon, ts) SELECT id, seq, lat, lon, ts FROM b)
    INSERT INTO last (id, lat, lon, ts, received_at)
    SELECT DISTINCT ON (id) id, lat, lon, ts, now() FROM b ORDER BY id, seq DESC
    ON CONFLICT (id) DO UPDATE SET lat = EXCLUDED.lat, lon = EXCLUDED.lon, ts = EXCLUDED.ts,
        received_at = EXCLUDED.received_at";

async fn pg_heartbeat_worker(
    settings: &PoolSettings,
    requests: &mut mpsc::Receiver<PoolRequest>,
) -> Result<(), String> {
    let client = pg_connect(&settings.url).await?;
    let statement = client
        .prepare(PG_HEARTBEAT_SQL)
        .await
        .map_err(|e| format!("prepare: {e}"))?;
    let client = &client;
    let statement = &statement;
    // Statements in flight, in submission order; each resolves to its request index.
    let mut in_flight = FuturesOrdered::new();
    // Requests whose statements are in flight, with the number of statements still pending.
    let mut waiting: VecDeque<(PoolRequest, usize, bool)> = VecDeque::new();
    let mut statements = 0usize;
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            request = requests.recv(), if open && statements < settings.pipeline_max => {
                let Some(request) = request else {
                    open = false;
                    continue;
                };
                for s in &request.samples {
                    let id = Arc::clone(&request.device_id);
                    let (seq, lat, lon, ts) = (s.seq as i64, s.lat, s.lon, s.ts_ms);
                    in_flight.push_back(async move {
                        client.execute(statement, &[&&*id, &seq, &lat, &lon, &ts]).await
                    });
                    statements += 1;
                }
                let count = request.samples.len();
                waiting.push_back((request, count, true));
            }
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                statements -= 1;
                let front = waiting.front_mut().expect("a statement belongs to a waiting request");
                front.1 -= 1;
                if let Err(e) = result {
                    settings.report(&format!("postgres insert: {e}"));
                    front.2 = false;
                }
                if front.1 == 0 {
                    let (request, _, ok) = waiting.pop_front().expect("front exists");
                    if ok {
                        request.ack();
                    } else {
                        request.reject(REASON_BACKEND_ERROR);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn pg_batch_worker(
    settings: &PoolSettings,
    requests: &mut mpsc::Receiver<PoolRequest>,
) -> Result<(), String> {
    let client = pg_connect(&settings.url).await?;
    let statement = client
        .prepare(PG_BATCH_SQL)
        .await
        .map_err(|e| format!("prepare: {e}"))?;
    let mut batch = Vec::new();
    while next_batch(requests, settings.pipeline_max, &mut batch).await {
        let heartbeats: usize = batch.iter().map(|r| r.samples.len()).sum();
        let mut ids: Vec<&str> = Vec::with_capacity(heartbeats);
        let mut seqs = Vec::with_capacity(heartbeats);
        let mut lats = Vec::with_capacity(heartbeats);
        let mut lons = Vec::with_capacity(heartbeats);
        let mut tss = Vec::with_capacity(heartbeats);
        for request in &batch {
            for s in &request.samples {
                ids.push(&request.device_id);
                seqs.push(s.seq as i64);
                lats.push(s.lat);
                lons.push(s.lon);
                tss.push(s.ts_ms);
            }
        }
        let result = client
            .execute(&statement, &[&ids, &seqs, &lats, &lons, &tss])
            .await;
        match result {
            Ok(_) => batch.iter().for_each(PoolRequest::ack),
            Err(e) => {
                settings.report(&format!("postgres batch: {e}"));
                batch.iter().for_each(|r| r.reject(REASON_BACKEND_ERROR));
            }
        }
    }
    Ok(())
}
