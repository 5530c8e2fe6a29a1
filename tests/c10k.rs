//! 10,000 concurrent device connections against the real binary, within the 20,000 open-file
//! cap of each process: every connection sends a few heartbeats and gets them acked while all
//! 10,000 are open at once, and every device's last location is then readable. Also reports the
//! server's resident memory per idle connection.

mod common;
use common::*;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_util::StreamExt;

const CONNECTIONS: usize = 10_000;
const HEARTBEATS_PER_CONN: u64 = 3;
const CONNECTS_IN_FLIGHT_MAX: usize = 256;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn ten_thousand_connections_all_acked_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--connections-max", "12000"]);
    let secret = geobeat::auth::Secret::load(&dir.path().join("secret")).unwrap();
    let expires = geobeat::rt::now_s() + 3600;
    let tokens: Vec<String> = (0..CONNECTIONS)
        .map(|i| {
            geobeat::auth::mint(
                &secret,
                &geobeat::auth::Scope::Device(format!("c10k-{i}")),
                expires,
            )
        })
        .collect();
    let rss_before = rss_kib(server.child.id());
    let addr = server.addr;
    let pid = server.child.id();

    // One client executor holds all 10,000 sockets.
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .ring_depth(1024)
        .make()
        .unwrap();
    let (acked, rss_open) = ex.run(async move {
        let gate = Rc::new(glommio::sync::Semaphore::new(CONNECTS_IN_FLIGHT_MAX as u64));
        let connected = Rc::new(Cell::new(0usize));
        let acked = Rc::new(Cell::new(0usize));
        let release = Rc::new(glommio::sync::Semaphore::new(0));
        let mut tasks = Vec::new();
        for (i, tok) in tokens.into_iter().enumerate() {
            let (gate, connected, acked, release) = (
                gate.clone(),
                connected.clone(),
                acked.clone(),
                release.clone(),
            );
            tasks.push(glommio::spawn_local(async move {
                let permit = gate.acquire_permit(1).await.unwrap();
                let stream = glommio::net::TcpStream::connect(addr)
                    .await
                    .expect("connect");
                let url = format!("ws://{addr}/v1/ingest?token={tok}");
                let (mut ws, _) = async_tungstenite::client_async(url, stream)
                    .await
                    .expect("handshake");
                drop(permit);
                for seq in 1..=HEARTBEATS_PER_CONN {
                    let f = format!(
                        r#"{{"seq":{seq},"lat":{},"lon":{},"ts":{}}}"#,
                        (i % 170) as f64 - 85.0,
                        (i % 350) as f64 - 175.0,
                        now_ms()
                    );
                    ws.send(tungstenite::Message::text(f)).await.unwrap();
                    loop {
                        let m = ws.next().await.expect("open").expect("frame");
                        if let tungstenite::Message::Text(t) = m {
                            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                            assert!(v.get("error").is_none(), "{v}");
                            if v["ack"].as_u64() == Some(seq) {
                                break;
                            }
                        }
                    }
                }
                connected.set(connected.get() + 1);
                acked.set(acked.get() + 1);
                // Stay open until every connection is up.
                let _ = release.acquire(1).await;
                let _ = ws.close(None).await;
            }));
        }
        while connected.get() < CONNECTIONS {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        let rss_open = rss_kib(pid);
        release.signal(CONNECTIONS as u64);
        for t in tasks {
            t.await;
        }
        (acked.get(), rss_open)
    });
    assert_eq!(acked, CONNECTIONS);
    let per_conn = (rss_open.saturating_sub(rss_before)) * 1024 / CONNECTIONS as u64;
    eprintln!("server RSS: {rss_before} KiB before, {rss_open} KiB with {CONNECTIONS} open: {per_conn} B/connection");
    // A regression guard far above the 8 KiB budget (tungstenite's default buffers cost ~136 KiB).
    assert!(per_conn < 32 * 1024, "{per_conn} bytes per connection");

    let ops = server.token(&["ops"]);
    for i in (0..CONNECTIONS).step_by(97) {
        let (st, body) = server.get(&format!("/v1/devices/c10k-{i}"), Some(&ops));
        assert_eq!(st, 200, "{body}");
    }
}
