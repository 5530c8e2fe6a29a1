//! MQTT ingest end to end (docs/MQTT.md): the real binary with `--mqtt-listen`, spoken to by real
//! clients: `mosquitto_pub` (Debian's mosquitto-clients) and paho-mqtt (PyPI) through
//! tests/support/mqtt_client.py, in MQTT 3.1.1 and 5. `.ci/run` installs both. Each test checks
//! what a device sees (CONNACK, PUBACK/PUBREC/PUBCOMP and their reason codes, DISCONNECT) and what
//! the server stored (the device's history over the HTTP API).

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A server with MQTT on a free port.
fn start(dir: &std::path::Path) -> (Server, SocketAddr) {
    let mqtt = free_addr();
    let server = Server::start(dir, &["--mqtt-listen", &mqtt.to_string()]);
    (server, mqtt)
}

fn script() -> String {
    format!(
        "{}/tests/support/mqtt_client.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs a paho scenario to its end; its JSON lines.
fn paho(mqtt: SocketAddr, args: &[&str]) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .args(["--port", &mqtt.port().to_string()])
        .output()
        .expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "paho scenario {args:?} failed (is paho-mqtt installed? .ci/run installs it): {stderr}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

/// The first line of `lines` that has `key`.
fn line<'a>(lines: &'a [Value], key: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l.get(key).is_some())
        .unwrap_or_else(|| panic!("no {key:?} line in {lines:?}"))
}

/// `mosquitto_pub -d` with `args`: whether it exited 0, and its debug output.
fn mosquitto_pub(mqtt: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-d"])
        .args(args)
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients; .ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// MQTT 5 CONNECT with `token`, one QoS 2 PUBLISH, and the PUBREC's reason code and string.
fn raw_v5_pubrec(mqtt: SocketAddr, token: &str, topic: &str, payload: &[u8]) -> (u8, String) {
    use geobeat::proto::mqtt::codec::{self, Connect, Packet, PropValue, Props, QoS, Version};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let connect = Connect {
        version: Version::V5,
        clean: true,
        keep_alive_s: 30,
        props: &[],
        client_id: "raw",
        will: None,
        username: None,
        password: Some(token.as_bytes()),
    };
    codec::encode(&Packet::Connect(connect), Version::V5, &mut out);
    let publish = codec::Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic,
        packet_id: Some(7),
        props: &[],
        payload,
    };
    codec::encode(&Packet::Publish(publish), Version::V5, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the PUBREC");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some((p, used)) = codec::decode(&buf[at..], Some(Version::V5), 1 << 20).unwrap() {
            if let Packet::PubRec(a) = p {
                assert_eq!(a.packet_id, 7);
                let why = match Props(a.props).get(codec::prop::REASON_STRING) {
                    Some(PropValue::Str(w)) => w.to_string(),
                    _ => String::new(),
                };
                return (a.code, why);
            }
            at += used;
        }
    }
}

