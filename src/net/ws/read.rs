//! [`WsReader`]: the read half of a server WebSocket (ingest and subscribe connections) with its
//! deadlines, and [`Ctl`], the flags its reader and writer share. It owns waiting for the next
//! data frame against the executor's shutdown, the writer's end, the idle policy (a ping after
//! one ping interval of silence, close 1001 "idle timeout" after the second) and an optional
//! fixed end (a token's expiry: ingest and subscribe close with 1008 then), an optional end on
//! revocation (when the executor's revocation signal fires and the connection's check says its
//! token is revoked: 1008 too), and it turns read errors into close codes (1009, 1007, 1002).
//! It does not interpret frames and does not decide when to pause reading (backpressure is the
//! connection's).
//!
//! It also owns the bound on partial frames. tungstenite reserves (and zero-fills) a frame's
//! whole payload as soon as it has parsed the frame's header, so a client that sends the header
//! of a 64 KiB frame and then a trickle pins 64 KiB and more. Every server WebSocket therefore
//! reads through a [`Metered`] stream that follows the frame boundaries in the bytes it passes
//! on: a frame of `PARTIAL_FRAME_SMALL_BYTES` or more is charged to its executor's
//! [`PartialFrames`] when its header is complete, and while the charge would pass
//! `PARTIAL_FRAME_BYTES_EXEC_MAX` the header's last byte is held back, so tungstenite reserves
//! nothing and that connection is not read further; ordinary small frames always pass. Charges
//! return when the message completes or the connection ends; a connection held back for the
//! idle timeout is closed like a silent one. See: issue 20 §7.
//!
//! The same scan holds back a client's Close frame while a connection kind asks for it
//! ([`ReadMeter::gate_close`]): tungstenite answers a Close as soon as it parses it and then
//! refuses to send data, so ingest keeps the Close out of it until every heartbeat read before it
//! is durable and acked (a client that sends its heartbeats and closes still gets its acks).
//!
//! Invariants: the stop and writer-gone waits and one [`rt::Watchdog`] are created once per
//! connection and kept across messages, so reading a message creates no timer and no waiter; a
//! connection's charges return to its executor's account when a message completes and when the
//! connection ends; bytes are passed on in stream order, each scanned once.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use async_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_util::StreamExt;

use crate::limits::{
    FRAME_BYTES_MAX, IDLE_STRIKES_MAX, PARTIAL_FRAME_BYTES_EXEC_MAX, PARTIAL_FRAME_SMALL_BYTES,
    TOKEN_EXPIRY_WAIT_MAX,
};
use crate::net::tls::Conn;
use crate::proto::close;
use crate::rt::{self, TcpStream};
use crate::rt::{now_s, Stop};

/// The read half of a server WebSocket, with its connection's partial-frame meter.
pub struct Source<S = TcpStream> {
    pub(super) stream: futures_util::stream::SplitStream<WebSocketStream<Metered<S>>>,
    pub(super) meter: Rc<ReadMeter>,
}

/// One executor's account of the memory its WebSocket connections have committed to large
/// frames they are still reading, and the connections waiting for room in it.
pub struct PartialFrames {
    /// Bytes of admitted large frames whose message is not complete yet.
    held: Cell<usize>,
    /// Connections waiting to start a large frame, woken once the total is under the low mark.
    paused: RefCell<Vec<Rc<ReadMeter>>>,
}

impl PartialFrames {
    /// An empty account.
    pub fn new() -> Rc<PartialFrames> {
        Rc::new(PartialFrames {
            held: Cell::new(0),
            paused: RefCell::new(Vec::new()),
        })
    }

    /// Bytes of large partial frames held now.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// Charges `len` bytes of a large frame read outside tungstenite (the connection engine) if
    /// they fit the bound; the caller returns them with [`Self::release`].
    pub fn try_charge(&self, len: usize) -> bool {
        if self.held.get() + len > PARTIAL_FRAME_BYTES_EXEC_MAX {
            return false;
        }
        self.held.set(self.held.get() + len);
        true
    }

