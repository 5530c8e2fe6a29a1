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

mod common;
#[path = "common/nats.rs"]
mod nats;

use common::*;
use nats::NatsCluster;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One geobeat node of the test cluster.
struct Node {
    server: Server,
    log: PathBuf,
}

/// Starts node `id` on a free port advertising it (every node with the shared `secret`).
fn start_node(root: &Path, id: &str, nats: &NatsCluster, secret: &Path) -> Node {
    let dir = root.join(id);
    let log = root.join(format!("{id}.log"));
    let addr = free_addr_outside_ephemeral();
    let args: Vec<String> = [
        "serve",
        "--init",
        "--listen",
        &addr.to_string(),
        "--data-dir",
        &dir.display().to_string(),
        "--shards",
        "2",
        "--durability",
        "replicated",
        "--nats-url",
        &nats.urls(),
        "--node-id",
        id,
        "--advertise",
        &addr.to_string(),
        "--secret-file",
        &secret.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let child = spawn_logged(&args, &log);
    let server = Server {
        child,
        addr,
        dir,
        args,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut server = server;
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            panic!("{id} exited early: {st}\n{}", log_tail(&log, 40));
        }
        if let Ok((200, _)) = http(server.addr, "GET", "/healthz", None) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not healthy\n{}",
            log_tail(&log, 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Node { server, log }
}

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
    let a = start_node(root.path(), "geobeat-a", &nats, &secret);
    let mut b = start_node(root.path(), "geobeat-b", &nats, &secret);

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