/// A heartbeat payload for `geobeat/<id>` with a recognisable latitude.
fn hb(lat: f64) -> String {
    format!(r#"{{"lat":{lat},"lon":11.5,"ts":{}}}"#, now_ms())
}

/// The latitudes stored for device `id`.
fn stored_lats(server: &Server, id: &str) -> Vec<f64> {
    let ops = server.token(&["ops"]);
    let mut lats: Vec<f64> = history_all(server, id, &ops)
        .unwrap_or_default()
        .iter()
        .map(|h| h["lat"].as_f64().unwrap())
        .collect();
    lats.sort_by(f64::total_cmp);
    lats
}

/// One MQTT event counter summed over executors, from /metrics.
fn mqtt_event(server: &Server, event: &str) -> u64 {
    let (_, text) = server.get("/metrics", None);
    let needle = format!("event=\"{event}\"}} ");
    text.lines()
        .filter(|l| l.starts_with("geobeat_mqtt_events_total") && l.contains(&needle))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn qos_0_1_2_from_mosquitto_pub_and_paho_are_stored_and_acked_only_when_durable() {
    // Every QoS in both protocol versions, from both clients: QoS 1 gets PUBACK 0, QoS 2
    // PUBREC then PUBCOMP, QoS 0 nothing; afterwards every heartbeat is in the history.
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "m-1"]);
    let mut want = Vec::new();
    for (n, (version, qos)) in [
        ("311", "0"),
        ("311", "1"),
        ("311", "2"),
        ("5", "0"),
        ("5", "1"),
        ("5", "2"),
    ]
    .into_iter()
    .enumerate()
    {
        let lat = 10.0 + n as f64;
        let v = if version == "5" { "mqttv5" } else { "mqttv311" };
        let payload = hb(lat);
        let (ok, text) = mosquitto_pub(
            mqtt,
            &[
                "-V",
                v,
                "-u",
                "m-1",
                "-P",
                &tok,
                "-q",
                qos,
                "-t",
                "geobeat/m-1",
                "-m",
                &payload,
            ],
        );
        assert!(ok, "{text}");
        assert!(text.contains("received CONNACK (0)"), "{text}");
        match qos {
            "1" => assert!(text.contains("received PUBACK (Mid: 1, RC:0)"), "{text}"),
            "2" => assert!(
                text.contains("received PUBREC (Mid: 1")
                    && text.contains("received PUBCOMP (Mid: 1, RC:0)"),
                "{text}"
            ),
            _ => assert!(
                !text.contains("PUBACK") && !text.contains("PUBREC"),
                "{text}"
            ),
        }
        want.push(lat);
    }
    // paho: an array of three heartbeats per PUBLISH (QoS 1 and 2, 3.1.1 and 5), acked as one.
    for (n, (v5, qos)) in [(false, "1"), (false, "2"), (true, "1"), (true, "2")]
        .into_iter()
        .enumerate()
    {
        let base = 20.0 + 3.0 * n as f64;
        let t = now_ms();
        let payload = format!(
            r#"[{{"lat":{},"lon":1,"ts":{t}}},{{"lat":{},"lon":1,"ts":{}}},{{"id":"m-1","lat":{},"lon":1,"ts":{}}}]"#,
            base,
            base + 1.0,
            t + 1,
            base + 2.0,
            t + 2
        );
        let mut args = vec![
            "publish",
            "--token",
            &tok,
            "--topic",
            "geobeat/m-1",
            "--qos",
            qos,
            "--payload",
            &payload,
        ];
        if v5 {
            args.push("--v5");
        }
        let lines = paho(mqtt, &args);
        assert_eq!(line(&lines, "connack")["connack"], 0, "{lines:?}");
        assert_eq!(line(&lines, "ack")["rc"], 0, "{lines:?}");
        want.extend([base, base + 1.0, base + 2.0]);
    }
    // QoS 0 is not acknowledged: wait until both QoS 0 heartbeats are visible.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_lats(&server, "m-1").len() < want.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    want.sort_by(f64::total_cmp);
    assert_eq!(stored_lats(&server, "m-1"), want);
    assert!(mqtt_event(&server, "connect") >= 10);
}

