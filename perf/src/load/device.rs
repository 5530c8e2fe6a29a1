//! One simulated device: connect (paced by the connect ramp), then send heartbeats in closed or
//! open loop and account for every reply, then drain outstanding acks and close. It owns the
//! device's connection, track, seq counter and in-flight window; it does not own run-wide
//! timing (see [`Shared`]) or aggregation beyond recording into its stats shard. Invariant: a
//! heartbeat counts as measured iff its intended send time lies in the measured window, and its
//! latency is taken from that intended time (open loop) or actual send time (closed loop, where
//! the two coincide).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use tokio::sync::mpsc;
use tungstenite::protocol::WebSocketConfig;

use super::config::{Mode, Plan};
use super::link::{Incoming, Link, LinkClosed};
use super::pool::PoolRequest;
use super::LoadError;
use crate::frame::{Common, Sample};
use crate::inflight::{InFlight, OpenSchedule};
use crate::reply::Reply;
use crate::stats::{Counters, ShardedStats, LATENCY_US_MAX};
use crate::tokens::DeviceCredential;
use crate::track::Track;

/// Read buffer per client connection: acks are ~16 bytes, so a small buffer suffices and keeps
/// 10,000 connections cheap (tungstenite's default is 128 KiB).
pub const CLIENT_READ_BUFFER_BYTES: usize = 4 << 10;
/// Outgoing bytes tungstenite buffers before writing to the socket (we flush explicitly).
pub const CLIENT_WRITE_BUFFER_BYTES: usize = 16 << 10;
/// Largest reply a client accepts (acks and rejections are tiny).
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 64 << 10;
/// Most already-received replies handled in one go before the device sends again (bounds the
/// time one busy connection can hold its thread).
const REPLIES_PER_TURN_MAX: usize = 256;
/// Pause between connection attempts of one device, multiplied by the attempt number.
const CONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// How long closing a connection at the end may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Run-wide state every device task reads.
#[derive(Debug)]
pub struct Shared {
    /// This process's plan.
    pub plan: Plan,
    /// Statistics, sharded by device index.
    pub stats: ShardedStats,
    /// Run start: device n begins connecting at `t0 + n / connect_rate`.
    pub t0: Instant,
    /// Start of the measured window.
    pub measure_start: Instant,
    /// End of the measured window; no frame is intended at or after it.
    pub measure_end: Instant,
    /// Deadline for outstanding acks after the window.
    pub drain_end: Instant,
    /// Open loop: time between one device's frames.
    pub open_period: Option<Duration>,
    /// Client WebSocket settings.
    pub ws_config: WebSocketConfig,
    /// Whether a connection error has been reported on stderr already (report once per process).
    pub connect_error_reported: AtomicBool,
    /// Pooled targets (Redis, PostgreSQL): the queue of each pool connection. Dropping the
    /// last `Shared` closes them, which lets the pool workers finish.
    pub pool: Option<Vec<mpsc::Sender<PoolRequest>>>,
}

impl Shared {
    fn in_window(&self, t: Instant) -> bool {
        self.measure_start <= t && t < self.measure_end
    }
}

/// The client WebSocket configuration used for every device connection.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER_BYTES)
        .write_buffer_size(CLIENT_WRITE_BUFFER_BYTES)
        .max_message_size(Some(CLIENT_MESSAGE_BYTES_MAX))
        .max_frame_size(Some(CLIENT_MESSAGE_BYTES_MAX))
}

/// Whether the device loop should go on after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// The connection ended (closed by the server or failed).
    Ended,
}

/// Runs device `local` (0-based within this process) to completion and records its statistics.
pub async fn run_device(shared: Arc<Shared>, local: usize) {
    let global = shared.plan.device_offset + local;
    let mut counters = Counters {
        devices: 1,
        ..Counters::default()
    };
    let connect_at =
        shared.t0 + Duration::from_secs_f64(local as f64 / shared.plan.connect_rate_per_s);
    tokio::time::sleep_until(connect_at.into()).await;
    let credential = match shared.plan.credentials.for_device(global) {
        Ok(credential) => credential,
        Err(e) => {
            // Plan::new checked every device's credential; this only happens if that changes.
            report_once(&shared, &format!("device {global}: {e}"));
            counters.connect_failures += 1;
            shared.stats.with(global, |s| s.counters.add(&counters));
            return;
        }
    };
    let device_id: Arc<str> = Arc::from(credential.device_id.as_str());
    let Some(mut link) = connect(&shared, global, &credential, &device_id, &mut counters).await
    else {
        shared.stats.with(global, |s| s.counters.add(&counters));
        return;
    };
    counters.connected = 1;
    let mut device = Device::new(&shared, global, credential.frame_id, counters);
    let mut flow = match shared.plan.args.mode {
        Mode::Closed => device.closed_loop(&mut link).await,
        Mode::Open => device.open_loop(&mut link).await,
    };
    if flow == Flow::Continue {
        flow = device.drain(&mut link).await;
    }
    if flow == Flow::Continue {
        link.close(CLOSE_TIMEOUT).await;
    } else {
        device.counters.disconnects += 1;
    }
    device.counters.unacked = device.window.measured_heartbeats();
    let counters = device.counters;
    shared.stats.with(global, |s| s.counters.add(&counters));
}

