//! Ownership without split brain (issue 17 item 2), end to end: two real geobeat nodes with
//! `--node-id`/`--advertise` on one real three-server NATS JetStream cluster (the PyPI wheel's
//! nats-server, configs from deploy/nats/, all on 127.0.0.0/8). Checks that placement converges
//! (every unit owned by exactly one node), that a non-owner redirects a device (WebSocket 307
//! with the owner's `Location`, MQTT 5 CONNACK 0x9C with a Server Reference, MQTT 3.1.1 CONNACK
//! 0x03), and that after kill -9 of an owner its units are taken over
//! within the documented bound and its devices keep sending through the new owner, with every
//! acked heartbeat in the streams exactly once; and that a frozen owner (SIGSTOP) whose units
//! moved steps down when it wakes (SIGCONT): its late publishes are refused by the new owner's
//! fence, nothing it held unacked lands, nothing is stored twice. And that any node answers for
//! the whole fleet (issue 17 item 3): last location, area queries, subscriptions and fence
//! events of a device another node writes, the view's lag, history by redirect. Bounded: about
//! 60 s.

#[path = "common/cluster_node.rs"]
mod cluster_node;
mod common;
#[path = "common/nats.rs"]
mod nats;

use cluster_node::{start_node, start_node_mqtt, Node};
use common::*;
use nats::NatsCluster;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use geobeat::auth::Scope;
use geobeat::replicate::{batch, wire};

/// The takeover bound the test holds the cluster to: the dead-lease bound plus a few lease
/// intervals for the survivor to see it, claim, fence, and the device to reconnect.
const TAKEOVER_MAX: Duration = Duration::from_secs(15);

/// The ownership section of a node's `/v1/stats`.
fn ownership(node: &Node, ops: &str) -> serde_json::Value {
    let (st, body) = node.server.get("/v1/stats", Some(ops));
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["replication"]["ownership"].clone()
}

