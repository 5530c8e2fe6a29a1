//! Security properties of the real server, each refused case with its own test: forged, expired,
//! foreign, tampered and wrong-scope tokens on the ingest and query endpoints; a device writing
//! another device's id; a gateway escaping its prefix; query endpoints without a reader token;
//! and the secret file's permissions (a group- or world-readable secret stops `geobeat serve`
//! with a message naming the file; a created secret is 0600). Library-level token and secret
//! checks live in tests/auth_tokens.rs and tests/auth_secret_file.rs; the cases already covered end
//! to end in tests/ingest.rs and tests/query.rs are listed in RELIABILITY.md, not repeated.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use geobeat::auth::{mint, Scope, Secret};
use geobeat::proto::{binary::encode_frame, Seq};
use geobeat::record::Heartbeat;

fn setup() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = Server::start_logged(&dir.path().join("data"), &[], &log);
    (dir, server)
}

/// Status of a WebSocket upgrade of `/v1/ingest` with `token` as a bearer header.
fn upgrade_status(server: &Server, token: &str) -> (u16, String) {
    let req = upgrade_request("", &format!("authorization: Bearer {token}\r\n"));
    // A 101 keeps the connection open: read only the status line then.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf[n..]).unwrap();
        if k == 0 {
            break;
        }
        n += k;
    }
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status != 101 {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        return (status, text + &String::from_utf8_lossy(&rest));
    }
    (status, text)
}

/// A token with the same claims re-signed with a different secret.
fn foreign(scope: &Scope) -> String {
    mint(&Secret::from_bytes([0x42; 32]), scope, u64::MAX / 2)
}

/// `token` with its part `index` replaced (the signature left as it was). Works on both token
/// forms: `gb2.<scope>.<subject>.<issued>.<expiry>.<mac>` and the older `gb1` without `<issued>`.
fn with_part(token: &str, index: usize, value: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    assert!(matches!(parts.len(), 5 | 6), "{token}");
    parts[index] = value;
    parts.join(".")
}

/// `token` with its subject replaced (the signature left as it was).
fn with_subject(token: &str, subject: &str) -> String {
    with_part(token, 2, &URL_SAFE_NO_PAD.encode(subject))
}

/// `token` with its scope letter replaced (the signature left as it was).
fn with_letter(token: &str, letter: &str) -> String {
    with_part(token, 1, letter)
}

/// `token` with a later expiry (the signature left as it was).
fn with_expiry(token: &str, expiry: u64) -> String {
    let at = token.split('.').count() - 2;
    with_part(token, at, &expiry.to_string())
}

#[test]
fn ingest_refuses_foreign_tampered_reader_and_oversized_tokens() {
    // (Missing, forged-MAC, expired and ops tokens are covered in tests/ingest.rs.) Refused with
    // 401 before any upgrade, the token never echoed: a device token signed by another secret, a
    // device token whose subject was swapped, one whose expiry was pushed out, a gateway token
    // relabelled as ops, a subscriber token, and a 600-byte token. The genuine token upgrades.
    let (_d, server) = setup();
    let dev = server.token(&["device", "dev-1"]);
    let sub = server.token(&["subscriber", ""]);
    let gw = server.token(&["gateway", "a/"]);
    let long = format!("gb1.d.{}.9999999999.{}", "A".repeat(300), "B".repeat(280));
    let cases = [
        ("foreign secret", foreign(&Scope::Device("dev-1".into()))),
        ("swapped subject", with_subject(&dev, "dev-2")),
        ("pushed expiry", with_expiry(&dev, 99_999_999_999)),
        ("relabelled scope", with_letter(&gw, "d")),
        ("subscriber scope", sub),
        ("oversized", long),
    ];
    for (what, tok) in &cases {
        let (st, body) = upgrade_status(&server, tok);
        assert_eq!(st, 401, "{what}: {body}");
        assert!(body.contains("\"error\""), "{what}: JSON body: {body}");
        assert!(!body.contains(tok.as_str()), "{what}: the token is echoed");
    }
    assert_eq!(upgrade_status(&server, &dev).0, 101, "the genuine token");
}

