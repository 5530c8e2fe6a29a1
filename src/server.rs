//! `geobeat serve`: the thread-per-core server, top to bottom in one file. It owns startup and
//! shutdown: it checks the platform ([`crate::preflight`]) and the listen addresses before
//! touching anything, opens the data directory (refusing one open to others), starts one pinned
//! executor per core (each accepting on the same port through SO_REUSEPORT), builds the
//! cross-executor meshes, spawns every long-lived task of an executor (the commit and retention
//! loops, the mesh receive loops that dispatch messages to the shard core and the network edge,
//! the listeners), and turns SIGTERM/SIGINT into an orderly drain. What an executor does is
//! below it: the shard core ([`crate::shard`]) and the network edge ([`crate::net`]); only
//! connections spawn their own tasks (a connection's writer).
//!
//! Ownership: logical shard `k` (fixed for the data directory) lives on executor `k % executors`.
//! A data directory created with 4 shards opens fine on a 2-core machine (two shards per
//! executor) or a 16-core one (some executors own none and only accept and forward).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ServeConfig;
use crate::datadir::DataDir;
use crate::limits::{FANOUT_MISSED_FLUSH_INTERVAL, SHUTDOWN_DRAIN_MAX, STOP_POLL_INTERVAL};
use crate::net::edge::{Edge, Handoff, Role};
use crate::node::{ExecutorId, Shared};
use crate::route::ShardId;
use crate::rt;
use crate::shard::core::Core;
use crate::shard::mesh::Meshes;