    /// Returns `n` charged bytes, waking the connections waiting for room once there is some.
    pub fn release(&self, n: usize) {
        let held = self.held.get() - n;
        self.held.set(held);
        // Hysteresis: wake the waiting only once an eighth of the bound is free again, so a total
        // hovering at the bound does not wake them all on every completed message.
        if held <= PARTIAL_FRAME_BYTES_EXEC_MAX - PARTIAL_FRAME_BYTES_EXEC_MAX / 8 {
            let paused = std::mem::take(&mut *self.paused.borrow_mut());
            for m in paused {
                m.paused.set(false);
                if let Some(w) = m.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

/// One connection's share of its executor's [`PartialFrames`].
pub struct ReadMeter {
    pool: Rc<PartialFrames>,
    /// Bytes charged for this connection's admitted large frames (until its message completes).
    charged: Cell<usize>,
    /// Set while in `pool.paused`.
    paused: Cell<bool>,
    /// The task to wake when it may go on.
    waker: RefCell<Option<Waker>>,
    /// Set by a connection kind that must answer everything it read before the close handshake
    /// (ingest: the acks): a client's Close frame is then held back until [`Self::release_close`]
    /// (tungstenite answers a Close as soon as it parses it and refuses to send data after it).
    close_gate: Cell<bool>,
    /// A Close frame is held back now.
    close_held: Cell<bool>,
    /// Notified when a Close frame starts to be held back (the connection's writer).
    on_close_held: RefCell<Option<Rc<rt::Signal>>>,
}

impl ReadMeter {
    /// Charges a large frame of `len` bytes if it fits the bound; otherwise registers to be
    /// woken and returns false.
    fn admit(self: &Rc<Self>, len: usize, cx: &Context<'_>) -> bool {
        let pool = &self.pool;
        if pool.held.get() + len <= PARTIAL_FRAME_BYTES_EXEC_MAX {
            pool.held.set(pool.held.get() + len);
            self.charged.set(self.charged.get() + len);
            return true;
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        if !self.paused.replace(true) {
            pool.paused.borrow_mut().push(self.clone());
        }
        false
    }

    /// From now on a client's Close frame is held back (not passed to the WebSocket layer) until
    /// [`Self::release_close`]; `writer` is notified when one starts to be held.
    pub fn gate_close(&self, writer: Rc<rt::Signal>) {
        self.close_gate.set(true);
        *self.on_close_held.borrow_mut() = Some(writer);
    }

    /// Whether a client's Close frame is being held back.
    pub fn close_held(&self) -> bool {
        self.close_held.get()
    }

    /// Lets a held Close frame (and everything after it) through, and stops holding.
    pub fn release_close(&self) {
        self.close_gate.set(false);
        if self.close_held.replace(false) {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    /// Whether the frame starting with `first` (its first header byte) must wait: a Close frame
    /// while the gate is set. Registers the reader to be woken at the release.
    fn holds(&self, first: u8, cx: &Context<'_>) -> bool {
        if !self.close_gate.get() || first & 0x0f != OPCODE_CLOSE {
            return false;
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        if !self.close_held.replace(true) {
            if let Some(w) = self.on_close_held.borrow().as_ref() {
                w.notify();
            }
        }
        true
    }

    /// A message completed (or the connection ended): its frames no longer hold memory.
    fn message_done(&self) {
        let n = self.charged.replace(0);
        if n > 0 {
            self.pool.release(n);
        }
    }
}

/// Opcode of a Close frame (RFC 6455 §5.5.1).
const OPCODE_CLOSE: u8 = 0x8;

/// Where a connection's byte stream stands relative to WebSocket frame boundaries.
struct Scan {
    /// Header bytes of the next frame collected so far (a client frame header is 2..=14 bytes).
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame not yet passed on.
    payload_left: u64,
}

impl Scan {
    /// Length of a header whose first two bytes are in `header`.
    fn header_len(&self) -> usize {
        let ext = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if self.header[1] & 0x80 != 0 { 4 } else { 0 }
    }

    /// Payload length of a complete header.
    fn payload_len(&self) -> u64 {
        let h = &self.header;
        match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        }
    }

    /// Follows `data` (the next bytes of the stream); returns how many of them may be passed to
    /// the WebSocket layer now: all, those before a Close frame held by the gate, or those
    /// before the last byte of the header of a large frame the budget does not admit (tungstenite reserves a frame's whole payload as soon as
    /// it has parsed its header, so the header is what must wait).
    fn advance(&mut self, data: &[u8], meter: &Rc<ReadMeter>, cx: &Context<'_>) -> usize {
        let mut i = 0;
        while i < data.len() {
            if self.payload_left > 0 {
                let step = self.payload_left.min((data.len() - i) as u64);
                self.payload_left -= step;
                i += step as usize;
                continue;
            }
            if self.have == 0 && meter.holds(data[i], cx) {
                return i;
            }
            self.header[self.have] = data[i];
            let have = self.have + 1;
            if have >= 2 && have == self.header_len() {
                let len = self.payload_len();
                // Frames over the frame limit are refused by tungstenite before it reserves.
                let large =
                    (PARTIAL_FRAME_SMALL_BYTES as u64..=FRAME_BYTES_MAX as u64).contains(&len);
                if large && !meter.admit(len as usize, cx) {
                    return i;
                }
                self.have = 0;
                self.payload_left = len;
            } else {
                self.have = have;
            }
            i += 1;
        }
        data.len()
    }
}

/// A connection's stream (TCP or TLS) read through a frame-boundary scan that holds back the
/// start of a large frame while its executor's [`PartialFrames`] are over their bound.
pub struct Metered<S = TcpStream> {
    inner: S,
    meter: Rc<ReadMeter>,
    scan: Scan,
    /// Bytes read but not yet passed on (the bytes past the HTTP head, or a held-back header and
    /// what followed it in the same read); `stash_pos` is how far they were passed.
    stash: Vec<u8>,
    stash_pos: usize,
}

impl<S: Conn> Metered<S> {
    /// Wraps a connection's stream whose first bytes are `leftover` (read past the HTTP head;
    /// pass them here, not to the WebSocket layer), charging `pool` (its executor's account).
    pub fn new(
        inner: S,
        leftover: Vec<u8>,
        pool: &Rc<PartialFrames>,
    ) -> (Metered<S>, Rc<ReadMeter>) {
        let meter = Rc::new(ReadMeter {
            pool: pool.clone(),
            charged: Cell::new(0),
            paused: Cell::new(false),
            waker: RefCell::new(None),
            close_gate: Cell::new(false),
            close_held: Cell::new(false),
            on_close_held: RefCell::new(None),
        });
        let m = Metered {
            inner,
            meter: meter.clone(),
            scan: Scan {
                header: [0; 14],
                have: 0,
                payload_left: 0,
            },
            stash: leftover,
            stash_pos: 0,
        };
        (m, meter)
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        // The connection's buffers go with it.
        self.meter.message_done();
    }
}

impl<S: Conn> futures_lite::AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.stash_pos < this.stash.len() {
            let avail = &this.stash[this.stash_pos..];
            let take = avail.len().min(out.len());
            let n = this.scan.advance(&avail[..take], &this.meter, cx);
            if n == 0 {
                return Poll::Pending; // woken once the budget has room
            }
            out[..n].copy_from_slice(&avail[..n]);
            this.stash_pos += n;
            if this.stash_pos == this.stash.len() {
                // Rare (pressure, or bytes past the head): do not keep the buffer.
                this.stash = Vec::new();
                this.stash_pos = 0;
            }
            return Poll::Ready(Ok(n));
        }
        let n = match Pin::new(&mut this.inner).poll_read(cx, out) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let k = this.scan.advance(&out[..n], &this.meter, cx);
        if k < n {
            this.stash.extend_from_slice(&out[k..n]);
            if k == 0 {
                // Nothing may be passed on yet (`Ok(0)` would read as the end of the stream).
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(k))
    }
}

impl<S: Conn> futures_lite::AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Close code for a protocol error (RFC 6455).
const CLOSE_PROTOCOL: u16 = 1002;

/// Control flags from a connection's reader to its writer (and back: `writer_gone`).
#[derive(Default)]
pub struct Ctl {
    /// Close with this code and reason once allowed (the writer decides when; ingest's 1001
    /// waits for pending acks).
    pub close: Cell<Option<(u16, &'static str)>>,
    /// Send a ping (idle check).
    pub ping: Cell<bool>,
    /// Set when the writer has ended (socket error, or a write stalled past its bound): the
    /// reader stops too.
    pub writer_gone: Cell<bool>,
    /// Fired when `writer_gone` is set.
    pub gone: rt::Signal,
}

impl Ctl {
    /// Marks the writer as ended and wakes whoever waits on it: the reader (`gone`) and the
    /// connection's signal (a reader paused on backpressure).
    pub fn writer_ended(&self, signal: &rt::Signal) {
        self.writer_gone.set(true);
        self.gone.notify();
        signal.notify();
    }
}

/// A data frame from the client.
pub enum Data {
    /// A text frame (valid UTF-8).
    Text(Utf8Bytes),
    /// A binary frame.
    Binary(Bytes),
}

/// What ended one wait for the next frame.
enum Next {
    Msg(Option<Result<Message, WsError>>),
    Idle,
    Stop,
    WriterGone,
    End,
    /// The executor's revocation list changed.
    Revocations,
}

/// A WebSocket source read under the connection's idle, shutdown and writer-gone rules.
pub struct WsReader<'a, S = TcpStream> {
    source: Source<S>,
    stop_handle: &'a Stop,
    ctl: &'a Ctl,
    /// The writer's wake-up signal (told when a ping is due).
    writer: &'a rt::Signal,
    /// Fires at the executor's stop signal; a fired wait stays ready.
    stop: rt::SignalWait<'a>,
    /// Fires when the writer ends.
    gone: rt::SignalWait<'a>,
    wd: rt::Watchdog,
    ping_after: Duration,
    idle_strikes: u32,
    /// A fixed end: when, and the close code and reason then.
    end: Option<(Instant, (u16, &'static str))>,
    /// The end on revocation, if asked for.
    revoke: Option<Revoke<'a>>,
}

/// A reader's end on revocation: the executor's "revocations changed" signal, a wait on it kept
/// across messages (renewed after each notification), and the connection's check.
struct Revoke<'a> {
    changed: &'a rt::Signal,
    wait: rt::SignalWait<'a>,
    /// True when the connection's token is now revoked.
    revoked: &'a dyn Fn() -> bool,
    /// The close reason (with 1008) then.
    reason: &'static str,
}

impl<'a, S: Conn> WsReader<'a, S> {
    /// Wraps `source` of a connection whose executor stops with `stop`, whose writer watches
    /// `ctl` and wakes on `writer`, and which is pinged after `ping_after` of silence. Create it
    /// on the connection's executor.
    pub fn new(
        stop: &'a Stop,
        ping_after: Duration,
        source: Source<S>,
        ctl: &'a Ctl,
        writer: &'a rt::Signal,
    ) -> WsReader<'a, S> {
        WsReader {
            source,
            stop_handle: stop,
            ctl,
            writer,
            stop: stop.wait(),
            gone: ctl.gone.wait(),
            wd: rt::Watchdog::new(),
            ping_after,
            idle_strikes: 0,
            end: None,
            revoke: None,
        }
    }

    /// Also ends reading, closing with 1008 and `reason`, once `revoked()` says so: asked now
    /// and whenever `changed` (the executor's revocation signal) fires. No timer: one waiter
    /// slot on the signal.
    pub fn end_if_revoked(
        mut self,
        changed: &'a rt::Signal,
        revoked: &'a dyn Fn() -> bool,
        reason: &'static str,
    ) -> WsReader<'a, S> {
        // The wait first, then the check: no change can slip between them (one thread).
        let wait = changed.wait();
        if revoked() {
            self.end = Some((Instant::now(), (close::POLICY, reason)));
        }
        self.revoke = Some(Revoke {
            changed,
            wait,
            revoked,
            reason,
        });
        self
    }

    /// Also ends reading at `at`, closing with `code` and `reason`.
    pub fn end_at(mut self, at: Instant, code: u16, reason: &'static str) -> WsReader<'a, S> {
        self.end = Some((at, (code, reason)));
        self
    }

    /// Also ends reading when a token valid until `expires_at_s` (Unix seconds) expires,
    /// closing with 1008 and `reason`.
    pub fn end_at_expiry(self, expires_at_s: u64, reason: &'static str) -> WsReader<'a, S> {
        let expires_in = Duration::from_secs(expires_at_s.saturating_sub(now_s()));
        if expires_in > TOKEN_EXPIRY_WAIT_MAX {
            return self;
        }
        self.end_at(Instant::now() + expires_in, close::POLICY, reason)
    }

    /// The next data frame. Pings and pongs only count as activity. `None` once reading is over
    /// (the client closed or vanished, the writer ended, shutdown, idle timeout, the fixed end,
    /// or a read error), with the close code and reason, if any, set in `ctl.close`.
    pub async fn next(&mut self) -> Option<Data> {
        loop {
            if self.stop_handle.stopping() {
                self.close(close::GOING_AWAY, "server shutting down");
                return None;
            }
            let WsReader {
                source,
                ctl,
                stop,
                gone,
                wd,
                ping_after,
                end,
                revoke,
                ..
            } = self;
            // Silence is measured from the start of this wait, so time the connection spent
            // processing or paused on backpressure never counts as the client's.
            let waiting_since = Instant::now();
            // One poll of the socket per message; the persistent waits and the watchdog only
            // refresh their registrations.
            let next = std::future::poll_fn(|cx| {
                if let Poll::Ready(m) = source.stream.poll_next_unpin(cx) {
                    return Poll::Ready(Next::Msg(m));
                }
                if Pin::new(&mut *stop).poll(cx).is_ready() {
                    return Poll::Ready(Next::Stop);
                }
                if ctl.writer_gone.get() || Pin::new(&mut *gone).poll(cx).is_ready() {
                    return Poll::Ready(Next::WriterGone);
                }
                if let Some(r) = revoke {
                    if Pin::new(&mut r.wait).poll(cx).is_ready() {
                        return Poll::Ready(Next::Revocations);
                    }
                }
                // One watchdog serves both deadlines: it stays armed for the earlier one.
                if let Some((at, _)) = end {
                    if wd.poll_elapsed(cx, *at, Duration::ZERO) {
                        return Poll::Ready(Next::End);
                    }
                }
                if wd.poll_elapsed(cx, waiting_since, *ping_after) {
                    return Poll::Ready(Next::Idle);
                }
                Poll::Pending
            })
            .await;
            match next {
                Next::WriterGone => return None,
                Next::Stop => {
                    self.close(close::GOING_AWAY, "server shutting down");
                    return None;
                }
                Next::End => {
                    if let Some((_, (code, reason))) = self.end {
                        self.close(code, reason);
                    }
                    return None;
                }
                Next::Revocations => {
                    let r = self
                        .revoke
                        .as_mut()
                        .expect("only a reader with a revoke end waits");
                    r.wait = r.changed.wait();
                    if (r.revoked)() {
                        let reason = r.reason;
                        self.close(close::POLICY, reason);
                        return None;
                    }
                }
                Next::Idle => {
                    self.idle_strikes += 1;
                    if self.idle_strikes >= IDLE_STRIKES_MAX {
                        self.close(close::GOING_AWAY, "idle timeout");
                        return None;
                    }
                    self.ctl.ping.set(true);
                    self.writer.notify();
                }
                Next::Msg(None) => return None,
                Next::Msg(Some(Err(e))) => {
                    self.ctl.close.set(match e {
                        WsError::Capacity(_) => Some((close::TOO_BIG, "frame too large")),
                        WsError::Utf8 => {
                            Some((close::INVALID_PAYLOAD, "invalid UTF-8 in text frame"))
                        }
                        WsError::Protocol(_) => Some((CLOSE_PROTOCOL, "protocol error")),
                        _ => None,
                    });
                    return None;
                }
                Next::Msg(Some(Ok(m))) => {
                    self.idle_strikes = 0;
                    self.source.meter.message_done();
                    match m {
                        Message::Text(t) => return Some(Data::Text(t)),
                        Message::Binary(b) => return Some(Data::Binary(b)),
                        Message::Close(_) => return None,
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
            }
        }
    }

    fn close(&self, code: u16, reason: &'static str) {
        self.ctl.close.set(Some((code, reason)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame header (masked, zero key) for a payload of `len` bytes, and the payload.
    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 4]);
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    fn meter(pool: &Rc<PartialFrames>) -> Rc<ReadMeter> {
        Rc::new(ReadMeter {
            pool: pool.clone(),
            charged: Cell::new(0),
            paused: Cell::new(false),
            waker: RefCell::new(None),
            close_gate: Cell::new(false),
            close_held: Cell::new(false),
            on_close_held: RefCell::new(None),
        })
    }

    #[test]
    fn a_gated_close_frame_waits_until_released() {
        // Data frames, then a Close, then bytes after it: ungated everything passes; gated the
        // scan stops exactly at the Close's first byte (whole or byte by byte, also when the Close
        // is the first byte of a read), marks it held, and passes it and the rest once released.
        let cx = Context::from_waker(Waker::noop());
        let mut stream: Vec<u8> = [0usize, 5, 300].iter().flat_map(|&n| frame(n)).collect();
        let at = stream.len();
        stream.extend_from_slice(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
        stream.extend(frame(3));
        let pool = PartialFrames::new();
        let m = meter(&pool);
        assert_eq!(scan().advance(&stream, &m, &cx), stream.len());
        assert!(!m.close_held());
        for piece in [stream.len(), 1, 7] {
            let m = meter(&pool);
            m.gate_close(rt::Signal::new());
            let mut s = scan();
            let mut passed = 0;
            for chunk in stream.chunks(piece) {
                let n = s.advance(chunk, &m, &cx);
                passed += n;
                if n < chunk.len() {
                    break;
                }
            }
            assert_eq!(passed, at, "piece {piece}");
            assert!(m.close_held());
            // Asked again (the stash path), it still holds.
            assert_eq!(s.advance(&stream[at..], &m, &cx), 0);
            m.release_close();
            assert!(!m.close_held());
            assert_eq!(s.advance(&stream[at..], &m, &cx), stream.len() - at);
        }
    }

    fn scan() -> Scan {
        Scan {
            header: [0; 14],
            have: 0,
            payload_left: 0,
        }
    }

    #[test]
    fn the_scan_follows_frame_boundaries_and_holds_back_large_headers_over_the_bound() {
        // Frames of every header form, passed whole, in 1-byte and in 7-byte pieces: every byte
        // passes and only the large ones (2 KiB ..= 64 KiB) are charged. With the account full, a
        // large frame's header passes all but its last byte; once charges return, the rest goes.
        let cx = Context::from_waker(Waker::noop());
        let sizes = [
            0,
            5,
            125,
            126,
            2047,
            2048,
            60 << 10,
            64 << 10,
            (64 << 10) + 1,
        ];
        let stream: Vec<u8> = sizes.iter().flat_map(|&n| frame(n)).collect();
        let charged: usize = 2048 + (60 << 10) + (64 << 10);
        for piece in [stream.len(), 1, 7] {
            let pool = PartialFrames::new();
            let m = meter(&pool);
            let mut s = scan();
            for chunk in stream.chunks(piece) {
                assert_eq!(s.advance(chunk, &m, &cx), chunk.len());
            }
            assert_eq!((s.have, s.payload_left), (0, 0));
            assert_eq!((pool.held(), m.charged.get()), (charged, charged));
            m.message_done();
            assert_eq!(pool.held(), 0);
        }

        let pool = PartialFrames::new();
        let hog = meter(&pool);
        let mut other = scan();
        assert_eq!(other.advance(&frame(1 << 20)[..14], &hog, &cx), 14); // over the frame limit: free
        assert!(hog.admit(PARTIAL_FRAME_BYTES_EXEC_MAX - 100, &cx));
        let m = meter(&pool);
        let mut s = scan();
        let small = frame(300);
        assert_eq!(s.advance(&small, &m, &cx), small.len(), "small frames pass");
        let big = frame(4096);
        // A 4 KiB frame has an 8-byte header (2, a 16-bit length, the mask key).
        assert_eq!(
            s.advance(&big, &m, &cx),
            7,
            "all but the header's last byte"
        );
        assert_eq!(s.advance(&big[7..], &m, &cx), 0, "still no room");
        assert!(m.paused.get() && m.waker.borrow().is_some());
        hog.message_done();
        assert!(!m.paused.get(), "woken once the charges returned");
        assert_eq!(s.advance(&big[7..], &m, &cx), big.len() - 7);
        assert_eq!(pool.held(), 4096);
    }
}
