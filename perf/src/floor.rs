//! The floor server (`geobeat-floor`): the leanest WebSocket endpoint this crate offers that still
//! speaks geobeat's device protocol, so geobeat's cost per heartbeat can be stated against what
//! the kernel's socket work alone costs. One thread per shard, each with its own SO_REUSEPORT
//! listener and its own edge-triggered epoll set; nonblocking sockets; one fixed read buffer and
//! one fixed write buffer per connection, allocated once per slot and reused; a hand-written HTTP
//! upgrade and WebSocket frame parser; per connection, one `{"ack":N}` per loop iteration covering
//! every data frame read in that iteration (the coalescing geobeat's protocol allows, see
//! docs/PROTOCOL.md "Acks"), written with one `send` after all ready events are handled. It owns
//! listening, upgrading `GET /v1/ingest` (tokens ignored), finding each frame's highest seq,
//! pongs and close echoes. It does not validate heartbeats, authenticate, persist, or take
//! fragmented messages (closed with 1003; the load generator never sends them). Invariants: acks
//! on a connection only increase and cover exactly the data frames read so far; nothing is
//! allocated per message; a peer whose replies do not fit its write buffer, or whose frame does
//! not fit its read buffer, is dropped, never buffered without bound.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use thiserror::Error;

use crate::frame::FRAME_BYTES_MAX;
use crate::null::INGEST_PATH;
use crate::scan::{binary_max_seq, json_max_seq};

/// Most shards (threads) one floor server runs.
pub const SHARDS_MAX: usize = 256;
/// Default read buffer per connection: a heartbeat frame is far smaller.
pub const READ_BUFFER_BYTES_DEFAULT: usize = 4 << 10;
/// Largest read buffer: one maximal frame plus its longest header.
pub const READ_BUFFER_BYTES_MAX: usize = FRAME_BYTES_MAX + 14;
/// Write buffer per connection: the upgrade response, or one iteration's ack plus error frames
/// and pongs.
const WRITE_BUFFER_BYTES: usize = 1 << 10;
/// Events taken from epoll per wait.
const EVENTS_MAX: usize = 1024;
/// Connections one shard serves at once; accepts beyond it are closed at once.
const CONNECTIONS_MAX: usize = 1 << 20;
/// How long one epoll wait may block, so a stop request is seen.
const WAIT_TIMEOUT_MS: i32 = 50;
/// Listen backlog.
const BACKLOG: i32 = 4096;
/// Longest request head of an upgrade.
const HEAD_BYTES_MAX: usize = 4 << 10;
/// epoll token of the listener (connections use their slot index + 1).
const LISTENER_TOKEN: u64 = 0;
/// The reply to a data frame whose seq cannot be found.
const BAD_FRAME_REPLY: &[u8] = br#"{"seq":null,"error":"bad_frame"}"#;
/// Events every connection is registered for (EPOLLOUT is added only while a write is short).
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const _: () = assert!(READ_BUFFER_BYTES_DEFAULT >= HEAD_BYTES_MAX);
const _: () = assert!(BAD_FRAME_REPLY.len() < 126);

/// `geobeat-floor`: the floor server.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "geobeat-floor", version)]
pub struct FloorArgs {
    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: String,
    /// Threads, one per core by default.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Do not pin shard i to CPU i.
    #[arg(long)]
    pub no_pin: bool,
    /// Read buffer per connection, bytes (a whole frame must fit in it).
    #[arg(long, default_value_t = READ_BUFFER_BYTES_DEFAULT)]
    pub read_buffer_bytes: usize,
}

