//! The null server (`geobeat-null`): a WebSocket endpoint that reads heartbeat frames and acks
//! them without storing anything, built on the same stack as geobeat (glommio thread-per-core
//! executors, one per shard, each with its own SO_REUSEPORT listener on the same port;
//! async-tungstenite over glommio's TcpStream). Its throughput and latency are the machine's
//! network-and-protocol ceiling: geobeat can approach them, never beat them. It owns listening,
//! upgrading `GET /v1/ingest` (tokens are ignored), finding each frame's highest seq and replying
//! `{"ack":N}` once per frame. It does not validate heartbeats, authenticate, or persist.
//! Invariant: one ack per data frame, in frame order; malformed frames get
//! `{"seq":null,"error":"bad_frame"}` and never end the server.

use std::cell::Cell;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use futures_lite::FutureExt as _;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use thiserror::Error;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, Utf8Bytes};

use crate::frame::FRAME_BYTES_MAX;
use crate::reply::encode_ack;
use crate::scan::{binary_max_seq, json_max_seq};

/// Path that upgrades to the ingest WebSocket.
pub const INGEST_PATH: &str = "/v1/ingest";
/// Default per-connection read buffer: heartbeat frames are small, and tungstenite's default
/// (128 KiB) would cost ~1.3 GiB at 10,000 connections.
pub const READ_BUFFER_BYTES_DEFAULT: usize = 4 << 10;
/// Outgoing bytes buffered before tungstenite writes to the socket: above the acks of
/// [`FRAMES_PER_FLUSH_MAX`] frames, so a burst of acks leaves in one write at the explicit flush
/// (0 would write every ack with its own syscall).
pub const WRITE_BUFFER_BYTES: usize = 8 << 10;
/// Most shards (executors) one null server runs.
pub const SHARDS_MAX: usize = 256;
/// Default glommio io_memory per executor: network I/O does not use glommio's DMA buffers, so a
/// small pool keeps pinned memory well under the 8 MiB locked-memory limit.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 1 << 20;
/// Default io_uring ring depth per executor (enough in-flight polls for thousands of sockets).
pub const RING_DEPTH_DEFAULT: usize = 1024;
/// How often each shard checks whether it was asked to stop.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Most data frames answered before one flush, so a flood cannot grow the write buffer unbounded.
const FRAMES_PER_FLUSH_MAX: usize = 256;
/// Longest ack text: `{"ack":` + 20 digits + `}`, plus WebSocket framing (2 bytes).
const ACK_FRAME_BYTES_MAX: usize = 7 + 20 + 1 + 2;
const _: () = assert!(FRAMES_PER_FLUSH_MAX * ACK_FRAME_BYTES_MAX <= WRITE_BUFFER_BYTES);
/// The reply to a frame whose seq cannot be found.
const BAD_FRAME_REPLY: &str = r#"{"seq":null,"error":"bad_frame"}"#;

/// `geobeat-null`: the ceiling server.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "geobeat-null", version)]
pub struct NullArgs {
    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: String,
    /// Executors (threads), one per core by default.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Do not pin shard i to CPU i.
    #[arg(long)]
    pub no_pin: bool,
    /// glommio io_memory per executor, bytes.
    #[arg(long, default_value_t = IO_MEMORY_BYTES_DEFAULT)]
    pub io_memory_bytes: usize,
    /// io_uring ring depth per executor.
    #[arg(long, default_value_t = RING_DEPTH_DEFAULT)]
    pub ring_depth: usize,
    /// tungstenite read buffer per connection, bytes.
    #[arg(long, default_value_t = READ_BUFFER_BYTES_DEFAULT)]
    pub read_buffer_bytes: usize,
}