#[test]
fn bad_tokens_and_wrong_scopes_are_refused_in_the_connack() {
    // No token, a forged token, an ops token, a device token with another device's user name:
    // CONNACK 0x05 (3.1.1) / 0x86 or 0x87 (5), and nothing is stored.
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let dev = server.token(&["device", "m-2"]);
    let ops = server.token(&["ops"]);
    let (ok, text) = mosquitto_pub(
        mqtt,
        &[
            "-u",
            "m-2",
            "-P",
            "not-a-token",
            "-q",
            "1",
            "-t",
            "geobeat/m-2",
            "-m",
            &hb(1.0),
        ],
    );
    assert!(!ok && text.contains("not authorised"), "{text}");
    let (ok, text) = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-u",
            "m-2",
            "-P",
            "not-a-token",
            "-q",
            "1",
            "-t",
            "geobeat/m-2",
            "-m",
            &hb(1.0),
        ],
    );
    assert!(!ok && text.contains("received CONNACK (134)"), "{text}");
    for (args, code) in [
        (vec!["--v5"], 134),
        (vec!["--v5", "--token", &ops], 135),
        (vec!["--v5", "--token", &dev, "--user", "m-3"], 135),
        // paho reports a 3.1.1 return code 5 as 135 (its MQTT 5 equivalent); mosquitto_pub
        // above showed the raw code.
        (vec!["--token", &dev, "--user", "m-3"], 135),
        (vec!["--token", &ops, "--user", "x"], 135),
    ] {
        let mut a = vec!["publish", "--topic", "geobeat/m-2", "--payload", "{}"];
        a.extend(args.iter().copied());
        let lines = paho(mqtt, &a);
        assert_eq!(line(&lines, "connack")["connack"], code, "{a:?}: {lines:?}");
        assert!(lines.iter().all(|l| l.get("ack").is_none()), "{lines:?}");
    }
    assert!(stored_lats(&server, "m-2").is_empty());
    assert!(mqtt_event(&server, "connect_refused") >= 7);
}

#[test]
fn refused_heartbeats_are_never_acked_as_stored() {
    // MQTT 5: a PUBLISH naming another device gets PUBACK 0x87, a malformed payload 0x99, both
    // with a reason string; a gateway outside its prefix 0x87. MQTT 3.1.1: the connection closes
    // without a PUBACK (counted in geobeat_mqtt_events_total{event="closed_on_refusal"}).
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let dev = server.token(&["device", "m-4"]);
    let gw = server.token(&["gateway", "fleet-"]);
    let good = hb(4.0);
    let lat_91 = format!(r#"{{"lat":91,"lon":0,"ts":{}}}"#, now_ms());
    for (tok, topic, payload, code, reason) in [
        (&dev, "geobeat/m-5", good.as_str(), 135, "id_mismatch"),
        (&dev, "geobeat/m-4", r#"{"lat":1"#, 153, "invalid_json"),
        (
            &dev,
            "geobeat/m-4",
            lat_91.as_str(),
            153,
            "lat_out_of_range",
        ),
        (
            &gw,
            "geobeat/other-1",
            good.as_str(),
            135,
            "id_outside_prefix",
        ),
        (
            &dev,
            "owntracks/m-4/phone",
            r#"{"_type":"location","lat":1}"#,
            153,
            "missing:lon",
        ),
    ] {
        // QoS 1: paho reports a QoS 2 exchange by its PUBCOMP, not by the refusing PUBREC (the
        // raw exchange below shows the PUBREC's code).
        let lines = paho(
            mqtt,
            &[
                "publish",
                "--v5",
                "--token",
                tok,
                "--topic",
                topic,
                "--qos",
                "1",
                "--payload",
                payload,
            ],
        );
        let ack = line(&lines, "ack");
        assert_eq!(
            (ack["rc"].as_u64(), ack["reason"].as_str()),
            (Some(code), Some(reason)),
            "{topic} {payload}: {lines:?}"
        );
    }
    // mosquitto_pub prints the MQTT 5 reason code too.
    let (_, text) = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-u",
            "m-4",
            "-P",
            &dev,
            "-q",
            "1",
            "-t",
            "geobeat/m-5",
            "-m",
            &good,
        ],
    );
    assert!(text.contains("received PUBACK (Mid: 1, RC:135)"), "{text}");
    let (_, text) = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-u",
            "m-4",
            "-P",
            &dev,
            "-q",
            "1",
            "-t",
            "geobeat/m-4",
            "-m",
            "[]",
        ],
    );
    assert!(text.contains("received PUBACK (Mid: 1, RC:153)"), "{text}");
    // A refused QoS 2 PUBLISH: its PUBREC carries the code (neither client prints a PUBREC's
    // code, so this one exchange is read with geobeat's own codec over a plain socket).
    assert_eq!(
        raw_v5_pubrec(mqtt, &dev, "geobeat/m-4", br#"{"lat":1"#),
        (0x99, "invalid_json".to_string())
    );
    let before = mqtt_event(&server, "closed_on_refusal");
    for payload in [r#"{"lat":1"#, lat_91.as_str()] {
        let lines = paho(
            mqtt,
            &[
                "publish",
                "--token",
                &dev,
                "--user",
                "m-4",
                "--topic",
                "geobeat/m-4",
                "--payload",
                payload,
            ],
        );
        assert!(lines.iter().all(|l| l.get("ack").is_none()), "{lines:?}");
        assert!(line(&lines, "disconnect")["disconnect"] != 0, "{lines:?}");
    }
    assert_eq!(mqtt_event(&server, "closed_on_refusal"), before + 2);
    // Nothing of it was stored; a good heartbeat after all that still is.
    assert!(stored_lats(&server, "m-5").is_empty() && stored_lats(&server, "other-1").is_empty());
    let lines = paho(
        mqtt,
        &[
            "publish",
            "--token",
            &dev,
            "--topic",
            "geobeat/m-4",
            "--payload",
            &good,
        ],
    );
    assert_eq!(line(&lines, "ack")["rc"], 0);
    assert_eq!(stored_lats(&server, "m-4"), [4.0]);
}

