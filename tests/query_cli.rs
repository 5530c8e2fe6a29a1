//! `geobeat query` against the real server: last location, history, bbox and near areas,
//! geofences and stats as tables and as JSON, live events from `subscribe`, and the one-line
//! refusals (no token, a refused token, no server, an unknown device) with their exit codes, and
//! `ready` (the container health check).

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

fn query(server: &Server, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("query")
        .args(args)
        .env("GEOBEAT_URL", format!("http://{}", server.addr))
        .env_remove("GEOBEAT_TOKEN")
        .env("GEOBEAT_QUERY_CONFIG", "")
        .env("HOME", &server.dir);
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    cmd.output().expect("run geobeat query")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "geobeat query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn query_answers_tables_json_events_and_clear_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &[]);
    let ops = server.token(&["ops"]);
    let gw = server.token(&["gateway", "cli-"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms() / 1000 * 1000 - 60_000;
    let frame = format!(
        r#"[{{"seq":1,"id":"cli-a","lat":52.5,"lon":13.4,"ts":{t},"speed":3.5}},
            {{"seq":2,"id":"cli-a","lat":52.6,"lon":13.5,"ts":{}}},
            {{"seq":3,"id":"cli-b","lat":-33.9,"lon":151.2,"ts":{t}}}]"#,
        t + 1000
    );
    ws.send(Message::text(frame)).unwrap();
    assert!(wait_ack(&mut ws, 3).is_empty());

    // Last location as a table, with the time in UTC.
    let text = ok(&query(&server, Some(&ops), &["last", "cli-a"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("id") && lines[0].contains("received_at"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("cli-a") && lines[1].contains("52.6"),
        "{text}"
    );
    // The device time in UTC: second-aligned, so `.000Z`; the year is this one.
    assert!(
        lines[1].contains(".000Z") && lines[1].contains("T"),
        "{text}"
    );
    // ... and as the server's JSON.
    let v: serde_json::Value = serde_json::from_str(&ok(&query(
        &server,
        Some(&ops),
        &["--json", "last", "cli-a"],
    )))
    .unwrap();
    assert_eq!(
        (v["id"].as_str(), v["lat"].as_f64()),
        (Some("cli-a"), Some(52.6))
    );

    let text = ok(&query(
        &server,
        Some(&ops),
        &["history", "cli-a", "--limit", "5"],
    ));
    assert!(text.contains("(2 rows)"), "{text}");
    let text = ok(&query(
        &server,
        Some(&ops),
        &["history", "cli-a", "--from", &(t + 500).to_string()],
    ));
    assert!(text.contains("(1 rows)"), "{text}");

    let text = ok(&query(&server, Some(&ops), &["bbox", "13,52,14,53"]));
    assert!(text.contains("cli-a") && !text.contains("cli-b"), "{text}");
    let text = ok(&query(
        &server,
        Some(&ops),
        &["near", "-33.9,151.2", "--radius", "1000"],
    ));
    assert!(
        text.contains("cli-b") && text.contains("distance_m"),
        "{text}"
    );

    let (st, _) = http_body(
        &server,
        "PUT",
        "/v1/geofences/depot",
        Some(&ops),
        r#"{"type":"Polygon","coordinates":[[[13,52],[14,52],[14,53],[13,53],[13,52]]]}"#,
    );
    assert_eq!(st, 200);
    let text = ok(&query(&server, Some(&ops), &["fences"]));
    assert!(
        text.contains("depot") && text.contains("(1 fences)"),
        "{text}"
    );
    let text = ok(&query(&server, Some(&ops), &["fences", "depot"]));
    assert!(text.contains("Polygon"), "{text}");

    let text = ok(&query(&server, Some(&ops), &["stats"]));
    assert!(
        text.contains("durability strict") && text.contains("shard"),
        "{text}"
    );

    // Live events: the first heartbeat after the subscription shows up as a line.
    let mut child = Command::new(bin())
        .args(["query", "subscribe", "--devices", "cli-a", "--token", &ops])
        .env("GEOBEAT_URL", format!("http://{}", server.addr))
        .env("HOME", &server.dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("# subscribed"), "{first}");
    ws.send(Message::text(format!(
        r#"{{"seq":4,"id":"cli-a","lat":1.25,"lon":2.5,"ts":{}}}"#,
        t + 2000
    )))
    .unwrap();
    wait_ack(&mut ws, 4);
    let event = lines.next().unwrap().unwrap();
    assert!(
        event.starts_with("cli-a") && event.contains("1.25"),
        "{event}"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // Refusals: one line naming the fix, exit 2 for usage, 1 for what the server said.
    let out = query(&server, None, &["last", "cli-a"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no token") && err.contains("geobeat token ops"),
        "{err}"
    );
    let out = query(&server, Some("gb1.o.bad"), &["last", "cli-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));
    let out = query(&server, Some(&ops), &["last", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404: unknown device"));
    let out = Command::new(bin())
        .args(["query", "stats", "--token", &ops, "--url"])
        .arg(format!("http://{}", free_addr()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the server") && err.contains("--url"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Readiness, the image's health check: no token needed; exit 0 while ready, 1 with the
    // server's answer when it is not (here: no server at all).
    let text = ok(&query(&server, None, &["ready"]));
    assert_eq!(text.trim(), "ready");
    let out = Command::new(bin())
        .args(["query", "ready", "--url"])
        .arg(format!("http://{}", free_addr()))
        .env_remove("GEOBEAT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
