//! The subscriber load behind `geobeat-subload`: N WebSocket subscribers on geobeat's
//! `/v1/subscribe`, each with one subscription (a bbox, a set of device ids, or a fence), that
//! count what the server delivers while something else (usually `geobeat-load`) ingests. It
//! owns flags, connecting and subscribing on a ramp, classifying server frames cheaply (no full
//! JSON parse per event) and the report; it does not send heartbeats. Invariant: only frames
//! that arrive inside the measured window count towards the window's figures, and every
//! `{"missed":N}` notice is added in full, so `events + missed` is what the server had to
//! deliver to the connected subscribers in that window.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_tungstenite::tokio::TokioAdapter;
use clap::Parser;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use rand::SeedableRng as _;
use thiserror::Error;
use tungstenite::client::IntoClientRequest as _;
use tungstenite::http::header::AUTHORIZATION;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::Message;

use crate::stats::{new_histogram, LatencySummary};
use crate::sys::{self, CpuTimes};

/// Most subscribers one run may open.
pub const SUBSCRIBERS_MAX: usize = 20_000;
/// Most device ids one subscriber follows (`--device-ids`; the server takes at most 1000 per
/// subscription).
pub const DEVICE_IDS_PER_SUB_MAX: usize = 1000;
/// Most runtime threads.
pub const THREADS_MAX: usize = 256;
/// Read buffer per connection (tungstenite's default, 128 KiB, is far too much for 10,000).
pub const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Server frames kept verbatim for the report when they are errors or unexpected.
pub const FRAMES_KEPT_MAX: usize = 5;
/// Longest a kept frame is shown.
const FRAME_SHOWN_BYTES_MAX: usize = 200;

/// `geobeat-subload`: many subscribers on geobeat's `/v1/subscribe`, counting delivered events.
#[derive(Debug, Clone, Parser)]
#[command(name = "geobeat-subload", version, args_override_self = true)]
pub struct SubloadArgs {
    /// Subscribe endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/subscribe")]
    pub url: String,
    /// Ops or subscriber token (sent as `Authorization: Bearer`).
    #[arg(long, env = "GEOBEAT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Number of subscriber connections.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Each subscriber subscribes to this box, `minLon,minLat,maxLon,maxLat` (the default when
    /// neither --device-ids nor --fence is given: the whole world).
    #[arg(long, allow_hyphen_values = true, conflicts_with_all = ["device_ids", "fence"])]
    pub bbox: Option<String>,
    /// Each subscriber follows this many device ids, drawn (seeded, without repetition) from
    /// `<id-prefix>0 .. <id-prefix><id-space - 1>` (geobeat-load's ids).
    #[arg(long, conflicts_with = "fence")]
    pub device_ids: Option<usize>,
    /// Prefix of the device ids for --device-ids.
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,
    /// Number of device ids to draw from for --device-ids (geobeat-load's --devices).
    #[arg(long, default_value_t = 1000)]
    pub id_space: usize,
    /// Each subscriber subscribes to this fence (enter/exit events).
    #[arg(long)]
    pub fence: Option<String>,
    /// Measured window, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds after the connect ramp.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// New connections per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Limit for one connect + upgrade + subscription acknowledgement, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Runtime threads (one current-thread runtime each; subscribers dealt round-robin).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of the device-id draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the summary as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Exit 3 unless every subscriber connected, subscribed and stayed connected.
    #[arg(long)]
    pub fail_on_errors: bool,
}

/// Why a run could not be planned or run.
#[derive(Debug, Error)]
pub enum SubloadError {
    /// A flag is out of range or malformed.
    #[error("--{flag}: {reason}")]
    Flag {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A runtime thread could not be started.
    #[error("cannot start runtime thread: {0}")]
    Runtime(std::io::Error),
}

fn flag(flag: &'static str, reason: impl Into<String>) -> SubloadError {
    SubloadError::Flag {
        flag,
        reason: reason.into(),
    }
}

/// What every subscriber subscribes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Subscription {
    /// A box, `[minLon, minLat, maxLon, maxLat]`.
    BBox([f64; 4]),
    /// `count` ids drawn from `<prefix>0 .. <prefix><space - 1>`.
    Devices {
        /// Ids per subscriber.
        count: usize,
        /// Id prefix.
        prefix: String,
        /// Number of ids to draw from.
        space: usize,
    },
    /// A fence by name.
    Fence(String),
}

