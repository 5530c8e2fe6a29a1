//! The geobeat node of the cluster tests (tests/cluster.rs, tests/cluster_status.rs): one real
//! `geobeat serve` with `--durability replicated --node-id --advertise` on the test's NATS
//! cluster, started on a free port and waited for until healthy. Included by `#[path]` next to
//! `common` and `nats`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::nats::NatsCluster;

/// One geobeat node of the test cluster.
pub struct Node {
    /// The running server.
    pub server: Server,
    /// Its log file.
    pub log: PathBuf,
}

/// Starts node `id` on a free port, advertising that port; `secret`: the secret file shared by
/// every node (tokens verify on any node).
pub fn start_node(root: &Path, id: &str, nats: &NatsCluster, secret: Option<&Path>) -> Node {
    start_node_mqtt(root, id, nats, secret, None)
}

/// [`start_node`] with an MQTT listener at `mqtt`.
pub fn start_node_mqtt(
    root: &Path,
    id: &str,
    nats: &NatsCluster,
    secret: Option<&Path>,
    mqtt: Option<SocketAddr>,
) -> Node {
    let dir = root.join(id);
    let log = root.join(format!("{id}.log"));
    let addr = free_addr_outside_ephemeral();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--init".into(),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--shards".into(),
        "2".into(),
        "--durability".into(),
        "replicated".into(),
        "--nats-url".into(),
        nats.urls(),
        "--node-id".into(),
        id.into(),
        "--advertise".into(),
        addr.to_string(),
    ];
    if let Some(s) = secret {
        args.extend(["--secret-file".into(), s.display().to_string()]);
    }
    if let Some(m) = mqtt {
        args.extend(["--mqtt-listen".into(), m.to_string()]);
    }
    let child = spawn_logged(&args, &log);
    let mut server = Server {
        child,
        addr,
        dir,
        args,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
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
