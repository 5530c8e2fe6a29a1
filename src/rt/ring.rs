//! [`Ring`]: an io_uring of our own inside a glommio executor, for the work glommio 0.9 cannot
//! express (multishot `recv` into a provided buffer ring, many sends per `io_uring_enter`). It
//! owns the ring, its provided buffer ring ([`BufRing`], `IORING_REGISTER_PBUF_RING`, one group)
//! and the eventfd registered on the ring, which a glommio task awaits with an ordinary
//! io_uring read through glommio's reactor ([`Ring::poll_wake`]): the executor sleeps in
//! glommio's own `io_uring_enter` while nothing happens and wakes as soon as this ring posts a
//! completion. It does not know what the operations mean: callers name them by `user_data`.
//!
//! Invariants: a buffer is either published to the kernel or handed out to the caller by a
//! completion, never both (the caller returns each handed-out buffer with [`Ring::recycle`]);
//! a send's bytes stay alive and unmoved until its completion arrives (the caller's duty, see
//! [`Ring::send`]); the ring is only touched by its executor's thread.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// One completion, copied out of the completion queue.
#[derive(Debug, Clone, Copy)]
pub struct Cqe {
    /// The `user_data` the operation was submitted with.
    pub user_data: u64,
    /// The operation's result (bytes, or a negated errno).
    pub result: i32,
    flags: u32,
}

