//! Crash under load, end to end: the real `geobeat serve` is SIGKILLed at random moments while
//! many device and gateway connections stream heartbeats, then restarted, round after round. After
//! every restart each device's history and last location are checked against what the clients
//! sent and what the server acknowledged:
//!
//! - every heartbeat whose ack a client received is in the device's history (acked-but-lost = 0);
//! - nothing appears that was never sent, and nothing appears twice;
//! - the last location is the newest heartbeat by device time (and not older than any acked one).
//!
//! Clients never resend, and every heartbeat of a device has a unique device time, so a duplicate
//! can only come from the server. Rounds alternate `--durability strict` and `relaxed` (both
//! promise that a process crash loses nothing acked), and the write modes cycle `--write-mode
//! mmap`, `pwrite` and `dsync` (dsync always strict, every other time with
//! `--commit-linger-adaptive-us`). `GB_CRASH_ROUNDS` and `GB_SEED` override the
//! round count and the random seed (printed, so a failing run can be replayed).

mod common;
use common::*;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geobeat::auth::Scope;
use geobeat::proto::{binary::encode_frame, Seq};
use geobeat::record::Heartbeat;
use rand::{Rng, SeedableRng};

/// Device connections (one device token each).
const DEVICES: usize = 50;
/// Gateway connections, each writing `GATEWAY_DEVICES` devices whose ids hash to both shards, so
/// frames are split and forwarded across executors while the kill happens.
const GATEWAYS: usize = 4;
const GATEWAY_DEVICES: usize = 4;
/// Frames a client keeps unacknowledged before it waits for acks.
const WINDOW_FRAMES: usize = 4;
/// Pause after each frame: bounds the load (about 5,000 heartbeats/s from all clients together)
/// so that re-reading every device's whole history after each round stays within the test's time
/// budget on a 2-core machine.
const FRAME_GAP: Duration = Duration::from_millis(40);
/// Longest wait for an ack while the server is up (a stall is a failure, not a pass).
const ACK_WAIT: Duration = Duration::from_secs(15);

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const EXIT: u8 = 2;

/// What one device was sent and what of it was acknowledged.
#[derive(Default)]
struct DevLog {
    id: String,
    next_ts: i64,
    /// Device time → (lat, lon) of every heartbeat ever sent for this device.
    sent: HashMap<i64, (f64, f64)>,
    /// Device times whose ack the client received.
    acked: Vec<i64>,
}

/// One client connection's state, shared with the checker between rounds.
struct Client {
    token: String,
    gateway: bool,
    devs: Vec<DevLog>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    error_frames: AtomicU64,
    stalls: AtomicU64,
    connects: AtomicU64,
}

fn position(ts: i64) -> (f64, f64) {
    // Deterministic from the device time. Integer thousandths divided once are the doubles
    // nearest to short decimals, which every JSON reader (serde_json's fast path included)
    // parses back exactly.
    (
        ((ts % 170_000) - 85_000) as f64 / 1000.0,
        ((ts % 350_000) - 175_000) as f64 / 1000.0,
    )
}

