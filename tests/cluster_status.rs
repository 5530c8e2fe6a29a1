//! `geobeat cluster status` (issue 17 item 6) against a real cluster: two geobeat nodes with
//! `--node-id`/`--advertise` on a real three-server NATS JetStream cluster (the PyPI wheel's
//! nats-server, configs from deploy/nats/, all on 127.0.0.0/8). Checks that a fresh NATS has every
//! unit unplaced (exit 1); that once placement converged the status lists both nodes live, every
//! unit placed, the streams with their leaders and each node's replication lag (exit 0); that
//! after kill -9 of one node the status shows it not live and its units without a live owner
//! (exit 1), then dead, then its units on the survivor (exit 0 again); that the HAProxy map it
//! writes (`--haproxy-map`) matches the placement, names only backends of
//! deploy/haproxy/haproxy.cfg and passes `haproxy -c` with it, and that `--haproxy-socket` puts it
//! into a running HAProxy (read back with `show map`); and that NATS unreachable gives exit 2 with
//! one line naming the URL. Bounded: about 45 s.

#[path = "common/cluster_node.rs"]
mod cluster_node;
mod common;
#[path = "common/nats.rs"]
mod nats;

use cluster_node::{start_node, start_node_mqtt};
use common::*;
use nats::NatsCluster;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `geobeat cluster status` with `args`: (exit code, stdout, stderr).
fn status(urls: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["cluster", "status", "--nats-url", urls])
        .args(args)
        .env_remove("GEOBEAT_NATS_URL")
        .output()
        .expect("run geobeat cluster status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cluster status --json` (plus `extra`): (exit code, the JSON object).
fn status_json(urls: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = status(urls, &args);
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}\n{err}"));
    (code, v)
}

/// The node `id` of a status.
fn node<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node {id} in {v}"))
}

/// Polls `cluster status --json` until `done` holds, within `limit`.
fn status_until(
    urls: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(i32, &serde_json::Value) -> bool,
) -> (i32, serde_json::Value) {
    let t0 = Instant::now();
    loop {
        let (code, v) = status_json(urls, &[]);
        if done(code, &v) {
            eprintln!("{what}: after {:?}", t0.elapsed());
            return (code, v);
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: not within {limit:?}; last status (exit {code}): {v}"
        );
    }
}

/// The backends `haproxy.cfg` defines.
fn cfg_backends(cfg: &str) -> Vec<String> {
    cfg.lines()
        .filter_map(|l| l.strip_prefix("backend "))
        .map(|b| b.trim().to_string())
        .collect()
}

/// The map's rows: (64-vshard block, backend).
fn map_rows(map: &str) -> Vec<(usize, String)> {
    map.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, b) = l.split_once(' ').expect("`key value` rows");
            (k.parse().expect("numeric key"), b.trim().to_string())
        })
        .collect()
}

/// Checks a generated map against the placement in `v` (block b -> the owner of unit b*64) and the
/// shipped config (its backends, and `haproxy -c` with the map in place of the shipped one).
fn check_map(map_file: &Path, v: &serde_json::Value, cfg_dir: &Path) {
    let map = std::fs::read_to_string(map_file).unwrap();
    let rows = map_rows(&map);
    assert_eq!(rows.len(), 64, "{map}");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy");
    let shipped = std::fs::read_to_string(repo.join("haproxy.cfg")).unwrap();
    let backends = cfg_backends(&shipped);
    for (i, (block, backend)) in rows.iter().enumerate() {
        assert_eq!(*block, i);
        let unit = v["units"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["unit"] == block * 64)
            .unwrap();
        let owner = unit["node"].as_str().unwrap();
        assert_eq!(
            *backend,
            format!("be_{}", owner.replace('-', "_")),
            "block {block}"
        );
        assert!(backends.contains(backend), "{backend} not in haproxy.cfg");
    }
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("haproxy not installed (.ci/run installs it): haproxy -c skipped");
        return;
    }
    let cfg = shipped.replace(
        "/etc/haproxy/geobeat-units.map",
        &map_file.display().to_string(),
    );
    let path = cfg_dir.join("haproxy-check.cfg");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running HAProxy with the shipped config on a free port, its map at `map_file`, and an admin