impl Subscription {
    /// The subscribe frame of subscriber `index` (device draws depend on `seed` and `index`
    /// only, so a run is reproducible).
    pub fn frame(&self, index: usize, seed: u64) -> String {
        let body = match self {
            Subscription::BBox(b) => serde_json::json!({ "bbox": b }),
            Subscription::Devices {
                count,
                prefix,
                space,
            } => {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(
                    seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let picks = rand::seq::index::sample(&mut rng, *space, *count);
                let ids: Vec<String> = picks.iter().map(|n| format!("{prefix}{n}")).collect();
                serde_json::json!({ "devices": ids })
            }
            Subscription::Fence(name) => serde_json::json!({ "fence": name }),
        };
        let mut frame = serde_json::json!({"op": "subscribe", "sub": "load"});
        frame
            .as_object_mut()
            .expect("an object")
            .extend(body.as_object().expect("an object").clone());
        frame.to_string()
    }

    fn describe(&self) -> String {
        match self {
            Subscription::BBox(b) => format!("bbox {},{},{},{}", b[0], b[1], b[2], b[3]),
            Subscription::Devices {
                count,
                prefix,
                space,
            } => format!("{count} device ids of {prefix}0..{prefix}{}", space - 1),
            Subscription::Fence(name) => format!("fence {name}"),
        }
    }
}

/// A validated run.
#[derive(Debug, Clone)]
pub struct SubPlan {
    /// The flags.
    pub args: SubloadArgs,
    /// Resolved server address.
    pub addr: SocketAddr,
    /// What every subscriber subscribes to.
    pub subscription: Subscription,
    /// Runtime threads.
    pub threads: usize,
    /// Connect ramp length.
    pub ramp: Duration,
}

impl SubPlan {
    /// Validates the flags.
    pub fn new(args: SubloadArgs) -> Result<SubPlan, SubloadError> {
        if !(1..=SUBSCRIBERS_MAX).contains(&args.subscribers) {
            return Err(flag(
                "subscribers",
                format!("must be 1..={SUBSCRIBERS_MAX}"),
            ));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(args.duration) {
            return Err(flag("duration", "must be > 0"));
        }
        if !(args.warmup.is_finite() && args.warmup >= 0.0) {
            return Err(flag("warmup", "must be >= 0"));
        }
        if !positive(args.connect_rate) {
            return Err(flag("connect-rate", "must be > 0"));
        }
        if !positive(args.connect_timeout) {
            return Err(flag("connect-timeout", "must be > 0"));
        }
        let subscription = if let Some(n) = args.device_ids {
            if !(1..=DEVICE_IDS_PER_SUB_MAX).contains(&n) {
                return Err(flag(
                    "device-ids",
                    format!("must be 1..={DEVICE_IDS_PER_SUB_MAX}"),
                ));
            }
            if args.id_space < n {
                return Err(flag("id-space", "must be at least --device-ids"));
            }
            Subscription::Devices {
                count: n,
                prefix: args.id_prefix.clone(),
                space: args.id_space,
            }
        } else if let Some(name) = &args.fence {
            Subscription::Fence(name.clone())
        } else {
            let text = args.bbox.as_deref().unwrap_or("-180,-90,180,90");
            let parts: Vec<f64> = text
                .split(',')
                .map(|p| p.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| flag("bbox", "four numbers minLon,minLat,maxLon,maxLat"))?;
            let b: [f64; 4] = parts
                .try_into()
                .map_err(|_| flag("bbox", "four numbers minLon,minLat,maxLon,maxLat"))?;
            Subscription::BBox(b)
        };
        let threads = args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if !(1..=THREADS_MAX).contains(&threads) {
            return Err(flag("threads", format!("must be 1..={THREADS_MAX}")));
        }
        let addr = resolve(&args.url).map_err(|reason| flag("url", reason))?;
        let ramp = Duration::from_secs_f64(args.subscribers as f64 / args.connect_rate);
        Ok(SubPlan {
            addr,
            subscription,
            threads: threads.min(args.subscribers),
            ramp,
            args,
        })
    }

    /// One line describing the run.
    pub fn describe(&self) -> String {
        format!(
            "geobeat-subload: {} subscribers -> {} ({}); {} thread(s); ramp {:.1} s, warmup {:.1} s, \
             measure {:.1} s",
            self.args.subscribers,
            self.args.url,
            self.subscription.describe(),
            self.threads,
            self.ramp.as_secs_f64(),
            self.args.warmup,
            self.args.duration
        )
    }
}

fn resolve(url: &str) -> Result<SocketAddr, String> {
    let uri: tungstenite::http::Uri = url.parse().map_err(|_| "not a URI".to_string())?;
    if uri.scheme_str() != Some("ws") {
        return Err("needs a ws:// URL".into());
    }
    let host = uri.host().ok_or("no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, uri.port_u16().unwrap_or(80))
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "host resolves to no address".to_string())
}

/// One server frame, classified by its first key (geobeat writes `missed`, `ok` and `error`
/// first) and by the keys events carry, without parsing the JSON. A heartbeat whose `attrs`
/// carry both a `fence` and an `event` key would be taken for a fence event; geobeat-load sends
/// no such attrs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A heartbeat event; `received_at_ms` is the server's receive time when present.
    Heartbeat {
        /// `received_at`, ms since the Unix epoch.
        received_at_ms: Option<i64>,
    },
    /// A fence enter/exit event.
    Fence,
    /// `{"missed":N}`.
    Missed(u64),
    /// `{"ok":..}`.
    Ok,
    /// `{"error":..}`.
    Error,
    /// Anything else.
    Unexpected,
}

/// The text after the first occurrence of the key `name` used as a key (`"name"` followed by
/// optional whitespace and a colon), with leading whitespace skipped.
fn after_key<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(at) = text[from..].find(name) {
        let start = from + at;
        from = start + name.len();
        let quoted = start > 0
            && text.as_bytes()[start - 1] == b'"'
            && text.as_bytes().get(from) == Some(&b'"');
        if !quoted {
            continue;
        }
        if let Some(rest) = text[from + 1..].trim_start().strip_prefix(':') {
            return Some(rest.trim_start());
        }
    }
    None
}

