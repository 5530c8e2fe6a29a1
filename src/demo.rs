//! `geobeat demo`: the server on its defaults plus a simulated fleet, so a newcomer sees
//! heartbeats flowing. It owns the fleet simulation only: devices moving along plausible tracks
//! (a random walk with momentum around a city), sent through gateway connections — one of the two
//! real ways devices reach geobeat — and it prints what to try next and what the server answered.
//!
//! Invariant: every heartbeat the fleet sends passes the server's rules (it is built as a
//! [`Heartbeat`] within the protocol's ranges and written by the protocol encoder; debug builds
//! check each with the `validate` the server applies, and the tests run it through the server's
//! decoder), so a refusal counted in [`Tally`] is a server problem worth showing, never noise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::auth::{mint, Scope, Secret};
use crate::limits::DEMO_DRAIN_TIMEOUT_MS;
use crate::proto::Seq;
use crate::record::Heartbeat;

/// Devices per gateway connection in the demo fleet.
const DEVICES_PER_GATEWAY: usize = 250;
/// Prefix of every demo device id.
pub const DEMO_PREFIX: &str = "demo-";

/// The id of demo device `index` (`demo-00000`, `demo-00001`, ...).
pub fn device_id(index: usize) -> String {
    format!("{DEMO_PREFIX}{index:05}")
}

/// A device the demo's hints can name: `demo-00042` when the fleet has one, else its last device.
pub fn hint_device(devices: usize) -> String {
    device_id(42.min(devices.saturating_sub(1)))
}

/// One simulated device.
struct Device {
    id: String,
    lat: f64,
    lon: f64,
    heading_deg: f64,
    speed_mps: f64,
    seq_owner: usize,
}

impl Device {
    fn step(&mut self, rng: &mut impl Rng, dt_s: f64) {
        self.heading_deg = (self.heading_deg + rng.gen_range(-20.0..20.0)).rem_euclid(360.0);
        self.speed_mps = (self.speed_mps + rng.gen_range(-1.0..1.0)).clamp(0.0, 25.0);
        let d = self.speed_mps * dt_s;
        let (s, c) = self.heading_deg.to_radians().sin_cos();
        self.lat = (self.lat + d * c / 111_320.0).clamp(-89.0, 89.0);
        let per_deg_lon = 111_320.0 * self.lat.to_radians().cos().max(0.01);
        self.lon = ((self.lon + d * s / per_deg_lon + 180.0).rem_euclid(360.0)) - 180.0;
    }

    /// The heartbeat this device sends now. The heading is whole degrees in `0..360`: rounding
    /// 359.5 up gives 360, which the protocol refuses (`0 <= heading < 360`), so it wraps to 0.
    fn heartbeat(&self, ts_ms: i64) -> Heartbeat {
        let heading = self.heading_deg.round().rem_euclid(360.0) as f32;
        Heartbeat {
            device_id: self.id.clone(),
            lat: self.lat,
            lon: self.lon,
            ts_ms,
            received_ms: 0,
            alt_m: None,
            speed_mps: Some((self.speed_mps * 10.0).round() as f32 / 10.0),
            heading_deg: Some(if heading >= 360.0 { 0.0 } else { heading }),
            acc_m: None,
            attrs: Vec::new(),
        }
    }
}

/// What the server answered the fleet: acked heartbeats and refusals by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Heartbeats sent.
    pub sent: u64,
    /// Heartbeats covered by an ack (acks are cumulative per connection).
    pub acked: u64,
    /// Refused heartbeats (or whole messages), by reason, in order of first appearance.
    pub refused: Vec<(String, u64)>,
    /// Per gateway connection: the highest ack, and the refused seqs above it (refusals arrive
    /// before the ack that covers them; an ack covers its refused seqs without storing them).
    gateways: Vec<(u64, Vec<u64>)>,
}

impl Tally {
    /// A tally for a fleet sending over `gateways` connections.
    pub fn new(gateways: usize) -> Tally {
        Tally {
            gateways: vec![(0, Vec::new()); gateways],
            ..Tally::default()
        }
    }