/// Why the floor server could not start or failed.
#[derive(Debug, Error)]
pub enum FloorError {
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
    /// A shard could not set up its listener or epoll set.
    #[error("shard {shard}: {op} on {addr}: {source}")]
    Setup {
        /// Shard index.
        shard: usize,
        /// Address.
        addr: SocketAddr,
        /// The failing call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A shard thread could not start or panicked.
    #[error("shard {shard}: thread: {message}")]
    Thread {
        /// Shard index.
        shard: usize,
        /// What happened.
        message: String,
    },
}

/// Validated settings of a floor server.
#[derive(Debug, Clone)]
pub struct FloorConfig {
    /// Resolved listen address (port 0 picks a free port, shared by all shards).
    pub listen: SocketAddr,
    /// Number of threads.
    pub shards: usize,
    /// Pin shard i to CPU i (mod available CPUs).
    pub pin: bool,
    /// Read buffer per connection.
    pub read_buffer_bytes: usize,
}

impl FloorConfig {
    /// Validates parsed flags.
    pub fn from_args(args: &FloorArgs) -> Result<Self, FloorError> {
        let listen = args
            .listen
            .to_socket_addrs()
            .map_err(|e| FloorError::Resolve {
                listen: args.listen.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| FloorError::Resolve {
                listen: args.listen.clone(),
                reason: "no address".into(),
            })?;
        let shards = args
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if shards == 0 || shards > SHARDS_MAX {
            return Err(FloorError::Invalid(format!(
                "--shards must be 1..={SHARDS_MAX}"
            )));
        }
        if !(HEAD_BYTES_MAX..=READ_BUFFER_BYTES_MAX).contains(&args.read_buffer_bytes) {
            return Err(FloorError::Invalid(format!(
                "--read-buffer-bytes must be {HEAD_BYTES_MAX}..={READ_BUFFER_BYTES_MAX}"
            )));
        }
        Ok(Self {
            listen,
            shards,
            pin: !args.no_pin,
            read_buffer_bytes: args.read_buffer_bytes,
        })
    }

    /// A single-shard, unpinned server on a free loopback port (for tests).
    pub fn loopback_for_tests() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: 1,
            pin: false,
            read_buffer_bytes: READ_BUFFER_BYTES_DEFAULT,
        }
    }
}

/// Counts from one shard (or all shards, summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloorTotals {
    /// WebSocket upgrades completed.
    pub connections: u64,
    /// Accepted sockets that closed before their upgrade completed (bad request, wrong path).
    pub handshake_failures: u64,
    /// Data frames received.
    pub frames: u64,
    /// Data frames without a findable seq.
    pub bad_frames: u64,
    /// Ack frames sent (at most one per connection per loop iteration).
    pub acks: u64,
    /// Connections dropped for a protocol violation or a full buffer.
    pub dropped: u64,
}

impl FloorTotals {
    fn add(&mut self, other: &FloorTotals) {
        self.connections += other.connections;
        self.handshake_failures += other.handshake_failures;
        self.frames += other.frames;
        self.bad_frames += other.bad_frames;
        self.acks += other.acks;
        self.dropped += other.dropped;
    }
}

/// A running floor server.
pub struct FloorServer {
    /// Address every shard listens on.
    addr: SocketAddr,
    /// Set to ask every shard to stop.
    stop: Arc<AtomicBool>,
    /// One thread per shard.
    shards: Vec<JoinHandle<FloorTotals>>,
}

