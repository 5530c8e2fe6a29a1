//! [`WsReader`]: the read half of a server WebSocket (ingest and subscribe connections) with its
//! deadlines, and [`Ctl`], the flags its reader and writer share. It owns waiting for the next
//! data frame against the executor's shutdown, the writer's end, the idle policy (a ping after
//! one ping interval of silence, close 1001 "idle timeout" after the second) and an optional
//! fixed end (a token's expiry: ingest and subscribe close with 1008 then), and it turns read errors into close codes (1009, 1007, 1002).
//! It does not interpret frames and does not decide when to pause reading (backpressure is the
//! connection's).
//!
//! Invariant: the stop and writer-gone waits and one [`rt::Watchdog`] are created once per
//! connection and kept across messages, so reading a message creates no timer and no waiter.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use async_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_util::StreamExt;

use crate::proto::close;
use crate::rt::{self, TcpStream};
use crate::server::exec::{now_s, Exec};

/// The read half of a server WebSocket.
pub type Source = futures_util::stream::SplitStream<WebSocketStream<TcpStream>>;

/// Close code for a protocol error (RFC 6455).
const CLOSE_PROTOCOL: u16 = 1002;
/// Longest token expiry a connection arms a deadline for (about 100 years): a later expiry
/// cannot come while the connection lives (and a far-future instant would overflow).
const TOKEN_EXPIRY_WAIT_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Idle intervals without a frame from the client after which it is closed (the first one earns
/// a ping, which a live client answers).
const IDLE_STRIKES_MAX: u32 = 2;

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
}

/// A WebSocket source read under the connection's idle, shutdown and writer-gone rules.
pub struct WsReader<'a> {
    source: Source,
    exec: &'a Exec,
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
}

impl<'a> WsReader<'a> {
    /// Wraps `source` of a connection on `exec` whose writer watches `ctl` and wakes on
    /// `writer`. Create it on the connection's executor.
    pub fn new(
        exec: &'a Exec,
        source: Source,
        ctl: &'a Ctl,
        writer: &'a rt::Signal,
    ) -> WsReader<'a> {
        WsReader {
            source,
            exec,
            ctl,
            writer,
            stop: exec.stop_signal.wait(),
            gone: ctl.gone.wait(),
            wd: rt::Watchdog::new(),
            ping_after: exec.shared.cfg.ping_interval(),
            idle_strikes: 0,
            end: None,
        }
    }

    /// Also ends reading at `at`, closing with `code` and `reason`.
    pub fn end_at(mut self, at: Instant, code: u16, reason: &'static str) -> WsReader<'a> {
        self.end = Some((at, (code, reason)));
        self
    }

    /// Also ends reading when a token valid until `expires_at_s` (Unix seconds) expires,
    /// closing with 1008 and `reason`.
    pub fn end_at_expiry(self, expires_at_s: u64, reason: &'static str) -> WsReader<'a> {
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
            if self.exec.stopping() {
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
                ..
            } = self;
            // Silence is measured from the start of this wait, so time the connection spent
            // processing or paused on backpressure never counts as the client's.
            let waiting_since = Instant::now();
            // One poll of the socket per message; the persistent waits and the watchdog only
            // refresh their registrations.
            let next = std::future::poll_fn(|cx| {
                if let Poll::Ready(m) = source.poll_next_unpin(cx) {
                    return Poll::Ready(Next::Msg(m));
                }
                if Pin::new(&mut *stop).poll(cx).is_ready() {
                    return Poll::Ready(Next::Stop);
                }
                if ctl.writer_gone.get() || Pin::new(&mut *gone).poll(cx).is_ready() {
                    return Poll::Ready(Next::WriterGone);
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