/// Why the null server could not start or failed.
#[derive(Debug, Error)]
pub enum NullError {
    /// A flag is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The listen address does not resolve.
    #[error("cannot resolve --listen {listen}: {reason}")]
    Resolve {
        /// The address given.
        listen: String,
        /// Why.
        reason: String,
    },
    /// A shard could not bind its listener.
    #[error("shard {shard}: cannot listen on {addr}: {source}")]
    Bind {
        /// Shard index.
        shard: usize,
        /// Address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A glommio executor could not be created or ended abnormally.
    #[error("shard {shard}: executor: {message}")]
    Executor {
        /// Shard index.
        shard: usize,
        /// glommio's description.
        message: String,
    },
}

/// Validated settings of a null server.
#[derive(Debug, Clone)]
pub struct NullConfig {
    /// Resolved listen address (port 0 picks a free port, shared by all shards).
    pub listen: SocketAddr,
    /// Number of executors.
    pub shards: usize,
    /// Pin shard i to CPU i (mod available CPUs).
    pub pin: bool,
    /// glommio io_memory per executor.
    pub io_memory_bytes: usize,
    /// io_uring ring depth per executor.
    pub ring_depth: usize,
    /// tungstenite read buffer per connection.
    pub read_buffer_bytes: usize,
}

impl NullConfig {
    /// Validates parsed flags.
    pub fn from_args(args: &NullArgs) -> Result<Self, NullError> {
        let listen = args
            .listen
            .to_socket_addrs()
            .map_err(|e| NullError::Resolve {
                listen: args.listen.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| NullError::Resolve {
                listen: args.listen.clone(),
                reason: "no address".into(),
            })?;
        let shards = args
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if shards == 0 || shards > SHARDS_MAX {
            return Err(NullError::Invalid(format!(
                "--shards must be 1..={SHARDS_MAX}"
            )));
        }
        if args.ring_depth == 0 || args.ring_depth > 32_768 {
            return Err(NullError::Invalid("--ring-depth must be 1..=32768".into()));
        }
        if args.read_buffer_bytes < 256 || args.read_buffer_bytes > 16 << 20 {
            return Err(NullError::Invalid(
                "--read-buffer-bytes must be 256..=16 MiB".into(),
            ));
        }
        Ok(Self {
            listen,
            shards,
            pin: !args.no_pin,
            io_memory_bytes: args.io_memory_bytes,
            ring_depth: args.ring_depth,
            read_buffer_bytes: args.read_buffer_bytes,
        })
    }

    /// A single-shard, unpinned server on a free loopback port (for tests).
    pub fn loopback_for_tests() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: 1,
            pin: false,
            io_memory_bytes: IO_MEMORY_BYTES_DEFAULT,
            ring_depth: 256,
            read_buffer_bytes: READ_BUFFER_BYTES_DEFAULT,
        }
    }

    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            .max_message_size(Some(FRAME_BYTES_MAX))
            .max_frame_size(Some(FRAME_BYTES_MAX))
    }
}

/// Counts from one shard (or all shards, summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NullTotals {
    /// WebSocket upgrades completed.
    pub connections: u64,
    /// Accepted sockets whose upgrade failed (bad request, wrong path, early EOF).
    pub handshake_failures: u64,
    /// Failed accept calls.
    pub accept_errors: u64,
    /// Data frames received.
    pub frames: u64,
    /// Data frames without a findable seq.
    pub bad_frames: u64,
}

impl NullTotals {
    fn add(&mut self, other: &NullTotals) {
        self.connections += other.connections;
        self.handshake_failures += other.handshake_failures;
        self.accept_errors += other.accept_errors;
        self.frames += other.frames;
        self.bad_frames += other.bad_frames;
    }
}

/// Per-shard live counters (shard-local: no atomics needed on one executor).
#[derive(Debug, Default)]
struct ShardCounters {
    connections: Cell<u64>,
    handshake_failures: Cell<u64>,
    accept_errors: Cell<u64>,
    frames: Cell<u64>,
    bad_frames: Cell<u64>,
}

impl ShardCounters {
    fn bump(cell: &Cell<u64>) {
        cell.set(cell.get() + 1);
    }

