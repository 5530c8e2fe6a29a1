//! [`WsWriter`]: the write half of a server WebSocket (ingest and subscribe connections) with its
//! deadlines. It owns the bounds on every write (a feed or flush must finish within the stall
//! bound, the idle timeout; optionally, once the executor stops, within a shorter grace) and the
//! close sequence (close frame, then closing the socket, each bounded). It does not know what the
//! frames mean or when to send them; that is the connection's writer's.
//!
//! Invariant: one [`rt::Watchdog`] per connection keeps every deadline, so a write that is ready
//! at once touches no timer and a stalled one re-arms the same timer; no timer or stop-signal
//! waiter is created per write.

use crate::limits::CLOSE_STEP_BOUND;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_util::SinkExt;

use crate::rt;

/// The write half of a server WebSocket.
pub type Sink<S = crate::rt::TcpStream> =
    futures_util::stream::SplitSink<WebSocketStream<super::read::Metered<S>>, Message>;

/// Why a write did not complete; the connection's writer ends either way.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write was still pending when its deadline passed (the client stopped reading).
    #[error("write stalled for {0:?}")]
    Stalled(Duration),
    /// The socket or the WebSocket layer failed.
    #[error("write failed: {0}")]
    Socket(#[from] WsError),
}

/// Shutdown bound of a writer whose writes must not hold up the executor's drain.
struct StopBound<'a> {
    /// The executor's stop handle (its flag is set before its signal fires).
    stopping: &'a rt::Stop,
    /// Fires at the executor's stop signal; kept across writes (a ready wait stays ready).
    wait: rt::SignalWait<'a>,
    grace: Duration,
}

/// A WebSocket sink whose writes are bounded by one per-connection watchdog.
pub struct WsWriter<'a, S = crate::rt::TcpStream> {
    sink: Sink<S>,
    wd: rt::Watchdog,
    stall: Duration,
    stop: Option<StopBound<'a>>,
}

impl<'a, S: crate::net::tls::Conn> WsWriter<'a, S> {
    /// Wraps `sink`; every feed and flush must finish within `stall`. Create it on the
    /// connection's executor.
    pub fn new(sink: Sink<S>, stall: Duration) -> WsWriter<'a, S> {
        WsWriter {
            sink,
            wd: rt::Watchdog::new(),
            stall,
            stop: None,
        }
    }

    /// Also bounds writes by the executor's shutdown (`stop`): a write begun once the executor
    /// is stopping gets at most `grace`; one pending when it begins stopping ends at most `grace`
    /// later.
    pub fn stop_bounded(mut self, stop: &'a rt::Stop, grace: Duration) -> WsWriter<'a, S> {
        self.stop = Some(StopBound {
            stopping: stop,
            wait: stop.wait(),
            grace,
        });
        self
    }

    /// Queues `msg` (tungstenite writes to the socket once its write buffer fills).
    pub async fn feed(&mut self, msg: Message) -> Result<(), WriteError> {
        let WsWriter {
            sink,
            wd,
            stall,
            stop,
        } = self;
        bounded(wd, *stall, stop.as_mut(), sink.feed(msg))
            .await?
            .map_err(WriteError::from)
    }

    /// Writes everything queued to the socket.
    pub async fn flush(&mut self) -> Result<(), WriteError> {
        let WsWriter {
            sink,
            wd,
            stall,
            stop,
        } = self;
        bounded(wd, *stall, stop.as_mut(), sink.flush())
            .await?
            .map_err(WriteError::from)
    }

    /// Sends a close frame with `code` and `reason`, then closes the socket; each step may take
    /// [`CLOSE_STEP_BOUND`] (not the stall or shutdown bounds); failures are ignored, as the
    /// connection ends anyway.
    pub async fn close(mut self, code: u16, reason: &str) {
        log_refusal_close(code, reason);
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = self
            .wd
            .within(
                CLOSE_STEP_BOUND,
                self.sink.send(Message::Close(Some(frame))),
            )
            .await;
        let _ = self.wd.within(CLOSE_STEP_BOUND, self.sink.close()).await;
    }
}

thread_local! {
    /// Rate limit of the "connection closed by policy" info line, per executor thread.
    static CLOSE_LOG: crate::ratelog::LogEvery = const {
        crate::ratelog::LogEvery::new(Duration::from_millis(
            crate::limits::REPEAT_LOG_INTERVAL_MS,
        ))
    };
}