impl FloorServer {
    /// Starts `config.shards` threads listening on `config.listen` and returns once all listen.
    pub fn start(config: FloorConfig) -> Result<FloorServer, FloorError> {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut addr = config.listen;
        let mut shards = Vec::with_capacity(config.shards);
        let fail = |stop: &AtomicBool, e| {
            stop.store(true, Ordering::Relaxed);
            Err(e)
        };
        for shard in 0..config.shards {
            let (bound_tx, bound_rx) = mpsc::channel();
            let stop_flag = Arc::clone(&stop);
            let cpu = config.pin.then_some(shard % cpus);
            let read_bytes = config.read_buffer_bytes;
            let spawned = std::thread::Builder::new()
                .name(format!("floor-{shard}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    let mut shard_loop = match Shard::open(shard, addr, read_bytes) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return FloorTotals::default();
                        }
                    };
                    let _ = bound_tx.send(Ok(shard_loop.local));
                    shard_loop.run(&stop_flag);
                    shard_loop.totals
                });
            match spawned {
                Ok(handle) => shards.push(handle),
                Err(e) => {
                    return fail(
                        &stop,
                        FloorError::Thread {
                            shard,
                            message: e.to_string(),
                        },
                    )
                }
            }
            // Shard 0 may pick the port (listen on port 0); later shards bind the same one.
            match bound_rx.recv() {
                Ok(Ok(bound)) => addr = bound,
                Ok(Err(e)) => return fail(&stop, e),
                Err(_) => {
                    return fail(
                        &stop,
                        FloorError::Thread {
                            shard,
                            message: "exited early".into(),
                        },
                    )
                }
            }
        }
        Ok(FloorServer { addr, stop, shards })
    }

    /// The address every shard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks every shard to stop, waits for them, and returns the summed counts.
    pub fn stop(self) -> Result<FloorTotals, FloorError> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for every shard to end (they only end after [`FloorServer::stop`]).
    pub fn join(self) -> Result<FloorTotals, FloorError> {
        let mut totals = FloorTotals::default();
        for (shard, handle) in self.shards.into_iter().enumerate() {
            let shard_totals = handle.join().map_err(|_| FloorError::Thread {
                shard,
                message: "panicked".into(),
            })?;
            totals.add(&shard_totals);
        }
        Ok(totals)
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) pins the
    // calling thread. A failure leaves the thread unpinned, which is only slower.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP upgrade request.
    Upgrade,
    /// Exchanging WebSocket frames.
    Open,
    /// Slot is free.
    Free,
}

/// One connection slot: a socket and two fixed buffers (kept when the slot is reused).
struct Conn {
    /// The socket (-1 while free).
    fd: RawFd,
    /// Upgrade, open or free.
    phase: Phase,
    /// Bytes read and not yet consumed: `read[..read_len]`.
    read: Box<[u8]>,
    /// How many bytes of `read` hold data.
    read_len: usize,
    /// Replies not yet written: `write[write_at..write_len]`.
    write: Box<[u8]>,
    /// First unwritten byte of `write`.
    write_at: usize,
    /// End of queued bytes in `write`.
    write_len: usize,
    /// Highest seq read in this loop iteration and not yet acked.
    ack_due: Option<u64>,
    /// Whether this slot is on the iteration's flush list.
    listed: bool,
    /// Whether EPOLLOUT is armed (only while a write was short).
    want_out: bool,
}

impl Conn {
    fn queue(&mut self, bytes: &[u8]) -> bool {
        let end = self.write_len + bytes.len();
        if end > self.write.len() {
            return false;
        }
        self.write[self.write_len..end].copy_from_slice(bytes);
        self.write_len = end;
        true
    }

    /// Queues one unmasked server frame with a payload under 126 bytes.
    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) -> bool {
        debug_assert!(payload.len() < 126);
        self.queue(&[0x80 | opcode, payload.len() as u8]) && self.queue(payload)
    }
}

/// What reading a connection decided.
enum Verdict {
    /// Keep it open.
    Keep,
    /// Close it (after writing what is queued, best effort).
    Close,
}

/// One shard: a listener, an epoll set and its connections.
struct Shard {
    /// Bound address.
    local: SocketAddr,
    /// Listening socket.
    listener: RawFd,
    /// epoll set.
    epoll: RawFd,
    /// Connection slots; the epoll token of slot i is i + 1.
    conns: Vec<Conn>,
    /// Free slots.
    free: Vec<usize>,
    /// Slots with replies queued this iteration.
    flush: Vec<usize>,
    /// Slots closed this iteration, freed at its end so no token is reused within one batch.
    closed: Vec<usize>,
    /// Read buffer size for new slots.
    read_bytes: usize,
    /// Counters.
    totals: FloorTotals,
}

fn os_err(shard: usize, addr: SocketAddr, op: &'static str) -> FloorError {
    FloorError::Setup {
        shard,
        addr,
        op,
        source: io::Error::last_os_error(),
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, large enough and aligned for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: see above.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: see above.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn bound_port(fd: RawFd) -> Option<u16> {
    // SAFETY: getsockname writes at most `len` bytes into storage; sin_port and sin6_port sit at
    // the same offset.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return None;
        }
        let sin = &*(&storage as *const _ as *const libc::sockaddr_in);
        Some(u16::from_be(sin.sin_port))
    }
}

fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) -> bool {
    // SAFETY: passes a pointer to a live i32 and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        ) == 0
    }
}

fn epoll_set(epoll: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> bool {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: event is a live epoll_event.
    unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) == 0 }
}

impl Shard {
    fn open(shard: usize, addr: SocketAddr, read_bytes: usize) -> Result<Shard, FloorError> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket/bind/listen/epoll calls on descriptors this function owns; on
        // error they are closed before returning.
        unsafe {
            let listener = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if listener < 0 {
                return Err(os_err(shard, addr, "socket"));
            }
            let fail = |op| {
                let e = os_err(shard, addr, op);
                libc::close(listener);
                Err(e)
            };
            if !set_int_opt(listener, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
                || !set_int_opt(listener, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
            {
                return fail("setsockopt");
            }
            let (storage, len) = sockaddr(addr);
            if libc::bind(listener, &storage as *const _ as *const libc::sockaddr, len) != 0 {
                return fail("bind");
            }
            if libc::listen(listener, BACKLOG) != 0 {
                return fail("listen");
            }
            let mut local = addr;
            local.set_port(bound_port(listener).unwrap_or(addr.port()));
            let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if epoll < 0 {
                return fail("epoll_create1");
            }
            if !epoll_set(
                epoll,
                libc::EPOLL_CTL_ADD,
                listener,
                (libc::EPOLLIN | libc::EPOLLET) as u32,
                LISTENER_TOKEN,
            ) {
                libc::close(epoll);
                return fail("epoll_ctl");
            }
            Ok(Shard {
                local,
                listener,
                epoll,
                conns: Vec::new(),
                free: Vec::new(),
                flush: Vec::new(),
                closed: Vec::new(),
                read_bytes,
                totals: FloorTotals::default(),
            })
        }
    }

    fn run(&mut self, stop: &AtomicBool) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: events has EVENTS_MAX entries.
            let ready = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    events.as_mut_ptr(),
                    EVENTS_MAX as i32,
                    WAIT_TIMEOUT_MS,
                )
            };
            if ready < 0 {
                continue; // EINTR
            }
            for event in &events[..ready as usize] {
                let (token, bits) = (event.u64, event.events);
                if token == LISTENER_TOKEN {
                    self.accept_all();
                    continue;
                }
                let slot = (token - 1) as usize;
                if self.conns[slot].phase == Phase::Free {
                    continue;
                }
                if bits & libc::EPOLLOUT as u32 != 0 && !self.write_out(slot) {
                    self.close(slot);
                    continue;
                }
                if bits & readable != 0 {
                    if let Verdict::Close = self.read_in(slot) {
                        self.write_out(slot);
                        self.close(slot);
                    }
                }
            }
            self.flush_all();
            self.free.append(&mut self.closed);
        }
        for slot in 0..self.conns.len() {
            self.close(slot);
        }
        // SAFETY: closes descriptors this shard owns.
        unsafe {
            libc::close(self.listener);
            libc::close(self.epoll);
        }
    }

    /// One write per connection with replies this iteration, its coalesced ack last.
    fn flush_all(&mut self) {
        let mut flush = std::mem::take(&mut self.flush);
        for &slot in &flush {
            let conn = &mut self.conns[slot];
            conn.listed = false;
            if conn.phase == Phase::Free {
                continue;
            }
            if let Some(seq) = conn.ack_due.take() {
                let mut text = [0u8; 28];
                let len = ack_text(seq, &mut text);
                if !conn.queue_frame(0x1, &text[..len]) {
                    self.totals.dropped += 1;
                    self.close(slot);
                    continue;
                }
                self.totals.acks += 1;
            }
            if !self.write_out(slot) {
                self.close(slot);
            }
        }
        flush.clear();
        self.flush = flush;
    }

    fn accept_all(&mut self) {
        loop {
            // SAFETY: accept4 with null address pointers.
            let fd = unsafe {
                libc::accept4(
                    self.listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                // EAGAIN ends the edge; anything else (EMFILE) waits for the next edge.
                return;
            }
            let slot = match self.free.pop() {
                Some(slot) => slot,
                None if self.conns.len() < CONNECTIONS_MAX => {
                    self.conns.push(Conn {
                        fd: -1,
                        phase: Phase::Free,
                        read: vec![0; self.read_bytes].into_boxed_slice(),
                        read_len: 0,
                        write: vec![0; WRITE_BUFFER_BYTES].into_boxed_slice(),
                        write_at: 0,
                        write_len: 0,
                        ack_due: None,
                        listed: false,
                        want_out: false,
                    });
                    self.conns.len() - 1
                }
                None => {
                    // SAFETY: fd was just accepted and is ours.
                    unsafe { libc::close(fd) };
                    self.totals.handshake_failures += 1;
                    continue;
                }
            };
            set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
            let conn = &mut self.conns[slot];
            conn.fd = fd;
            conn.phase = Phase::Upgrade;
            conn.read_len = 0;
            conn.write_at = 0;
            conn.write_len = 0;
            conn.ack_due = None;
            conn.want_out = false;
            if !epoll_set(
                self.epoll,
                libc::EPOLL_CTL_ADD,
                fd,
                CONN_EVENTS,
                slot as u64 + 1,
            ) {
                self.close(slot);
            }
        }
    }

    fn close(&mut self, slot: usize) {
        let conn = &mut self.conns[slot];
        if conn.phase == Phase::Free {
            return;
        }
        if conn.phase == Phase::Upgrade {
            self.totals.handshake_failures += 1;
        }
        // SAFETY: fd is this connection's socket; closing it also removes it from the epoll set.
        unsafe { libc::close(conn.fd) };
        conn.fd = -1;
        conn.phase = Phase::Free;
        conn.ack_due = None;
        self.closed.push(slot);
    }

    /// Writes queued replies; false if the socket failed. A short write arms EPOLLOUT.
    fn write_out(&mut self, slot: usize) -> bool {
        let conn = &mut self.conns[slot];
        while conn.write_at < conn.write_len {
            let pending = &conn.write[conn.write_at..conn.write_len];
            // SAFETY: sends from a live slice of the connection's buffer.
            let n = unsafe {
                libc::send(
                    conn.fd,
                    pending.as_ptr() as *const libc::c_void,
                    pending.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error().raw_os_error();
                if err == Some(libc::EINTR) {
                    continue;
                }
                if err != Some(libc::EAGAIN) {
                    return false;
                }
                if !conn.want_out {
                    conn.want_out = true;
                    return epoll_set(
                        self.epoll,
                        libc::EPOLL_CTL_MOD,
                        conn.fd,
                        CONN_EVENTS | libc::EPOLLOUT as u32,
                        slot as u64 + 1,
                    );
                }
                return true;
            }
            conn.write_at += n as usize;
        }
        conn.write_at = 0;
        conn.write_len = 0;
        if conn.want_out {
            conn.want_out = false;
            return epoll_set(
                self.epoll,
                libc::EPOLL_CTL_MOD,
                conn.fd,
                CONN_EVENTS,
                slot as u64 + 1,
            );
        }
        true
    }

    /// Reads until the socket is drained (edge-triggered), handling every complete message.
    fn read_in(&mut self, slot: usize) -> Verdict {
        loop {
            let conn = &mut self.conns[slot];
            if conn.read_len == conn.read.len() {
                // A frame (or request head) larger than the buffer.
                self.totals.dropped += 1;
                return Verdict::Close;
            }
            let room = &mut conn.read[conn.read_len..];
            // SAFETY: reads into a live slice of the connection's buffer.
            let n = unsafe {
                libc::recv(
                    conn.fd,
                    room.as_mut_ptr() as *mut libc::c_void,
                    room.len(),
                    0,
                )
            };
            if n == 0 {
                return Verdict::Close;
            }
            if n < 0 {
                return match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => Verdict::Keep,
                    Some(libc::EINTR) => continue,
                    _ => Verdict::Close,
                };
            }
            let short = (n as usize) < room.len();
            conn.read_len += n as usize;
            let verdict = match conn.phase {
                Phase::Upgrade => upgrade(conn, &mut self.totals),
                Phase::Open => frames(conn, &mut self.totals),
                Phase::Free => Verdict::Close,
            };
            if (conn.ack_due.is_some() || conn.write_len > 0) && !conn.listed {
                conn.listed = true;
                self.flush.push(slot);
            }
            if let Verdict::Close = verdict {
                return Verdict::Close;
            }
            if short {
                // A short read drained the socket: skip the recv that would only say EAGAIN.
                // A later arrival raises a new edge.
                return Verdict::Keep;
            }
        }
    }
}

