//! The runtime seam: everything geobeat needs from its async runtime (glommio today), behind a
//! thin layer so a later move to another io_uring runtime stays small. It owns executor startup
//! (one pinned executor per core, explicit `io_memory` and `ring_depth`), local task spawning,
//! timers, the cross-executor channel mesh, an io_uring `fdatasync`, a tiny single-threaded
//! notification primitive, an executor's stop handle ([`Stop`]) and the wall clock ([`now_ms`],
//! [`now_s`]: the one "now" every layer reads), and [`ring`], an io_uring of its own per
//! executor for the connection engine (multishot receives into provided buffers). It owns no
//! geobeat logic.
//!
//! Invariant: nothing outside this module names `glommio` or `io_uring`.

use crate::limits::{IO_MEMORY_BYTES, IO_RING_DEPTH, NUDGE_INTERVAL};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub use glommio::net::{TcpListener, TcpStream};

pub mod ring;

/// Starts `count` executors, executor `i` pinned to CPU `i % online CPUs`, each running `main(i)`;
/// blocks until every one has returned, and returns their results in order.
pub fn run_executors<F, Fut, T>(count: usize, main: F) -> io::Result<Vec<T>>
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    assert!(count > 0);
    let cpus: Vec<usize> = glommio::CpuSet::online()
        .map(|set| set.into_iter().map(|l| l.cpu).collect())
        .unwrap_or_default();
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let placement = if cpus.is_empty() {
            glommio::Placement::Unbound
        } else {
            glommio::Placement::Fixed(cpus[index % cpus.len()])
        };
        let main = main.clone();
        let handle = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("geobeat-{index}"))
            .io_memory(IO_MEMORY_BYTES)
            .ring_depth(IO_RING_DEPTH)
            .spin_before_park(Duration::from_micros(0))
            .spawn(move || main(index))
            .map_err(|e| io::Error::other(format!("starting executor {index}: {e}")))?;
        handles.push(handle);
    }
    handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            h.join()
                .map_err(|e| io::Error::other(format!("executor {i} failed: {e}")))
        })
        .collect()
}

/// Wall-clock milliseconds since the Unix epoch (receive times, expiry checks, file stamps); 0 if
/// the clock is before 1970.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Wall-clock seconds since the Unix epoch (token expiry).
pub fn now_s() -> u64 {
    (now_ms() / 1000).max(0) as u64
}

/// One executor's view of shutdown: the process-wide "stopping" flag (shared by every executor)
/// and this executor's own signal that fires when it is set. Connections hold a `&Stop` (not the
/// executor) to end their reads and bound their writes.
pub struct Stop {
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    signal: Signal,
}

impl Stop {
    /// A stop handle on the process-wide `flag`, with a signal of this executor's.
    pub fn new(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Stop {
        Stop {
            flag,
            signal: Signal::default(),
        }
    }

    /// True once shutdown has begun (on any executor).
    pub fn stopping(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Begins shutdown: sets the process-wide flag and wakes this executor's waiters.
    pub fn begin(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
        self.signal.notify();
    }

    /// Waits for the next [`Stop::begin`] on this executor; a wait that fired stays ready (check
    /// [`Stop::stopping`] before creating one).
    pub fn wait(&self) -> SignalWait<'_> {
        self.signal.wait()
    }
}

/// Spawns a task on the current executor and lets it run on its own.
pub fn spawn<F: Future<Output = ()> + 'static>(fut: F) {
    glommio::spawn_local(fut).detach();
}

/// Spawns a task on the current executor and returns a handle to await its result.
pub fn spawn_joinable<T: 'static, F: Future<Output = T> + 'static>(
    fut: F,
) -> glommio::task::JoinHandle<T> {
    glommio::spawn_local(fut).detach()
}

/// Sleeps without blocking the executor.
pub async fn sleep(d: Duration) {
    glommio::timer::sleep(d).await;
}

/// Runs `fut` for at most `d`; `None` on timeout (the future is dropped). A future that is
/// ready at its first poll (a buffered WebSocket write, say) never creates a timer.
pub async fn timeout<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    if let Some(v) = futures_lite::future::poll_once(fut.as_mut()).await {
        return Some(v);
    }
    futures_lite::future::or(async { Some(fut.await) }, async {
        sleep(d).await;
        None
    })
    .await
}