#[test]
fn queries_refuse_missing_forged_expired_foreign_and_wrong_scope_tokens() {
    // Last location and history both answer 401 (never 404: no existence oracle, even for a
    // device that does not exist) to: no token, a forged MAC, an expired ops token, an ops token
    // from another secret, an ops token made from a device token by relabelling, device, gateway
    // and out-of-prefix subscriber tokens — in the header and in `?token=`. An ops token and a
    // subscriber token for the device's prefix read it.
    let (_d, server) = setup();
    let ops = server.token(&["ops"]);
    let dev = server.token(&["device", "fleet-a/1"]);
    let mut ws = ws_connect(&server, &dev).unwrap();
    ws.send(Message::text(hb_json(1, 1.0, 1.0, now_ms())))
        .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    let expired = server.token(&["ops", "--ttl", "1s"]);
    let bad: Vec<(&str, String)> = vec![
        ("none", String::new()),
        (
            "forged",
            "gb1.o..9999999999.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        ),
        ("foreign", foreign(&Scope::Ops)),
        ("relabelled", with_subject(&with_letter(&dev, "o"), "")),
        ("device", dev.clone()),
        ("gateway", server.token(&["gateway", ""])),
        ("other prefix", server.token(&["subscriber", "fleet-b/"])),
        ("expired", expired),
    ];
    std::thread::sleep(Duration::from_millis(2100)); // the 1 s token expires
    let enc = "fleet-a%2F1";
    for path in [
        format!("/v1/devices/{enc}"),
        format!("/v1/devices/{enc}/history"),
        "/v1/devices/nobody".to_string(),
        "/v1/devices/nobody/history".to_string(),
    ] {
        for (what, tok) in &bad {
            let t = (!tok.is_empty()).then_some(tok.as_str());
            let (st, body) = server.get(&path, t);
            assert_eq!(st, 401, "{path} with {what}: {body}");
            if !tok.is_empty() {
                assert!(!body.contains(tok.as_str()), "{what}: the token is echoed");
                let (st, _) = server.get(&format!("{path}?token={tok}"), None);
                assert_eq!(st, 401, "{path}?token= with {what}");
            }
        }
    }
    let sub = server.token(&["subscriber", "fleet-a/"]);
    for tok in [&ops, &sub] {
        assert_eq!(server.get(&format!("/v1/devices/{enc}"), Some(tok)).0, 200);
        assert_eq!(
            server
                .get(&format!("/v1/devices/{enc}/history"), Some(tok))
                .0,
            200
        );
        assert_eq!(
            server
                .get(&format!("/v1/devices/{enc}?token={tok}"), None)
                .0,
            200
        );
    }
    assert_eq!(server.get("/v1/devices/nobody", Some(&ops)).0, 404);
}

#[test]
fn tokens_of_one_server_are_refused_by_another() {
    // Two data directories have two secrets: a device token and an ops token of one are refused
    // by the other, for ingest and for queries.
    let (_d1, a) = setup();
    let (_d2, b) = setup();
    let dev = a.token(&["device", "x"]);
    let ops = a.token(&["ops"]);
    assert_eq!(upgrade_status(&b, &dev).0, 401);
    assert_eq!(b.get("/v1/devices/x", Some(&ops)).0, 401);
    assert_eq!(upgrade_status(&a, &dev).0, 101);
}

#[test]
fn a_device_cannot_write_another_device() {
    // (The JSON case is covered in tests/ingest.rs.) A device token naming another id in a binary
    // frame, in a batch next to its own heartbeats, or with a look-alike id (case, trailing space,
    // a zero-width character) gets id_mismatch for those heartbeats; nothing is stored under any
    // other id and the device's own heartbeats are stored.
    let (_d, server) = setup();
    let ops = server.token(&["ops"]);
    let tok = server.token(&["device", "dev-a"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    let others = ["dev-b", "DEV-A", "dev-a ", "dev-a\u{200b}", "dev-"];
    let mut items = Vec::new();
    for (i, id) in others.iter().enumerate() {
        items.push(format!(
            r#"{{"seq":{},"id":"{id}","lat":1,"lon":1,"ts":{t}}}"#,
            i + 1
        ));
    }
    items.push(format!(
        r#"{{"seq":10,"id":"dev-a","lat":5,"lon":5,"ts":{t}}}"#
    ));
    ws.send(Message::text(format!("[{}]", items.join(","))))
        .unwrap();
    let errs = wait_ack(&mut ws, 10);
    assert_eq!(errs.len(), others.len(), "{errs:?}");
    assert!(errs.iter().all(|e| e["error"] == "id_mismatch"), "{errs:?}");
    let hb = Heartbeat {
        device_id: "dev-b".into(),
        lat: 2.0,
        lon: 2.0,
        ts_ms: t + 1,
        ..Default::default()
    };
    let mut frame = Vec::new();
    encode_frame(&mut frame, [(Seq(11), &hb)]).unwrap();
    ws.send(Message::binary(frame)).unwrap();
    let v = next_json(&mut ws);
    assert_eq!(
        (v["seq"].as_u64(), v["error"].as_str()),
        (Some(11), Some("id_mismatch"))
    );
    for id in others {
        let mut enc = String::new();
        geobeat::http::parse::percent_encode(id, &mut enc);
        let (st, _) = server.get(&format!("/v1/devices/{enc}"), Some(&ops));
        assert!(st == 404 || st == 400, "{id:?} stored ({st})");
    }
    let last = last_location(&server, "dev-a", &ops).unwrap();
    assert_eq!(last["lat"], 5.0);
}

#[test]
fn a_gateway_cannot_escape_its_prefix() {
    // (A plain other prefix and a missing id are covered in tests/ingest.rs.) For prefix
    // "fleet-a/": the bare prefix name, another case, a full-width solidus, a leading space or
    // zero-width character, and a percent-encoded slash (ids are opaque, never decoded) are all
    // id_outside_prefix, in JSON and binary frames; nothing is stored for them. Ids that start with
    // the prefix — however odd — are the gateway's to write.
    let (_d, server) = setup();
    let ops = server.token(&["ops"]);
    let gw = server.token(&["gateway", "fleet-a/"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms();
    let outside = [
        "fleet-a",
        "FLEET-A/1",
        "fleet-a\u{ff0f}1",
        " fleet-a/1",
        "\u{200b}fleet-a/1",
        "fleet-a%2F1",
        "fleet-b/1",
    ];
    let mut items: Vec<String> = outside
        .iter()
        .enumerate()
        .map(|(i, id)| {
            format!(
                r#"{{"seq":{},"id":"{id}","lat":1,"lon":1,"ts":{t}}}"#,
                i + 1
            )
        })
        .collect();
    items.push(format!(
        r#"{{"seq":20,"id":"fleet-a/../fleet-b/1","lat":3,"lon":3,"ts":{t}}}"#
    ));
    ws.send(Message::text(format!("[{}]", items.join(","))))
        .unwrap();
    let errs = wait_ack(&mut ws, 20);
    assert_eq!(errs.len(), outside.len(), "{errs:?}");
    assert!(
        errs.iter().all(|e| e["error"] == "id_outside_prefix"),
        "{errs:?}"
    );
    let hb = Heartbeat {
        device_id: "fleet-b/2".into(),
        lat: 2.0,
        lon: 2.0,
        ts_ms: t,
        ..Default::default()
    };
    let mut frame = Vec::new();
    encode_frame(&mut frame, [(Seq(21), &hb)]).unwrap();
    ws.send(Message::binary(frame)).unwrap();
    let v = next_json(&mut ws);
    assert_eq!(
        (v["seq"].as_u64(), v["error"].as_str()),
        (Some(21), Some("id_outside_prefix"))
    );
    for id in outside.iter().chain(["fleet-b/2"].iter()) {
        let mut enc = String::new();
        geobeat::http::parse::percent_encode(id, &mut enc);
        let (st, _) = server.get(&format!("/v1/devices/{enc}"), Some(&ops));
        assert!(st == 404 || st == 400, "{id:?} stored ({st})");
    }
    assert!(last_location(&server, "fleet-a/../fleet-b/1", &ops).is_some());
    assert!(last_location(&server, "fleet-b/1", &ops).is_none());
}

#[test]
fn a_readable_secret_file_stops_the_server_and_a_created_one_is_private() {
    // A fresh data directory gets a 0600 secret. Made group- or world-readable, `geobeat serve`
    // exits non-zero with a message naming the file and its mode, and `geobeat token` refuses
    // too; back at 0600 the server starts with the same secret (old tokens still verify).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = Server::start_logged(&data, &[], &log);
    let secret = data.join("secret");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "created secret mode {mode:o}");
    let ops = server.token(&["ops"]);
    assert!(server.sigterm().success());
    for bad in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(bad)).unwrap();
        let attempt = dir.path().join(format!("refused-{bad:o}.log"));
        let args: Vec<&str> = server.args.iter().map(String::as_str).collect();
        let (status, out) = serve_until_exit(&args, &attempt);
        assert!(
            status.is_some_and(|s| !s.success()),
            "serve must refuse mode {bad:o}: {status:?}\n{out}"
        );
        assert!(
            out.contains(secret.to_str().unwrap()),
            "names the file: {out}"
        );
        assert!(out.contains(&format!("{bad:04o}")), "names the mode: {out}");
        let minted = std::process::Command::new(bin())
            .args(["token", "ops", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!minted.status.success(), "token must refuse mode {bad:o}");
    }
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    server.restart_logged(&log);
    assert_eq!(
        server.get("/v1/devices/none", Some(&ops)).0,
        404,
        "old token verifies"
    );
}
