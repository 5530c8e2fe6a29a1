//! `geobeat demo`: the server on its defaults plus a simulated fleet, so a newcomer sees
//! heartbeats flowing. It owns the fleet simulation only: devices moving along plausible tracks
//! (a random walk with momentum around a city), sent through gateway connections — one of the two
//! real ways devices reach geobeat — and it prints what to try next.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::auth::{mint, Scope, Secret};

/// Devices per gateway connection in the demo fleet.
const DEVICES_PER_GATEWAY: usize = 250;
/// Prefix of every demo device id.
pub const DEMO_PREFIX: &str = "demo-";

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
}

/// Runs the fleet against a server listening on `addr` until `stop` is set. `devices` devices each
/// send one heartbeat every `1 / rate_hz` seconds.
pub fn run_fleet(
    addr: SocketAddr,
    secret: &Secret,
    devices: usize,
    rate_hz: f64,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    // Three cities, devices spread around them.
    let cities = [(52.52, 13.405), (48.8566, 2.3522), (40.4168, -3.7038)];
    let mut fleet: Vec<Device> = (0..devices)
        .map(|i| {
            let (lat, lon) = cities[i % cities.len()];
            Device {
                id: format!("{DEMO_PREFIX}{i:05}"),
                lat: lat + rng.gen_range(-0.05..0.05),
                lon: lon + rng.gen_range(-0.08..0.08),
                heading_deg: rng.gen_range(0.0..360.0),
                speed_mps: rng.gen_range(0.0..15.0),
                seq_owner: i / DEVICES_PER_GATEWAY,
            }
        })
        .collect();
    let gateways = devices.div_ceil(DEVICES_PER_GATEWAY);
    let expires = crate::server::exec::now_s() + 86_400;
    let token = mint(secret, &Scope::Gateway(DEMO_PREFIX.to_string()), expires);
    let url = format!("ws://{addr}/v1/ingest?token={token}");
    let mut sockets = Vec::with_capacity(gateways);
    for _ in 0..gateways {
        let (ws, _) = tungstenite::connect(url.as_str()).map_err(std::io::Error::other)?;
        sockets.push(ws);
    }
    let mut seqs = vec![0u64; gateways];
    let period = Duration::from_secs_f64(1.0 / rate_hz.max(0.01));
    let mut next = Instant::now();
    let mut sent = 0u64;
    let started = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let now_ms = crate::server::exec::received_now_ms();
        let mut frames: Vec<String> = vec![String::from("["); gateways];
        for d in fleet.iter_mut() {
            d.step(&mut rng, period.as_secs_f64());
            let g = d.seq_owner;
            seqs[g] += 1;
            let f = &mut frames[g];
            if f.len() > 1 {
                f.push(',');
            }
            f.push_str(&format!(
                r#"{{"seq":{},"id":"{}","lat":{:.6},"lon":{:.6},"ts":{},"speed":{:.1},"heading":{:.0}}}"#,
                seqs[g], d.id, d.lat, d.lon, now_ms, d.speed_mps, d.heading_deg
            ));
        }
        for (ws, mut f) in sockets.iter_mut().zip(frames) {
            f.push(']');
            ws.send(tungstenite::Message::text(f))
                .map_err(std::io::Error::other)?;
            // Drain acks without blocking for long.
            while ws.can_read() {
                match ws.get_mut() {
                    tungstenite::stream::MaybeTlsStream::Plain(s) => {
                        s.set_nonblocking(true)?;
                    }
                    _ => break,
                }
                let r = ws.read();
                if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
                    s.set_nonblocking(false)?;
                }
                match r {
                    Ok(_) => continue,
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        break
                    }
                    Err(e) => return Err(std::io::Error::other(e)),
                }
            }
        }
        sent += devices as u64;
        if sent % (devices as u64 * 10) == 0 {
            tracing::info!(
                sent,
                per_s = sent as f64 / started.elapsed().as_secs_f64(),
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
    Ok(())
}