/// Keeps the current executor from sleeping for longer than [`NUDGE_INTERVAL`] while alive.
///
/// Why: glommio 0.9 can lose the cross-executor wake-up that completes a channel-mesh join (the
/// notification lands while the peer is going to sleep; upstream #261/#555 describe the class).
/// The sleeping executor then never connects its side of the mesh, and its peers spin in
/// `join()` forever — seen here as a server that recovered its shards but never listened, mostly
/// when several servers start at once. Each wake-up makes the reactor re-check its shared
/// channels, which recovers a lost notification. Hold one across the mesh joins; drop it after.
pub struct Nudge {
    stop: Rc<Cell<bool>>,
}

impl Nudge {
    /// Starts nudging the current executor.
    pub fn start() -> Nudge {
        let stop = Rc::new(Cell::new(false));
        let flag = stop.clone();
        spawn(async move {
            while !flag.get() {
                sleep(NUDGE_INTERVAL).await;
            }
        });
        Nudge { stop }
    }
}

impl Drop for Nudge {
    fn drop(&mut self) {
        self.stop.set(true);
    }
}

/// Lets other tasks run if this one has used up its time slice.
pub async fn yield_if_needed() {
    glommio::yield_if_needed().await;
}

/// Listen backlog: deep enough for thousands of devices reconnecting at once.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listening socket with SO_REUSEPORT (every executor binds the same address; the kernel
/// spreads connections) and SO_REUSEADDR (a restart must not fail on the previous life's
/// connections: TIME_WAIT, or FIN_WAIT when devices keep their end open after a kill -9).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let listener = bind_std(addr)?;
    // SAFETY: a listening TCP socket that only this call owns.
    Ok(unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(listener)) })
}

/// [`bind`] as a plain `std` listener, usable outside an executor (the start-up probe that
/// resolves port 0 and names an address in use before anything else happens). Non-blocking.
pub fn bind_std(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let family = match addr {
        std::net::SocketAddr::V4(_) => libc::AF_INET,
        std::net::SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket syscalls on a descriptor this function owns (via OwnedFd on every
    // path); each sockaddr is fully initialised and its size passed exactly.
    unsafe {
        let fd = check(libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        ))?;
        let owned = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            check(libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ))?;
        }
        match addr {
            std::net::SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                check(libc::bind(
                    fd,
                    &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                ))?;
            }
            std::net::SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                check(libc::bind(
                    fd,
                    &sin6 as *const libc::sockaddr_in6 as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                ))?;
            }
        }
        check(libc::listen(fd, LISTEN_BACKLOG))?;
        Ok(std::net::TcpListener::from(owned))
    }
}

/// Builds a TcpStream from a file descriptor handed over from another executor.
///
/// # Safety
/// `fd` must be an open, connected TCP socket that nothing else owns.
pub unsafe fn stream_from_fd(fd: RawFd) -> TcpStream {
    // SAFETY: the caller hands over sole ownership of a connected TCP socket.
    unsafe { TcpStream::from_raw_fd(fd) }
}

/// A file opened for io_uring `fdatasync` (one per log segment, cached by the caller).
pub struct SyncFile(glommio::io::BufferedFile);

impl SyncFile {
    /// Wraps a duplicate of `fd` (the caller keeps its own).
    pub fn from_fd(fd: RawFd) -> io::Result<SyncFile> {
        // SAFETY: dup returns a fresh descriptor that only this SyncFile owns.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a new, open descriptor owned by nothing else.
        Ok(SyncFile(unsafe {
            glommio::io::BufferedFile::from_raw_fd(dup)
        }))
    }

    /// `fdatasync` through the executor's io_uring: the shard keeps serving while the kernel
    /// writes back the segment's dirty pages (including those dirtied through the mapping).
    pub async fn fdatasync(&self) -> io::Result<()> {
        self.0.fdatasync().await.map_err(io::Error::from)
    }

    /// Writes all of `bytes` at `pos` through the executor's io_uring (continued after a short
    /// write). On a descriptor opened with `O_DSYNC` (`log::WriteMode::Dsync`) the completion is
    /// the durability point; the shard keeps serving meanwhile (the kernel runs the blocking
    /// part of the write in its io_uring workers). glommio takes an owned buffer: one copy of
    /// the group per write.
    pub async fn write_all_at(&self, bytes: &[u8], pos: u64) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            let n = self
                .0
                .write_at(bytes[done..].to_vec(), pos + done as u64)
                .await
                .map_err(io::Error::from)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// Bounded channels between every pair of executors (glommio's channel mesh).
pub mod mesh {
    pub use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