fn report_once(shared: &Shared, message: &str) {
    if !shared.connect_error_reported.swap(true, Ordering::Relaxed) {
        eprintln!("geobeat-load: {message} (further connection errors are only counted)");
    }
}

async fn connect(
    shared: &Shared,
    global: usize,
    credential: &DeviceCredential,
    device_id: &Arc<str>,
    counters: &mut Counters,
) -> Option<Link> {
    let attempts = shared.plan.args.connect_attempts;
    for attempt in 1..=attempts {
        if Instant::now() >= shared.measure_end {
            return None;
        }
        let result = tokio::time::timeout(
            shared.plan.connect_timeout,
            Link::connect(shared, global, credential, device_id),
        )
        .await
        .unwrap_or(Err(LoadError::ConnectTimeout));
        match result {
            Ok(link) => return Some(link),
            Err(e) => {
                counters.connect_failures += 1;
                report_once(shared, &format!("connect to {}: {e}", shared.plan.addr));
                if attempt < attempts {
                    tokio::time::sleep(CONNECT_BACKOFF * attempt).await;
                }
            }
        }
    }
    None
}

/// A connected device's sending and accounting state.
struct Device<'a> {
    /// Run-wide state.
    shared: &'a Shared,
    /// Global device index (also the stats shard key).
    global: usize,
    /// Position generator.
    track: Track,
    /// Frames in flight.
    window: InFlight,
    /// Samples of the frame being built (capacity = batch).
    samples: Vec<Sample>,
    /// Id carried in frames (gateway mode).
    frame_id: Option<String>,
    /// Seconds of simulated movement per heartbeat.
    step_s: f64,
    /// This device's counts, added to the shared stats at the end.
    counters: Counters,
}

impl<'a> Device<'a> {
    fn new(
        shared: &'a Shared,
        global: usize,
        frame_id: Option<String>,
        counters: Counters,
    ) -> Self {
        let batch = shared.plan.args.batch;
        let step_s = shared
            .open_period
            .map_or(1.0, |period| period.as_secs_f64() / batch as f64);
        let seed = shared.plan.args.seed ^ (global as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            shared,
            global,
            track: Track::new(seed),
            window: InFlight::new(shared.plan.inflight_max),
            samples: Vec::with_capacity(batch),
            frame_id,
            step_s,
            counters,
        }
    }

    /// Encodes and queues (without flushing) one frame intended at `intended`.
    async fn feed_frame(&mut self, link: &mut Link, intended: Instant) -> Flow {
        let args = &self.shared.plan.args;
        let batch = args.batch;
        let first_seq = self.window.last_seq() + 1;
        let ts_ms = super::config::unix_ms_now() as i64;
        self.samples.clear();
        for i in 0..batch {
            let fix = self.track.step(self.step_s);
            let extra = |v: f32| args.extras.then_some(v);
            self.samples.push(Sample {
                seq: first_seq + i as u64,
                lat: fix.lat,
                lon: fix.lon,
                ts_ms,
                alt_m: extra(fix.alt_m),
                speed_mps: extra(fix.speed_mps),
                heading_deg: extra(fix.heading_deg),
                acc_m: extra(fix.acc_m),
            });
        }
        let common = Common {
            id: self.frame_id.as_deref(),
            attrs_json: args.attrs.as_deref(),
        };
        let count = batch as u32;
        let measured = self.shared.in_window(intended);
        let sent = Instant::now();
        self.window.push(first_seq, count, intended, sent, measured);
        self.counters.frames_sent_total += 1;
        self.counters.sent_total += u64::from(count);
        if measured {
            self.counters.sent += u64::from(count);
            if args.mode == Mode::Open {
                let lag_us = sent.saturating_duration_since(intended).as_micros();
                let lag_us = u64::try_from(lag_us)
                    .unwrap_or(u64::MAX)
                    .min(LATENCY_US_MAX);
                self.shared.stats.with(self.global, |s| {
                    let _ = s.send_lag_us.record(lag_us);
                });
            }
        }
        match link.feed(&self.samples, &common, args.format).await {
            Ok(()) => Flow::Continue,
            Err(LinkClosed) => Flow::Ended,
        }
    }