#[test]
fn owntracks_locations_are_stored_and_other_messages_acked_and_ignored() {
    // OwnTracks in MQTT mode publishes to owntracks/<user>/<device>; <user> is the device id.
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "jane"]);
    let tst = now_ms() / 1000;
    let loc = format!(
        r#"{{"_type":"location","lat":48.85,"lon":2.29,"tst":{tst},"acc":13,"batt":40,"tid":"JJ"}}"#
    );
    for (topic, payload) in [
        ("owntracks/jane/phone", loc.as_str()),
        (
            "owntracks/jane/phone",
            r#"{"_type":"transition","event":"enter","tst":1}"#,
        ),
        ("owntracks/jane/phone", ""),
        // The app's event topic (one level more): acknowledged, nothing stored.
        (
            "owntracks/jane/phone/event",
            r#"{"_type":"transition","tst":1}"#,
        ),
    ] {
        let mut args = vec!["-u", "jane", "-P", &tok, "-q", "1", "-r", "-t", topic];
        if payload.is_empty() {
            args.push("-n"); // the empty (retain-clearing) message
        } else {
            args.extend(["-m", payload]);
        }
        let (ok, text) = mosquitto_pub(mqtt, &args);
        assert!(
            ok && text.contains("received PUBACK (Mid: 1, RC:0)"),
            "{topic} {payload}: {text}"
        );
    }
    // Another user's topic is not this token's device: refused (MQTT 5: 0x87).
    let lines = paho(
        mqtt,
        &[
            "publish",
            "--v5",
            "--token",
            &tok,
            "--topic",
            "owntracks/john/phone",
            "--payload",
            &loc,
        ],
    );
    assert_eq!(line(&lines, "ack")["rc"], 0x87, "{lines:?}");
    let ops = server.token(&["ops"]);
    let history = history_all(&server, "jane", &ops).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["lat"], 48.85);
    assert_eq!(history[0]["attrs"]["tid"], "JJ");
}