/// Writes `{"ack":N}` into `out`, returning its length.
fn ack_text(seq: u64, out: &mut [u8; 28]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = seq;
    let mut count = 0;
    loop {
        digits[19 - count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out[..7].copy_from_slice(b"{\"ack\":");
    out[7..7 + count].copy_from_slice(&digits[20 - count..]);
    out[7 + count] = b'}';
    8 + count
}

/// Handles the upgrade request once its head is complete.
fn upgrade(conn: &mut Conn, totals: &mut FloorTotals) -> Verdict {
    let data = &conn.read[..conn.read_len];
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if data.len() >= HEAD_BYTES_MAX {
            Verdict::Close
        } else {
            Verdict::Keep
        };
    };
    let head = &data[..end];
    let path_ok = head
        .strip_prefix(b"GET ")
        .and_then(|rest| rest.strip_prefix(INGEST_PATH.as_bytes()))
        .is_some_and(|rest| matches!(rest.first(), Some(b' ' | b'?')));
    let key = head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(b"sec-websocket-key")
            .then(|| line[colon + 1..].trim_ascii())
    });
    let Some(key) = key.filter(|_| path_ok) else {
        conn.queue(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return Verdict::Close;
    };
    let accept = tungstenite::handshake::derive_accept_key(key);
    let consumed = end + 4;
    let queued = conn.queue(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ")
        && conn.queue(accept.as_bytes())
        && conn.queue(b"\r\n\r\n");
    if !queued {
        return Verdict::Close;
    }
    conn.read.copy_within(consumed..conn.read_len, 0);
    conn.read_len -= consumed;
    conn.phase = Phase::Open;
    totals.connections += 1;
    // Frames may have arrived with the request.
    frames(conn, totals)
}

/// Handles every complete frame in the read buffer and keeps the incomplete tail.
fn frames(conn: &mut Conn, totals: &mut FloorTotals) -> Verdict {
    let mut at = 0;
    let capacity = conn.read.len();
    let verdict = loop {
        let data = &mut conn.read[at..conn.read_len];
        let Some((opcode, fin, header, len)) = frame_header(data) else {
            break Verdict::Keep;
        };
        let Some(total) = header.checked_add(len).filter(|&t| t <= capacity) else {
            totals.dropped += 1;
            break Verdict::Close;
        };
        if data.len() < total {
            break Verdict::Keep;
        }
        let mask = [
            data[header - 4],
            data[header - 3],
            data[header - 2],
            data[header - 1],
        ];
        let payload = &mut data[header..total];
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        at += total;
        if !fin {
            // Fragmented messages are not part of what this floor serves.
            totals.dropped += 1;
            conn.queue_frame(0x8, &1003u16.to_be_bytes());
            break Verdict::Close;
        }
        match opcode {
            0x1 | 0x2 => {
                totals.frames += 1;
                let seq = if opcode == 0x1 {
                    json_max_seq(payload)
                } else {
                    binary_max_seq(payload).ok()
                };
                match seq {
                    Some(seq) => {
                        if conn.ack_due.is_none_or(|due| seq > due) {
                            conn.ack_due = Some(seq);
                        }
                    }
                    None => {
                        totals.bad_frames += 1;
                        if !conn.queue_frame(0x1, BAD_FRAME_REPLY) {
                            totals.dropped += 1;
                            break Verdict::Close;
                        }
                    }
                }
            }
            0x9 => {
                let mut copy = [0u8; 125];
                let Some(copy) = copy.get_mut(..payload.len()) else {
                    break Verdict::Close;
                };
                copy.copy_from_slice(payload);
                if !conn.queue_frame(0xA, copy) {
                    break Verdict::Close;
                }
            }
            0xA => {}
            0x8 => {
                conn.queue_frame(0x8, &1000u16.to_be_bytes());
                break Verdict::Close;
            }
            _ => {
                totals.dropped += 1;
                break Verdict::Close;
            }
        }
    };
    conn.read.copy_within(at..conn.read_len, 0);
    conn.read_len -= at;
    verdict
}

/// Parses a client (masked) frame header: `(opcode, fin, header_bytes, payload_bytes)`, or
/// `None` while the header is incomplete. An unmasked client frame reads as a header longer than
/// any buffer, so the caller drops the connection.
fn frame_header(data: &[u8]) -> Option<(u8, bool, usize, usize)> {
    if data.len() < 2 {
        return None;
    }
    let fin = data[0] & 0x80 != 0;
    let opcode = data[0] & 0x0F;
    if data[1] & 0x80 == 0 {
        return Some((opcode, fin, usize::MAX, 0));
    }
    let (ext, len) = match data[1] & 0x7F {
        126 => {
            if data.len() < 4 {
                return None;
            }
            (2, u16::from_be_bytes([data[2], data[3]]) as usize)
        }
        127 => {
            if data.len() < 10 {
                return None;
            }
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&data[2..10]);
            (
                8,
                usize::try_from(u64::from_be_bytes(raw)).unwrap_or(usize::MAX),
            )
        }
        short => (0, short as usize),
    };
    let header = 2 + ext + 4;
    if data.len() < header {
        return None;
    }
    Some((opcode, fin, header, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn ack_text_matches_the_protocol_form() {
        // Checks the hand-rolled formatter against the protocol's `{"ack":N}` at the edges.
        for seq in [0u64, 7, 42, 1_000_000, u64::MAX] {
            let mut out = [0u8; 28];
            let len = ack_text(seq, &mut out);
            assert_eq!(&out[..len], format!("{{\"ack\":{seq}}}").as_bytes());
        }
    }

    #[test]
    fn upgrades_acks_pipelined_frames_and_refuses_other_paths() {
        // Starts a real floor server, upgrades (RFC 6455's sample key), sends three pipelined
        // frames in one write and reads until the ack of the highest seq (coalescing may merge
        // the acks), checks a seq-less frame gets bad_frame, a ping its pong, and another path a
        // 404; the totals count what was sent.
        let server = FloorServer::start(FloorConfig::loopback_for_tests()).unwrap();
        let addr = server.local_addr();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /v1/ingest?token=x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
        let mut wire = Vec::new();
        for seq in [3, 5, 9] {
            wire.extend(masked(0x1, format!(r#"[{{"seq":{seq}}}]"#).as_bytes()));
        }
        s.write_all(&wire).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(r#"{"ack":9}"#) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        s.write_all(&masked(0x1, b"{}")).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..2], &[0x81, BAD_FRAME_REPLY.len() as u8]);
        assert_eq!(&buf[2..n], BAD_FRAME_REPLY);
        s.write_all(&masked(0x9, b"hi")).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x8A, 2, b'h', b'i']);

        let mut other = TcpStream::connect(addr).unwrap();
        other
            .write_all(b"GET /other HTTP/1.1\r\nSec-WebSocket-Key: x\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        other.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        drop(s);
        let totals = server.stop().unwrap();
        assert_eq!(
            (totals.connections, totals.frames, totals.bad_frames),
            (1, 4, 1)
        );
    }
}
