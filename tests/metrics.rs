//! `/metrics` of the real binary: the exposition passes `promtool check metrics`, and a real
//! Prometheus server (Debian's `prometheus`, installed by .ci/run) scrapes it and sees the
//! heartbeats counted per shard.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ingest_some(server: &Server) {
    let tok = server.token(&["device", "m-1"]);
    let mut ws = ws_connect(server, &tok).unwrap();
    for seq in 1..=20u64 {
        ws.send(Message::text(hb_json(seq, 1.0, 2.0, now_ms())))
            .unwrap();
    }
    ws.send(Message::text(hb_json(21, 100.0, 2.0, now_ms())))
        .unwrap();
    let errors = wait_ack(&mut ws, 20);
    assert!(errors.is_empty() || errors[0]["error"] == "lat_out_of_range");
}

#[test]
fn metrics_pass_promtool_and_count_per_shard() {
    // The classic text exposition lints clean with promtool; the families operators watch are
    // present with a shard label and count what was sent.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    ingest_some(&server);
    let (st, body) = server.get("/metrics", None);
    assert_eq!(st, 200);
    for family in [
        "geobeat_heartbeats_accepted_total{shard=",
        "geobeat_heartbeats_rejected_total{shard=",
        "geobeat_ack_latency_seconds_bucket{",
        "geobeat_commit_latency_seconds_bucket{",
        "geobeat_commit_group_entries_bucket{",
        "geobeat_queue_depth{",
        "geobeat_last_location_devices{shard=",
        "geobeat_log_bytes{shard=",
        "geobeat_durability_mode{",
        "geobeat_build_info{",
        "geobeat_uptime_seconds",
        "geobeat_connections_open{shard=",
    ] {
        assert!(body.contains(family), "missing {family}");
    }
    let accepted: f64 = body
        .lines()
        .filter(|l| l.starts_with("geobeat_heartbeats_accepted_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(accepted, 20.0);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed; .ci/run installs it");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_real_prometheus_scrapes_geobeat() {
    // Prometheus scrapes a geobeat with --metrics-listen (its own address) every 500 ms; its
    // query API then reports the target up and the accepted heartbeats.
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_addr();
    let server = Server::start(dir.path(), &["--metrics-listen", &metrics_addr.to_string()]);
    ingest_some(&server);
    assert_eq!(
        server.get("/metrics", None).0,
        404,
        "metrics moved to their own listener"
    );
    let prom_dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: geobeat\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
    );
    std::fs::write(prom_dir.path().join("prometheus.yml"), config).unwrap();
    let web = free_addr();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            prom_dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package) must be installed; .ci/run installs it");
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = |q: &str| -> Option<f64> {
        let (st, body) = http(web, "GET", &format!("/api/v1/query?query={q}"), None).ok()?;
        if st != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?;
        let sum: f64 = r
            .iter()
            .filter_map(|x| x["value"][1].as_str()?.parse::<f64>().ok())
            .sum();
        (!r.is_empty()).then_some(sum)
    };
    let result = loop {
        let up = query("up");
        let accepted = query("sum(geobeat_heartbeats_accepted_total)");
        if up == Some(1.0) && accepted == Some(20.0) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!("up={up:?} accepted={accepted:?}"));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    result.unwrap();
}
