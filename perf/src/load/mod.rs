//! The fleet simulator (`geobeat-load`): many devices sending heartbeats in closed loop
//! (saturation) or open loop (fixed rate, latency from intended send times) to geobeat or the
//! null server (one WebSocket each) or to the systems people use instead (an MQTT broker, Redis,
//! PostgreSQL; see [`link`]). This module owns running a [`Plan`] on tokio runtimes inside one
//! process ([`run`]) and splitting a run over child processes and merging their summaries
//! ([`run_processes`]); flags live in [`config`], the per-device loop in [`device`], transports
//! in [`link`], [`mqtt`] and [`pool`] (TLS under WebSocket and MQTT in [`tls`]). Invariant: every process of a run shares one start time,
//! ramp and measured window, so merged counters and histograms describe one interval.

pub mod config;
pub mod device;
pub mod link;
pub mod mqtt;
pub mod pool;
pub mod report;
pub mod tls;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::inflight::open_period;
use crate::stats::{ShardedStats, Summary, SummaryError};
use crate::sys::{cpu_times, Who};
pub use config::{LoadArgs, Mode, PgCommit, Plan, RuntimeKind, Target};
use pool::{PoolSettings, POOL_QUEUE_REQUESTS_MAX, POOL_SHUTDOWN_GRACE};

/// Time children get to start before the shared run start.
const CHILD_START_MS: u64 = 1000;