impl Cqe {
    /// The provided buffer this completion filled, if any (return it with [`Ring::recycle`]).
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// Whether the (multishot) operation stays armed after this completion.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// The provided buffer ring: `count` buffers of `buf_bytes` each, in one allocation, and the
/// ring of entries the kernel takes them from. The bookkeeping (which slot the next returned
/// buffer goes to, the published tail) is plain memory and testable without a kernel.
pub struct BufRing {
    /// The entries (`count` of `io_uring_buf`, page-aligned, mapped anonymously).
    entries: *mut types::BufRingEntry,
    map_bytes: usize,
    /// Buffer memory: buffer `bid` is `bid * buf_bytes ..` in it.
    memory: Box<[u8]>,
    buf_bytes: usize,
    count: u16,
    /// Our tail (entries written); published to the kernel by [`BufRing::publish`].
    tail: u16,
    /// Buffers handed out by completions and not yet returned.
    out: usize,
}

impl BufRing {
    /// `count` (a power of two) buffers of `buf_bytes`, all published.
    pub fn new(count: u16, buf_bytes: usize) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && buf_bytes > 0);
        let map_bytes = usize::from(count) * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked for failure below, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut ring = BufRing {
            entries: ptr.cast(),
            map_bytes,
            memory: vec![0u8; usize::from(count) * buf_bytes].into_boxed_slice(),
            buf_bytes,
            count,
            tail: 0,
            out: usize::from(count),
        };
        for bid in 0..count {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Address of the entries, for `IORING_REGISTER_PBUF_RING`.
    fn addr(&self) -> u64 {
        self.entries as u64
    }

    /// Writes buffer `bid` into the next entry (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        assert!(bid < self.count, "buffer id {bid} out of range");
        assert!(self.out > 0, "a buffer returned twice");
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.memory[usize::from(bid) * self.buf_bytes..].as_ptr() as u64;
        // SAFETY: `slot < count`, inside the mapping; the kernel reads entries only below the
        // published tail, and this one is past it until `publish`.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(addr);
        entry.set_len(self.buf_bytes as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.out -= 1;
    }

    /// Makes every pushed entry visible to the kernel (one release store of the tail).
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the mapping (the kernel's layout);
        // the kernel only reads it, so an atomic store of our value is the protocol.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The tail as published (for tests).
    #[cfg(test)]
    fn published_tail(&self) -> u16 {
        // SAFETY: as in `publish`.
        unsafe {
            (*(types::BufRingEntry::tail(self.entries) as *const AtomicU16)).load(Ordering::Acquire)
        }
    }

    /// Buffer `bid`'s first `len` bytes (a completion handed it out).
    fn get_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(len <= self.buf_bytes);
        let start = usize::from(bid) * self.buf_bytes;
        &mut self.memory[start..start + len]
    }

    /// Notes that the kernel handed buffer out (a completion named it).
    fn taken(&mut self) {
        self.out += 1;
        assert!(
            self.out <= usize::from(self.count),
            "more buffers out than exist"
        );
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of `map_bytes`; the ring that used it is gone (a
        // `Ring` drops its `IoUring` before its `BufRing`: field order).
        unsafe { libc::munmap(self.entries.cast(), self.map_bytes) };
    }
}

/// Buffer group id of the one provided buffer ring.
const BUF_GROUP: u16 = 0;

/// An io_uring with one provided buffer ring and a registered eventfd (see the module comment).
pub struct Ring {
    // Field order matters: the ring goes before the buffers it references.
    uring: IoUring,
    bufs: BufRing,
    /// The eventfd the kernel signals per completion, awaited through glommio.
    wake: std::rc::Rc<glommio::io::BufferedFile>,
    /// The pending glommio read of the eventfd, if one is armed.
    wake_read: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// SQEs pushed since the last submit.
    queued: usize,
}

impl Ring {
    /// A ring of `sq_entries` submissions (completions: `cq_entries`) with `buf_count` provided
    /// buffers of `buf_bytes`. Create it on the executor that will drive it.
    pub fn new(
        sq_entries: u32,
        cq_entries: u32,
        buf_count: u16,
        buf_bytes: usize,
    ) -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_submit_all()
            .build(sq_entries)?;
        let bufs = BufRing::new(buf_count, buf_bytes)?;
        // SAFETY: the entries stay mapped for the ring's life (field order, see `Drop`).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(bufs.addr(), buf_count, BUF_GROUP, 0)?
        };
        // Blocking on purpose: io_uring returns EAGAIN for reads of an O_NONBLOCK file instead
        // of waiting for it to become readable.
        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        uring.submitter().register_eventfd(efd.as_raw_fd())?;
        // SAFETY: the BufferedFile takes sole ownership of the eventfd.
        let wake = std::rc::Rc::new(unsafe {
            glommio::io::BufferedFile::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(efd))
        });
        Ok(Ring {
            uring,
            bufs,
            wake,
            wake_read: None,
            queued: 0,
        })
    }

    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY (of each caller's SQE): the operations below reference only descriptors and
        // memory their callers keep alive until completion.
        while unsafe { self.uring.submission().push(&sqe) }.is_err() {
            // Full: hand what is queued to the kernel and try again.
            if let Err(e) = self.uring.submit() {
                panic!("io_uring submit failed with a full submission queue: {e}");
            }
            self.queued = 0;
        }
        self.queued += 1;
    }

    /// Arms a multishot receive on `fd` into the provided buffers.
    pub fn recv_multishot(&mut self, fd: RawFd, user_data: u64) {
        let sqe = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
            .build()
            .user_data(user_data);
        self.push(sqe);
    }

    /// Queues a send of `len` bytes at `ptr` on `fd` (`MSG_NOSIGNAL`).
    ///
    /// # Safety
    /// The `len` bytes at `ptr` must stay valid and unmoved until the completion named
    /// `user_data` has been reaped.
    pub unsafe fn send(&mut self, fd: RawFd, ptr: *const u8, len: usize, user_data: u64) {
        let sqe = opcode::Send::new(types::Fd(fd), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        self.push(sqe);
    }

    /// Queues the cancellation of the operation named `target` (its own completion follows);
    /// this request's completion carries `user_data`.
    pub fn cancel(&mut self, target: u64, user_data: u64) {
        let sqe = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push(sqe);
    }

    /// Hands every queued request to the kernel (one `io_uring_enter`, none if nothing queued).
    pub fn submit(&mut self) -> io::Result<()> {
        // An overflowed completion queue is flushed only by an enter (the kernel keeps the
        // overflow; it is not lost).
        if self.queued > 0 || self.uring.submission().cq_overflow() {
            self.uring.submit()?;
            self.queued = 0;
        }
        Ok(())
    }

    /// Copies the completions available now into `out` (appending).
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            let c = Cqe {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            };
            if c.buffer().is_some() {
                self.bufs.taken();
            }
            out.push(c);
        }
    }

    /// The first `len` bytes of provided buffer `bid`, handed out by a completion.
    pub fn buffer_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        self.bufs.get_mut(bid, len)
    }

    /// Returns buffer `bid` to the kernel (visible after [`Ring::publish_buffers`]).
    pub fn recycle(&mut self, bid: u16) {
        self.bufs.push(bid);
    }

    /// Makes the recycled buffers available to the kernel again.
    pub fn publish_buffers(&mut self) {
        self.bufs.publish();
    }

    /// Stops the kernel from signalling the eventfd per completion while the caller is awake
    /// and reaping anyway ([`Ring::poll_wake`] turns it back on before the caller sleeps).
    pub fn quiet(&mut self) {
        self.uring.completion().disable_eventfd();
    }

    /// Ready once the ring may have new completions, registering `cx` with glommio's reactor
    /// otherwise (a read of the eventfd through glommio's own ring: the executor sleeps in
    /// glommio's `io_uring_enter` and wakes when this ring completes something). Drain with
    /// [`Ring::reap`] after each ready.
    pub fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Notifications on, then look: a completion posted before this is seen here, one
        // posted after it signals the eventfd.
        let mut cq = self.uring.completion();
        cq.enable_eventfd();
        cq.sync();
        if !cq.is_empty() {
            return Poll::Ready(());
        }
        let read = self.wake_read.get_or_insert_with(|| {
            let file = self.wake.clone();
            Box::pin(async move {
                let _ = file.read_at(0, 8).await;
            })
        });
        match read.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.wake_read = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_cycle_through_the_ring_in_order_and_the_tail_is_published() {
        // A ring of 4: all published at start; buffers handed out and returned in any order go
        // to consecutive entries, the published tail moves only at `publish`, wraps at u16, and
        // a buffer returned twice is refused.
        let mut r = BufRing::new(4, 64).unwrap();
        assert_eq!((r.published_tail(), r.out), (4, 0));
        for _ in 0..3 {
            r.taken();
        }
        r.push(2);
        r.push(0);
        assert_eq!(r.published_tail(), 4, "not visible before publish");
        r.publish();
        assert_eq!((r.published_tail(), r.out), (6, 1));
        // SAFETY: reading back entries we wrote (slots 4 & 3 = 0 and 5 & 3 = 1).
        let bid_at = |slot: usize| unsafe { (*r.entries.add(slot)).bid() };
        assert_eq!((bid_at(0), bid_at(1)), (2, 0));
        assert_eq!(r.get_mut(2, 64).as_ptr() as u64, unsafe {
            (*r.entries).addr()
        });
        r.tail = u16::MAX;
        r.taken();
        r.push(3);
        r.push(1);
        r.publish();
        assert_eq!((r.published_tail(), r.out), (1, 0));
        let twice = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.push(1)));
        assert!(twice.is_err(), "more buffers returned than handed out");
    }

    /// Waits (through glommio) until the ring has completions, and reaps them.
    async fn next_cqes(ring: &mut Ring, cqes: &mut Vec<Cqe>) {
        loop {
            ring.reap(cqes);
            if !cqes.is_empty() {
                return;
            }
            std::future::poll_fn(|cx| ring.poll_wake(cx)).await;
        }
    }

    #[test]
    fn multishot_recv_fills_provided_buffers_and_stops_when_they_run_out() {
        // A socket pair; a multishot recv on one end with a ring of 2 buffers of 8 bytes. Each
        // write arrives in a buffer; with both buffers out the recv ends with ENOBUFS (no
        // `more`); once they are returned and the recv re-armed, data flows again. Runs on an
        // executor, as the engine does (the eventfd read goes through glommio).
        let got = crate::rt::run_executors(1, |_| async {
            let mut fds = [0; 2];
            // SAFETY: plain syscall into a local array.
            assert_eq!(
                unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
                0
            );
            // SAFETY: fresh descriptors owned here.
            let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let mut ring = Ring::new(8, 32, 2, 8).unwrap();
            ring.recv_multishot(a.as_raw_fd(), 7);
            ring.submit().unwrap();
            let write = |s: &[u8]| {
                // SAFETY: writes from a live slice.
                assert_eq!(
                    unsafe { libc::write(b.as_raw_fd(), s.as_ptr().cast(), s.len()) },
                    s.len() as isize
                );
            };
            let mut cqes = Vec::new();
            let mut seen = Vec::new();
            write(b"hello");
            next_cqes(&mut ring, &mut cqes).await;
            let c = cqes.remove(0);
            assert!(c.more() && c.user_data == 7 && c.result == 5);
            let bid = c.buffer().unwrap();
            seen.push(ring.buffer_mut(bid, 5).to_vec());
            write(b"world!");
            next_cqes(&mut ring, &mut cqes).await;
            let c2 = cqes.remove(0);
            assert_eq!(c2.result, 6);
            let bid2 = c2.buffer().unwrap();
            seen.push(ring.buffer_mut(bid2, 6).to_vec());
            write(b"x");
            next_cqes(&mut ring, &mut cqes).await;
            let c3 = cqes.remove(0);
            assert_eq!((c3.result, c3.more()), (-libc::ENOBUFS, false));
            ring.recycle(bid);
            ring.recycle(bid2);
            ring.publish_buffers();
            ring.recv_multishot(a.as_raw_fd(), 8);
            ring.submit().unwrap();
            next_cqes(&mut ring, &mut cqes).await;
            let c4 = cqes.remove(0);
            assert_eq!((c4.user_data, c4.result), (8, 1));
            seen.push(ring.buffer_mut(c4.buffer().unwrap(), 1).to_vec());
            seen
        })
        .unwrap();
        assert_eq!(
            got[0],
            vec![b"hello".to_vec(), b"world!".to_vec(), b"x".to_vec()]
        );
    }
}