    fn totals(&self) -> NullTotals {
        NullTotals {
            connections: self.connections.get(),
            handshake_failures: self.handshake_failures.get(),
            accept_errors: self.accept_errors.get(),
            frames: self.frames.get(),
            bad_frames: self.bad_frames.get(),
        }
    }
}

/// A running null server.
pub struct NullServer {
    /// Address every shard listens on.
    addr: SocketAddr,
    /// Set to ask every shard to stop.
    stop: Arc<AtomicBool>,
    /// One executor per shard.
    shards: Vec<glommio::ExecutorJoinHandle<NullTotals>>,
}

impl NullServer {
    /// Starts `config.shards` executors listening on `config.listen` and returns once all are
    /// listening.
    pub fn start(config: NullConfig) -> Result<NullServer, NullError> {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut addr = config.listen;
        let mut shards = Vec::with_capacity(config.shards);
        for shard in 0..config.shards {
            let placement = if config.pin {
                Placement::Fixed(shard % cpus)
            } else {
                Placement::Unbound
            };
            let (bound_tx, bound_rx) = mpsc::channel();
            let stop_flag = Arc::clone(&stop);
            let ws_config = config.ws_config();
            let spawned = LocalExecutorBuilder::new(placement)
                .name(&format!("null-{shard}"))
                .io_memory(config.io_memory_bytes)
                .ring_depth(config.ring_depth)
                .spawn(move || run_shard(shard, addr, ws_config, stop_flag, bound_tx));
            let handle = match spawned {
                Ok(handle) => handle,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(NullError::Executor {
                        shard,
                        message: e.to_string(),
                    });
                }
            };
            shards.push(handle);
            // Shard 0 may pick the port (listen on port 0); later shards bind the same one.
            match bound_rx.recv() {
                Ok(Ok(bound)) => addr = bound,
                Ok(Err(e)) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                Err(_) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(NullError::Executor {
                        shard,
                        message: "exited early".into(),
                    });
                }
            }
        }
        Ok(NullServer { addr, stop, shards })
    }

    /// The address every shard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks every shard to stop, waits for them, and returns the summed counts. Open connections
    /// are dropped.
    pub fn stop(self) -> Result<NullTotals, NullError> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for every shard to end (they only end after [`NullServer::stop`] or on failure).
    pub fn join(self) -> Result<NullTotals, NullError> {
        let mut totals = NullTotals::default();
        for (shard, handle) in self.shards.into_iter().enumerate() {
            let shard_totals = handle.join().map_err(|e| NullError::Executor {
                shard,
                message: e.to_string(),
            })?;
            totals.add(&shard_totals);
        }
        Ok(totals)
    }
}

async fn run_shard(
    shard: usize,
    addr: SocketAddr,
    ws_config: WebSocketConfig,
    stop: Arc<AtomicBool>,
    bound: mpsc::Sender<Result<SocketAddr, NullError>>,
) -> NullTotals {
    let listener = match TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => {
            let source = std::io::Error::other(e.to_string());
            let _ = bound.send(Err(NullError::Bind {
                shard,
                addr,
                source,
            }));
            return NullTotals::default();
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    let _ = bound.send(Ok(local));
    let counters = Rc::new(ShardCounters::default());
    let accept_loop = {
        let counters = Rc::clone(&counters);
        async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        let counters = Rc::clone(&counters);
                        glommio::spawn_local(serve_connection(stream, ws_config, counters))
                            .detach();
                    }
                    Err(_) => {
                        ShardCounters::bump(&counters.accept_errors);
                        glommio::timer::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
            }
        }
    };
    let stop_watch = async move {
        while !stop.load(Ordering::Relaxed) {
            glommio::timer::sleep(STOP_POLL).await;
        }
    };
    accept_loop.or(stop_watch).await;
    counters.totals()
}

// The signature is tungstenite's handshake callback; its error type is not ours to shrink.
#[allow(clippy::result_large_err)]
fn upgrade_filter(request: &Request, response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() == INGEST_PATH {
        return Ok(response);
    }
    let mut not_found = ErrorResponse::new(Some("not found".into()));
    *not_found.status_mut() = tungstenite::http::StatusCode::NOT_FOUND;
    Err(not_found)
}