/// The integer value of the key `name`.
fn int_of(text: &str, name: &str) -> Option<i64> {
    let rest = after_key(text, name)?;
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

/// The first key of a JSON object's text.
fn first_key(text: &str) -> Option<&str> {
    let rest = text
        .trim_start()
        .strip_prefix('{')?
        .trim_start()
        .strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// Classifies one server text frame.
pub fn classify(text: &str) -> Frame {
    match first_key(text) {
        Some("missed") => {
            return int_of(text, "missed")
                .and_then(|n| u64::try_from(n).ok())
                .map_or(Frame::Unexpected, Frame::Missed)
        }
        Some("ok") => return Frame::Ok,
        Some("error") => return Frame::Error,
        Some(_) => {}
        None => return Frame::Unexpected,
    }
    if after_key(text, "sub").is_none() {
        return Frame::Unexpected;
    }
    if after_key(text, "fence").is_some() && after_key(text, "event").is_some() {
        return Frame::Fence;
    }
    if after_key(text, "lat").is_some() && after_key(text, "lon").is_some() {
        return Frame::Heartbeat {
            received_at_ms: int_of(text, "received_at"),
        };
    }
    Frame::Unexpected
}

/// What one runtime thread counted.
#[derive(Debug, Default)]
struct ThreadStats {
    connected: u64,
    connect_failures: u64,
    subscribed: u64,
    subscribe_errors: u64,
    closed_early: u64,
    close_codes: BTreeMap<u16, u64>,
    events: u64,
    fence_events: u64,
    missed: u64,
    missed_notices: u64,
    unexpected: u64,
    events_total: u64,
    missed_total: u64,
    /// Events inside the window, per subscriber of this thread.
    per_subscriber: Vec<u64>,
    lag: Option<Histogram<u64>>,
    frames_kept: Vec<String>,
}

impl ThreadStats {
    fn keep(&mut self, what: &str, text: &str) {
        if self.frames_kept.len() < FRAMES_KEPT_MAX {
            let mut end = text.len().min(FRAME_SHOWN_BYTES_MAX);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            self.frames_kept.push(format!("{what}: {}", &text[..end]));
        }
    }
}

/// Distribution of events per second over subscribers.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Spread {
    /// Least.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// Most.
    pub max: f64,
}

/// The result of a run (also written by `--json-out`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubloadSummary {
    /// Subscribers configured.
    pub subscribers: u64,
    /// Upgrades that succeeded.
    pub connected: u64,
    /// Connects or upgrades that failed or timed out.
    pub connect_failures: u64,
    /// Subscriptions acknowledged with `{"ok":"subscribe"}`.
    pub subscribed: u64,
    /// Subscriptions answered with an error (or not answered in time).
    pub subscribe_errors: u64,
    /// Connections the server ended before the run did.
    pub closed_early: u64,
    /// Close codes of those connections (1006: no close frame).
    pub close_codes: BTreeMap<u16, u64>,
    /// Length of the measured window, seconds.
    pub measured_s: f64,
    /// Heartbeat and fence events received in the window.
    pub events: u64,
    /// Of those, fence events.
    pub fence_events: u64,
    /// `events / measured_s`.
    pub events_per_s: f64,
    /// Sum of the `{"missed":N}` notices received in the window.
    pub missed: u64,
    /// `missed / measured_s`.
    pub missed_per_s: f64,
    /// Number of missed notices in the window.
    pub missed_notices: u64,
    /// Events over the whole run (warmup included).
    pub events_total: u64,
    /// Missed over the whole run.
    pub missed_total: u64,
    /// Frames that are neither events, notices, acks nor errors.
    pub unexpected: u64,
    /// Events per second per subscriber (window), over the subscribers that subscribed.
    pub per_subscriber_events_per_s: Spread,
    /// Delay from the server receiving a heartbeat (`received_at`, ms resolution) to a
    /// subscriber reading its event, µs, over the window's heartbeat events.
    pub lag: LatencySummary,
    /// CPU used by this process.
    pub client_cpu: CpuTimes,
    /// The first few error or unexpected frames.
    pub frames_kept: Vec<String>,
}

