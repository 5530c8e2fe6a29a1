//! `/metrics` of the real binary: the exposition passes `promtool check metrics`, a real
//! Prometheus server (Debian's `prometheus`, installed by .ci/run) scrapes it and sees the
//! heartbeats counted, executor series are labelled `executor` and shard series `shard`, and the
//! process figures and sink failure counters are there.

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
        "geobeat_heartbeats_accepted_total{executor=",
        "geobeat_heartbeats_rejected_total{executor=",
        "geobeat_ack_latency_seconds_bucket{",
        "geobeat_commit_latency_seconds_bucket{",
        "geobeat_commit_group_entries_bucket{",
        "geobeat_queue_depth{",
        "geobeat_last_location_devices{shard=",
        "geobeat_log_bytes{shard=",
        "geobeat_durability_mode{",
        "geobeat_build_info{",
        "geobeat_uptime_seconds",
        "geobeat_connections_open{executor=",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(body.contains(family), "missing {family}");
    }
    let accepted: f64 = body
        .lines()
        .filter(|l| l.starts_with("geobeat_heartbeats_accepted_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(accepted, 20.0);
    promtool_check(&body);
}

fn promtool_check(body: &str) {
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

/// The label values of `label` over the samples of `family` in `body`.
fn label_values(body: &str, family: &str, label: &str) -> std::collections::BTreeSet<String> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| {
            let at = l.find(&format!("{label}=\""))? + label.len() + 2;
            Some(l[at..at + l[at..].find('"')?].to_string())
        })
        .collect()
}

/// The sum of the samples of `family` (exact name, any labels).
fn sum_of(body: &str, family: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn executor_and_shard_labels_process_figures_and_sink_failures() {
    // A data directory of 4 shards served by 2 executors: executor series are labelled by
    // executor index 0..=1, shard series by shard 0..=3. A postgres sink with nothing listening
    // fails, and the failures show per sink and shard.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("geobeat.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"postgres://geobeat@{}/geobeat\"\n",
            free_addr()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    // The shard count is fixed when the directory is created; --shards later sets executors.
    drop(Server::start(&data, &["--shards", "4"]));
    let server = Server::start(
        &data,
        &["--shards", "2", "--config", &config.display().to_string()],
    );
    let gw = server.token(&["gateway", "mx-"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms();
    let batch: Vec<String> = (1..=40u64)
        .map(|i| format!(r#"{{"seq":{i},"id":"mx-{i}","lat":1,"lon":2,"ts":{t}}}"#))
        .collect();
    ws.send(Message::text(format!("[{}]", batch.join(","))))
        .unwrap();
    assert!(wait_ack(&mut ws, 40).is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (st, body) = server.get("/metrics", None);
        assert_eq!(st, 200);
        if sum_of(&body, "geobeat_sink_failures_total") > 0.0 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no sink failure counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let executors = label_values(&body, "geobeat_heartbeats_accepted_total", "executor");
    let shards = label_values(&body, "geobeat_log_entries", "shard");
    assert_eq!(shards, ["0", "1", "2", "3"].map(String::from).into());
    assert_eq!(executors, ["0", "1"].map(String::from).into());
    assert_eq!(sum_of(&body, "geobeat_heartbeats_accepted_total"), 40.0);
    assert_eq!(sum_of(&body, "geobeat_log_entries"), 40.0);
    for family in [
        "geobeat_heartbeats_accepted_total",
        "geobeat_connections_open",
        "geobeat_ack_latency_seconds_count",
        "geobeat_frames_in_total",
    ] {
        assert!(
            label_values(&body, family, "shard").is_empty(),
            "{family} is an executor series: no shard label"
        );
    }
    assert_eq!(
        label_values(&body, "geobeat_sink_failures_total", "shard"),
        shards,
        "one failure series per sink and shard"
    );
    assert!(sum_of(&body, "geobeat_sink_consecutive_failures") > 0.0);
    assert_eq!(sum_of(&body, "geobeat_sink_rows_total"), 0.0);
    assert!(sum_of(&body, "process_cpu_seconds_total") > 0.0);
    assert!(sum_of(&body, "process_open_fds") >= 3.0);
    let start = sum_of(&body, "process_start_time_seconds");
    let now_s = now_ms() as f64 / 1000.0;
    assert!(start <= now_s && start > now_s - 3600.0, "start {start}");
    promtool_check(&body);
}