#[test]
fn oversize_packets_end_the_connection_without_an_ack() {
    // A PUBLISH larger than the packet bound (64 KiB + 1 KiB): closed as soon as its header is
    // read, never acked.
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "m-6"]);
    let lines = paho(
        mqtt,
        &[
            "publish",
            "--token",
            &tok,
            "--topic",
            "geobeat/m-6",
            "--payload-bytes",
            "70000",
        ],
    );
    assert!(lines.iter().all(|l| l.get("ack").is_none()), "{lines:?}");
    assert!(line(&lines, "disconnect")["disconnect"] != 0, "{lines:?}");
    // mosquitto_pub, 3.1.1 (MQTT 5 clients hold themselves to the advertised Maximum Packet
    // Size and never send it): no PUBACK, the connection ends.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 70_000]).unwrap();
    let (_, text) = mosquitto_pub(
        mqtt,
        &[
            "-u",
            "m-6",
            "-P",
            &tok,
            "-q",
            "1",
            "-t",
            "geobeat/m-6",
            "-f",
            big.to_str().unwrap(),
        ],
    );
    assert!(
        text.contains("received CONNACK (0)") && !text.contains("PUBACK"),
        "{text}"
    );
    assert!(mqtt_event(&server, "protocol_error") >= 2);
    assert!(stored_lats(&server, "m-6").is_empty());
}

#[test]
fn keep_alive_is_enforced_at_one_and_a_half_times() {
    // A client with keep alive 1 s that then sends nothing: closed after ~1.5 s (MQTT 5:
    // DISCONNECT 0x8D Keep alive timeout), not before 1 s.
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "m-7"]);
    for v5 in [true, false] {
        let mut args = vec![
            "silent",
            "--token",
            &tok,
            "--keepalive",
            "1",
            "--silent-s",
            "0.2",
        ];
        if v5 {
            args.push("--v5");
        }
        let lines = paho(mqtt, &args);
        assert_eq!(line(&lines, "connack")["connack"], 0);
        let closed = line(&lines, "closed_after_s");
        let after = closed["closed_after_s"].as_f64().unwrap();
        assert!((1.2..2.5).contains(&after), "{lines:?}");
        if v5 {
            assert_eq!(closed["disconnect"], 0x8d, "{lines:?}");
        }
    }
    assert_eq!(mqtt_event(&server, "keepalive_expired"), 2);
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_the_first_over() {
    // Several rounds so that both "same executor" and "another executor" cases occur (2
    // executors, the kernel spreads connections): the first connection always gets DISCONNECT
    // 0x8E (MQTT 5) and the second publishes.
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "m-8"]);
    let payload = hb(8.0);
    for round in 0..4 {
        let id = format!("same-{round}");
        let lines = paho(
            mqtt,
            &[
                "takeover",
                "--v5",
                "--token",
                &tok,
                "--client-id",
                &id,
                "--topic",
                "geobeat/m-8",
                "--payload",
                &payload,
            ],
        );
        assert_eq!(
            line(&lines, "a_disconnect")["a_disconnect"],
            0x8e,
            "{lines:?}"
        );
        assert_eq!(line(&lines, "b_connack")["b_connack"], 0, "{lines:?}");
        assert_eq!(line(&lines, "b_ack")["b_ack"], 0, "{lines:?}");
    }
    assert_eq!(mqtt_event(&server, "takeover"), 4);
}

#[test]
fn subscribe_is_refused() {
    // Subscriptions are not served over MQTT: SUBACK 0x80 (3.1.1) / 0x87 (5).
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "m-9"]);
    for (v5, code) in [(false, 0x80), (true, 0x87)] {
        let mut args = vec!["subscribe", "--token", &tok, "--topic", "geobeat/#"];
        if v5 {
            args.push("--v5");
        }
        let lines = paho(mqtt, &args);
        assert_eq!(
            line(&lines, "suback")["suback"],
            serde_json::json!([code]),
            "{lines:?}"
        );
    }
}