impl SubloadSummary {
    /// What made the run unclean (empty when clean).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.connect_failures > 0 {
            out.push(format!("{} connect failures", self.connect_failures));
        }
        if self.subscribed < self.subscribers {
            out.push(format!(
                "{} of {} subscribed",
                self.subscribed, self.subscribers
            ));
        }
        if self.closed_early > 0 {
            out.push(format!("{} closed early", self.closed_early));
        }
        if self.unexpected > 0 {
            out.push(format!("{} unexpected frames", self.unexpected));
        }
        out
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let l = &self.lag;
        let s = &self.per_subscriber_events_per_s;
        let mut out = format!(
            "subscribers: {} of {} connected, {} subscribed, {} connect failures, {} subscribe \
             errors, {} closed early {:?}\n",
            self.connected,
            self.subscribers,
            self.subscribed,
            self.connect_failures,
            self.subscribe_errors,
            self.closed_early,
            self.close_codes
        );
        out += &format!(
            "delivered:   {:.0} events/s ({} events, {} fence events) over {:.1} s; whole run {} \
             events\n",
            self.events_per_s, self.events, self.fence_events, self.measured_s, self.events_total
        );
        out += &format!(
            "missed:      {:.0} events/s ({} in {} notices); whole run {}\n",
            self.missed_per_s, self.missed, self.missed_notices, self.missed_total
        );
        out += &format!(
            "per subscriber: min {:.1}, median {:.1}, max {:.1} events/s\n",
            s.min, s.p50, s.max
        );
        out += &format!(
            "event lag (server receive -> subscriber, ms resolution): p50 {} us, p99 {} us, max \
             {} us ({} samples)\n",
            l.p50_us, l.p99_us, l.max_us, l.count
        );
        for f in &self.frames_kept {
            out += &format!("  frame {f}\n");
        }
        out += &format!(
            "client cpu:  user {:.2} s, sys {:.2} s; unexpected frames {}",
            self.client_cpu.user_s, self.client_cpu.sys_s, self.unexpected
        );
        out
    }
}

/// Shared, read-only timing of a run.
struct Timing {
    start: tokio::time::Instant,
    window_start: tokio::time::Instant,
    window_end: tokio::time::Instant,
}