/// Why `serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be opened or created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        source: crate::datadir::DataDirError,
    },
    /// The data directory has no meta file and `--init` was not given.
    #[error(
        "data directory {}: no geobeat.meta there; if this is the first start, add --init \
         (creates the directory and a new secret); if it held data (removed, or a volume not \
         mounted), restore it: geobeat does not silently start over",
        .0.display()
    )]
    NotInitialized(std::path::PathBuf),
    /// The token secret could not be loaded or created.
    #[error("secret: {0}")]
    Secret(String),
    /// The geofences file could not be read.
    #[error("geofences: {0}")]
    Fences(crate::fence::FenceError),
    /// The revocation list could not be read (a server does not start without it).
    #[error("{0}")]
    Revocations(crate::revoke::Error),
    /// The storage sinks could not be started.
    #[error("sinks: {0}")]
    Sinks(String),
    /// `--durability replicated` could not reach NATS JetStream or set up its streams.
    #[error("replicated durability: {0} (geobeat refuses to start without the streams; see docs/cluster.md)")]
    Replication(crate::replicate::Error),
    /// A listen address could not be bound (in use, not local, not permitted).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate, key or client CA could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::net::tls::TlsError),
    /// The platform cannot run geobeat (io_uring blocked, locked-memory limit too low).
    #[error("{0}")]
    Platform(#[from] crate::preflight::PreflightError),
    /// An executor failed to start, or a shard failed to open.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The one info line that says the server is up: what it listens on and where the data is.
/// Logged by the last executor to start accepting.
pub fn announce_listening(shared: &Shared) {
    let addr = shared
        .local_addr
        .get()
        .copied()
        .unwrap_or(shared.cfg.listen);
    let metrics = match shared.cfg.metrics_listen {
        Some(m) => format!("http://{m}/metrics"),
        None => format!("http://{addr}/metrics"),
    };
    tracing::info!(
        listen = %addr,
        metrics = %metrics,
        data_dir = %shared.cfg.data_dir.display(),
        "listening: devices ws://{addr}/v1/ingest, HTTP API http://{addr}, metrics {metrics}; data in {}",
        shared.cfg.data_dir.display()
    );
}

/// Binds `addr` with the options the executors' listeners use (SO_REUSEADDR, SO_REUSEPORT) and
/// lets it go again: the address actually bound (a concrete port for port 0), or an error that
/// names the address.
///
/// SO_REUSEPORT lets a second process of the same user bind an address a live geobeat listens
/// on (and silently take half its connections), so a configured port is first tried with a
/// connection: an answer that persists for `LISTEN_PROBE_WAIT_MS` means the address is in use.
/// A predecessor killed a moment ago answers only briefly (its listening socket outlives the
/// process by a few ms), and its connections (TIME_WAIT, FIN_WAIT) answer nothing, so a
/// supervisor's immediate restart binds. See: issue 13 §7a.
fn probe_bind(addr: SocketAddr) -> Result<SocketAddr, ServeError> {
    let listen = |source| ServeError::Listen { addr, source };
    if addr.port() != 0 {
        let target = match addr.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            }
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
            }
            _ => addr,
        };
        let wait = std::time::Duration::from_millis(crate::limits::LISTEN_PROBE_CONNECT_TIMEOUT_MS);
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_millis(crate::limits::LISTEN_PROBE_WAIT_MS);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect_timeout(&target, wait).is_ok() {
            if std::time::Instant::now() >= deadline {
                return Err(listen(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "address in use: another process is listening there",
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::debug!(waited_ms = started.elapsed().as_millis() as u64, %addr, "listen address free");
    }
    let probe = rt::bind_std(addr).map_err(listen)?;
    probe.local_addr().map_err(listen)
}

/// Runs the server until SIGTERM/SIGINT (or until `stop` is set) and returns after an orderly
/// drain: every heartbeat already received is made durable and acked before connections close.
pub fn run(mut cfg: ServeConfig, stop: Option<Arc<AtomicBool>>) -> Result<(), ServeError> {
    // The platform first (io_uring allowed, locked memory), then the addresses: a server that
    // cannot run leaves nothing behind in its data directory. See: issue 13 §4.
    crate::preflight::check()?;
    // Bind once up front so a port of 0 resolves to one concrete port every executor shares,
    // and an address in use fails before any executor starts or any file is created.
    let addr = probe_bind(cfg.listen)?;
    if let Some(metrics) = cfg.metrics_listen {
        probe_bind(metrics)?;
    }
    // Every executor accepts OsmAnd requests on the same concrete port (SO_REUSEPORT).
    if let Some(osmand) = cfg.osmand_listen {
        cfg.osmand_listen = Some(probe_bind(osmand)?);
    }
    // MQTT (`--mqtt-listen`): resolved the same way, so every executor binds one concrete port.
    if let Some(mqtt) = cfg.mqtt_listen {
        // Its default (1883) is the port a local MQTT broker uses: say how to move or drop it.
        let resolved = probe_bind(mqtt).map_err(|e| match e {
            ServeError::Listen { addr, source } => ServeError::Listen {
                addr,
                source: std::io::Error::new(
                    source.kind(),
                    format!("{source} (the MQTT listener: pass --mqtt-listen ADDR, or off)"),
                ),
            },
            other => other,
        })?;
        cfg.mqtt_listen = Some(resolved);
    }
    // TLS: the listeners resolved like the others, the files loaded before anything is created
    // (a missing or mismatched certificate is one clear line and a non-zero exit).
    if let Some(a) = cfg.tls_listen {
        cfg.tls_listen = Some(probe_bind(a)?);
    }
    if let Some(a) = cfg.mqtts_listen {
        cfg.mqtts_listen = Some(probe_bind(a)?);
    }
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) if cfg.tls_listen.is_some() || cfg.mqtts_listen.is_some() => {
            Some(Arc::new(crate::net::tls::TlsFiles::load(
                cert.clone(),
                key.clone(),
                cfg.tls_client_ca.clone(),
            )?))
        }
        _ => None,
    };
    // SIGHUP re-reads them; the watcher ends with `run`.
    let _hup = match &tls {
        Some(files) => Some(crate::net::tls::HupWatch::start(files.clone())?),
        None => None,
    };
    // Whatever this process creates from here on (segments, meta, fences, cursors, audit files,
    // and files added later) is private even where a create call names no mode; the start-up
    // check below refuses anything looser. See: issue 20 §3.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    // A data directory (and its secret) is created only where that is clearly meant: with
    // `--init`, or in the repository's shipped `shards/` (nothing but its README). A directory
    // that was removed, or a volume that is not mounted, must not silently become an empty one
    // with a new secret that invalidates every token. See: issue 20 §1.
    let fresh = !cfg.data_dir.join(crate::datadir::META_FILE).exists();
    if fresh && !cfg.init && !crate::datadir::is_shipped_empty(&cfg.data_dir) {
        return Err(ServeError::NotInitialized(cfg.data_dir.clone()));
    }
    let datadir = DataDir::open_for_serve(&cfg.data_dir, cfg.shards as u32).map_err(|source| {
        ServeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        }
    })?;
    // Refused like a secret file open to others (not only warned about): location history
    // must not be readable by every local user. See: issue 20 §3.
    crate::datadir::check_private(&cfg.data_dir).map_err(|source| ServeError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    // After the directory's own checks (a format-1 directory is told to migrate first).
    let own_secret = cfg.data_dir.join(crate::auth::SECRET_FILE_NAME);
    let external_secret = cfg.secret_file.is_some()
        || std::env::var(crate::auth::SECRET_ENV).is_ok_and(|v| !v.is_empty());
    if !fresh && !cfg.init && !external_secret && !own_secret.exists() {
        return Err(ServeError::Secret(format!(
            "{} is missing from an existing data directory: a new secret would refuse every \
             token issued so far; restore the file (or pass --secret-file / GEOBEAT_SECRET), or \
             start once with --init to make a new one on purpose",
            own_secret.display()
        )));
    }
    let fences =
        Arc::new(crate::fence::FenceRegistry::open(&cfg.data_dir).map_err(ServeError::Fences)?);
    let secret = cfg
        .load_secret()
        .map_err(|e| ServeError::Secret(e.to_string()))?;
    let revocations =
        crate::revoke::Registry::open(&cfg.data_dir).map_err(ServeError::Revocations)?;
    let executors = cfg.shards.max(1);
    let feeds: Vec<crate::flusher::ShardFeed> = (0..datadir.shard_count())
        .map(|k| {
            crate::flusher::ShardFeed::new(
                ShardId(k),
                datadir.shard_dir(ShardId(k)),
                crate::log::LogPos(0),
            )
        })
        .collect();
    let flusher_stop = Arc::new(AtomicBool::new(false));
    let flusher = if cfg.sinks.is_empty() {
        None
    } else {
        let handle = crate::flusher::start(cfg.sinks.clone(), feeds.clone(), flusher_stop.clone())
            .map_err(|e| ServeError::Sinks(e.to_string()))?;
        tracing::info!(sinks = cfg.sinks.len(), "storage flusher started");
        Some(handle)
    };
    let sinks = flusher.as_ref().map(|f| f.status_reader());
    let replication = if cfg.durability == crate::config::Durability::Replicated {
        let mut plan = crate::replicate::Plan::new(
            datadir.router(),
            &cfg.nats_urls,
            cfg.nats_streams,
            cfg.nats_replicas,
        );
        plan.log_id = datadir.created_ms();
        if let Some(own) = &cfg.ownership {
            plan.placement = Some(Arc::new(crate::replicate::placement::Placement::new(
                &plan,
                &own.node_id,
                &own.advertise,
            )));
            // Every node of a cluster follows the streams (issue 17 item 3).
            plan.view = Some(crate::replicate::follow::FollowStatus::new(
                executors,
                cfg.nats_streams as usize,
            ));
        }
        // Refuse to start rather than hold every ack from the first heartbeat: the streams must
        // exist (a misconfigured URL shows at once, not as devices that never get an ack).
        plan.prepare(crate::limits::REPLICATE_STARTUP_WAIT)
            .map_err(ServeError::Replication)?;
        tracing::info!(servers = %cfg.nats_urls.join(","), streams = cfg.nats_streams, replicas = cfg.nats_replicas, "JetStream streams ready");
        Some(Arc::new(plan))
    } else {
        None
    };
    // Ownership: the placement thread leases, claims and fences units until shutdown.
    let placement_stop = Arc::new(AtomicBool::new(false));
    let placement = match &replication {
        Some(plan) if plan.placement.is_some() => {
            tracing::info!(node = %cfg.ownership.as_ref().map_or("", |o| o.node_id.as_str()), "ownership on: placement in the GEOBEAT_PLACEMENT bucket");
            Some(crate::replicate::placement::start(
                plan.clone(),
                placement_stop.clone(),
            )?)
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        replication,
        feeds,
        fences,
        sinks,
        shard_count: datadir.shard_count(),
        router: datadir.router().clone(),
        executors,
        secret,
        revocations,
        executors_ready: AtomicUsize::new(0),
        connections_open: AtomicUsize::new(0),
        connections_http: AtomicUsize::new(0),
        subscribers_open: AtomicUsize::new(0),
        sub_devices_total: AtomicUsize::new(0),
        stopping: Arc::new(AtomicBool::new(false)),
        executors_drained: AtomicUsize::new(0),
        local_addr: std::sync::OnceLock::new(),
        storage_faults: (0..datadir.shard_count())
            .map(|_| std::sync::OnceLock::new())
            .collect(),
        started: std::time::Instant::now(),
        cfg,
    });
    tracing::info!(
        executors,
        shards = shared.shard_count,
        data_dir = %shared.cfg.data_dir.display(),
        durability = ?shared.cfg.durability,
        "starting geobeat"
    );

    let _ = shared.local_addr.set(addr);

    let stop_flag = stop.unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop_flag.clone())?;
    }

    // glommio's MeshBuilder shares an `Rc` between threads (behind an `unsafe impl Send`), so
    // its clones must all be made here, before any executor runs: clones made on executor
    // threads (or here while executors already run) race on the non-atomic count, which freed
    // the builder under a peer and hung startup in mesh joins. Each executor takes its own.
    let meshes = Meshes::<Core>::new(executors, shared.cfg.mesh_capacity);
    let handoff = rt::mesh::full::<Handoff>(executors, crate::limits::HANDOFF_MESH_CAPACITY);
    let per_executor: Vec<Option<(Meshes<Core>, HandoffMesh)>> = (0..executors)
        .map(|_| Some((meshes.clone(), handoff.clone())))
        .collect();
    drop((meshes, handoff));
    let per_executor = Arc::new(std::sync::Mutex::new(per_executor));
    let datadir = Arc::new(datadir);
    let results = rt::run_executors(executors, {
        let shared = shared.clone();
        let stop_flag = stop_flag.clone();
        move |index| {
            let (meshes, handoff) = per_executor.lock().unwrap_or_else(|p| p.into_inner())[index]
                .take()
                .expect("each executor starts once");
            executor_main(
                ExecutorId(index),
                shared.clone(),
                datadir.clone(),
                meshes,
                handoff,
                stop_flag.clone(),
                tls.clone(),
            )
        }
    })?;
    // The flusher drains what became durable up to the end, then stops; its cursors make the
    // next start resume exactly there.
    flusher_stop.store(true, Ordering::Release);
    placement_stop.store(true, Ordering::Release);
    if let Some(p) = placement {
        let _ = p.join();
    }
    if let Some(f) = flusher {
        if let Err(e) = f.join() {
            tracing::error!(error = %e, "storage flusher stopped with an error");
        }
    }
    for r in results {
        r?;
    }
    tracing::info!("geobeat stopped cleanly");
    Ok(())
}