#[test]
fn a_puback_survives_kill_9_of_the_server() {
    // A paho client publishes QoS 1 heartbeats back to back; the moment its first PUBACK arrives
    // the server is killed with SIGKILL. After a restart, every heartbeat whose PUBACK the client
    // saw is in the history. Several rounds, 3.1.1 and 5.
    let dir = tempfile::tempdir().unwrap();
    let (mut server, mqtt) = start(dir.path());
    let tok = server.token(&["device", "m-10"]);
    // (round, index): the round is the latitude, the message index the longitude.
    let mut acked = Vec::new();
    for round in 0..4 {
        let payload = format!(r#"{{"lat":{round},"lon":{{i}},"ts":{{ts}}}}"#);
        let mut cmd = Command::new("python3");
        cmd.arg(script())
            .args([
                "publish",
                "--token",
                &tok,
                "--topic",
                "geobeat/m-10",
                "--qos",
                "1",
            ])
            .args(["--count", "200", "--timeout", "5", "--payload", &payload])
            .args(["--port", &mqtt.port().to_string()])
            .stdout(Stdio::piped());
        if round % 2 == 1 {
            cmd.arg("--v5");
        }
        let mut child = cmd.spawn().expect("python3");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut killed = false;
        for l in lines.by_ref() {
            let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
            if let Some(i) = v.get("ack").and_then(Value::as_u64) {
                assert_eq!(v["rc"], 0, "{v}");
                if !killed {
                    server.kill9();
                    killed = true;
                }
                // Acks read after the kill arrived before it.
                acked.push((round as f64, i as f64));
            }
        }
        let _ = child.wait();
        assert!(killed, "round {round}: no PUBACK arrived");
        server.restart();
        let ops = server.token(&["ops"]);
        let stored: Vec<(f64, f64)> = history_all(&server, "m-10", &ops)
            .unwrap_or_default()
            .iter()
            .map(|h| (h["lat"].as_f64().unwrap(), h["lon"].as_f64().unwrap()))
            .collect();
        for hb in &acked {
            assert!(
                stored.contains(hb),
                "round {round}: acked heartbeat {hb:?} lost after kill -9; stored {stored:?}"
            );
        }
    }
}

/// The fenced blocks of `lang` in `doc`.
fn doc_blocks<'a>(doc: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = doc[at..].find(&fence) {
        let start = at + i + fence.len();
        let end = start + doc[start..].find("```").expect("closed block");
        out.push(&doc[start..end]);
        at = end + 3;
    }
    out
}

#[test]
fn the_client_examples_in_docs_mqtt_work_as_written() {
    // docs/MQTT.md's mosquitto_pub block (token minted with the CLI in the default ./shards) and
    // its paho block, run against a server whose MQTT port replaces 1883: both heartbeats of the
    // shell block and the paho one are stored, and paho prints "durable:".
    let doc =
        std::fs::read_to_string(format!("{}/docs/MQTT.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let base = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(&base.path().join("shards"));
    let port = mqtt.port().to_string();
    let sh = doc_blocks(&doc, "sh").join("\n");
    let sh = sh
        .replace("geobeat token", &format!("{} token", bin()))
        .replace("-p 1883", &format!("-p {port}"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &sh])
        .current_dir(base.path())
        .output()
        .expect("bash");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("received PUBACK (Mid: 1, RC:0)") && text.contains("received PUBCOMP"),
        "{text}"
    );
    let py = doc_blocks(&doc, "python")[0].replace("1883", &port);
    let tok = server.token(&["device", "truck-1"]);
    let out = Command::new("python3")
        .args(["-c", &py])
        .env("TOK", &tok)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("durable:"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stored_lats(&server, "truck-1"),
        [52.52, 52.52, 52.52, 52.53]
    );
}

#[test]
fn mqtt_over_websocket_on_the_main_listener() {
    // paho's websockets transport on `/mqtt` (subprotocol `mqtt`): the same CONNECT rules and
    // durable acks as over TCP; an upgrade without the subprotocol is refused with 400, and with
    // `--mqtt-listen off` the path is not served.
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(dir.path());
    let http = server.addr;
    let tok = server.token(&["device", "m-11"]);
    let payload = r#"{"lat":11,"lon":{i},"ts":{ts}}"#;
    for v5 in [false, true] {
        let mut args = vec![
            "publish",
            "--ws-path",
            "/mqtt",
            "--token",
            &tok,
            "--user",
            "m-11",
            "--topic",
            "geobeat/m-11",
            "--count",
            "20",
            "--payload",
            payload,
        ];
        if v5 {
            args.push("--v5");
        }
        let lines = paho(http, &args);
        let acks: Vec<_> = lines.iter().filter(|l| l.get("ack").is_some()).collect();
        assert_eq!(acks.len(), 20, "{lines:?}");
        assert!(acks.iter().all(|a| a["rc"] == 0), "{lines:?}");
    }
    let lines = paho(
        http,
        &[
            "publish",
            "--ws-path",
            "/mqtt",
            "--v5",
            "--token",
            "bad",
            "--topic",
            "geobeat/m-11",
        ],
    );
    assert_eq!(line(&lines, "connack")["connack"], 0x86, "{lines:?}");
    let ops = server.token(&["ops"]);
    assert_eq!(history_all(&server, "m-11", &ops).unwrap().len(), 40);
    let upgrade = "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (status, body) = raw_http(http, upgrade.as_bytes()).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Sec-WebSocket-Protocol: mqtt"), "{body}");
    let off = tempfile::tempdir().unwrap();
    let plain = Server::start(off.path(), &[]);
    let with_protocol = upgrade.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n");
    assert_eq!(
        raw_http(plain.addr, with_protocol.as_bytes()).unwrap().0,
        404
    );
}