/// Runs the plan to the end of the measured window and summarises.
pub fn run(plan: &SubPlan) -> Result<SubloadSummary, SubloadError> {
    let cpu_before = sys::cpu_times(sys::Who::SelfProcess);
    let now = Instant::now();
    // Every thread gets the same wall-clock schedule (tokio's Instant wraps std's).
    let start = now + Duration::from_millis(50);
    let window_start = start + plan.ramp + Duration::from_secs_f64(plan.args.warmup);
    let window_end = window_start + Duration::from_secs_f64(plan.args.duration);
    let mut handles = Vec::with_capacity(plan.threads);
    for t in 0..plan.threads {
        let plan = plan.clone();
        let handle = std::thread::Builder::new()
            .name(format!("subload-{t}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                let timing = Rc::new(Timing {
                    start: start.into(),
                    window_start: window_start.into(),
                    window_end: window_end.into(),
                });
                let local = tokio::task::LocalSet::new();
                let stats = Rc::new(RefCell::new(ThreadStats {
                    lag: Some(new_histogram()),
                    ..ThreadStats::default()
                }));
                for (slot, index) in (t..plan.args.subscribers).step_by(plan.threads).enumerate() {
                    stats.borrow_mut().per_subscriber.push(0);
                    local.spawn_local(subscriber(
                        plan.clone(),
                        index,
                        slot,
                        Rc::clone(&timing),
                        Rc::clone(&stats),
                    ));
                }
                rt.block_on(local.run_until(async {
                    tokio::time::sleep_until(window_end.into()).await;
                }));
                drop(local);
                Rc::try_unwrap(stats)
                    .map(RefCell::into_inner)
                    .unwrap_or_else(|rc| std::mem::take(&mut rc.borrow_mut()))
            })
            .map_err(SubloadError::Runtime)?;
        handles.push(handle);
    }
    let parts: Vec<ThreadStats> = handles
        .into_iter()
        .map(|h| h.join().expect("subscriber thread panicked"))
        .collect();
    let client_cpu = sys::cpu_times(sys::Who::SelfProcess).minus(&cpu_before);
    Ok(summarise(plan, parts, client_cpu))
}

fn summarise(plan: &SubPlan, parts: Vec<ThreadStats>, client_cpu: CpuTimes) -> SubloadSummary {
    let measured_s = plan.args.duration;
    let mut s = SubloadSummary {
        subscribers: plan.args.subscribers as u64,
        measured_s,
        client_cpu,
        ..SubloadSummary::default()
    };
    let mut lag = new_histogram();
    let mut per_subscriber = Vec::new();
    for p in parts {
        s.connected += p.connected;
        s.connect_failures += p.connect_failures;
        s.subscribed += p.subscribed;
        s.subscribe_errors += p.subscribe_errors;
        s.closed_early += p.closed_early;
        for (code, n) in p.close_codes {
            *s.close_codes.entry(code).or_default() += n;
        }
        s.events += p.events;
        s.fence_events += p.fence_events;
        s.missed += p.missed;
        s.missed_notices += p.missed_notices;
        s.events_total += p.events_total;
        s.missed_total += p.missed_total;
        s.unexpected += p.unexpected;
        if let Some(h) = &p.lag {
            lag.add(h).expect("histograms with equal bounds add");
        }
        per_subscriber.extend(p.per_subscriber);
        for f in p.frames_kept {
            if s.frames_kept.len() < FRAMES_KEPT_MAX {
                s.frames_kept.push(f);
            }
        }
    }
    s.events_per_s = s.events as f64 / measured_s;
    s.missed_per_s = s.missed as f64 / measured_s;
    s.lag = LatencySummary::of(&lag);
    per_subscriber.sort_unstable();
    if let (Some(&min), Some(&max)) = (per_subscriber.first(), per_subscriber.last()) {
        s.per_subscriber_events_per_s = Spread {
            min: min as f64 / measured_s,
            p50: per_subscriber[per_subscriber.len() / 2] as f64 / measured_s,
            max: max as f64 / measured_s,
        };
    }
    s
}