    /// Refused heartbeats in all.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|r| r.1).sum()
    }

    /// Counts one server message on gateway connection `g`: `{"ack":N}` or
    /// `{"seq":S,"error":R}` (`S` null for a whole message). Returns the reason of a refusal seen
    /// for the first time (worth a log line).
    pub fn record(&mut self, g: usize, text: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let (high, pending) = &mut self.gateways[g];
        if let Some(ack) = v["ack"].as_u64() {
            if ack > *high {
                let covered = pending.iter().filter(|&&s| s <= ack).count() as u64;
                pending.retain(|&s| s > ack);
                self.acked += (ack - *high).saturating_sub(covered);
                *high = ack;
            }
            return None;
        }
        if let Some(seq) = v["seq"].as_u64() {
            pending.push(seq);
        }
        let reason = v["error"].as_str().unwrap_or("unknown");
        match self.refused.iter_mut().find(|r| r.0 == reason) {
            Some(r) => {
                r.1 += 1;
                None
            }
            None => {
                self.refused.push((reason.to_string(), 1));
                Some(reason.to_string())
            }
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} heartbeats sent, {} acked, {} refused",
            self.sent,
            self.acked,
            self.refused_total()
        )?;
        for (i, (reason, n)) in self.refused.iter().enumerate() {
            write!(f, "{}{reason}: {n}", if i == 0 { " (" } else { ", " })?;
        }
        if !self.refused.is_empty() {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Runs the fleet against a server listening on `addr` until `stop` is set. `devices` devices each
/// send one heartbeat every `1 / rate_hz` seconds. Returns what the server answered; acks and
/// refusals are counted as they arrive (each new refusal reason is logged at once) and, after
/// `stop`, for up to [`DEMO_DRAIN_TIMEOUT_MS`] until every heartbeat sent is answered.
pub fn run_fleet(
    addr: SocketAddr,
    secret: &Secret,
    devices: usize,
    rate_hz: f64,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Tally> {
    use std::sync::atomic::Ordering;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    // Three cities, devices spread around them.
    let cities = [(52.52, 13.405), (48.8566, 2.3522), (40.4168, -3.7038)];
    let mut fleet: Vec<Device> = (0..devices)
        .map(|i| {
            let (lat, lon) = cities[i % cities.len()];
            Device {
                id: device_id(i),
                lat: lat + rng.gen_range(-0.05..0.05),
                lon: lon + rng.gen_range(-0.08..0.08),
                heading_deg: rng.gen_range(0.0..360.0),
                speed_mps: rng.gen_range(0.0..15.0),
                seq_owner: i / DEVICES_PER_GATEWAY,
            }
        })
        .collect();
    let gateways = devices.div_ceil(DEVICES_PER_GATEWAY);
    let expires = crate::rt::now_s() + 86_400;
    let token = mint(secret, &Scope::Gateway(DEMO_PREFIX.to_string()), expires);
    let url = format!("ws://{addr}/v1/ingest?token={token}");
    let mut sockets = Vec::with_capacity(gateways);
    for _ in 0..gateways {
        let (ws, _) = tungstenite::connect(url.as_str()).map_err(std::io::Error::other)?;
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            // Answers are read between sends without waiting for them.
            s.set_nonblocking(true)?;
        }
        sockets.push(ws);
    }
    let mut tally = Tally::new(gateways);
    let mut seqs = vec![0u64; gateways];
    let period = Duration::from_secs_f64(1.0 / rate_hz.max(0.01));
    let mut next = Instant::now();
    let started = Instant::now();
    let mut frame = String::new();
    let mut batches: Vec<Vec<(Seq, Heartbeat)>> = (0..gateways).map(|_| Vec::new()).collect();
    let mut rounds = 0u64;
    let mut open = vec![true; gateways];
    while !stop.load(Ordering::Acquire) {
        let now_ms = crate::rt::now_ms();
        for d in fleet.iter_mut() {
            d.step(&mut rng, period.as_secs_f64());
            let g = d.seq_owner;
            seqs[g] += 1;
            let hb = d.heartbeat(now_ms);
            debug_assert_eq!(
                hb.validate(),
                Ok(()),
                "the demo sends only valid heartbeats"
            );
            batches[g].push((Seq(seqs[g]), hb));
        }
        for (g, ws) in sockets.iter_mut().enumerate() {
            crate::proto::json::encode_frame(&mut frame, batches[g].iter().map(|(s, h)| (*s, h)))
                .map_err(std::io::Error::other)?;
            let count = batches[g].len() as u64;
            batches[g].clear();
            if !open[g] {
                continue;
            }
            let sent = send(ws, tungstenite::Message::text(frame.as_str()));
            if sent.is_ok() {
                tally.sent += count;
            }
            open[g] = sent.is_ok() && drain(ws, g, &mut tally).unwrap_or(false);
            if !open[g] && !stop.load(Ordering::Acquire) {
                // Not a shutdown: the server closed (or broke) a connection it should keep.
                sent?;
                return Err(std::io::Error::other("the server closed a demo connection"));
            }
        }
        rounds += 1;
        if rounds % 10 == 0 {
            tracing::info!(
                sent = tally.sent,
                acked = tally.acked,
                refused = tally.refused_total(),
                per_s = tally.sent as f64 / started.elapsed().as_secs_f64(),
                "demo fleet"
            );
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    // The server is shutting down too: it sends each connection its final ack, then closes.
    let deadline = Instant::now() + Duration::from_millis(DEMO_DRAIN_TIMEOUT_MS);
    while open.contains(&true)
        && tally.acked + tally.refused_total() < tally.sent
        && Instant::now() < deadline
    {
        for (g, ws) in sockets.iter_mut().enumerate() {
            if open[g] {
                open[g] = drain(ws, g, &mut tally).unwrap_or(false);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(tally)
}

/// Sends `msg` on a non-blocking socket, waiting while the socket buffer is full.
fn send(ws: &mut DemoSocket, msg: tungstenite::Message) -> std::io::Result<()> {
    let mut r = ws.send(msg);
    loop {
        match r {
            Ok(()) => return Ok(()),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
                r = ws.flush();
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// Counts every answer already received on gateway connection `g`, without waiting; `false`
/// once the server closed the connection (it does when it shuts down); an error if it broke.
fn drain(ws: &mut DemoSocket, g: usize, tally: &mut Tally) -> std::io::Result<bool> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                if let Some(reason) = tally.record(g, t.as_str()) {
                    tracing::warn!(reason, frame = %t, "the server refused a demo heartbeat");
                }
            }
            Ok(tungstenite::Message::Close(_))
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(false)
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Ok(true)
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

type DemoSocket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_heading_rounds_into_the_protocol_range() {
        // 359.5 and above rounded to whole degrees is 360, which the protocol refuses: it is
        // sent as 0. Every heartbeat the demo builds passes the server's own decoder.
        for heading_deg in [0.0, 0.4, 180.5, 359.4, 359.5, 359.99, 359.999_999_9] {
            let d = Device {
                id: device_id(7),
                lat: 52.5,
                lon: 13.4,
                heading_deg,
                speed_mps: 24.96,
                seq_owner: 0,
            };
            let hb = d.heartbeat(1_732_200_000_000);
            assert_eq!(hb.validate(), Ok(()), "heading {heading_deg}");
            let mut text = String::new();
            crate::proto::json::encode_frame(&mut text, [(Seq(1), &hb)]).unwrap();
            let ingest = crate::proto::Ingest::new(
                crate::proto::IngestScope::Gateway(DEMO_PREFIX),
                1_732_200_000_000,
            );
            let mut dec = crate::proto::Decoder::new();
            let slots = dec.decode_text(&text, &ingest).unwrap();
            assert!(
                matches!(slots[0].outcome(), crate::proto::Outcome::Accepted { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn the_fleet_stays_valid_over_many_steps() {
        // A random walk of many devices for many steps never leaves the protocol's ranges.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut d = Device {
            id: device_id(0),
            lat: 88.9,
            lon: 179.9,
            heading_deg: 0.0,
            speed_mps: 25.0,
            seq_owner: 0,
        };
        for _ in 0..200_000 {
            d.step(&mut rng, 60.0);
            assert_eq!(d.heartbeat(1).validate(), Ok(()), "{}", d.heading_deg);
        }
    }

    #[test]
    fn hints_name_a_device_of_the_fleet() {
        assert_eq!(hint_device(1000), "demo-00042");
        assert_eq!(hint_device(43), "demo-00042");
        assert_eq!(hint_device(5), "demo-00004");
        assert_eq!(hint_device(1), "demo-00000");
    }

    #[test]
    fn the_tally_counts_cumulative_acks_and_refusals() {
        // Two connections; seq 3 refused before the ack covering it; a whole-message refusal.
        let mut t = Tally::new(2);
        t.sent = 7;
        assert_eq!(
            t.record(0, r#"{"seq":3,"error":"lat_out_of_range"}"#),
            Some("lat_out_of_range".into())
        );
        assert_eq!(t.record(0, r#"{"ack":2}"#), None);
        assert_eq!(t.record(0, r#"{"ack":4}"#), None);
        assert_eq!(t.record(1, r#"{"ack":2}"#), None);
        assert_eq!(t.record(1, r#"{"seq":4,"error":"lat_out_of_range"}"#), None);
        assert_eq!(t.acked, 5);
        assert_eq!(t.refused_total(), 2);
        assert_eq!(
            t.to_string(),
            "7 heartbeats sent, 5 acked, 2 refused (lat_out_of_range: 2)"
        );
    }
}