/// Connects with `token` at `version` and reads the CONNACK: the socket (kept open by the
/// caller) and the CONNACK's code.
fn raw_connect(
    mqtt: SocketAddr,
    token: &str,
    user: &str,
    version: geobeat::proto::mqtt::codec::Version,
) -> (std::net::TcpStream, u8) {
    use geobeat::proto::mqtt::codec::{self, Connect, Packet};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let connect = Connect {
        version,
        clean: true,
        keep_alive_s: 60,
        props: &[],
        client_id: "",
        will: None,
        username: Some(user),
        password: Some(token.as_bytes()),
    };
    let mut out = Vec::new();
    codec::encode(&Packet::Connect(connect), version, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the CONNACK");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((Packet::ConnAck(a), _)) = codec::decode(&buf, Some(version), 1 << 20).unwrap()
        {
            return (s, a.code);
        }
    }
}

#[test]
fn connections_over_the_cap_get_server_unavailable() {
    // MQTT connections count against --connections-max with every other: with a cap of 3 and 3
    // MQTT connections held, the next CONNECT gets 0x03 (3.1.1) / 0x89 (5); once one closes, a
    // CONNECT is accepted again.
    use geobeat::proto::mqtt::codec::Version;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let server = Server::start(
        dir.path(),
        &["--mqtt-listen", &mqtt.to_string(), "--connections-max", "3"],
    );
    const USER: &str = "m-12";
    let tok = server.token(&["device", USER]);
    let mut held: Vec<_> = (0..3)
        .map(|_| {
            let (s, code) = raw_connect(mqtt, &tok, USER, Version::V311);
            assert_eq!(code, 0);
            s
        })
        .collect();
    assert_eq!(raw_connect(mqtt, &tok, USER, Version::V311).1, 0x03);
    assert_eq!(raw_connect(mqtt, &tok, USER, Version::V5).1, 0x89);
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_s, code) = raw_connect(mqtt, &tok, USER, Version::V5);
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "a slot never came free");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_mqtt_port_in_use_stops_the_start_and_says_how_to_move_it() {
    // Port 1883 is often a local broker's: the refusal names the address and --mqtt-listen, and
    // nothing is left running.
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().to_string();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let accepting = std::thread::spawn(move || {
        // Answer the start-up probe's connections like a live broker would.
        busy.set_nonblocking(true).unwrap();
        let mut held = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            if let Ok((s, _)) = busy.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let log = dir.path().join("serve.log");
    let data = dir.path().join("data").display().to_string();
    let listen = free_addr().to_string();
    let args = [
        "serve",
        "--init",
        "--listen",
        &listen,
        "--data-dir",
        &data,
        "--mqtt-listen",
        &taken,
    ];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut child = Command::new(bin())
        .args(&args)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    done.store(true, std::sync::atomic::Ordering::Release);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&taken) && text.contains("--mqtt-listen"),
        "{text}"
    );
    accepting.join().unwrap();
}