/// Logs a close for bad input (1007 invalid payload, 1008 policy: abuse, scope, expiry, 1009
/// too big; also 1002 protocol error) at info, one line per interval per executor with the
/// number suppressed. Normal and going-away closes are not logged. See: issue 13 §4.
pub(crate) fn log_refusal_close(code: u16, reason: &str) {
    use crate::proto::close;
    if !matches!(
        code,
        1002 | close::INVALID_PAYLOAD | close::POLICY | close::TOO_BIG
    ) {
        return;
    }
    CLOSE_LOG.with(|every| {
        if let Some(suppressed) = every.check() {
            tracing::info!(
                code,
                reason,
                suppressed_since_last = suppressed,
                "connection closed for bad input"
            );
        }
    });
}

/// Runs `fut` until it completes or its deadline passes: `stall` after it first waits, or with
/// a stop bound, `grace` after it first waits when the executor was already stopping, else the
/// earlier of that and `grace` after the stop signal fired during the write.
async fn bounded<T>(
    wd: &mut rt::Watchdog,
    stall: Duration,
    mut stop: Option<&mut StopBound<'_>>,
    fut: impl Future<Output = T>,
) -> Result<T, WriteError> {
    let mut fut = std::pin::pin!(fut);
    // A write begun during shutdown gets only the grace.
    let stopping = stop.as_ref().is_some_and(|s| s.stopping.stopping());
    let limit = match &stop {
        Some(s) if stopping => s.grace,
        _ => stall,
    };
    let mut start = None;
    let mut stopped_at = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let (mut since, mut d) = (*start.get_or_insert_with(Instant::now), limit);
        if let (Some(s), false) = (stop.as_deref_mut(), stopping) {
            if stopped_at.is_none() && Pin::new(&mut s.wait).poll(cx).is_ready() {
                stopped_at = Some(Instant::now());
            }
            if let Some(t) = stopped_at {
                if t + s.grace < since + stall {
                    (since, d) = (t, s.grace);
                }
            }
        }
        if wd.poll_elapsed(cx, since, d) {
            Poll::Ready(Err(WriteError::Stalled(d)))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn writes_end_at_the_stall_bound_or_the_shutdown_grace() {
        // Drives `bounded` on one executor with futures that never complete, through one
        // watchdog: without a stop bound the write fails after `stall`; with one, a write begun
        // while stopping fails after `grace`, and one pending when the stop signal fires fails
        // `grace` after it (the stall is 30 s, so the returned bound shows which deadline fired).
        // Ready and quickly completing writes pass. Lower time bounds only (timers fire late on a
        // busy machine, never early).
        let got = rt::run_executors(1, |_| async {
            let mut wd = rt::Watchdog::new();
            let pending = futures_lite::future::pending::<()>;
            let short = Duration::from_millis(60);
            let long = Duration::from_secs(30);
            let grace = Duration::from_millis(40);

            assert_eq!(bounded(&mut wd, short, None, async { 7 }).await.unwrap(), 7);
            let quick = bounded(&mut wd, long, None, rt::sleep(Duration::from_millis(5)));
            assert!(quick.await.is_ok());
            let t0 = Instant::now();
            let e = bounded(&mut wd, short, None, pending()).await.unwrap_err();
            assert!(matches!(e, WriteError::Stalled(d) if d == short), "{e}");
            assert!(t0.elapsed() >= short);

            let handle = Rc::new(rt::Stop::new(Arc::new(AtomicBool::new(false))));
            let mut stop = StopBound {
                stopping: &handle,
                wait: handle.wait(),
                grace,
            };
            let quick = bounded(&mut wd, long, Some(&mut stop), async { 1 });
            assert_eq!(quick.await.unwrap(), 1);
            let (s2, fire_after) = (Rc::clone(&handle), Duration::from_millis(50));
            let stopper = rt::spawn_joinable(async move {
                rt::sleep(fire_after).await;
                s2.begin();
            });
            let t0 = Instant::now();
            let e = bounded(&mut wd, long, Some(&mut stop), pending())
                .await
                .unwrap_err();
            assert!(matches!(e, WriteError::Stalled(d) if d == grace), "{e}");
            assert!(t0.elapsed() >= fire_after + grace, "{:?}", t0.elapsed());
            stopper.await.unwrap();

            // A write begun once shutdown began (the flag is set; the signal fired earlier).
            assert!(handle.stopping());
            let mut stop = StopBound {
                stopping: &handle,
                wait: handle.wait(),
                grace,
            };
            let t0 = Instant::now();
            let e = bounded(&mut wd, long, Some(&mut stop), pending())
                .await
                .unwrap_err();
            assert!(matches!(e, WriteError::Stalled(d) if d == grace), "{e}");
            assert!(t0.elapsed() >= grace);
            true
        })
        .unwrap();
        assert_eq!(got, vec![true]);
    }
}