type HandoffMesh = rt::mesh::MeshBuilder<Handoff, rt::mesh::Full>;

/// The body of one executor: recover its shards, join the meshes, spawn its tasks, serve until
/// shutdown, drain.
async fn executor_main(
    index: ExecutorId,
    shared: Arc<Shared>,
    datadir: Arc<DataDir>,
    meshes: Meshes<Core>,
    handoff: HandoffMesh,
    stop_flag: Arc<AtomicBool>,
    tls: Option<Arc<crate::net::tls::TlsFiles>>,
) -> Result<(), std::io::Error> {
    let stores = crate::shard::core::open_stores(index, &shared, &datadir);
    // glommio can lose the wake-up that completes a mesh join; keep this executor awake.
    let nudge = rt::Nudge::start();
    let (tx, rx) = meshes.join().await?;
    let (handoff_tx, handoff_rx) = handoff
        .join()
        .await
        .map_err(|_| std::io::Error::other("joining the hand-off mesh"))?;
    drop(nudge);
    let stores = match stores {
        Ok(stores) => stores,
        Err(e) => {
            // The meshes are joined (peers would wait for us forever otherwise); now stop
            // everyone.
            tracing::error!(executor = index.0, error = %e, "a shard could not be opened; stopping");
            stop_flag.store(true, Ordering::Release);
            shared.stopping.store(true, Ordering::Release);
            shared.executors_drained.fetch_add(1, Ordering::AcqRel);
            return Err(e);
        }
    };
    let core = Rc::new(Core::new(index, shared.clone(), stores, tx));
    let edge = Rc::new(Edge::new(core.clone(), handoff_tx));
    spawn_mesh_loops(&edge, rx, handoff_rx);
    rt::spawn(fanout_flush_loop(core.clone()));
    let commit = rt::spawn_joinable(core.clone().commit_loop());
    rt::spawn(core.clone().retention_loop());
    rt::spawn(crate::net::revoke::watch_loop(edge.clone()));
    if shared.replication.is_some() {
        rt::spawn(core.clone().replicate_loop());
    }
    if shared
        .replication
        .as_ref()
        .is_some_and(|plan| plan.view.is_some())
    {
        rt::spawn(core.clone().follow_loop());
    }

    let listener = rt::bind(
        *shared
            .local_addr
            .get()
            .expect("address resolved before executors start"),
    )?;
    if shared.executors_ready.fetch_add(1, Ordering::AcqRel) + 1 == shared.executors {
        announce_listening(&shared);
    }
    rt::spawn(crate::net::router::accept_loop(
        edge.clone(),
        listener,
        Role::Main,
    ));
    if let Some(addr) = shared.cfg.osmand_listen {
        let osmand = rt::bind(addr)?;
        if index.0 == 0 {
            tracing::info!(%addr, "serving the OsmAnd protocol on its own listener, at any path");
        }
        rt::spawn(crate::net::router::accept_loop(
            edge.clone(),
            osmand,
            Role::Osmand,
        ));
    }
    if let Some(addr) = shared.cfg.mqtt_listen {
        // Every executor accepts MQTT on the same port (SO_REUSEPORT), like the main listener.
        let mqtt = rt::bind(addr)?;
        if index.0 == 0 {
            tracing::info!(%addr, "MQTT device ingest on mqtt://{addr} (docs/MQTT.md)");
        }
        rt::spawn(crate::net::mqtt::accept_loop(edge.clone(), mqtt));
    }
    if let Some(files) = tls {
        // One acceptor per executor: its handshake rate bound covers both TLS listeners.
        let acceptor = Rc::new(crate::net::tls::Acceptor::new(files));
        if let Some(addr) = shared.cfg.tls_listen {
            let l = rt::bind(addr)?;
            if index.0 == 0 {
                tracing::info!(%addr, "TLS: devices wss://{addr}/v1/ingest, HTTP API https://{addr}");
            }
            rt::spawn(crate::net::router::accept_loop_tls(
                edge.clone(),
                l,
                acceptor.clone(),
            ));
        }
        if let Some(addr) = shared.cfg.mqtts_listen {
            let l = rt::bind(addr)?;
            if index.0 == 0 {
                tracing::info!(%addr, "MQTT device ingest over TLS on mqtts://{addr} (docs/MQTT.md)");
            }
            rt::spawn(crate::net::mqtt::accept_loop_tls(edge.clone(), l, acceptor));
        }
    }
    if let (0, Some(addr)) = (index.0, shared.cfg.metrics_listen) {
        let metrics = rt::bind(addr)?;
        tracing::info!(%addr, "serving /metrics on its own listener");
        rt::spawn(crate::net::router::accept_loop(
            edge.clone(),
            metrics,
            Role::Metrics,
        ));
    }

    // Watch for shutdown.
    while !stop_flag.load(Ordering::Acquire) {
        rt::sleep(STOP_POLL_INTERVAL).await;
    }
    core.stop.begin();
    tracing::info!(executor = index.0, "draining");
    let drain_deadline = Instant::now() + SHUTDOWN_DRAIN_MAX;
    while (core.acks.open_count() > 0 || core.fanout.conns_open() > 0)
        && Instant::now() < drain_deadline
    {
        rt::sleep(Duration::from_millis(5)).await;
    }
    shared.executors_drained.fetch_add(1, Ordering::AcqRel);
    // Keep committing for peers until every executor drained.
    while shared.executors_drained.load(Ordering::Acquire) < shared.executors
        && Instant::now() < drain_deadline
    {
        rt::sleep(Duration::from_millis(5)).await;
    }
    shared
        .executors_drained
        .store(shared.executors, Ordering::Release);
    commit.await;
    for slot in &core.stores {
        match slot.store.borrow_mut().sync_blocking() {
            Ok(durable) => shared.feeds[slot.shard.0 as usize].publish_durable(durable),
            Err(e) => tracing::error!(shard = %slot.shard, error = %e, "final sync failed"),
        }
    }
    Ok(())
}