/// Encodes `packets` at `version` into one buffer.
fn encode_all(
    packets: &[geobeat::proto::mqtt::codec::Packet<'_>],
    version: geobeat::proto::mqtt::codec::Version,
) -> Vec<u8> {
    let mut out = Vec::new();
    for p in packets {
        geobeat::proto::mqtt::codec::encode(p, version, &mut out);
    }
    out
}

#[test]
fn pipelined_qos2_publishes_complete_beyond_the_inflight_bound() {
    // A 3.1.1 client writes 200 QoS 2 PUBLISHes at once (more than the 64 the server reads
    // ahead), answering each PUBREC with its PUBREL as it comes: the PUBRELs behind the
    // PUBLISHes must still be read, so all 200 complete (no deadlock) and all are stored. An
    // MQTT 5 client that ignores the advertised Receive Maximum (64) instead is disconnected
    // with 0x93.
    use geobeat::proto::mqtt::codec::{self, Ack, Packet, Publish, QoS, Version};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (server, mqtt) = start(dir.path());
    const USER: &str = "m-13";
    let tok = server.token(&["device", USER]);
    let (mut s, code) = raw_connect(mqtt, &tok, USER, Version::V311);
    assert_eq!(code, 0);
    let t = now_ms();
    let payloads: Vec<String> = (0..200)
        .map(|i| format!(r#"{{"lat":13,"lon":{},"ts":{}}}"#, i as f64 / 10.0, t + i))
        .collect();
    let publishes: Vec<Packet> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::ExactlyOnce,
                retain: false,
                topic: "geobeat/m-13",
                packet_id: Some(i as u16 + 1),
                props: &[],
                payload: p.as_bytes(),
            })
        })
        .collect();
    s.write_all(&encode_all(&publishes, Version::V311)).unwrap();
    let mut buf = Vec::new();
    let mut completed = 0;
    while completed < 200 {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("the server answers within 5 s");
        assert!(n > 0, "closed after {completed} PUBCOMPs");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        let mut rels = Vec::new();
        while let Some((p, used)) = codec::decode(&buf[at..], Some(Version::V311), 1 << 20).unwrap()
        {
            match p {
                Packet::PubRec(a) => rels.push(Packet::PubRel(Ack { props: &[], ..a })),
                Packet::PubComp(_) => completed += 1,
                other => panic!("unexpected {other:?}"),
            }
            at += used;
        }
        let rels = encode_all(&rels, Version::V311);
        buf.drain(..at);
        s.write_all(&rels).unwrap();
    }
    assert_eq!(
        history_all(&server, "m-13", &server.token(&["ops"]))
            .unwrap()
            .len(),
        200
    );

    // MQTT 5: 65 QoS 1 PUBLISHes without waiting while the first 64 are unacknowledged is only
    // possible if the store is slower than the client; the PUBRELs withheld here make it
    // certain: 64 QoS 2 PUBLISHes never released, then one more.
    let (mut s, code) = raw_connect(mqtt, &tok, USER, Version::V5);
    assert_eq!(code, 0);
    s.write_all(&encode_all(&publishes[..64], Version::V5))
        .unwrap();
    let mut recs = 0;
    let mut buf = Vec::new();
    while recs < 64 {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some((p, used)) = codec::decode(&buf[at..], Some(Version::V5), 1 << 20).unwrap() {
            assert!(matches!(p, Packet::PubRec(_)), "{p:?}");
            recs += 1;
            at += used;
        }
        buf.drain(..at);
    }
    s.write_all(&encode_all(&publishes[64..65], Version::V5))
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let (p, _) = codec::decode(&rest, Some(Version::V5), 1 << 20)
        .unwrap()
        .unwrap();
    let Packet::Disconnect(d) = p else {
        panic!("{p:?}")
    };
    assert_eq!(d.code, 0x93);
}