fn now_unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// One subscriber: connect at its place in the ramp, subscribe, then count until the thread's
/// runtime stops driving it at the end of the window.
async fn subscriber(
    plan: SubPlan,
    index: usize,
    slot: usize,
    timing: Rc<Timing>,
    stats: Rc<RefCell<ThreadStats>>,
) {
    let at = timing.start + Duration::from_secs_f64(index as f64 / plan.args.connect_rate);
    tokio::time::sleep_until(at).await;
    let limit = Duration::from_secs_f64(plan.args.connect_timeout);
    let frame = plan.subscription.frame(index, plan.args.seed);
    let mut ws = match tokio::time::timeout(limit, connect(&plan)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let mut st = stats.borrow_mut();
            st.connect_failures += 1;
            st.keep("connect", &e);
            return;
        }
        Err(_) => {
            stats.borrow_mut().connect_failures += 1;
            return;
        }
    };
    stats.borrow_mut().connected += 1;
    if ws.send(Message::text(frame)).await.is_err() {
        stats.borrow_mut().closed_early += 1;
        return;
    }
    let ack_deadline = tokio::time::Instant::now() + limit;
    let mut acked = false;
    loop {
        let next = if acked {
            ws.next().await
        } else {
            match tokio::time::timeout_at(ack_deadline, ws.next()).await {
                Ok(next) => next,
                Err(_) => {
                    stats.borrow_mut().subscribe_errors += 1;
                    acked = true;
                    continue;
                }
            }
        };
        let text = match next {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(close))) => {
                let code = close.map_or(1005, |c| u16::from(c.code));
                let mut st = stats.borrow_mut();
                st.closed_early += 1;
                *st.close_codes.entry(code).or_default() += 1;
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                let mut st = stats.borrow_mut();
                st.closed_early += 1;
                *st.close_codes.entry(1006).or_default() += 1;
                return;
            }
        };
        let now = tokio::time::Instant::now();
        let in_window = now >= timing.window_start && now < timing.window_end;
        let mut st = stats.borrow_mut();
        match classify(text.as_str()) {
            Frame::Heartbeat { received_at_ms } => {
                st.events_total += 1;
                if in_window {
                    st.events += 1;
                    st.per_subscriber[slot] += 1;
                    if let Some(ms) = received_at_ms {
                        let lag_us = (now_unix_us() - ms.saturating_mul(1000)).max(1) as u64;
                        if let Some(h) = st.lag.as_mut() {
                            h.saturating_record(lag_us);
                        }
                    }
                }
            }
            Frame::Fence => {
                st.events_total += 1;
                if in_window {
                    st.events += 1;
                    st.fence_events += 1;
                    st.per_subscriber[slot] += 1;
                }
            }
            Frame::Missed(n) => {
                st.missed_total += n;
                if in_window {
                    st.missed += n;
                    st.missed_notices += 1;
                }
            }
            Frame::Ok => {
                if !acked {
                    acked = true;
                    st.subscribed += 1;
                }
            }
            Frame::Error => {
                if !acked {
                    acked = true;
                    st.subscribe_errors += 1;
                }
                st.keep("error", text.as_str());
            }
            Frame::Unexpected => {
                st.unexpected += 1;
                st.keep("unexpected", text.as_str());
            }
        }
    }
}

type SubStream = async_tungstenite::WebSocketStream<TokioAdapter<tokio::net::TcpStream>>;

