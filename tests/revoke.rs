//! Revocation without rotating the secret (issue 16 §4), end to end: the real binary, the real
//! `geobeat token revoke / unrevoke / revocations / id` commands, and clients no one here wrote:
//! Python `websockets` and paho-mqtt (tests/support/revoke_client.py) and curl. Each test checks
//! what a client sees (401 and its JSON reason, CONNACK codes, WebSocket close 1008
//! `token_revoked`, MQTT 5 DISCONNECT 0x8C) and, where it matters, what the server logged (token
//! ids, never tokens).

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a live connection may take to be closed after `geobeat token revoke` returns: the
/// poll interval (1 s) for the reload, one more for the other executors' look, and slack for a
/// loaded CI machine.
const CLOSE_WITHIN: Duration = Duration::from_secs(6);

/// Runs `geobeat token <args> --data-dir <dir>`: exit code, stdout, stderr.
fn cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("token")
        .args(args)
        .args(["--data-dir", &dir.display().to_string()])
        .output()
        .expect("run geobeat token");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `geobeat token revoke <args>`, which must succeed.
fn revoke(dir: &Path, args: &[&str]) {
    let mut full = vec!["revoke"];
    full.extend_from_slice(args);
    let (code, out, err) = cli(dir, &full);
    assert_eq!(code, 0, "revoke {args:?}: {err}");
    assert!(
        out.starts_with("revoked ") || out.contains("already revoked"),
        "{out}"
    );
}