    /// Builds a full mesh of `peers` executors with `capacity` messages per directed pair.
    pub fn full<T: Send + 'static>(peers: usize, capacity: usize) -> MeshBuilder<T, Full> {
        MeshBuilder::full(peers, capacity)
    }

    /// Sends without waiting: `Err` hands the message back when the channel to `peer` is full
    /// or closed.
    pub fn try_send_to<T: Send>(senders: &Senders<T>, peer: usize, msg: T) -> Result<(), T> {
        use glommio::{GlommioError, ResourceType};
        match senders.try_send_to(peer, msg) {
            Ok(()) => Ok(()),
            Err(GlommioError::WouldBlock(ResourceType::Channel(m)))
            | Err(GlommioError::Closed(ResourceType::Channel(m))) => Err(m),
            // Any other error (an invalid peer index) is a programming error.
            Err(e) => panic!("try_send_to peer {peer}: {e}"),
        }
    }
}

/// A single-threaded broadcast signal: tasks wait for "something changed" and a notifier wakes all
/// of them. No atomics, no allocation per notify (the waiter slots are reused), and constant-time
/// waits: each [`SignalWait`] owns one slot, so thousands of connections waiting on one signal
/// (the executor's stop signal) cost nothing per poll, and a dropped wait frees its slot.
#[derive(Default)]
pub struct Signal {
    generation: Cell<u64>,
    /// Waiter slots of the current generation; `None` = free.
    waiters: RefCell<Vec<Option<Waker>>>,
    /// Free slots of `waiters`.
    free: RefCell<Vec<usize>>,
    /// Woken at every notify and kept (not drained): the connection engine's per-connection
    /// waker, so a connection costs no waiter registration per wake-up.
    hook: RefCell<Option<Waker>>,
}

impl Signal {
    /// A new signal, shared by reference counting within one executor.
    pub fn new() -> Rc<Signal> {
        Rc::new(Signal::default())
    }

    /// Wakes every waiting task.
    pub fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        // Waking only schedules the tasks (nothing runs inline), so holding the borrow is safe.
        for w in self.waiters.borrow_mut().drain(..).flatten() {
            w.wake();
        }
        self.free.borrow_mut().clear();
        if let Some(w) = self.hook.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Wakes `waker` at every later notify, until replaced (see the field).
    pub fn set_hook(&self, waker: Waker) {
        *self.hook.borrow_mut() = Some(waker);
    }

    /// Waits until the next [`Signal::notify`] after this call.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait {
            signal: self,
            seen: self.generation.get(),
            slot: None,
        }
    }

    /// Tasks currently registered (for tests).
    #[cfg(test)]
    fn registered(&self) -> usize {
        self.waiters.borrow().iter().flatten().count()
    }
}

/// The future returned by [`Signal::wait`]. It may be polled many times (kept across the
/// iterations of a loop); it registers once and then only refreshes its own slot.
pub struct SignalWait<'a> {
    signal: &'a Signal,
    seen: u64,
    /// This wait's slot in `signal.waiters`, valid while the generation is still `seen`.
    slot: Option<usize>,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.generation.get() != self.seen {
            self.slot = None;
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        match self.slot {
            Some(i) => match &mut waiters[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            },
            None => {
                let waker = Some(cx.waker().clone());
                let i = match self.signal.free.borrow_mut().pop() {
                    Some(i) => {
                        waiters[i] = waker;
                        i
                    }
                    None => {
                        waiters.push(waker);
                        waiters.len() - 1
                    }
                };
                drop(waiters);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for SignalWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if self.signal.generation.get() == self.seen {
                self.signal.waiters.borrow_mut()[i] = None;
                self.signal.free.borrow_mut().push(i);
            }
        }
    }
}

/// A per-task watchdog timer for "has `d` passed since `since`?" checks on hot paths. Checking is
/// a clock read; the underlying timer is armed only when no armed deadline covers the question,
/// so a connection that reads a message every few milliseconds re-arms it about once per idle
/// period instead of creating and cancelling a timer per message. An early wake-up is harmless:
/// the caller just asks again.
pub struct Watchdog {
    timer: glommio::timer::Timer,
    /// Deadline the timer is armed for, if armed.
    armed_until: Option<Instant>,
}

impl Watchdog {
    /// A disarmed watchdog (must be created on an executor).
    pub fn new() -> Watchdog {
        Watchdog {
            timer: glommio::timer::Timer::new(Duration::from_secs(3600)),
            armed_until: None,
        }
    }

