//! `geobeat demo` as a newcomer runs it: the device its hints name exists whatever `--devices`
//! is, and on Ctrl-C (SIGTERM here) it prints how many heartbeats the server acked and refused —
//! every demo heartbeat acked, none refused.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_names_devices_that_exist_and_reports_every_heartbeat_acked() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut demo = Command::new(bin())
        .args(["demo", "--devices", "5", "--rate-hz", "20", "--shards", "2"])
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .env(MQTT_OFF.0, MQTT_OFF.1)
        .env("RUST_LOG", "geobeat=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn geobeat demo");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let hinted = loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = demo.kill();
            let mut err = String::new();
            use std::io::Read as _;
            let _ = demo.stderr.take().unwrap().read_to_string(&mut err);
            panic!("no hint from the demo: {printed:?}\nstderr: {err}");
        };
        printed.push(line.clone());
        if let Some(at) = line.find("/v1/devices/") {
            break line[at + "/v1/devices/".len()..].trim().to_string();
        }
    };
    assert_eq!(
        hinted, "demo-00004",
        "the fleet has demo-00000 ..= demo-00004"
    );
    let ops = token_in(dir.path(), &["ops"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, body) = http(addr, "GET", &format!("/v1/devices/{hinted}"), Some(&ops)).unwrap();
        if st == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hinted device never appeared: {st} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(demo.id() as i32, libc::SIGTERM) };
    let status = demo.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(demo.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // Everything the demo printed: the reader thread ends at EOF (the demo has exited), so wait
    // for it rather than taking only what it forwarded so far.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        printed.push(line);
    }
    assert!(status.success(), "demo exit {status}: {printed:?} {stderr}");
    let summary = printed
        .iter()
        .find_map(|l| {
            l.strip_prefix("geobeat demo: ")
                .filter(|l| l.contains(" acked, "))
        })
        .unwrap_or_else(|| panic!("no ack/refusal summary: {printed:?}"));
    // "N heartbeats sent, N acked, 0 refused"
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(numbers[0] >= 5 * 20, "{summary}");
    assert_eq!(numbers[1], numbers[0], "every heartbeat acked: {summary}");
    assert_eq!(numbers[2], 0, "none refused: {summary}");
    assert!(!stderr.contains("refused"), "{stderr}");
}