/// The id `geobeat token id` gives `token` (read from standard input).
fn token_id(token: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(["token", "id"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(id, geobeat::auth::TokenId::of(token).to_string());
    id
}

/// A client from tests/support/revoke_client.py, its JSON lines arriving on a channel.
struct Client {
    child: Child,
    lines: mpsc::Receiver<Value>,
    what: String,
}

impl Client {
    fn spawn(args: &[&str]) -> Client {
        let script = format!(
            "{}/tests/support/revoke_client.py",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (with websockets and paho-mqtt; .ci/run installs them)");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Client {
            child,
            lines: rx,
            what: format!("{args:?}"),
        }
    }

    /// A WebSocket client of `path` on `server` with `token`; `hb`: send a heartbeat once open.
    fn ws(server: &Server, path: &str, token: &str, hb: bool) -> Client {
        let url = format!("ws://{}{path}", server.addr);
        let mut args = vec!["ws", "--url", &url, "--token", token];
        if hb {
            args.push("--hb");
        }
        Client::spawn(&args)
    }

    /// A paho client on `mqtt` publishing for `device` with `token`.
    fn mqtt(mqtt: std::net::SocketAddr, token: &str, v5: bool, device: &str) -> Client {
        let port = mqtt.port().to_string();
        let client_id = format!("rv-{device}");
        let mut args = vec![
            "mqtt",
            "--port",
            &port,
            "--token",
            token,
            "--client-id",
            &client_id,
            "--device",
            device,
        ];
        if v5 {
            args.push("--v5");
        }
        Client::spawn(&args)
    }

    /// The next line that has `key` (lines without it are skipped), within `within`.
    fn expect(&self, key: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v.get(key).is_some() => return v,
                Ok(_) => continue,
                Err(_) => panic!("{}: no {key:?} line within {within:?}", self.what),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST /v1/osmand` for `device` with the token in the URL, through curl: status and body.
fn osmand(server: &Server, device: &str, token: &str) -> (u16, String) {
    let url = format!(
        "http://{}/v1/osmand?id={device}&lat=48.1&lon=11.5&timestamp={}&token={token}",
        server.addr,
        now_ms() / 1000
    );
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", "-w", "\n%{http_code}", &url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl -w adds the status");
    (code.trim().parse().expect("status"), body.to_owned())
}

/// `GET path` with a bearer token, through curl: status and body.
fn curl_get(server: &Server, path: &str, token: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://{}{path}", server.addr))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl -w adds the status");
    (code.trim().parse().expect("status"), body.to_owned())
}

/// Waits until `f` holds (polling), at most `within`.
fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server with MQTT on a free port, logging at info to `<tmp>/server.log`.
fn start(tmp: &Path) -> (Server, std::net::SocketAddr, PathBuf) {
    let mqtt = free_addr();
    let log = tmp.join("server.log");
    let server = Server::start_logged(
        &tmp.join("data"),
        &["--mqtt-listen", &mqtt.to_string()],
        &log,
    );
    (server, mqtt, log)
}

/// Asserts the server log holds none of `tokens` (whole or their MAC part) and each of `ids`.
fn assert_log_names_ids_not_tokens(log: &Path, tokens: &[&str], ids: &[&str]) {
    let text = std::fs::read_to_string(log).unwrap();
    for t in tokens {
        let mac = t.rsplit('.').next().unwrap();
        assert!(
            !text.contains(t) && !text.contains(mac),
            "the server log carries a token: {t}"
        );
    }
    for id in ids {
        assert!(text.contains(id), "token id {id} is in no log line");
    }
}

#[test]
fn a_revoked_token_is_refused_at_connect_and_newer_ones_work() {
    // A device token works over HTTP; `geobeat token revoke device` (server running) makes the
    // server refuse it within seconds on HTTP (curl: 401 token_revoked naming its id), WebSocket
    // (websockets: 401 with the same JSON) and MQTT (paho: CONNACK 5 for 3.1.1, 0x86 for 5);
    // a token minted after the revocation works everywhere. The log names the refused token's
    // id and never a token.
    let tmp = tempfile::tempdir().unwrap();
    let (server, mqtt, log) = start(tmp.path());
    let old = server.token(&["device", "rv-1"]);
    assert_eq!(osmand(&server, "rv-1", &old).0, 200, "works before");
    revoke(&server.dir, &["device", "rv-1"]);
    let id = token_id(&old);
    let mut refusal = (0, String::new());
    eventually(CLOSE_WITHIN, "HTTP refuses the revoked token", || {
        refusal = osmand(&server, "rv-1", &old);
        refusal.0 == 401
    });
    let body: Value = serde_json::from_str(&refusal.1).unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("token_revoked: ") && error.contains(&id) && error.contains("rv-1"),
        "{error}"
    );
    assert!(!refusal.1.contains(&old), "the answer echoes the token");

    let ws = Client::ws(&server, "/v1/ingest", &old, true);
    let r = ws.expect("refused", Duration::from_secs(10));
    assert_eq!(r["refused"], 401, "{r}");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("token_revoked"),
        "{body}"
    );
    assert_eq!(body["param"], "token");
    // paho reports a 3.1.1 return code 5 as 135 (its MQTT 5 equivalent); mosquitto_pub shows
    // the raw 3.1.1 code.
    for (v5, code) in [(false, 135), (true, 0x86)] {
        let m = Client::mqtt(mqtt, &old, v5, "rv-1");
        assert_eq!(
            m.expect("connack", Duration::from_secs(10))["connack"],
            code,
            "v5 {v5}"
        );
    }
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.port().to_string(),
            "-d",
            "-q",
            "1",
        ])
        .args(["-u", "rv-1", "-P", &old, "-t", "geobeat/rv-1", "-m", "{}"])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients; .ci/run installs it)");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("not authorised"),
        "{text}"
    );

    let new = server.token(&["device", "rv-1"]);
    assert_eq!(
        osmand(&server, "rv-1", &new).0,
        200,
        "a token minted since works"
    );
    let ws = Client::ws(&server, "/v1/ingest", &new, true);
    ws.expect("open", Duration::from_secs(10));
    assert_eq!(ws.expect("ack", Duration::from_secs(10))["ack"], 1);
    for v5 in [false, true] {
        let m = Client::mqtt(mqtt, &new, v5, "rv-1");
        assert_eq!(m.expect("connack", Duration::from_secs(10))["connack"], 0);
        assert_eq!(m.expect("puback", Duration::from_secs(10))["puback"], 0);
    }
    assert_log_names_ids_not_tokens(&log, &[&old, &new], &[&id]);
}

#[test]
fn live_connections_are_closed_within_seconds() {
    // Live connections of four revoked tokens: a WebSocket ingest (websockets), a WebSocket
    // subscriber with an ops token, MQTT 5 and MQTT 3.1.1 (paho), each proven working first. After
    // `geobeat token revoke` of their subjects each is closed within seconds: WebSocket 1008
    // `token_revoked`, MQTT 5 DISCONNECT 0x8C, MQTT 3.1.1 a close. A connection whose token is
    // not revoked stays open and working.
    let tmp = tempfile::tempdir().unwrap();
    let (server, mqtt, log) = start(tmp.path());
    let t_ws = server.token(&["device", "live-ws"]);
    let t_sub = server.token(&["ops"]);
    let t_m5 = server.token(&["device", "live-m5"]);
    let t_m3 = server.token(&["device", "live-m3"]);
    let t_keep = server.token(&["device", "live-keep"]);
    let ws = Client::ws(&server, "/v1/ingest", &t_ws, true);
    let sub = Client::ws(&server, "/v1/subscribe", &t_sub, false);
    let keep = Client::ws(&server, "/v1/ingest", &t_keep, true);
    let m5 = Client::mqtt(mqtt, &t_m5, true, "live-m5");
    let m3 = Client::mqtt(mqtt, &t_m3, false, "live-m3");
    for c in [&ws, &keep] {
        assert_eq!(c.expect("ack", Duration::from_secs(10))["ack"], 1);
    }
    sub.expect("open", Duration::from_secs(10));
    for m in [&m5, &m3] {
        assert_eq!(m.expect("puback", Duration::from_secs(10))["puback"], 0);
    }
    for subject in [
        &["device", "live-ws"][..],
        &["ops"],
        &["device", "live-m5"],
        &["device", "live-m3"],
    ] {
        revoke(&server.dir, subject);
    }
    let revoked_at = Instant::now();
    for c in [&ws, &sub] {
        let closed = c.expect("closed", CLOSE_WITHIN);
        assert_eq!(closed["closed"], 1008, "{}: {closed}", c.what);
        assert_eq!(closed["reason"], "token_revoked", "{}", c.what);
    }
    let d5 = m5.expect("disconnect", CLOSE_WITHIN);
    assert_eq!(
        d5["disconnect"], 0x8c,
        "MQTT 5 DISCONNECT reason code: {d5}"
    );
    m3.expect("disconnect", CLOSE_WITHIN);
    assert!(revoked_at.elapsed() < CLOSE_WITHIN);
    // The unrevoked connection is untouched (its client would have printed "closed").
    assert!(
        keep.lines.try_recv().is_err(),
        "an unrevoked connection was disturbed"
    );
    assert_eq!(osmand(&server, "live-keep", &t_keep).0, 200);
    let ids: Vec<String> = [&t_ws, &t_m5].iter().map(|t| token_id(t)).collect();
    let all = [&t_ws, &t_sub, &t_m5, &t_m3, &t_keep].map(String::as_str);
    // The close lines are rate limited per executor; at least one of these two is logged.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        ids.iter().any(|id| text.contains(id.as_str())),
        "no close line names a token id"
    );
    assert!(text.contains("closing a connection: token revoked"));
    assert_log_names_ids_not_tokens(&log, &all, &[]);
}

/// A `gb1` token (the format before issue times) for `scope_letter`/`subject`, signed with the
/// secret in `dir`, built by hand as old builds minted it.
fn gb1_token(dir: &Path, scope_letter: &str, subject: &str, expires_at_s: u64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use hmac::{Hmac, Mac as _};
    let hex = std::fs::read_to_string(dir.join("secret")).unwrap();
    let key: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let signed = format!(
        "gb1.{scope_letter}.{}.{expires_at_s}",
        URL_SAFE_NO_PAD.encode(subject)
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[test]
fn gateway_prefix_ops_before_and_old_tokens() {
    // A gateway revocation names the exact prefix: `fleet-` tokens are refused, `fleet-a-` ones
    // are not. An ops revocation refuses ops tokens on the HTTP API; one minted since works.
    // `--before` a past time (RFC 3339 or Unix seconds) spares tokens issued after it. An old
    // gb1 token (no issue time) works until its subject is revoked, and then is refused whatever
    // --before says. `geobeat token revocations` lists every entry.
    let tmp = tempfile::tempdir().unwrap();
    let (server, _mqtt, _log) = start(tmp.path());
    let dir = server.dir.clone();
    let fleet = server.token(&["gateway", "fleet-"]);
    let fleet_a = server.token(&["gateway", "fleet-a-"]);
    let ops = server.token(&["ops"]);
    let legacy = gb1_token(&dir, "d", "old-1", (now_ms() / 1000) as u64 + 3600);
    let spared = server.token(&["device", "spared-1"]);
    assert_eq!(
        osmand(&server, "old-1", &legacy).0,
        200,
        "gb1 tokens still verify"
    );
    assert_eq!(curl_get(&server, "/v1/devices/nope", &ops).0, 404);

    revoke(&dir, &["gateway", "fleet-"]);
    revoke(&dir, &["ops"]);
    // Both --before forms, an hour ago: the tokens minted above were issued after that.
    let hour_ago_s = (now_ms() / 1000 - 3600).to_string();
    revoke(&dir, &["device", "spared-1", "--before", &hour_ago_s]);
    revoke(
        &dir,
        &["device", "old-1", "--before", "2020-01-01T00:00:00Z"],
    );
    eventually(CLOSE_WITHIN, "the gateway revocation applies", || {
        osmand(&server, "fleet-1", &fleet).0 == 401
    });
    assert_eq!(
        osmand(&server, "fleet-a-1", &fleet_a).0,
        200,
        "exact prefix only"
    );
    let (st, body) = curl_get(&server, "/v1/devices/nope", &ops);
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("token_revoked"), "{body}");
    assert_eq!(
        curl_get(&server, "/v1/devices/nope", &server.token(&["ops"])).0,
        404
    );
    assert_eq!(
        osmand(&server, "spared-1", &spared).0,
        200,
        "issued after --before"
    );
    let (st, body) = osmand(&server, "old-1", &legacy);
    assert_eq!(st, 401, "a gb1 token of a revoked subject: {body}");
    assert!(body.contains("gb1"), "{body}");

    let (code, out, _) = cli(&dir, &["revocations"]);
    assert_eq!(code, 0);
    for needle in [
        "gateway",
        "\"fleet-\"",
        "ops",
        "\"spared-1\"",
        "\"old-1\"",
        "2020-01-01T00:00:00.000Z",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    assert_eq!(out.lines().count(), 5, "a header and four entries:\n{out}");
}

#[test]
fn revocations_survive_restarts_and_the_cli_works_without_a_server() {
    // Recorded while the server runs, a revocation holds after a restart. Recorded while no
    // server runs, it holds from the next start. Lifted (`unrevoke`) while the server runs, the
    // token works again within seconds, with no restart.
    let tmp = tempfile::tempdir().unwrap();
    let (mut server, _mqtt, log) = start(tmp.path());
    let dir = server.dir.clone();
    let a = server.token(&["device", "keep-a"]);
    let b = server.token(&["device", "keep-b"]);
    revoke(&dir, &["device", "keep-a"]);
    server.kill9();
    revoke(&dir, &["device", "keep-b"]);
    server.restart_logged(&log);
    assert_eq!(
        osmand(&server, "keep-a", &a).0,
        401,
        "kept across a restart"
    );
    assert_eq!(
        osmand(&server, "keep-b", &b).0,
        401,
        "recorded while stopped"
    );
    let (code, out, err) = cli(&dir, &["unrevoke", "device", "keep-a"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("lifted the revocation of device \"keep-a\""),
        "{out}"
    );
    eventually(CLOSE_WITHIN, "the lifted token works again", || {
        osmand(&server, "keep-a", &a).0 == 200
    });
    assert_eq!(osmand(&server, "keep-b", &b).0, 401);
    // A list the server cannot read stops a start, naming the file and the fix.
    server.kill9();
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("revocations"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{not json").unwrap();
    }
    let out = Command::new(bin())
        .args(&server.args)
        .env(MQTT_OFF.0, MQTT_OFF.1)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("revocations") && err.contains("move it away"),
        "{err}"
    );
}

#[test]
fn bad_cli_input_gets_one_line_naming_the_problem_and_the_fix() {
    // Every mistake exits non-zero with one line on stderr that names what is wrong and what to
    // do, and records nothing.
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let dir = server.dir.clone();
    let other = tmp.path().join("not-a-data-dir");
    std::fs::create_dir_all(&other).unwrap();
    let future = (now_ms() / 1000 + 86_400).to_string();
    let cases: Vec<(Vec<&str>, &Path, &[&str])> = vec![
        (
            vec!["revoke", "ops", "--before", "yesterday"],
            &dir,
            &["yesterday", "RFC 3339", "Unix seconds"],
        ),
        (
            vec!["revoke", "ops", "--before", "1796475600000"],
            &dir,
            &["milliseconds"],
        ),
        (
            vec!["revoke", "ops", "--before", &future],
            &dir,
            &["in the future", "leave --before out"],
        ),
        (vec!["revoke", "device", ""], &dir, &["device", "id"]),
        (
            vec!["revoke", "ops"],
            &other,
            &["not a geobeat data directory", "--data-dir"],
        ),
        (
            vec!["revoke", "ops", "--ttl", "3d"],
            &dir,
            &["--ttl", "leave it out"],
        ),
        (
            vec!["unrevoke", "device", "never"],
            &dir,
            &["no revocation", "geobeat token revocations"],
        ),
    ];
    for (args, d, needles) in cases {
        let (code, out, err) = cli(d, &args);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line, got:\n{err}"
        );
        for n in needles {
            assert!(err.contains(n), "{args:?}: {n:?} missing from {err}");
        }
    }
    assert!(!dir.join("revocations").exists(), "nothing was recorded");
    assert!(!other.join("revocations").exists());
    let out = Command::new(bin())
        .args(["token", "id"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("standard input"));
}