/// runtime API socket; killed on drop.
struct Haproxy {
    child: Child,
    socket: PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_haproxy(dir: &Path, map_file: &Path) -> Option<Haproxy> {
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("haproxy not installed (.ci/run installs it): runtime API push skipped");
        return None;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy");
    let socket = dir.join("haproxy.sock");
    let port = free_addr().port();
    let cfg = std::fs::read_to_string(repo.join("haproxy.cfg"))
        .unwrap()
        .replace(
            "/etc/haproxy/geobeat-units.map",
            &map_file.display().to_string(),
        )
        .replace("bind :8080", &format!("bind 127.0.0.1:{port}"))
        .replace(
            "    maxconn 100000\n",
            &format!(
                "    maxconn 1000\n    stats socket {} mode 600 level admin\n",
                socket.display()
            ),
        );
    assert!(
        cfg.contains("stats socket"),
        "haproxy.cfg's global section changed"
    );
    let path = dir.join("haproxy-run.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run haproxy");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "haproxy's socket did not appear"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Haproxy { child, socket })
}

/// `show map <map_file>` through the runtime API: (block, backend) rows.
fn show_map(h: &Haproxy, map_file: &Path) -> Vec<(usize, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&h.socket).unwrap();
    writeln!(s, "show map {}", map_file.display()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    // Rows are `<entry id> <key> <value>`.
    let mut rows: Vec<(usize, String)> = out
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            let _id = p.next()?;
            Some((p.next()?.parse().ok()?, p.next()?.to_string()))
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn status_lists_the_nodes_then_a_killed_node_dead_then_its_units_moved_and_writes_the_map() {
    let t_start = Instant::now();
    let nats = NatsCluster::start();
    let urls = nats.urls();
    let root = tempfile::tempdir().unwrap();

    // A fresh NATS: no bucket, every unit unplaced, exit 1; the text names them.
    let (code, v) = status_json(&urls, &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["summary"]["total"], 64, "{v}");
    assert_eq!(v["summary"]["unplaced"].as_array().unwrap().len(), 64);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 0);

    let secret = root.path().join("secret");
    std::fs::write(&secret, format!("{}\n", "ab".repeat(32))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a = start_node(root.path(), "geobeat-a", &nats, Some(&secret));
    let mut b = start_node(root.path(), "geobeat-b", &nats, Some(&secret));

    // Converged: both live, every unit placed (32 each), exit 0.
    let (_, v) = status_until(
        &urls,
        Duration::from_secs(25),
        "placement converged",
        |c, v| {
            c == 0
                && v["nodes"].as_array().unwrap().len() == 2
                && v["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["units"] == 32)
        },
    );
    for (id, n) in [("geobeat-a", &a), ("geobeat-b", &b)] {
        let j = node(&v, id);
        assert_eq!(j["state"], "live", "{v}");
        assert_eq!(j["addr"], n.server.addr.to_string());
        assert_eq!(j["stats"]["reachable"], true, "{v}");
        assert!(j["stats"]["replication_lag_bytes"].is_u64(), "{v}");
        // Every cluster node follows the streams: its view lag is shown.
        assert!(j["stats"]["view_lag_messages"].is_u64(), "{v}");
    }
    assert!(v["ok"].as_bool().unwrap());
    assert_eq!(v["summary"]["live_nodes"], 2, "{v}");
    assert_eq!(v["summary"]["moving"].as_array().unwrap().len(), 0, "{v}");
    // --expect-nodes: settled for two nodes, not for three.
    assert_eq!(status(&urls, &["--expect-nodes", "2"]).0, 0);
    assert_eq!(status(&urls, &["--expect-nodes", "3"]).0, 1);
    assert!(v["units"]
        .as_array()
        .unwrap()
        .iter()
        .all(|u| u["state"] == "placed"
            && u["epoch"].as_u64().unwrap() >= 1
            && u["node"] == u["assigned"]));
    let streams = v["streams"].as_array().unwrap();
    let names: Vec<&str> = streams
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "GEOBEAT_HB_0",
            "GEOBEAT_HB_1",
            "GEOBEAT_HB_2",
            "KV_GEOBEAT_PLACEMENT"
        ],
        "{v}"
    );
    for s in streams {
        assert!(s["leader"].is_string(), "{s}");
        assert_eq!(s["replicas"].as_array().unwrap().len(), 2, "{s}");
    }
    // The fences are in the heartbeat streams (one per claim).
    let fenced: u64 = streams[..3]
        .iter()
        .map(|s| s["messages"].as_u64().unwrap())
        .sum();
    assert!(fenced >= 64, "{v}");

    // The text form says the same.
    let (code, text, _) = status(&urls, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("cluster: OK (64 of 64 units have a live owner"),
        "{text}"
    );
    assert!(
        text.contains("geobeat-a") && text.contains("geobeat-b") && text.contains("GEOBEAT_HB_2")
    );

    // The HAProxy map from the live placement, written and pushed into a running HAProxy.
    let map_file = root.path().join("geobeat-units.map");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/geobeat-units.map"),
        &map_file,
    )
    .unwrap();
    let haproxy = start_haproxy(root.path(), &map_file);
    let mut push: Vec<String> = vec!["--haproxy-map".into(), map_file.display().to_string()];
    if let Some(h) = &haproxy {
        push.extend(["--haproxy-socket".into(), h.socket.display().to_string()]);
    }
    let push: Vec<&str> = push.iter().map(String::as_str).collect();
    let (code, v) = status_json(&urls, &push);
    assert_eq!(code, 0, "{v}");
    check_map(&map_file, &v, root.path());
    if let Some(h) = &haproxy {
        assert_eq!(
            show_map(h, &map_file),
            map_rows(&std::fs::read_to_string(&map_file).unwrap())
        );
    }

    // kill -9 b: at once its lease stops moving: not live, its units without a live owner, exit 1.
    b.server.kill9();
    let killed = Instant::now();
    let (code, v) = status_json(&urls, &[]);
    assert_eq!(code, 1, "{v}");
    assert_ne!(node(&v, "geobeat-b")["state"], "live", "{v}");
    assert_eq!(node(&v, "geobeat-a")["state"], "live", "{v}");
    assert_eq!(
        v["summary"]["owner_down"].as_array().unwrap().len(),
        32,
        "{v}"
    );
    assert!(node(&v, "geobeat-b")["stats"]["reachable"] == false, "{v}");
    // After the dead time it shows dead; the survivor takes the units over: exit 0 again.
    status_until(&urls, Duration::from_secs(15), "b shown dead", |_, v| {
        node(v, "geobeat-b")["state"] == "dead"
    });
    let (_, v) = status_until(
        &urls,
        Duration::from_secs(20),
        "units moved to a",
        |c, v| c == 0 && node(v, "geobeat-a")["units"] == 64,
    );
    eprintln!(
        "takeover seen by cluster status {:?} after kill -9",
        killed.elapsed()
    );
    assert_eq!(node(&v, "geobeat-b")["state"], "dead");
    assert_eq!(node(&v, "geobeat-b")["units"], 0);
    // Units b owned moved with a new epoch.
    assert!(v["units"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["epoch"].as_u64().unwrap() >= 2));

    // The map follows: every block to a's backend, in the file and in HAProxy.
    let (code, v) = status_json(&urls, &push);
    assert_eq!(code, 0, "{v}");
    check_map(&map_file, &v, root.path());
    let rows = map_rows(&std::fs::read_to_string(&map_file).unwrap());
    assert!(rows.iter().all(|(_, b)| b == "be_geobeat_a"), "{rows:?}");
    if let Some(h) = &haproxy {
        assert_eq!(show_map(h, &map_file), rows);
    }
    drop(haproxy);
    let mut a = a;
    a.server.kill9();
    let _ = a.log;
    eprintln!("test took {:?}", t_start.elapsed());
}