/// Runs one client until the phase leaves RUN or the connection breaks.
fn run_connection(
    server_url: &str,
    client: &mut Client,
    phase: &AtomicU8,
    counters: &Counters,
    rng: &mut rand::rngs::StdRng,
) {
    use tungstenite::client::IntoClientRequest;
    let mut req = server_url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", client.token).parse().unwrap(),
    );
    let Ok((mut ws, _)) = tungstenite::connect(req) else {
        std::thread::sleep(Duration::from_millis(20));
        return;
    };
    counters.connects.fetch_add(1, Ordering::Relaxed);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(ACK_WAIT)).unwrap();
    }
    let mut seq = 0u64;
    // (seq, device index, ts) not yet acknowledged, and the last seq of each frame in flight.
    let mut pending: VecDeque<(u64, usize, i64)> = VecDeque::new();
    let mut frames: VecDeque<u64> = VecDeque::new();
    let mut refused: HashSet<u64> = HashSet::new();
    while phase.load(Ordering::Acquire) == RUN {
        let count = rng.gen_range(1..=8usize);
        let binary = rng.gen_bool(0.3);
        let mut text = String::from("[");
        let mut hbs: Vec<(Seq, Heartbeat)> = Vec::new();
        for k in 0..count {
            seq += 1;
            let d = rng.gen_range(0..client.devs.len());
            let dev = &mut client.devs[d];
            let ts = dev.next_ts;
            dev.next_ts += 1;
            let (lat, lon) = position(ts);
            dev.sent.insert(ts, (lat, lon));
            pending.push_back((seq, d, ts));
            if binary {
                hbs.push((
                    Seq(seq),
                    Heartbeat {
                        device_id: if client.gateway {
                            dev.id.clone()
                        } else {
                            String::new()
                        },
                        lat,
                        lon,
                        ts_ms: ts,
                        ..Default::default()
                    },
                ));
            } else {
                if k > 0 {
                    text.push(',');
                }
                text.push_str(&format!(
                    r#"{{"seq":{seq},"id":"{}","lat":{lat},"lon":{lon},"ts":{ts}}}"#,
                    dev.id
                ));
            }
        }
        counters.sent.fetch_add(count as u64, Ordering::Relaxed);
        let msg = if binary {
            let mut buf = Vec::new();
            encode_frame(&mut buf, hbs.iter().map(|(s, h)| (*s, h))).unwrap();
            Message::binary(buf)
        } else {
            text.push(']');
            Message::text(text)
        };
        if ws.send(msg).is_err() {
            return;
        }
        frames.push_back(seq);
        std::thread::sleep(FRAME_GAP);
        while frames.len() >= WINDOW_FRAMES {
            let v = match ws.read() {
                Ok(Message::Text(t)) => serde_json::from_str::<serde_json::Value>(t.as_str())
                    .expect("server sends JSON"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    counters.stalls.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => return,
            };
            if let Some(a) = v["ack"].as_u64() {
                while frames.front().is_some_and(|&s| s <= a) {
                    frames.pop_front();
                }
                while pending.front().is_some_and(|p| p.0 <= a) {
                    let (s, d, ts) = pending.pop_front().unwrap();
                    if !refused.contains(&s) {
                        client.devs[d].acked.push(ts);
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else {
                counters.error_frames.fetch_add(1, Ordering::Relaxed);
                eprintln!("unexpected error frame: {v}");
                if let Some(s) = v["seq"].as_u64() {
                    refused.insert(s);
                }
            }
        }
    }
}

/// Checks every device against the server, panicking with details on the first device that
/// fails; returns how many heartbeats the server holds in total.
fn verify(server: &Server, ops: &str, clients: &[Arc<Mutex<Client>>]) -> usize {
    let mut stored_total = 0;
    for c in clients {
        let c = c.lock().unwrap();
        for dev in &c.devs {
            let hist = history_all(server, &dev.id, ops).unwrap_or_default();
            let mut seen = HashSet::new();
            let mut dups = 0;
            let mut phantom = Vec::new();
            let mut prev_ts = i64::MAX;
            for h in &hist {
                let ts = h["ts"].as_i64().expect("ts");
                assert!(
                    ts < prev_ts || seen.contains(&ts),
                    "{}: history not newest first",
                    dev.id
                );
                prev_ts = ts;
                if !seen.insert(ts) {
                    dups += 1;
                }
                match dev.sent.get(&ts) {
                    Some(&(lat, lon))
                        if h["lat"].as_f64() == Some(lat)
                            && h["lon"].as_f64() == Some(lon)
                            && h["id"] == dev.id.as_str() => {}
                    _ => phantom.push(h.clone()),
                }
            }
            let lost: Vec<i64> = dev
                .acked
                .iter()
                .copied()
                .filter(|ts| !seen.contains(ts))
                .collect();
            stored_total += hist.len();
            assert!(
                lost.is_empty() && phantom.is_empty() && dups == 0,
                "{}: acked-but-lost {} (first {:?}), phantom {} (first {:?}), duplicated {dups}",
                dev.id,
                lost.len(),
                lost.first(),
                phantom.len(),
                phantom.first()
            );
            let last = last_location(server, &dev.id, ops);
            match (hist.first(), last) {
                (None, None) => {}
                (Some(newest), Some(last)) => {
                    assert_eq!(
                        last["ts"], newest["ts"],
                        "{}: last is not the newest",
                        dev.id
                    );
                    assert_eq!(last["lat"], newest["lat"], "{}", dev.id);
                    assert_eq!(last["lon"], newest["lon"], "{}", dev.id);
                    let acked_max = dev.acked.iter().max().copied().unwrap_or(i64::MIN);
                    assert!(
                        last["ts"].as_i64().unwrap() >= acked_max,
                        "{}: last location older than an acked heartbeat",
                        dev.id
                    );
                }
                (h, l) => panic!("{}: history {:?} but last location {:?}", dev.id, h, l),
            }
        }
    }
    stored_total
}

#[test]
fn sigkill_under_load_loses_no_acked_heartbeat() {
    // 50 device connections and 4 gateway connections stream heartbeats; the server is SIGKILLed
    // at a random moment each round and restarted; after each restart every acked heartbeat must
    // be in history, nothing unsent or duplicated may appear, and the last location must be the
    // newest heartbeat. Fails on any violation, any error frame, and any ack stall.
    let seed: u64 = std::env::var("GB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let rounds: usize = std::env::var("GB_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("crash_server: seed {seed} (GB_SEED={seed} replays), {rounds} rounds");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let mut server = Server::start_logged(&data, &["--segment-bytes", "1MiB"], &log);
    let ops = server.token(&["ops"]);
    let t0 = now_ms() - 86_400_000;

    let mut clients = Vec::new();
    for i in 0..DEVICES {
        let id = format!("crash-{i:02}");
        clients.push(Client {
            token: server.token_fast(Scope::Device(id.clone())),
            gateway: false,
            devs: vec![DevLog {
                id,
                next_ts: t0,
                ..Default::default()
            }],
        });
    }
    for g in 0..GATEWAYS {
        let prefix = format!("gw{g}/");
        clients.push(Client {
            token: server.token_fast(Scope::Gateway(prefix.clone())),
            gateway: true,
            devs: (0..GATEWAY_DEVICES)
                .map(|k| DevLog {
                    id: format!("{prefix}{k}"),
                    next_ts: t0,
                    ..Default::default()
                })
                .collect(),
        });
    }
    let clients: Vec<Arc<Mutex<Client>>> = clients
        .into_iter()
        .map(|c| Arc::new(Mutex::new(c)))
        .collect();
    let phase = Arc::new(AtomicU8::new(PAUSE));
    let parked = Arc::new(AtomicUsize::new(0));
    let counters = Arc::new(Counters::default());
    let url = server.ingest_url();
    let threads: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, phase, parked, counters, url) = (
                c.clone(),
                phase.clone(),
                parked.clone(),
                counters.clone(),
                url.clone(),
            );
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64 + 1));
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || loop {
                    match phase.load(Ordering::Acquire) {
                        EXIT => return,
                        PAUSE => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        _ => {}
                    }
                    let mut guard = c.lock().unwrap();
                    parked.fetch_sub(1, Ordering::AcqRel);
                    while phase.load(Ordering::Acquire) == RUN {
                        run_connection(&url, &mut guard, &phase, &counters, &mut rng);
                    }
                    parked.fetch_add(1, Ordering::AcqRel);
                })
                .unwrap()
        })
        .collect();
    parked.store(clients.len(), Ordering::Release);

    let started = Instant::now();
    let mut survived = 0;
    let mut stored = 0;
    for round in 0..rounds {
        phase.store(RUN, Ordering::Release);
        let run_ms = rng.gen_range(50..2500u64);
        std::thread::sleep(Duration::from_millis(run_ms));
        server.kill9();
        phase.store(PAUSE, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(30);
        while parked.load(Ordering::Acquire) < clients.len() {
            assert!(Instant::now() < deadline, "clients did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Alternate durability modes, and cycle the write modes, across restarts of the same
        // data directory (a segment written by one mode is continued by the next). dsync runs
        // with strict durability only (relaxed refuses it), every other time with the adaptive
        // linger on.
        let writes = ["mmap", "pwrite", "dsync"][round % 3];
        let mode = if round % 2 == 0 && writes != "dsync" {
            "relaxed"
        } else {
            "strict"
        };
        let adaptive = if writes == "dsync" && round % 2 == 1 {
            "300"
        } else {
            "0"
        };
        let ours = [
            "--durability",
            "--write-mode",
            "--commit-linger-adaptive-us",
        ];
        // Each of our flags is followed by its value: drop both.
        let mut kept = Vec::new();
        let mut args = std::mem::take(&mut server.args).into_iter();
        while let Some(a) = args.next() {
            if ours.contains(&a.as_str()) {
                args.next();
            } else {
                kept.push(a);
            }
        }
        server.args = kept;
        server.args.extend([
            "--durability".into(),
            mode.into(),
            "--write-mode".into(),
            writes.into(),
            "--commit-linger-adaptive-us".into(),
            adaptive.into(),
        ]);
        server.restart_logged(&log);
        let checked = Instant::now();
        let n = verify(&server, &ops, &clients);
        let verify_ms = checked.elapsed().as_millis();
        stored = n;
        survived += 1;
        eprintln!(
            "round {round}: killed after {run_ms} ms, restarted ({mode}, {writes}, adaptive \
             linger {adaptive} µs); stored {n}, acked \
             so far {}, verified in {verify_ms} ms",
            counters.acked.load(Ordering::Relaxed)
        );
    }
    phase.store(EXIT, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    let sent = counters.sent.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    eprintln!(
        "crash_server: rounds survived {survived}/{rounds}, heartbeats sent {sent}, acked {acked}, \
         stored {stored}, acked-but-lost 0, phantom 0, duplicated 0, connections {}, {:.1} s",
        counters.connects.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        counters.error_frames.load(Ordering::Relaxed),
        0,
        "error frames"
    );
    assert_eq!(
        counters.stalls.load(Ordering::Relaxed),
        0,
        "ack stalls while the server was up"
    );
    assert!(acked > 0, "the load generated acks");
}