/// Spawns, per peer, the loops that receive from the meshes and dispatch each message to the
/// shard core or the network edge. The reply and event receivers never wait on anything but
/// their channel, so bounded channels cannot deadlock (see `shard::mesh`).
fn spawn_mesh_loops(
    edge: &Rc<Edge>,
    rx: crate::shard::mesh::Rx<Core>,
    handoff_rx: rt::mesh::Receivers<Handoff>,
) {
    let core = &edge.core;
    let data = Rc::new(rx.data);
    let control = Rc::new(rx.control);
    let replies = Rc::new(rx.replies);
    let events = Rc::new(rx.events);
    let handoff = Rc::new(handoff_rx);
    for peer in (0..core.shared.executors).map(ExecutorId) {
        if peer == core.index {
            continue;
        }
        let (c, d) = (core.clone(), data.clone());
        rt::spawn(async move {
            while let Ok(Some(msg)) = d.recv_from(peer.0).await {
                c.append_remote(peer, msg);
            }
        });
        let (c, r) = (core.clone(), control.clone());
        rt::spawn(async move {
            while let Ok(Some(msg)) = r.recv_from(peer.0).await {
                c.on_control(peer, msg);
            }
        });
        let (c, r) = (core.clone(), replies.clone());
        rt::spawn(async move {
            while let Ok(Some(msg)) = r.recv_from(peer.0).await {
                c.on_done(msg);
            }
        });
        rt::spawn(core.clone().reply_send_loop(peer));
        let (c, r) = (core.clone(), events.clone());
        rt::spawn(async move {
            while let Ok(Some(batch)) = r.recv_from(peer.0).await {
                c.fanout.on_batch(batch);
            }
        });
        let (e, h) = (edge.clone(), handoff.clone());
        rt::spawn(async move {
            while let Ok(Some(msg)) = h.recv_from(peer.0).await {
                if e.core.shared.cfg.engine == crate::config::Engine::Ring {
                    crate::net::engine::adopt(e.clone(), peer, msg);
                } else {
                    crate::net::ingest::adopt(e.clone(), peer, msg);
                }
            }
        });
    }
}

/// Retries the fan-out's unreported drop counts periodically until shutdown.
async fn fanout_flush_loop(core: Rc<Core>) {
    loop {
        rt::timeout(FANOUT_MISSED_FLUSH_INTERVAL, core.stop.wait()).await;
        if core.stopping() {
            return;
        }
        core.fanout.flush();
    }
}