#[test]
fn nats_unreachable_is_exit_2_with_one_line_naming_the_url() {
    // Nothing listens there (a port just freed).
    let port = free_addr().port();
    let url = format!("nats://127.0.0.1:{port}");
    let t0 = Instant::now();
    let (code, out, err) = status(&url, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("--nats-url"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    // --json too: nothing on stdout, the same line.
    let (code, out, err) = status(&url, &["--json"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    // A bad URL is a usage error (clap's 2), naming the flag.
    let (code, _, err) = status("http://x:1", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--nats-url"), "{err}");
}

/// A raw MQTT client (geobeat's own codec, so the DISCONNECT's reason code and properties are
/// checked byte for byte).
struct Mqtt {
    sock: std::net::TcpStream,
    version: geobeat::proto::mqtt::codec::Version,
    buf: Vec<u8>,
}

/// What the server sent.
#[derive(Debug, PartialEq)]
enum Answer {
    ConnAck(u8),
    PubAck(u8),
    /// Reason code and Server Reference.
    Disconnect(u8, Option<String>),
    /// End of stream (or a reset).
    Closed,
}

impl Mqtt {
    /// Connects with `token` as client `client`; panics unless CONNACK 0.
    fn connect(addr: std::net::SocketAddr, client: &str, token: &str, v5: bool) -> Mqtt {
        use geobeat::proto::mqtt::codec::{self, Connect, Packet, Version};
        use std::io::Write;
        let version = if v5 { Version::V5 } else { Version::V311 };
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = Vec::new();
        let c = Connect {
            version,
            clean: true,
            keep_alive_s: 60,
            props: &[],
            client_id: client,
            will: None,
            username: Some(""),
            password: Some(token.as_bytes()),
        };
        codec::encode(&Packet::Connect(c), version, &mut out);
        sock.write_all(&out).unwrap();
        let mut m = Mqtt {
            sock,
            version,
            buf: Vec::new(),
        };
        assert_eq!(m.next(), Answer::ConnAck(0), "{client}");
        m
    }

    /// PUBLISH QoS 1 (packet id `pid`) of one heartbeat of `id` on `geobeat/<id>`; the answer.
    fn publish(&mut self, id: &str, pid: u16, ts: i64) -> Answer {
        use geobeat::proto::mqtt::codec::{self, Packet, Publish, QoS};
        use std::io::Write;
        let topic = format!("geobeat/{id}");
        let payload = format!(r#"{{"lat":1.5,"lon":2.5,"ts":{ts}}}"#);
        let mut out = Vec::new();
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: &topic,
            packet_id: Some(pid),
            props: &[],
            payload: payload.as_bytes(),
        };
        codec::encode(&Packet::Publish(p), self.version, &mut out);
        if self.sock.write_all(&out).is_err() {
            return Answer::Closed;
        }
        self.next()
    }

    /// The next packet the server sent.
    fn next(&mut self) -> Answer {
        use geobeat::proto::mqtt::codec::{self, Packet, PropValue, Props};
        use std::io::Read;
        loop {
            if let Some((p, used)) = codec::decode(&self.buf, Some(self.version), 1 << 16).unwrap()
            {
                let a = match p {
                    Packet::ConnAck(c) => Answer::ConnAck(c.code),
                    Packet::PubAck(a) => Answer::PubAck(a.code),
                    Packet::Disconnect(d) => Answer::Disconnect(
                        d.code,
                        match Props(d.props).get(0x1c) {
                            Some(PropValue::Str(r)) => Some(r.to_string()),
                            _ => None,
                        },
                    ),
                    other => panic!("unexpected {other:?}"),
                };
                self.buf.drain(..used);
                return a;
            }
            let mut chunk = [0u8; 4096];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Answer::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Answer::Closed,
                Err(e) => panic!("MQTT read: {e}"),
            }
        }
    }
}

/// A device whose unit has rank `rank mod 2 == parity` in the two-shard layout (rank parity
/// decides its node once two nodes are live: rank mod 2 over the sorted ids).
fn device_with_rank_parity(prefix: &str, parity: usize) -> String {
    let plan = geobeat::replicate::Plan::new(
        &geobeat::route::Router::contiguous(2).unwrap(),
        &["h:1".into()],
        3,
        3,
    );
    let units: Vec<u16> = plan.units().collect();
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| {
            let u = plan.unit_of(geobeat::route::vshard_of(id));
            units.iter().position(|x| *x == u).unwrap() % 2 == parity
        })
        .expect("a device of that parity")
}

#[test]
fn mqtt_connections_of_a_unit_that_moved_away_are_closed_at_their_next_publish() {
    // Node a alone owns every unit; an MQTT 5 and an MQTT 3.1.1 device whose units go to b once
    // b joins publish (acked). b joins and the placement settles (b claims odd ranks). Their next
    // PUBLISH on a: MQTT 5 gets DISCONNECT 0x9C with b's address as Server Reference, 3.1.1 a
    // plain close, neither a PUBACK; a device whose unit stayed on a is still acked; through b
    // the moved devices are served.
    let nats = NatsCluster::start();
    let urls = nats.urls();
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, format!("{}\n", "cd".repeat(32))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a_mqtt = free_addr_outside_ephemeral();
    let a = start_node_mqtt(root.path(), "geobeat-a", &nats, Some(&secret), Some(a_mqtt));
    status_until(
        &urls,
        Duration::from_secs(25),
        "a owns every unit",
        |c, v| c == 0 && node(v, "geobeat-a")["units"] == 64,
    );
    let moving5 = device_with_rank_parity("m5", 1);
    let moving3 = device_with_rank_parity("m3", 1);
    let staying = device_with_rank_parity("st", 0);
    let key = geobeat::auth::Secret::load(&secret).unwrap();
    let tok = |id: &str| {
        let exp = (now_ms() / 1000) as u64 + 3600;
        geobeat::auth::mint(&key, &geobeat::auth::Scope::Device(id.to_string()), exp)
    };
    let t0 = now_ms() - 60_000;
    let mut m5 = Mqtt::connect(a_mqtt, "c-m5", &tok(&moving5), true);
    let mut m3 = Mqtt::connect(a_mqtt, "c-m3", &tok(&moving3), false);
    let mut st = Mqtt::connect(a_mqtt, "c-st", &tok(&staying), true);
    assert_eq!(m5.publish(&moving5, 1, t0), Answer::PubAck(0));
    assert_eq!(m3.publish(&moving3, 1, t0), Answer::PubAck(0));
    assert_eq!(st.publish(&staying, 1, t0), Answer::PubAck(0));

    let b_mqtt = free_addr_outside_ephemeral();
    let b = start_node_mqtt(root.path(), "geobeat-b", &nats, Some(&secret), Some(b_mqtt));
    let (_, v) = status_until(
        &urls,
        Duration::from_secs(25),
        "b took its units",
        |c, v| {
            c == 0
                && v["summary"]["live_nodes"] == 2
                && v["summary"]["moving"].as_array().unwrap().is_empty()
                && node(v, "geobeat-b")["units"] == 32
        },
    );
    assert_eq!(node(&v, "geobeat-a")["units"], 32);
    // a learns of b within a lease interval of b's first lease: give it one more tick.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        m5.publish(&moving5, 2, t0 + 1),
        Answer::Disconnect(0x9c, Some(b.server.addr.to_string())),
        "{}",
        log_tail(&a.log, 20)
    );
    assert_eq!(m5.next(), Answer::Closed);
    assert_eq!(m3.publish(&moving3, 2, t0 + 1), Answer::Closed);
    assert_eq!(st.publish(&staying, 2, t0 + 1), Answer::PubAck(0));
    // Redirected, the moved device is served by b.
    let mut m5b = Mqtt::connect(b_mqtt, "c-m5", &tok(&moving5), true);
    assert_eq!(
        m5b.publish(&moving5, 2, t0 + 1),
        Answer::PubAck(0),
        "{}",
        log_tail(&b.log, 20)
    );
    let (code, body) = http(a.server.addr, "GET", "/metrics", None).unwrap();
    assert_eq!(code, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("geobeat_mqtt_events_total{") && l.contains("closed_not_owner")),
        "no closed_not_owner count"
    );
}