async fn connect(plan: &SubPlan) -> Result<SubStream, String> {
    let tcp = tokio::net::TcpStream::connect(plan.addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut request = plan
        .args
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let value = HeaderValue::from_str(&format!("Bearer {}", plan.args.token))
        .map_err(|_| "the token is not a valid header value".to_string())?;
    request.headers_mut().insert(AUTHORIZATION, value);
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let (ws, _) =
        async_tungstenite::client_async_with_config(request, TokioAdapter::new(tcp), Some(config))
            .await
            .map_err(|e| e.to_string())?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_tells_every_server_frame_apart() {
        // Checks each frame kind of the pinned wire protocol, including a negative and a
        // missing received_at, and garbage.
        assert_eq!(classify(r#"{"missed":12}"#), Frame::Missed(12));
        assert_eq!(classify(r#"{"missed":-1}"#), Frame::Unexpected);
        assert_eq!(classify(r#"{"ok":"subscribe","sub":"load"}"#), Frame::Ok);
        assert_eq!(
            classify(r#"{"error":"bad_bbox","sub":"load","detail":"x"}"#),
            Frame::Error
        );
        assert_eq!(
            classify(
                r#"{"sub":"load","id":"sim-1","lat":1.5,"lon":-2,"ts":5,"received_at":1700000000123,"speed":3}"#
            ),
            Frame::Heartbeat {
                received_at_ms: Some(1_700_000_000_123)
            }
        );
        assert_eq!(
            classify(r#"{"sub":"load","id":"a","lat":1,"lon":2,"ts":5}"#),
            Frame::Heartbeat {
                received_at_ms: None
            }
        );
        assert_eq!(
            classify(r#"{"sub":"f","fence":"depot","id":"a","event":"exit","ts":5}"#),
            Frame::Fence
        );
        // Whitespace between tokens is fine; a key-like value is not a key.
        assert_eq!(
            classify(r#"{ "sub" : "f", "fence": "depot", "id": "a", "event": "enter", "ts": 5}"#),
            Frame::Fence
        );
        assert_eq!(
            classify(r#"{"sub": "fence", "id": "a", "lat": 1, "lon": 2, "received_at" : 7}"#),
            Frame::Heartbeat {
                received_at_ms: Some(7)
            }
        );
        assert_eq!(classify(r#" { "missed" : 3 }"#), Frame::Missed(3));
        assert_eq!(classify("hello"), Frame::Unexpected);
        assert_eq!(classify(r#"{"id":"a","lat":1,"lon":2}"#), Frame::Unexpected);
    }

    #[test]
    fn subscribe_frames_follow_the_protocol_and_are_reproducible() {
        // Checks the three subscription kinds' frames, and that device draws are distinct ids
        // from the id space, the same for the same (seed, index), different across indexes.
        let bbox = Subscription::BBox([-180.0, -90.0, 180.0, 90.0]).frame(0, 1);
        let v: serde_json::Value = serde_json::from_str(&bbox).unwrap();
        assert_eq!(v["op"], "subscribe");
        assert_eq!(v["sub"], "load");
        assert_eq!(v["bbox"], serde_json::json!([-180.0, -90.0, 180.0, 90.0]));
        let fence: serde_json::Value =
            serde_json::from_str(&Subscription::Fence("depot".into()).frame(3, 1)).unwrap();
        assert_eq!(fence["fence"], "depot");
        let devices = Subscription::Devices {
            count: 10,
            prefix: "sim-".into(),
            space: 50,
        };
        let a: serde_json::Value = serde_json::from_str(&devices.frame(7, 1)).unwrap();
        let ids: Vec<&str> = a["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 10);
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 10);
        for id in &ids {
            let n: usize = id.strip_prefix("sim-").unwrap().parse().unwrap();
            assert!(n < 50);
        }
        assert_eq!(devices.frame(7, 1), devices.frame(7, 1));
        assert_ne!(devices.frame(7, 1), devices.frame(8, 1));
    }

    #[test]
    fn plans_refuse_bad_flags() {
        // Checks validation: a bad bbox, too few ids to draw from, a non-ws URL, and a good
        // plan's defaults (world bbox).
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "geobeat-subload",
                "--token",
                "t",
                "--url",
                "ws://127.0.0.1:9/x",
            ];
            argv.extend_from_slice(extra);
            SubPlan::new(SubloadArgs::parse_from(argv))
        };
        assert!(parse(&["--bbox", "1,2,3"]).is_err());
        assert!(parse(&["--device-ids", "20", "--id-space", "10"]).is_err());
        assert!(parse(&["--subscribers", "0"]).is_err());
        let mut argv = vec!["geobeat-subload", "--token", "t", "--url", "http://x/"];
        argv.truncate(5);
        assert!(SubPlan::new(SubloadArgs::parse_from(argv)).is_err());
        let plan = parse(&["--subscribers", "10", "--threads", "4"]).unwrap();
        assert_eq!(
            plan.subscription,
            Subscription::BBox([-180.0, -90.0, 180.0, 90.0])
        );
        assert_eq!(plan.threads, 4);
        assert!(parse(&["--bbox", "-10,-5,10,5"]).is_ok());
    }
}