    /// Accounts for one event from the link.
    fn on_message(&mut self, incoming: Incoming) -> Flow {
        let now = Instant::now();
        match incoming {
            Incoming::Reply(Reply::Ack(ack)) => {
                if ack > self.window.last_seq() {
                    self.counters.protocol_errors += 1;
                }
                let in_window = self.shared.in_window(now);
                let window = &mut self.window;
                let counters = &mut self.counters;
                self.shared.stats.with(self.global, |stats| {
                    let acked = window.ack(ack, now, |a| {
                        if a.measured {
                            counters.acked += u64::from(a.count);
                            let latency_us = a.latency_us.min(LATENCY_US_MAX);
                            let _ = stats.latency_us.record_n(latency_us, u64::from(a.count));
                            let service_us = a.service_us.min(LATENCY_US_MAX);
                            let _ = stats.service_us.record_n(service_us, u64::from(a.count));
                        }
                    });
                    counters.acked_total += acked as u64;
                    if in_window {
                        counters.acked_in_window += acked as u64;
                    }
                });
                Flow::Continue
            }
            Incoming::Reply(Reply::Rejected { seq, reason }) => {
                match seq {
                    Some(seq) => {
                        self.counters.rejected += 1;
                        let _ = self.window.reject(seq);
                    }
                    None => self.counters.frame_rejections += 1,
                }
                self.shared
                    .stats
                    .with(self.global, |s| s.count_reason(&reason));
                Flow::Continue
            }
            Incoming::Reply(Reply::Unrecognized) | Incoming::Unexpected => {
                self.counters.protocol_errors += 1;
                Flow::Continue
            }
            Incoming::Ignored => Flow::Continue,
            Incoming::Closed => Flow::Ended,
            Incoming::Failed => {
                self.counters.protocol_errors += 1;
                Flow::Ended
            }
        }
    }

    /// Handles replies that have already arrived, without waiting, so that a burst of acks
    /// frees the window once and the refill goes out in one write instead of one per ack.
    fn on_ready_messages(&mut self, link: &mut Link) -> Flow {
        for _ in 0..REPLIES_PER_TURN_MAX {
            match link.next_ready() {
                None => break,
                Some(incoming) => {
                    if self.on_message(incoming) == Flow::Ended {
                        return Flow::Ended;
                    }
                }
            }
        }
        Flow::Continue
    }

    /// Saturation: keep the window full until the measured window ends.
    async fn closed_loop(&mut self, link: &mut Link) -> Flow {
        let batch = self.shared.plan.args.batch;
        let end = tokio::time::sleep_until(self.shared.measure_end.into());
        tokio::pin!(end);
        loop {
            let now = Instant::now();
            if now >= self.shared.measure_end {
                return Flow::Continue;
            }
            let mut fed = false;
            while self.window.has_room(batch) {
                if self.feed_frame(link, now).await == Flow::Ended {
                    return Flow::Ended;
                }
                fed = true;
            }
            if fed && link.flush().await.is_err() {
                return Flow::Ended;
            }
            tokio::select! {
                message = link.next() => {
                    if self.on_message(message) == Flow::Ended
                        || self.on_ready_messages(link) == Flow::Ended
                    {
                        return Flow::Ended;
                    }
                }
                _ = &mut end => return Flow::Continue,
            }
        }
    }

    /// Fixed rate: send each frame at its intended time (or immediately, if late) until the
    /// measured window ends.
    async fn open_loop(&mut self, link: &mut Link) -> Flow {
        let batch = self.shared.plan.args.batch;
        let period = self.shared.open_period.expect("open loop has a period");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(self.global as u64 ^ 0x5EED);
        let phase = period.mul_f64(rng.gen_range(0.0..1.0));
        let mut schedule = OpenSchedule::new(Instant::now(), phase, period);
        let measure_end = self.shared.measure_end;
        let send = tokio::time::sleep_until(schedule.next_intended().into());
        tokio::pin!(send);
        let end = tokio::time::sleep_until(measure_end.into());
        tokio::pin!(end);
        let mut sending = true;
        loop {
            tokio::select! {
                biased;
                message = link.next() => {
                    if self.on_message(message) == Flow::Ended
                        || self.on_ready_messages(link) == Flow::Ended
                    {
                        return Flow::Ended;
                    }
                }
                _ = &mut send, if sending && self.window.has_room(batch) => {
                    let now = Instant::now();
                    // Catch up on every slot that is due: a late device sends at once, and its
                    // lag is part of the latency because `intended` stays the slot time.
                    while schedule.next_intended() <= now
                        && schedule.next_intended() < measure_end
                        && self.window.has_room(batch)
                    {
                        let intended = schedule.take();
                        if self.feed_frame(link, intended).await == Flow::Ended {
                            return Flow::Ended;
                        }
                    }
                    if link.flush().await.is_err() {
                        return Flow::Ended;
                    }
                    if schedule.next_intended() >= measure_end {
                        sending = false;
                    } else {
                        send.as_mut().reset(schedule.next_intended().into());
                    }
                }
                _ = &mut end => return Flow::Continue,
            }
        }
    }

    /// After the window: wait for outstanding acks until the drain deadline.
    async fn drain(&mut self, link: &mut Link) -> Flow {
        let end = tokio::time::sleep_until(self.shared.drain_end.into());
        tokio::pin!(end);
        while self.window.heartbeats() > 0 {
            tokio::select! {
                message = link.next() => {
                    if self.on_message(message) == Flow::Ended {
                        return Flow::Ended;
                    }
                }
                _ = &mut end => break,
            }
        }
        Flow::Continue
    }
}