/// Waits until the nodes together own every unit, each seeing `live` nodes.
fn wait_converged(nodes: &[&Node], ops: &str, live: usize, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let views: Vec<serde_json::Value> = nodes.iter().map(|n| ownership(n, ops)).collect();
        let owned: u64 = views
            .iter()
            .map(|v| v["units_owned"].as_u64().unwrap())
            .sum();
        let units = views[0]["units"].as_u64().unwrap();
        let seen = views
            .iter()
            .all(|v| v["live"].as_array().unwrap().len() == live);
        if owned == units && seen {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "placement did not converge in {limit:?}: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The answer to a device's WebSocket upgrade at `addr`: `Ok(ws)` on 101, else the status and
/// `Location`.
fn ws_device(addr: SocketAddr, token: &str) -> Result<Ws, (u16, Option<String>)> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/v1/ingest")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    // Not `tungstenite::connect`: it follows redirects itself.
    let Ok(tcp) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return Err((0, None));
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match tungstenite::client::client(req, tungstenite::stream::MaybeTlsStream::Plain(tcp)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => Err((
            r.status().as_u16(),
            r.headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        )),
        Err(_) => Err((0, None)),
    }
}

/// Sends one heartbeat (`ts`) and waits for its ack; `false` if the connection broke or no ack
/// came in time (the device then reconnects and resends, as the protocol says).
fn send_acked(ws: &mut Ws, seq: u64, id: &str, ts: i64) -> bool {
    send_acked_within(ws, seq, id, ts, Duration::from_secs(3))
}

/// [`send_acked`], waiting up to `wait` for the ack (a unit's first replicated batch may wait
/// for its stream's Raft leader on a crowded machine).
fn send_acked_within(ws: &mut Ws, seq: u64, id: &str, ts: i64, wait: Duration) -> bool {
    use tungstenite::Message;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(wait)).unwrap();
    }
    let text = format!(r#"[{{"seq":{seq},"id":"{id}","lat":1.0,"lon":2.0,"ts":{ts}}}]"#);
    if ws.send(Message::text(text)).is_err() {
        return false;
    }
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match v["ack"].as_u64() {
                    Some(a) if a >= seq => return true,
                    Some(_) => {}
                    None => panic!("error frame: {v}"),
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// The CONNACK (reason code, Server Reference) a device's MQTT CONNECT at `mqtt` gets.
fn mqtt_connack(mqtt: SocketAddr, token: &str, v5: bool) -> (u8, Option<String>) {
    use geobeat::proto::mqtt::codec::{self, Connect, Packet, PropValue, Props, Version};
    use std::io::{Read, Write};
    let version = if v5 { Version::V5 } else { Version::V311 };
    let mut s = std::net::TcpStream::connect(mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let connect = Connect {
        version,
        clean: true,
        keep_alive_s: 30,
        props: &[],
        client_id: "cluster-test",
        will: None,
        // MQTT 3.1.1 allows a password only with a user name; an empty one names no device.
        username: Some(""),
        password: Some(token.as_bytes()),
    };
    codec::encode(&Packet::Connect(connect), version, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 512];
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            return (
                0xff,
                Some(format!("closed before the CONNACK after {buf:?}")),
            );
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((Packet::ConnAck(a), _)) = codec::decode(&buf, Some(version), 1 << 16).unwrap()
        {
            let reference = match Props(a.props).get(0x1c) {
                Some(PropValue::Str(r)) => Some(r.to_string()),
                _ => None,
            };
            return (a.code, reference);
        }
    }
}

/// Every heartbeat stored in the streams, with how often (fences, empty batches, skipped).
fn stored(nats: &NatsCluster, streams: u32) -> HashMap<(String, i64), usize> {
    let mut out: HashMap<(String, i64), usize> = HashMap::new();
    for k in 0..streams {
        for m in nats.read_stream(&geobeat::replicate::stream_name(k)) {
            assert!(wire::header(&m.headers, "Nats-Msg-Id").is_some());
            for e in batch::decode(&m.data).expect("batch decodes") {
                *out.entry((e.hb.device_id.clone(), e.hb.ts_ms)).or_default() += 1;
            }
        }
    }
    out
}

/// One cluster test at a time: each runs three nats-servers and two geobeats on two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Finds a device whose unit `owner` writes: `from` answers its upgrade with 307 to `owner`.
fn device_of(from: &Node, owner: &Node) -> (String, String) {
    device_minted_by(from, owner, from)
}

/// [`device_of`] with tokens minted from `minter`'s data directory (the node holding the
/// shared secret file).
fn device_minted_by(from: &Node, owner: &Node, minter: &Node) -> (String, String) {
    for i in 0..400 {
        let id = format!("dev-{i}");
        let token = minter.server.token_fast(Scope::Device(id.clone()));
        match ws_device(from.server.addr, &token) {
            Err((307, Some(loc))) => {
                assert_eq!(loc, format!("ws://{}/v1/ingest", owner.server.addr));
                return (id, token);
            }
            Ok(_) => continue,
            Err(other) => panic!("unexpected answer: {other:?}"),
        }
    }
    panic!("no device of the other node among 400");
}

/// Connects to `node`, retrying (307 to a dead or frozen owner, 503 while placing) until it
/// serves the device or `limit` passes.
fn connect_until(node: &Node, token: &str, since: Instant, limit: Duration) -> Ws {
    loop {
        assert!(
            since.elapsed() < limit,
            "no takeover within {limit:?}\n{}",
            log_tail(&node.log, 30)
        );
        match ws_device(node.server.addr, token) {
            Ok(ws) => return ws,
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Waits until process `pid` is stopped (state `T` in /proc), so a SIGSTOP has taken effect.
fn wait_stopped(pid: i32) {
    let t = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if state == Some("T") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "pid {pid} did not stop: {stat}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_frozen_owner_steps_down_when_it_wakes_and_nothing_is_stored_twice() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let nats = NatsCluster::start();
    let root = tempfile::tempdir().unwrap();
    let mut a = start_node(root.path(), "a", &nats, None);
    let secret = a.server.dir.join("secret");
    let mut b = start_node(root.path(), "b", &nats, Some(&secret));
    let ops = a.server.token_fast(Scope::Ops);
    wait_converged(&[&a, &b], &ops, 2, Duration::from_secs(20));
    let (id, token) = device_of(&a, &b);
    let t0 = now_ms() - 3_600_000;
    let mut acked: Vec<i64> = Vec::new();
    let mut ws = ws_device(b.server.addr, &token).expect("b serves its device");
    for k in 0..10 {
        let wait = Duration::from_secs(15);
        assert!(
            send_acked_within(&mut ws, k as u64 + 1, &id, t0 + k, wait),
            "b acks\n{}",
            log_tail(&b.log, 30)
        );
        acked.push(t0 + k);
    }
    // A heartbeat sent to b after it froze (it waits in b's socket buffer): never acked; the
    // device resends it through the new owner. b reads it when it wakes; if b then published
    // it late, it would be stored twice. (Sent after the SIGSTOP so that b cannot have
    // published it before freezing: that would be an ordinary publish whose ack was lost, a
    // duplicate only device-scoped sequences remove, not a late publish.)
    let pending = t0 + 10;
    let pid = b.server.child.id() as i32;
    // SAFETY: signals to a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_stopped(pid);
    let text = format!(r#"[{{"seq":11,"id":"{id}","lat":1.0,"lon":2.0,"ts":{pending}}}]"#);
    ws.send(tungstenite::Message::text(text)).unwrap();
    drop(ws);
    let frozen = Instant::now();
    let mut ws = connect_until(&a, &token, frozen, TAKEOVER_MAX);
    eprintln!("a serves b's device {:?} after SIGSTOP", frozen.elapsed());
    let mut seq = 0;
    let mut ts = pending;
    while ts < pending + 10 {
        seq += 1;
        if send_acked(&mut ws, seq, &id, ts) {
            acked.push(ts);
            ts += 1;
        } else {
            ws = connect_until(&a, &token, frozen, TAKEOVER_MAX * 2);
            seq = 0;
        }
    }
    // SIGCONT: b wakes as a zombie; it must step down for the units it lost.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let woke = Instant::now();
    loop {
        let v = ownership(&b, &ops);
        if v["stepdowns"].as_u64().unwrap_or(0) > 0 {
            eprintln!("b stepped down {:?} after SIGCONT: {v}", woke.elapsed());
            break;
        }
        assert!(
            woke.elapsed() < Duration::from_secs(10),
            "b did not step down: {v}\n{}",
            log_tail(&b.log, 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give a late publish every chance to land, then read the streams.
    std::thread::sleep(Duration::from_secs(2));
    let found = stored(&nats, 3);
    for ((dev, t), n) in &found {
        assert_eq!(*n, 1, "{dev} ts {t} stored {n} times");
    }
    for t in &acked {
        assert_eq!(
            found.get(&(id.clone(), *t)).copied(),
            Some(1),
            "acked heartbeat ts {t} missing"
        );
    }
    a.server.kill9();
    b.server.kill9();
}

#[test]
fn placement_converges_non_owners_redirect_and_a_killed_owner_is_taken_over() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t_start = Instant::now();
    let nats = NatsCluster::start();
    let root = tempfile::tempdir().unwrap();
    let a_mqtt = free_addr_outside_ephemeral();
    let a = start_node_mqtt(root.path(), "a", &nats, None, Some(a_mqtt));
    let secret = a.server.dir.join("secret");
    let mut b = start_node(root.path(), "b", &nats, Some(&secret));
    let ops = a.server.token_fast(Scope::Ops);
    let took = wait_converged(&[&a, &b], &ops, 2, Duration::from_secs(20));
    eprintln!(
        "placement converged in {took:?}: {} {}",
        ownership(&a, &ops),
        ownership(&b, &ops)
    );

    // A device whose unit b owns: a answers its upgrade with 307 to b.
    let mut device = None;
    for i in 0..200 {
        let id = format!("dev-{i}");
        let token = a.server.token_fast(Scope::Device(id.clone()));
        match ws_device(a.server.addr, &token) {
            Err((307, Some(loc))) => {
                assert_eq!(loc, format!("ws://{}/v1/ingest", b.server.addr));
                device = Some((id, token));
                break;
            }
            Ok(_) => continue,
            Err(other) => panic!("unexpected answer from a: {other:?}"),
        }
    }
    let (id, token) = device.expect("some device belongs to b");
    // Over MQTT, a sends it to b too: MQTT 5 CONNACK 0x9C with b as Server Reference; 3.1.1
    // CONNACK 0x03 (server unavailable).
    assert_eq!(
        mqtt_connack(a_mqtt, &token, true),
        (0x9c, Some(b.server.addr.to_string())),
        "{}",
        log_tail(&a.log, 20)
    );
    assert_eq!(mqtt_connack(a_mqtt, &token, false), (0x03, None));

    // It sends through b; every heartbeat waits for its ack.
    let t0 = now_ms() - 3_600_000;
    let mut acked: Vec<i64> = Vec::new();
    let mut seq = 0u64;
    let mut ws = ws_device(b.server.addr, &token).expect("b serves its device");
    for k in 0..20 {
        seq += 1;
        assert!(send_acked(&mut ws, seq, &id, t0 + k), "b acks its device");
        acked.push(t0 + k);
    }

    // kill -9 b: a must take its units over within the bound; the device reconnects to a
    // (resending what was not acked) and keeps sending.
    b.server.kill9();
    drop(ws);
    let killed = Instant::now();
    let mut ts = t0 + 20;
    let mut ws = loop {
        assert!(
            killed.elapsed() < TAKEOVER_MAX,
            "a did not take b's device over in {TAKEOVER_MAX:?}\n{}",
            log_tail(&a.log, 30)
        );
        match ws_device(a.server.addr, &token) {
            Ok(ws) => break ws,
            // 307 to b (not yet seen dead) or 503 (being placed): retry.
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut sent_unacked = Vec::new();
    seq = 0;
    while acked.len() < 40 {
        seq += 1;
        if send_acked(&mut ws, seq, &id, ts) {
            acked.push(ts);
            ts += 1;
        } else {
            // Not acked: resend (same heartbeat) on a new connection.
            sent_unacked.push(ts);
            assert!(killed.elapsed() < TAKEOVER_MAX * 2, "a stopped acking");
            ws = ws_device(a.server.addr, &token).expect("a serves the device");
            seq = 0;
        }
    }
    let took = killed.elapsed();
    eprintln!("device acked again through a {took:?} after kill -9 of b");
    // a claims b's units one after another within its placement ticks: the device's unit may be
    // served before the last of them, so "a owns every unit" is awaited, within the same bound.
    let stats = loop {
        let stats = ownership(&a, &ops);
        if stats["units_owned"] == stats["units"] || killed.elapsed() > TAKEOVER_MAX * 2 {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        stats["units_owned"],
        stats["units"],
        "a owns every unit within {:?} of the kill: {stats}",
        TAKEOVER_MAX * 2
    );

    // Every acked heartbeat is in the streams exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = stored(&nats, 3);
        let missing = acked
            .iter()
            .filter(|t| !found.contains_key(&(id.clone(), **t)))
            .count();
        if missing == 0 || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for t in &acked {
        assert_eq!(
            found.get(&(id.clone(), *t)).copied(),
            Some(1),
            "acked heartbeat ts {t} stored {:?} times",
            found.get(&(id.clone(), *t))
        );
    }
    let mut a = a;
    a.server.kill9();
    eprintln!("test took {:?}", t_start.elapsed());
}

#[test]
fn haproxy_config_is_valid_and_routes_units_like_the_placement() {
    // deploy/haproxy: `haproxy -c` accepts the config (with the map at its repository path), and
    // the map sends unit rank i to node i mod 3, the placement's rule, where rank = vshard / 64
    // is the unit rank of the default two-shard layout (so HAProxy's crc32c,mod(4096),div(64)
    // lands on the unit geobeat computes).
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy");
    let map = std::fs::read_to_string(repo.join("geobeat-units.map")).unwrap();
    let nodes = ["be_geobeat_a", "be_geobeat_b", "be_geobeat_c"];
    let rows: Vec<(usize, &str)> = map
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (u, b) = l.split_once(' ').unwrap();
            (u.parse().unwrap(), b.trim())
        })
        .collect();
    let plan = geobeat::replicate::Plan::new(
        &geobeat::route::Router::contiguous(2).unwrap(),
        &["h:1".into()],
        3,
        3,
    );
    let units: Vec<u16> = plan.units().collect();
    assert_eq!(rows.len(), units.len());
    for (i, (rank, backend)) in rows.iter().enumerate() {
        assert_eq!(*rank, i);
        assert_eq!(
            Some(*backend),
            geobeat::replicate::placement::assigned(i, 3).map(|n| nodes[n])
        );
        assert_eq!(units[i] as usize / 64, i);
    }
    for d in 0..1000 {
        let id = format!("device-{d}");
        let v = geobeat::route::vshard_of(&id);
        let haproxy_rank = (crc32c::crc32c(id.as_bytes()) % 4096 / 64) as usize;
        assert_eq!(units[haproxy_rank], plan.unit_of(v));
    }
    let Ok(out) = std::process::Command::new("haproxy").arg("-v").output() else {
        eprintln!("haproxy not installed (.ci/run installs it): config check skipped");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(repo.join("haproxy.cfg"))
        .unwrap()
        .replace(
            "/etc/haproxy/geobeat-units.map",
            &repo.join("geobeat-units.map").display().to_string(),
        );
    std::fs::write(dir.path().join("haproxy.cfg"), cfg).unwrap();
    let out = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(dir.path().join("haproxy.cfg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends one heartbeat of `id` at (`lat`, `lon`), device time `ts`, and waits for its ack.
fn send_at(ws: &mut Ws, seq: u64, id: &str, ts: i64, lat: f64, lon: f64) -> bool {
    use tungstenite::Message;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    let text = format!(r#"[{{"seq":{seq},"id":"{id}","lat":{lat},"lon":{lon},"ts":{ts}}}]"#);
    if ws.send(Message::text(text)).is_err() {
        return false;
    }
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match v["ack"].as_u64() {
                    Some(a) if a >= seq => return true,
                    Some(_) => {}
                    None => panic!("error frame: {v}"),
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// A subscriber WebSocket on `node` (ops token).
fn subscriber(node: &Node, ops: &str) -> Ws {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/v1/subscribe", node.server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {ops}").parse().unwrap());
    let tcp = std::net::TcpStream::connect(node.server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, _) = tungstenite::client::client(req, tungstenite::stream::MaybeTlsStream::Plain(tcp))
        .expect("subscriber handshake");
    ws
}

/// Sends a subscriber op and expects its `ok` answer.
fn sub_op(ws: &mut Ws, op: serde_json::Value) {
    use tungstenite::Message;
    let sub = op["sub"].as_str().unwrap().to_string();
    ws.send(Message::text(op.to_string())).unwrap();
    assert_eq!(
        next_json(ws),
        serde_json::json!({"ok": "subscribe", "sub": sub})
    );
}

/// The `replication.view` section of a node's `/v1/stats`.
fn view_stats(node: &Node, ops: &str) -> serde_json::Value {
    let (st, body) = node.server.get("/v1/stats", Some(ops));
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["replication"]["view"].clone()
}

/// Polls `node` until `f` accepts the device's last location there, or panics after `limit`.
fn wait_last(
    node: &Node,
    id: &str,
    ops: &str,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        if let Some(v) = last_location(&node.server, id, ops) {
            if f(&v) {
                return v;
            }
        }
        assert!(
            t0.elapsed() < limit,
            "no matching last location of {id} on the node within {limit:?}: {:?}\nview: {}\n{}",
            last_location(&node.server, id, ops),
            view_stats(node, ops),
            std::fs::read_to_string(&node.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("view"))
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn any_node_answers_for_the_fleet_and_keeps_answering_after_the_writer_dies() {
    // Issue 17 item 3: a device written by node a is known on node b within seconds: b answers
    // its last location and a bbox query containing it, b's subscribers get its heartbeats and
    // its geofence enter, b's view lag goes to 0 in /v1/stats and metrics, and b redirects its
    // history to a (307). After kill -9 of a NATS server its followers read through, b
    // recreates its consumers and keeps following. After kill -9 of a, b still answers the device's last location (from
    // the view, before and after b takes a's units over).
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut nats = NatsCluster::start();
    let root = tempfile::tempdir().unwrap();
    let mut a = start_node(root.path(), "a", &nats, None);
    let secret = a.server.dir.join("secret");
    let mut b = start_node(root.path(), "b", &nats, Some(&secret));
    let ops = a.server.token_fast(Scope::Ops);
    wait_converged(&[&a, &b], &ops, 2, Duration::from_secs(20));
    // A device a writes (b redirects it to a), and a geofence on b around where it goes.
    let (id, token) = device_minted_by(&b, &a, &a);
    let (st, body) = http_body(
        &b.server,
        "PUT",
        "/v1/geofences/zone",
        Some(&ops),
        r#"{"center": [2.0, 1.0], "radius_m": 5000}"#,
    );
    assert_eq!(st, 200, "{body}");
    let mut sub = subscriber(&b, &ops);
    sub_op(
        &mut sub,
        serde_json::json!({"op": "subscribe", "sub": "dev", "devices": [id]}),
    );
    sub_op(
        &mut sub,
        serde_json::json!({"op": "subscribe", "sub": "zone", "fence": "zone"}),
    );

    // Five heartbeats through a: the first outside the zone, the rest inside.
    let t0 = now_ms() - 60_000;
    let mut ws = ws_device(a.server.addr, &token).expect("a serves its device");
    let sent_at = Instant::now();
    for k in 0..5u64 {
        let (lat, lon) = if k == 0 { (10.0, 20.0) } else { (1.0, 2.0) };
        assert!(
            send_at(&mut ws, k + 1, &id, t0 + k as i64, lat, lon),
            "a acks\n{}",
            log_tail(&a.log, 30)
        );
    }
    let v = wait_last(&b, &id, &ops, Duration::from_secs(10), |v| {
        v["ts"] == t0 + 4
    });
    eprintln!(
        "b knew a's device {:?} after its last ack",
        sent_at.elapsed()
    );
    assert_eq!(
        (v["lat"].as_f64(), v["lon"].as_f64()),
        (Some(1.0), Some(2.0))
    );
    // A bbox query on b finds it; one that does not contain it does not.
    let (st, body) = b.server.get("/v1/devices?bbox=1.5,0.5,2.5,1.5", Some(&ops));
    assert_eq!(st, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(rows.iter().any(|r| r["id"] == id.as_str()), "{body}");
    let (_, body) = b
        .server
        .get("/v1/devices?bbox=19.5,9.5,20.5,10.5", Some(&ops));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(
        !rows.iter().any(|r| r["id"] == id.as_str()),
        "the device moved out of this box: {body}"
    );
    let (st, body) = b
        .server
        .get("/v1/devices?near=1.0,2.0&radius=1000", Some(&ops));
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(&format!("\"{id}\"")), "{body}");

    // b's subscriber got the five heartbeats, in order, and one enter.
    let mut ts_seen = Vec::new();
    let mut enters = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ts_seen.len() < 5 || enters < 1 {
        assert!(
            Instant::now() < deadline,
            "events on b: {ts_seen:?}, enters {enters}"
        );
        let e = next_json(&mut sub);
        match e["sub"].as_str() {
            Some("dev") => {
                assert_eq!(e["id"], id.as_str());
                ts_seen.push(e["ts"].as_i64().unwrap());
            }
            Some("zone") => {
                assert_eq!(
                    (e["id"].as_str(), e["event"].as_str()),
                    (Some(id.as_str()), Some("enter")),
                    "{e}"
                );
                assert_eq!(e["ts"], t0 + 1);
                enters += 1;
            }
            other => panic!("unexpected event {other:?}: {e}"),
        }
    }
    assert_eq!(ts_seen, (0..5).map(|k| t0 + k).collect::<Vec<_>>());

    // b's view lag goes to 0 and shows what it applied; the metrics carry it.
    let t = Instant::now();
    loop {
        let v = view_stats(&b, &ops);
        if v["lag_messages"] == 0 && v["applied_entries"].as_u64().unwrap_or(0) >= 5 {
            assert_eq!(v["lag_seconds"], 0.0, "{v}");
            assert!(v["skipped_fences"].as_u64().unwrap() > 0, "{v}");
            assert_eq!(v["damaged_batches"], 0, "{v}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "view lag on b: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // a skipped its own batches (the device is in its local table).
    let va = view_stats(&a, &ops);
    assert!(va["skipped_own_batches"].as_u64().unwrap() > 0, "{va}");
    let (st, metrics) = b.server.get("/metrics", None);
    assert_eq!(st, 200);
    assert!(
        metrics.contains("geobeat_view_lag_messages{stream=\"GEOBEAT_HB_0\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("geobeat_view_lag_seconds{"), "{metrics}");

    // History lives with the writer: b redirects it to a, which answers it.
    let path = format!("/v1/devices/{id}/history?limit=10");
    let (st, body) = b.server.get(&path, Some(&ops));
    assert_eq!(st, 307, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["location"],
        format!("http://{}{path}", a.server.addr),
        "{body}"
    );
    let (st, body) = a.server.get(&path, Some(&ops));
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .len(),
        5
    );

    // kill -9 of the NATS server b's first executor follows through: its follower reconnects
    // and recreates its consumers past what it applied; the next heartbeat still reaches b.
    let created = view_stats(&b, &ops)["consumers_created"].as_u64().unwrap();
    nats.kill9(1);
    let last_ts = t0 + 5;
    assert!(
        send_at(&mut ws, 6, &id, last_ts, 1.0, 2.0),
        "a acks with one NATS server down\n{}",
        log_tail(&a.log, 30)
    );
    wait_last(&b, &id, &ops, Duration::from_secs(20), |v| {
        v["ts"] == last_ts
    });
    let v = view_stats(&b, &ops);
    assert!(v["consumers_created"].as_u64().unwrap() > created, "{v}");
    assert_eq!(v["damaged_batches"], 0, "{v}");

    // kill -9 a: b still answers its device, from the view, before and after taking a's units.
    drop(ws);
    a.server.kill9();
    let v = last_location(&b.server, &id, &ops).expect("b still knows the device");
    assert_eq!(v["ts"], last_ts);
    wait_converged(&[&b], &ops, 1, TAKEOVER_MAX);
    let v = last_location(&b.server, &id, &ops).expect("b still knows the device");
    assert_eq!(v["ts"], last_ts);
    // Now b writes the device: a newer heartbeat through b wins over the view.
    let mut ws = connect_until(&b, &token, Instant::now(), TAKEOVER_MAX);
    assert!(send_at(&mut ws, 6, &id, last_ts + 1, 5.0, 6.0), "b acks");
    let v = wait_last(&b, &id, &ops, Duration::from_secs(5), |v| {
        v["ts"] == last_ts + 1
    });
    assert_eq!(v["lat"].as_f64(), Some(5.0));
    b.server.kill9();
}
