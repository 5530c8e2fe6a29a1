//! End-to-end checks of the load generator against the null server: in-process (library API)
//! and as the real binaries (including the multi-process merge path). Runs are one to two
//! seconds on loopback; they assert that acks flowed and nothing went wrong, never a speed.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use clap::Parser as _;
use geobeat_perf::load::{self, LoadArgs, Plan};
use geobeat_perf::null::{NullConfig, NullServer};
use geobeat_perf::stats::Summary;

fn plan(url: &str, extra: &[&str]) -> Plan {
    let mut argv = vec![
        "geobeat-load",
        "--url",
        url,
        "--gateway-token",
        "ignored-by-null",
        "--devices",
        "8",
        "--threads",
        "1",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--drain",
        // Generous: the drain ends as soon as every heartbeat is acked, and a loaded CI machine
        // may delay the last acks.
        "5",
    ];
    argv.extend_from_slice(extra);
    Plan::new(LoadArgs::try_parse_from(argv).expect("flags parse")).expect("plan is valid")
}

fn assert_clean(summary: &Summary, what: &str) {
    let c = &summary.counters;
    assert_eq!(c.connected, c.devices, "{what}: all devices connect");
    assert!(c.acked > 0, "{what}: acks flowed");
    assert_eq!(c.acked, c.sent, "{what}: every measured heartbeat acked");
    assert_eq!(c.unacked, 0, "{what}");
    assert_eq!(
        (
            c.rejected,
            c.frame_rejections,
            c.protocol_errors,
            c.connect_failures,
            c.disconnects
        ),
        (0, 0, 0, 0, 0),
        "{what}: no errors"
    );
    assert_eq!(
        summary.latency.count, c.acked,
        "{what}: one latency sample per acked heartbeat"
    );
    assert!(summary.throughput_acked_per_s > 0.0, "{what}");
}

#[test]
fn in_process_closed_and_open_loop_get_acked() {
    // Starts a one-shard null server on a free port, runs the loader in-process for one second
    // in closed loop (JSON) and in open loop (binary batches), and checks that every measured
    // heartbeat was acked with no errors and that the server saw the frames.
    let server = NullServer::start(NullConfig::loopback_for_tests()).expect("null server starts");
    let url = format!("ws://{}/v1/ingest", server.local_addr());

    let closed = load::run(plan(&url, &["--window", "4"])).expect("closed run");
    assert_clean(&closed, "closed json");

    let open = load::run(plan(
        &url,
        &[
            "--mode", "open", "--rate", "400", "--format", "binary", "--batch", "4", "--extras",
        ],
    ))
    .expect("open run");
    assert_clean(&open, "open binary");
    // 400 heartbeats/s for 1 s: the open loop sends on schedule, not as fast as it can.
    assert!(
        (300..=500).contains(&open.counters.sent),
        "sent {}",
        open.counters.sent
    );

    let totals = server.stop().expect("null server stops");
    assert_eq!(totals.connections, 16);
    assert_eq!(totals.bad_frames, 0);
    assert!(totals.frames >= closed.counters.frames_sent_total + open.counters.frames_sent_total);
}

#[test]
fn wrong_path_is_a_connect_failure() {
    // Checks that an upgrade the server refuses (wrong path -> 404) is counted as a connect
    // failure for every attempt, with nothing sent.
    let server = NullServer::start(NullConfig::loopback_for_tests()).expect("null server starts");
    let url = format!("ws://{}/not-ingest", server.local_addr());
    let summary = load::run(plan(
        &url,
        &["--connect-attempts", "2", "--duration", "5", "--drain", "0"],
    ))
    .expect("run completes");
    let c = &summary.counters;
    assert_eq!(c.connected, 0);
    assert_eq!(c.connect_failures, 16, "8 devices x 2 attempts");
    assert_eq!(c.sent_total, 0);
    let totals = server.stop().expect("null server stops");
    assert_eq!(totals.handshake_failures, 16);
}

#[test]
fn binaries_run_with_child_processes() {
    // Starts the geobeat-null binary on port 0, reads its port from the first stdout line, runs
    // geobeat-load as a binary split over two child processes with --json-out, and checks the
    // merged JSON summary shows acked heartbeats and no errors.
    let mut null = Command::new(env!("CARGO_BIN_EXE_geobeat-null"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1", "--no-pin"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("geobeat-null starts");
    let mut first_line = String::new();
    BufReader::new(null.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let addr = first_line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected banner {first_line:?}"))
        .to_owned();
    let dir = std::env::temp_dir().join(format!("geobeat-perf-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_out = dir.join("summary.json");
    let status = Command::new(env!("CARGO_BIN_EXE_geobeat-load"))
        .args([
            "--url",
            &format!("ws://{addr}/v1/ingest"),
            "--gateway-token",
            "x",
        ])
        .args([
            "--devices",
            "6",
            "--processes",
            "2",
            "--threads",
            "1",
            "--window",
            "2",
        ])
        .args(["--warmup", "0.2", "--duration", "1", "--drain", "5"])
        .arg("--json-out")
        .arg(&json_out)
        .stdout(Stdio::null())
        .status()
        .expect("geobeat-load runs");
    let _ = null.kill();
    let _ = null.wait();
    assert!(status.success(), "geobeat-load exited with {status}");
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(summary.counters.devices, 6);
    assert_clean(&summary, "two processes");
    assert!(
        summary.histogram_v2_base64.is_none(),
        "--json-out omits the raw histogram"
    );
}
