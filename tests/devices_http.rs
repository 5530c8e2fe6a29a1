//! The phone apps' HTTP endpoints on the real binary, driven by a real HTTP client (curl) with
//! the payloads the apps publish or send: the OsmAnd app's and GPSLogger's URL templates exactly
//! as docs/DEVICES.md gives them (filled in the way each app fills them), Traccar Client 8's query
//! and Traccar Client 9's JSON body, OwnTracks' location JSON. A 200 must mean the heartbeat is
//! stored (visible through `GET /v1/devices/{id}` and its history) and survives `kill -9`; every
//! refusal is a non-2xx with a JSON reason and stores nothing.

mod common;
use common::*;

use std::net::SocketAddr;
use std::process::Command;

use serde_json::Value;

/// Runs curl with `args` (plus silent mode, a timeout, and the status code appended to the body
/// on its own line); returns the status and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl failed: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_string())
}

/// The line of docs/DEVICES.md holding `marker` (a URL template), trimmed.
fn doc_template(marker: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/DEVICES.md"))
        .expect("docs/DEVICES.md");
    doc.lines()
        .map(str::trim)
        .find(|l| l.starts_with("http") && l.contains(marker))
        .unwrap_or_else(|| panic!("docs/DEVICES.md has no URL template with {marker}"))
        .to_owned()
}

/// A documented template with the server, device and token filled in.
fn fill(template: &str, host: SocketAddr, id: &str, token: &str) -> String {
    template
        .replace("HOST:PORT", &host.to_string())
        .replace("DEVICE_ID", id)
        .replace("TOKEN", token)
}

/// An error answer: a JSON object with a string `error`.
fn reason(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error reason: {body}"))
        .to_owned()
}

fn history(server: &Server, id: &str, ops: &str) -> Vec<Value> {
    history_all(server, id, ops).unwrap_or_default()
}

fn now_s() -> i64 {
    now_ms() / 1000
}