/// Why a load run (or one connection of it) failed.
#[derive(Debug, Error)]
pub enum LoadError {
    /// TCP connect or socket option failed.
    #[error("tcp: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed (wss://, mqtts://).
    #[error("tls: {0}")]
    Tls(std::io::Error),
    /// The WebSocket upgrade failed (includes HTTP 401 and other non-101 answers).
    #[error("upgrade: {0}")]
    Upgrade(Box<tungstenite::Error>),
    /// Connect plus upgrade took longer than `--connect-timeout`.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The MQTT broker refused or broke the connection handshake.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// The Redis/PostgreSQL pool could not be prepared (e.g. the schema could not be created).
    #[error("backend: {0}")]
    Backend(String),
    /// The token contains characters not allowed in an HTTP header.
    #[error("token is not a valid HTTP header value")]
    TokenHeader,
    /// A tokio runtime could not be built.
    #[error("cannot build tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// A runtime thread panicked.
    #[error("runtime thread {thread} panicked")]
    ThreadPanicked {
        /// Index of the thread.
        thread: usize,
    },
    /// A child process could not be started or waited for.
    #[error("child process {index}: {source}")]
    Child {
        /// Child index.
        index: usize,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A child process exited without a summary line or with a failure status.
    #[error("child process {index} failed: {detail}")]
    ChildFailed {
        /// Child index.
        index: usize,
        /// Exit status or parse problem.
        detail: String,
    },
    /// Child summaries could not be merged.
    #[error(transparent)]
    Summary(#[from] SummaryError),
}

/// Runs `plan` inside this process and returns its summary (with histogram).
pub fn run(plan: Plan) -> Result<Summary, LoadError> {
    let cpu_before = cpu_times(Who::SelfProcess);
    let now_instant = Instant::now();
    let now_ms = config::unix_ms_now();
    let t0 = now_instant + Duration::from_millis(plan.t0_unix_ms.saturating_sub(now_ms));
    let measure_start = t0 + plan.measure_offset();
    let measure_end = measure_start + plan.duration;
    let drain_end = measure_end + plan.drain;
    let open_period = plan
        .rate_per_s
        .map(|rate| open_period(rate, plan.devices, plan.args.batch));
    let threads = plan.threads;
    let runtime_kind = plan.args.runtime;
    let devices = plan.devices;
    let measured_s = plan.duration.as_secs_f64();
    let (pool_runtime, pool_workers, pool) = start_pool(&plan)?;
    let shared = Arc::new(device::Shared {
        stats: ShardedStats::new(threads),
        t0,
        measure_start,
        measure_end,
        drain_end,
        open_period,
        ws_config: device::client_ws_config(),
        connect_error_reported: AtomicBool::new(false),
        pool,
        plan,
    });
    match runtime_kind {
        RuntimeKind::PerThread => {
            let mut handles = Vec::with_capacity(threads);
            for thread in 0..threads {
                let shared = Arc::clone(&shared);
                let handle = std::thread::Builder::new()
                    .name(format!("load-{thread}"))
                    .spawn(move || -> Result<(), LoadError> {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(LoadError::Runtime)?;
                        runtime.block_on(async move {
                            let mut tasks = JoinSet::new();
                            for local in (thread..devices).step_by(threads) {
                                tasks.spawn(device::run_device(Arc::clone(&shared), local));
                            }
                            while tasks.join_next().await.is_some() {}
                        });
                        Ok(())
                    })
                    .map_err(LoadError::Runtime)?;
                handles.push(handle);
            }
            for (thread, handle) in handles.into_iter().enumerate() {
                handle
                    .join()
                    .map_err(|_| LoadError::ThreadPanicked { thread })??;
            }
        }
        RuntimeKind::Multi => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .map_err(LoadError::Runtime)?;
            let shared_for_tasks = Arc::clone(&shared);
            runtime.block_on(async move {
                let mut tasks = JoinSet::new();
                for local in 0..devices {
                    tasks.spawn(device::run_device(Arc::clone(&shared_for_tasks), local));
                }
                while tasks.join_next().await.is_some() {}
            });
        }
    }
    let stats = shared.stats.merged();
    // Every device task is done: dropping the last `Shared` closes the pool queues, so the
    // workers finish what is queued and end; an overloaded database may still have a backlog
    // that no device waits for any more, so they get a short grace period and are then dropped.
    drop(shared);
    if let Some(runtime) = pool_runtime {
        runtime.block_on(async {
            let _ = tokio::time::timeout(POOL_SHUTDOWN_GRACE, async {
                for worker in pool_workers {
                    let _ = worker.await;
                }
            })
            .await;
        });
        runtime.shutdown_timeout(POOL_SHUTDOWN_GRACE);
    }
    let cpu = cpu_times(Who::SelfProcess).minus(&cpu_before);
    Ok(Summary::from_stats(&stats, measured_s, cpu))
}

/// Pool runtime, its worker tasks and the queues devices send into.
type PoolParts = (
    Option<tokio::runtime::Runtime>,
    Vec<tokio::task::JoinHandle<()>>,
    Option<Vec<mpsc::Sender<pool::PoolRequest>>>,
);

/// For Redis and PostgreSQL: prepares the schema and starts one worker per pool connection on a
/// runtime of their own (so they outlive whichever device thread finishes first).
fn start_pool(plan: &Plan) -> Result<PoolParts, LoadError> {
    if !plan.target.is_pooled() {
        return Ok((None, Vec::new(), None));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.threads)
        .thread_name("load-pool")
        .enable_all()
        .build()
        .map_err(LoadError::Runtime)?;
    let settings = Arc::new(PoolSettings {
        target: plan.target,
        url: plan.args.url.clone(),
        pipeline_max: plan.args.pipeline_max,
        pg_commit: plan.args.pg_commit,
        error_reported: AtomicBool::new(false),
    });
    runtime
        .block_on(pool::prepare(&settings))
        .map_err(LoadError::Backend)?;
    let mut workers = Vec::with_capacity(plan.args.backend_connections);
    let mut senders = Vec::with_capacity(plan.args.backend_connections);
    for _ in 0..plan.args.backend_connections {
        let frames_per_device = plan.inflight_max.div_ceil(plan.args.batch);
        let devices_per_connection = plan.devices.div_ceil(plan.args.backend_connections);
        let capacity =
            (devices_per_connection * frames_per_device).clamp(1, POOL_QUEUE_REQUESTS_MAX);
        let (tx, rx) = mpsc::channel(capacity);
        workers.push(runtime.spawn(pool::run_worker(Arc::clone(&settings), rx)));
        senders.push(tx);
    }
    Ok((Some(runtime), workers, Some(senders)))
}

/// Runs `plan` over `--processes` child copies of the current executable (started with
/// `argv` plus each child's share) and merges their summaries. With one process, runs in-process.
pub fn run_processes(mut plan: Plan, argv: &[String]) -> Result<Summary, LoadError> {
    let count = plan.args.processes;
    if count <= 1 {
        return run(plan);
    }
    let cpu_before = cpu_times(Who::SelfProcess);
    plan.t0_unix_ms = config::unix_ms_now() + CHILD_START_MS;
    let exe = std::env::current_exe().map_err(|source| LoadError::Child { index: 0, source })?;
    let mut children = Vec::with_capacity(count);
    for index in 0..count {
        let args = plan.child_args(argv, index, count);
        let child = Command::new(&exe)
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| LoadError::Child { index, source })?;
        children.push(child);
    }
    // Read every child's stdout on its own thread so no child blocks on a full pipe.
    let mut readers = Vec::with_capacity(count);
    for (index, child) in children.iter_mut().enumerate() {
        let stdout = child.stdout.take().expect("stdout was piped");
        readers.push(std::thread::spawn(move || -> Result<Summary, LoadError> {
            let mut found = None;
            for line in BufReader::new(stdout).lines() {
                let line = line.map_err(|source| LoadError::Child { index, source })?;
                match Summary::from_line(&line) {
                    Some(parsed) => found = Some(parsed?),
                    None => println!("{line}"),
                }
            }
            found.ok_or(LoadError::ChildFailed {
                index,
                detail: "no summary line on stdout".into(),
            })
        }));
    }
    let mut parts = Vec::with_capacity(count);
    let mut first_error = None;
    for (index, (mut child, reader)) in children.into_iter().zip(readers).enumerate() {
        let status = child
            .wait()
            .map_err(|source| LoadError::Child { index, source })?;
        let summary = reader.join().map_err(|_| LoadError::ChildFailed {
            index,
            detail: "reader panicked".into(),
        })?;
        match (status.success(), summary) {
            (true, Ok(summary)) => parts.push(summary),
            (false, _) => {
                first_error.get_or_insert(LoadError::ChildFailed {
                    index,
                    detail: format!("exited with {status}"),
                });
            }
            (true, Err(e)) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let parent_cpu = cpu_times(Who::SelfProcess).minus(&cpu_before);
    Ok(Summary::merge(&parts, parent_cpu)?)
}