/// What to answer to one data frame.
fn answer(message: &Message, counters: &ShardCounters, scratch: &mut Vec<u8>) -> Option<Message> {
    let seq = match message {
        Message::Text(text) => json_max_seq(text.as_bytes()),
        Message::Binary(bytes) => binary_max_seq(bytes).ok(),
        _ => return None,
    };
    ShardCounters::bump(&counters.frames);
    let Some(seq) = seq else {
        ShardCounters::bump(&counters.bad_frames);
        return Some(Message::Text(Utf8Bytes::from_static(BAD_FRAME_REPLY)));
    };
    scratch.clear();
    encode_ack(seq, scratch);
    let text = std::str::from_utf8(scratch).expect("acks are ASCII");
    Some(Message::Text(Utf8Bytes::from(text)))
}

async fn serve_connection(
    stream: TcpStream,
    ws_config: WebSocketConfig,
    counters: Rc<ShardCounters>,
) {
    let _ = stream.set_nodelay(true);
    let accepted =
        async_tungstenite::accept_hdr_async_with_config(stream, upgrade_filter, Some(ws_config))
            .await;
    let mut ws: WebSocketStream<TcpStream> = match accepted {
        Ok(ws) => ws,
        Err(_) => {
            ShardCounters::bump(&counters.handshake_failures);
            return;
        }
    };
    ShardCounters::bump(&counters.connections);
    let mut scratch = Vec::with_capacity(32);
    'connection: while let Some(Ok(message)) = ws.next().await {
        let mut pending = 0usize;
        if let Some(reply) = answer(&message, &counters, &mut scratch) {
            if ws.feed(reply).await.is_err() {
                break;
            }
            pending += 1;
        }
        // Answer every frame that is already buffered before flushing, so pipelined frames
        // cost one write instead of one per ack (each frame still gets its own ack).
        while pending < FRAMES_PER_FLUSH_MAX {
            match ws.next().now_or_never() {
                None => break,
                Some(Some(Ok(message))) => {
                    if let Some(reply) = answer(&message, &counters, &mut scratch) {
                        if ws.feed(reply).await.is_err() {
                            break 'connection;
                        }
                        pending += 1;
                    }
                }
                Some(_) => {
                    let _ = ws.flush().await;
                    break 'connection;
                }
            }
        }
        if ws.flush().await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_the_frame_max_seq_or_bad_frame() {
        // Checks the per-frame reply: JSON and binary frames are acked at their highest seq,
        // seq-less frames get the bad_frame rejection, control frames get nothing.
        let counters = ShardCounters::default();
        let mut scratch = Vec::new();
        let text = Message::Text(r#"[{"seq":4},{"seq":6}]"#.into());
        assert_eq!(
            answer(&text, &counters, &mut scratch),
            Some(Message::Text(r#"{"ack":6}"#.into()))
        );
        let mut binary = Vec::new();
        let sample = crate::frame::Sample {
            seq: 77,
            lat: 1.0,
            lon: 2.0,
            ts_ms: 3,
            alt_m: None,
            speed_mps: None,
            heading_deg: None,
            acc_m: None,
        };
        crate::frame::encode_binary(&[sample], &Default::default(), &mut binary).unwrap();
        assert_eq!(
            answer(&Message::Binary(binary.into()), &counters, &mut scratch),
            Some(Message::Text(r#"{"ack":77}"#.into()))
        );
        assert_eq!(
            answer(&Message::Text("{}".into()), &counters, &mut scratch),
            Some(Message::Text(BAD_FRAME_REPLY.into()))
        );
        assert_eq!(
            answer(&Message::Ping(Default::default()), &counters, &mut scratch),
            None
        );
        let totals = counters.totals();
        assert_eq!((totals.frames, totals.bad_frames), (3, 1));
    }
}