fn iso(ms: i64) -> String {
    // Civil date from days since the epoch (H. Hinnant), for a UTC ISO 8601 time.
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

#[test]
fn each_app_gets_200_only_with_its_heartbeat_stored() {
    // Each app's request, as the app sends it, is answered 200 and the heartbeat is then the
    // device's last location and in its history, with units converted (knots, km/h → m/s).
    let dir = tempfile::tempdir().unwrap();
    let osmand_addr = free_addr();
    let server = Server::start(dir.path(), &["--osmand-listen", &osmand_addr.to_string()]);
    let ops = server.token(&["ops"]);
    let host = server.addr;

    // The OsmAnd app: its online-tracking URL template from docs/DEVICES.md, filled by
    // MessageFormat ({2} is ms, {5} m/s, {11} battery percent).
    let t = server.token(&["device", "osmand-1"]);
    let ts = now_ms();
    let url = fill(&doc_template("{0}"), host, "osmand-1", &t)
        .replace("{0}", "52.5200")
        .replace("{1}", "13.4050")
        .replace("{2}", &ts.to_string())
        .replace("{3}", "3.5")
        .replace("{4}", "34.7")
        .replace("{5}", "2.5")
        .replace("{6}", "90.0")
        .replace("{11}", "81");
    assert_eq!(curl(&[&url]), (200, r#"{"durable":1}"#.into()));
    let last = last_location(&server, "osmand-1", &ops).expect("stored before the 200");
    assert_eq!(
        (last["lat"].as_f64(), last["ts"].as_i64()),
        (Some(52.52), Some(ts))
    );
    assert!(close(last["speed"].as_f64().unwrap(), 2.5), "{last}");
    assert_eq!(last["attrs"], serde_json::json!({"hdop": 3.5, "batt": 81}));

    // Traccar Client 8.x: POST, the parameters appended to the server URL, speed in knots.
    let t = server.token(&["device", "traccar-8"]);
    let ts = now_s();
    let url = format!(
        "http://{host}/v1/osmand?token={t}&id=traccar-8&timestamp={ts}&lat=48.8566&lon=2.3522&speed=19.4384&bearing=180.0&altitude=35.0&accuracy=12.0&batt=64.0"
    );
    assert_eq!(curl(&["-X", "POST", &url]).0, 200);
    let last = last_location(&server, "traccar-8", &ops).expect("stored");
    assert!(
        close(last["speed"].as_f64().unwrap(), 10.0),
        "knots: {last}"
    );
    assert_eq!(last["ts"].as_i64(), Some(ts * 1000));
    assert_eq!(last["heading"].as_f64(), Some(180.0));

    // Traccar Client 9: its JSON location (the published format) to the OsmAnd listener at `/`.
    let t = server.token(&["device", "48241179"]);
    let ts = now_ms() / 1000 * 1000;
    let body = format!(
        r#"{{"location":{{"timestamp":"{}","coords":{{"latitude":-33.8688,"longitude":151.2093,"accuracy":4.7,"speed":1.5,"heading":-1,"altitude":58}},"is_moving":true,"odometer":1204,"event":"motionchange","battery":{{"level":0.85,"is_charging":false}},"activity":{{"type":"walking"}},"extras":{{}}}},"device_id":"48241179"}}"#,
        iso(ts)
    );
    let url = format!("http://{osmand_addr}/?token={t}");
    let (st, _) = curl(&["-H", "content-type: application/json", "-d", &body, &url]);
    assert_eq!(st, 200);
    let last = last_location(&server, "48241179", &ops).expect("stored");
    assert_eq!(
        (last["lat"].as_f64(), last["ts"].as_i64()),
        (Some(-33.8688), Some(ts))
    );
    assert_eq!(last["heading"], Value::Null, "-1 is unknown");
    assert_eq!(last["attrs"]["batt"], 85);

    // GPSLogger: its custom URL template from docs/DEVICES.md, filled as GPSLogger fills it
    // (String.valueOf of each reading, %HDOP empty without a fix), Basic auth from its settings.
    let t = server.token(&["device", "gpslogger-1"]);
    let ts = now_s();
    let url = fill(&doc_template("%LAT"), host, "gpslogger-1", &t)
        .replace("%LAT", "51.5007")
        .replace("%LON", "-0.1246")
        .replace("%TIMESTAMP", &ts.to_string())
        .replace("%ALT", "12.5")
        .replace("%SPD", "3.5")
        .replace("%DIR", "270.0")
        .replace("%ACC", "4.0")
        .replace("%BATT", "55.0")
        .replace("%HDOP", "");
    assert_eq!(curl(&["-u", &format!("gpslogger-1:{t}"), &url]).0, 200);
    let last = last_location(&server, "gpslogger-1", &ops).expect("stored");
    assert!(close(last["speed"].as_f64().unwrap(), 3.5), "m/s: {last}");
    assert_eq!(
        (last["alt"].as_f64(), last["acc"].as_f64()),
        (Some(12.5), Some(4.0))
    );
    assert_eq!(last["attrs"], serde_json::json!({"batt": 55}));

    // OwnTracks HTTP mode: Basic user = device id, password = token; the location JSON of its
    // booklet; the answer is the JSON array the app expects.
    let t = server.token(&["device", "jane"]);
    let tst = now_s();
    let body = format!(
        r#"{{"_type":"location","acc":13,"alt":271,"batt":40,"bs":1,"conn":"w","lat":48.856826,"lon":2.292713,"t":"u","tid":"JJ","tst":{tst},"vac":26,"vel":36,"BSSID":"b0:f2:8:45:94:33","SSID":"Home","topic":"owntracks/jane/phone"}}"#
    );
    let url = format!("http://{host}/v1/owntracks");
    let user = format!("jane:{t}");
    let (st, answer) = curl(&[
        "-u",
        &user,
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &url,
    ]);
    assert_eq!((st, answer.as_str()), (200, "[]"));
    let last = last_location(&server, "jane", &ops).expect("stored");
    assert!(close(last["speed"].as_f64().unwrap(), 10.0), "km/h: {last}");
    assert_eq!(last["attrs"]["tid"], "JJ");
    // Other message types and empty bodies are acknowledged with [] and not stored.
    for other in [
        r#"{"_type":"transition","event":"enter","desc":"Home","lat":1,"lon":2,"tst":1714564800,"acc":5,"tid":"JJ","t":"c","wtst":1}"#,
        r#"{"_type":"lwt","tst":1714564800}"#,
        "",
    ] {
        let (st, answer) = curl(&[
            "-u",
            &user,
            "-H",
            "content-type: application/json",
            "--data-binary",
            other,
            &url,
        ]);
        assert_eq!((st, answer.as_str()), (200, "[]"), "{other}");
    }
    assert_eq!(
        history(&server, "jane", &ops).len(),
        1,
        "only the location is stored"
    );
}

#[test]
fn refusals_are_json_and_store_nothing() {
    // Bad and missing tokens are 401, a token for another device (or outside a gateway's
    // prefix) 403, malformed requests 400 with the parser's reason, other methods 405, large
    // bodies 413; none of them stores anything.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let host = server.addr;
    let ops = server.token(&["ops"]);
    let dev = server.token(&["device", "car-1"]);
    let gw = server.token(&["gateway", "fleet-"]);
    let q = |token: &str, id: &str, rest: &str| {
        format!("http://{host}/v1/osmand?token={token}&id={id}&lat=1.5&lon=2.5{rest}")
    };
    let cases: Vec<(Vec<String>, u16, &str)> = vec![
        (
            vec![format!("http://{host}/v1/osmand?id=car-1&lat=1&lon=2")],
            401,
            "missing token",
        ),
        (vec![q("garbage", "car-1", "")], 401, "malformed token"),
        (
            vec![q(&ops, "car-1", "")],
            401,
            "token scope does not allow ingest",
        ),
        (vec![q(&dev, "car-2", "")], 403, "id_mismatch"),
        (vec![q(&gw, "other-1", "")], 403, "id_outside_prefix"),
        (
            vec![format!(
                "http://{host}/v1/osmand?token={dev}&id=car-1&lon=2"
            )],
            400,
            "missing:lat",
        ),
        (
            vec![q(&dev, "car-1", "&timestamp=yesterday")],
            400,
            "bad_timestamp",
        ),
        (
            vec![q(&dev, "car-1", "&timestamp=1000")],
            400,
            "ts_out_of_range",
        ),
        (
            vec![q(&dev, "car-1", "&speed=fast")],
            400,
            "bad_value:speed",
        ),
        (
            vec!["-X".into(), "PUT".into(), q(&dev, "car-1", "")],
            405,
            "method not allowed",
        ),
        (
            vec![
                "-u".into(),
                format!("car-1:{dev}"),
                "-d".into(),
                "{\"_type\":\"location\"".into(),
                format!("http://{host}/v1/owntracks"),
            ],
            400,
            "invalid_json",
        ),
        (
            vec![
                "-u".into(),
                format!("car-1:{dev}"),
                "-d".into(),
                r#"{"_type":"encrypted","data":"AAAA"}"#.into(),
                format!("http://{host}/v1/owntracks"),
            ],
            400,
            "encrypted_unsupported",
        ),
        (
            vec![
                "-u".into(),
                format!("car-2:{dev}"),
                "-d".into(),
                "{}".into(),
                format!("http://{host}/v1/owntracks"),
            ],
            403,
            "id_mismatch",
        ),
        (
            vec![
                "-u".into(),
                "car-1:wrong".into(),
                "-d".into(),
                "{}".into(),
                format!("http://{host}/v1/owntracks"),
            ],
            401,
            "malformed token",
        ),
        (
            vec![
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"location":{"coords":{"latitude":1,"longitude":2}},"device_id":"car-1"}"#
                    .into(),
                format!("http://{host}/v1/osmand?token={dev}"),
            ],
            400,
            "missing:timestamp",
        ),
    ];
    for (args, want, why) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (st, body) = curl(&args);
        assert_eq!(st, *want, "{args:?}: {body}");
        assert!(reason(&body).starts_with(why), "{args:?}: {body}");
    }
    // Parse refusals count in the rejection metric under their reason, as WebSocket ones do.
    let (st, metrics) = server.get("/metrics", None);
    assert_eq!(st, 200);
    for why in [
        "missing:lat",
        "bad_timestamp",
        "ts_out_of_range",
        "encrypted_unsupported",
    ] {
        let counted: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("geobeat_heartbeats_rejected_total{"))
            .filter(|l| l.contains(&format!("reason=\"{why}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(counted, 1.0, "{why} counted once");
    }
    // A gateway token may report for any id under its prefix; the token may also come as a
    // bearer header, and the parameters as a form body (Traccar's "form-based payload").
    assert_eq!(curl(&[&q(&gw, "fleet-7", "")]).0, 200);
    let bearer = format!("authorization: Bearer {gw}");
    let url = format!("http://{host}/v1/osmand?id=fleet-8&lat=3&lon=4");
    assert_eq!(curl(&["-H", &bearer, &url]).0, 200);
    let url = format!("http://{host}/v1/osmand?token={gw}");
    assert_eq!(curl(&["-d", "id=fleet-9&lat=5&lon=6&speed=0", &url]).0, 200);
    for (id, lat) in [("fleet-8", 3.0), ("fleet-9", 5.0)] {
        let last = last_location(&server, id, &ops).expect("stored");
        assert_eq!(last["lat"].as_f64(), Some(lat));
    }
    // A body larger than the bound is refused before it is read.
    let big = format!(
        "{{\"_type\":\"location\",\"pad\":\"{}\"}}",
        "x".repeat(20_000)
    );
    let (st, body) = curl(&[
        "-u",
        &format!("car-1:{dev}"),
        "-d",
        &big,
        &format!("http://{host}/v1/owntracks"),
    ]);
    assert_eq!(st, 413, "{body}");
    assert_eq!(
        last_location(&server, "car-1", &ops),
        None,
        "nothing stored"
    );
    assert_eq!(
        last_location(&server, "car-2", &ops),
        None,
        "nothing stored"
    );
    assert!(last_location(&server, "fleet-7", &ops).is_some());
}

#[test]
fn a_200_survives_kill_9() {
    // Heartbeats answered 200, the server SIGKILLed right after the last answer, restarted: every
    // one of them is in the device's history (the 200 was sent only once it was durable).
    let dir = tempfile::tempdir().unwrap();
    let osmand_addr = free_addr();
    let mut server = Server::start(dir.path(), &["--osmand-listen", &osmand_addr.to_string()]);
    let ops = server.token(&["ops"]);
    let t = server.token(&["device", "crash-1"]);
    let base = now_s() - 100;
    let mut sent = Vec::new();
    for i in 0..20 {
        let ts = base + i;
        let (st, body) = if i % 2 == 0 {
            curl(&[&format!(
                "http://{osmand_addr}/?id=crash-1&lat=10.{i}&lon=20&timestamp={ts}&token={t}"
            )])
        } else {
            let body = format!(r#"{{"_type":"location","lat":10.{i},"lon":20,"tst":{ts}}}"#);
            let url = format!("http://{}/v1/owntracks", server.addr);
            curl(&["-u", &format!("crash-1:{t}"), "-d", &body, &url])
        };
        assert_eq!(st, 200, "{body}");
        sent.push(ts * 1000);
    }
    server.kill9();
    server.restart();
    let mut stored: Vec<i64> = history(&server, "crash-1", &ops)
        .iter()
        .map(|h| h["ts"].as_i64().unwrap())
        .collect();
    stored.sort_unstable();
    assert_eq!(stored, sent, "every 200 is in the history after kill -9");
}

#[test]
fn a_heartbeat_the_shard_refuses_is_a_503_and_not_stored() {
    // A PostgreSQL sink nobody listens on never consumes the log, so with a small backlog
    // budget (6 KiB: the segment header plus a few dozen heartbeats) the shard soon refuses every
    // heartbeat (`sink_backlog_full`). Each such request is answered 503 with that reason (the
    // app resends later), never 200, and exactly the heartbeats answered 200 are stored.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("geobeat.toml");
    let port = free_addr().port();
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"db\"\nkind = \"postgres\"\n\
             url = \"host=127.0.0.1 port={port} user=geobeat dbname=fleet connect_timeout=2\"\n"
        ),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--config",
            &config.display().to_string(),
            "--sink-backlog-warn-bytes",
            "6KiB",
            "--sink-backlog-max-bytes",
            "6KiB",
        ],
    );
    let ops = server.token(&["ops"]);
    let t = server.token(&["device", "full-1"]);
    let base = now_s() - 500;
    let (mut stored, mut refused) = (Vec::new(), 0);
    for i in 0..100 {
        let ts = base + i;
        let (st, body) = if i % 2 == 0 {
            curl(&[&format!(
                "http://{}/v1/osmand?id=full-1&lat=1&lon=2&timestamp={ts}&token={t}",
                server.addr
            )])
        } else {
            let body = format!(r#"{{"_type":"location","lat":1,"lon":2,"tst":{ts}}}"#);
            let url = format!("http://{}/v1/owntracks", server.addr);
            curl(&["-u", &format!("full-1:{t}"), "-d", &body, &url])
        };
        match st {
            200 => stored.push(ts * 1000),
            503 => {
                assert_eq!(reason(&body), "not stored: sink_backlog_full");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        stored.len() >= 5 && refused >= 20,
        "{} stored, {refused} refused",
        stored.len()
    );
    let mut got: Vec<i64> = history(&server, "full-1", &ops)
        .iter()
        .map(|h| h["ts"].as_i64().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, stored, "stored exactly what was answered 200");
}