    /// `true` once `d` has passed since `since`; otherwise makes sure the polling task is woken
    /// no later than `since + d`.
    pub fn poll_elapsed(&mut self, cx: &mut Context<'_>, since: Instant, d: Duration) -> bool {
        let now = Instant::now();
        let due = since + d;
        if now >= due {
            return true;
        }
        match self.armed_until {
            Some(t) if t > now && t <= due => {}
            _ => {
                self.timer.reset(due - now);
                // Registers the task's waker with the reactor (pending: `due` is in the future).
                let _ = Pin::new(&mut self.timer).poll(cx);
                self.armed_until = Some(due);
            }
        }
        false
    }

    /// Runs `fut`, giving up (`None`, the future dropped) once it has been pending for `d`. A
    /// future that is ready at once touches no timer.
    pub async fn within<T>(&mut self, d: Duration, fut: impl Future<Output = T>) -> Option<T> {
        let mut fut = std::pin::pin!(fut);
        let mut start = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let since = *start.get_or_insert_with(Instant::now);
            if self.poll_elapsed(cx, since, d) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_wakes_waiters_and_mesh_crosses_executors() {
        // Two executors: executor 1 sends a value over the mesh; executor 0 receives it, then a
        // local task waits on a Signal that another local task fires.
        let mesh = mesh::full::<u64>(2, 4);
        let got = run_executors(2, move |i| {
            let mesh = mesh.clone();
            async move {
                let (tx, rx) = mesh.join().await.unwrap();
                if i == 1 {
                    tx.send_to(0, 42).await.unwrap();
                    return 0;
                }
                let v = rx.recv_from(1).await.unwrap().unwrap();
                let sig = Signal::new();
                let s2 = sig.clone();
                let waiter = spawn_joinable(async move {
                    s2.wait().await;
                    7
                });
                sleep(Duration::from_millis(5)).await;
                sig.notify();
                v + waiter.await.unwrap()
            }
        })
        .unwrap();
        assert_eq!(got, vec![49, 0]);
    }

    #[test]
    fn signal_waits_register_once_and_free_their_slot() {
        // A wait polled many times holds one slot; a dropped wait frees it for reuse; notify
        // completes every wait made before it and none made after.
        let got = run_executors(1, |_| async {
            let sig = Signal::new();
            let woken = Rc::new(Cell::new(0u32));
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let (s, w) = (sig.clone(), woken.clone());
                tasks.push(spawn_joinable(async move {
                    let mut wait = std::pin::pin!(s.wait());
                    // Poll the same wait repeatedly, as a reader loop does.
                    for _ in 0..5 {
                        let _ = futures_lite::future::poll_once(wait.as_mut()).await;
                    }
                    wait.await;
                    w.set(w.get() + 1);
                }));
            }
            sleep(Duration::from_millis(5)).await;
            assert_eq!(sig.registered(), 3);
            {
                let mut dropped = std::pin::pin!(sig.wait());
                let _ = futures_lite::future::poll_once(dropped.as_mut()).await;
                assert_eq!(sig.registered(), 4);
            }
            assert_eq!(sig.registered(), 3);
            sig.notify();
            for t in tasks {
                t.await.unwrap();
            }
            let late = sig.wait();
            assert!(futures_lite::future::poll_once(late).await.is_none());
            woken.get()
        })
        .unwrap();
        assert_eq!(got, vec![3]);
    }

    #[test]
    fn watchdog_fires_after_the_deadline_not_before() {
        // `within` gives up on a future pending for longer than the limit, returns a ready value
        // at once, and a watchdog reused for many short waits still fires on a long one.
        let got = run_executors(1, |_| async {
            let mut wd = Watchdog::new();
            assert_eq!(
                wd.within(Duration::from_millis(20), async { 5 }).await,
                Some(5)
            );
            for _ in 0..10 {
                let r = wd
                    .within(Duration::from_millis(50), sleep(Duration::from_millis(1)))
                    .await;
                assert!(r.is_some());
            }
            let t0 = Instant::now();
            let r = wd
                .within(
                    Duration::from_millis(30),
                    futures_lite::future::pending::<()>(),
                )
                .await;
            let waited = t0.elapsed();
            assert!(r.is_none());
            assert!(waited >= Duration::from_millis(30), "{waited:?}");
            waited < Duration::from_secs(2)
        })
        .unwrap();
        assert_eq!(got, vec![true]);
    }
}
