//! End-to-end ingest over real sockets against the real binary: handshake auth, JSON / array /
//! binary heartbeats with durable acks, every promised answer to bad input, token scopes, and
//! last-location reads across a restart.

mod common;
use common::*;

fn setup() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    (dir, server)
}

#[test]
fn handshake_refuses_missing_forged_expired_and_wrong_scope_tokens() {
    // Each bad token gets HTTP 401 with a JSON body before any upgrade; a good device token in
    // the query string upgrades.
    let (_d, server) = setup();
    let upgrade = |auth: &str, query: &str| {
        let req = format!(
            "GET /v1/ingest{query} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
        );
        raw_http(server.addr, req.as_bytes()).unwrap()
    };
    let (st, body) = upgrade("", "");
    assert_eq!(st, 401);
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());

    let forged = "gb1.d.ZGV2LTE.9999999999.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_eq!(
        upgrade(&format!("authorization: Bearer {forged}\r\n"), "").0,
        401
    );

    let expired = server.token(&["device", "dev-1", "--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        upgrade(&format!("authorization: Bearer {expired}\r\n"), "").0,
        401
    );

    let ops = server.token(&["ops"]);
    assert_eq!(
        upgrade(&format!("authorization: Bearer {ops}\r\n"), "").0,
        401
    );

    let good = server.token(&["device", "dev-1"]);
    let (st, _) = {
        // A 101 has no body and the connection stays open: read just the status line.
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        let req = format!(
            "GET /v1/ingest?token={good} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        (
            text.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u16>()
                .unwrap(),
            text,
        )
    };
    assert_eq!(st, 101);
}

#[test]
fn json_array_and_binary_heartbeats_are_acked_and_readable_after_restart() {
    // A device sends one object, an array, and a binary frame; every seq is acked; the last
    // location (newest by device time) survives a graceful restart and is read with an ops token.
    let (_d, mut server) = setup();
    let tok = server.token(&["device", "truck-7"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t0 = now_ms() - 10_000;
    ws.send(Message::text(hb_json(1, 52.5, 13.4, t0))).unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    let arr = format!(
        "[{},{},{}]",
        hb_json(2, 52.6, 13.5, t0 + 1000),
        hb_json(3, 52.7, 13.6, t0 + 3000),
        // Late heartbeat: stored, but must not become "last".
        hb_json(4, 10.0, 10.0, t0 + 2000)
    );
    ws.send(Message::text(arr)).unwrap();
    assert!(wait_ack(&mut ws, 4).is_empty());
    let hb = geobeat::record::Heartbeat {
        lat: 52.8,
        lon: 13.7,
        ts_ms: t0 + 4000,
        ..Default::default()
    };
    let mut bin = Vec::new();
    geobeat::proto::binary::encode_frame(&mut bin, [(geobeat::proto::Seq(5), &hb)]).unwrap();
    ws.send(Message::binary(bin)).unwrap();
    assert!(wait_ack(&mut ws, 5).is_empty());

    let (st, body) = server.get("/v1/devices/truck-7", Some(&ops));
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "truck-7");
    assert_eq!(v["lat"], 52.8);
    assert_eq!(v["ts"], t0 + 4000);
    assert!(v["received_at"].as_i64().unwrap() >= t0);

    drop(ws);
    assert!(server.sigterm().success());
    server.restart();
    let (st, body) = server.get("/v1/devices/truck-7", Some(&ops));
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["lat"].as_f64(), v["ts"].as_i64()),
        (Some(52.8), Some(t0 + 4000))
    );

    // A reconnect after the restart keeps working (seq restarts per connection).
    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::text(hb_json(1, 1.0, 2.0, t0 + 5000)))
        .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    let v: serde_json::Value =
        serde_json::from_str(&server.get("/v1/devices/truck-7", Some(&ops)).1).unwrap();
    assert_eq!(v["lat"], 1.0);
}

#[test]
fn last_location_needs_an_ops_token_and_404s_unknown_devices() {
    // 401 without or with a non-ops token, 404 JSON for an unknown device, 404 for unknown paths,
    // 405 for a wrong method.
    let (_d, server) = setup();
    let ops = server.token(&["ops"]);
    let dev = server.token(&["device", "a"]);
    assert_eq!(server.get("/v1/devices/a", None).0, 401);
    assert_eq!(server.get("/v1/devices/a", Some(&dev)).0, 401);
    let (st, body) = server.get("/v1/devices/nobody", Some(&ops));
    assert_eq!(st, 404);
    assert!(body.contains("error"));
    assert_eq!(server.get("/nope", None).0, 404);
    assert_eq!(
        http(server.addr, "POST", "/v1/devices/a", Some(&ops))
            .unwrap()
            .0,
        405
    );
}

#[test]
fn bad_input_gets_the_promised_answers_while_others_keep_going() {
    // Invalid JSON → {"seq":null,...}; out-of-range coordinates → {"seq":N,...} and the
    // connection stays open; another id → id_mismatch; a too-large frame → close 1009; invalid
    // UTF-8 → close 1007; a non-increasing seq → close 1008. A bystander connection keeps
    // getting acks throughout.
    let (_d, server) = setup();
    let tok = server.token(&["device", "dev-bad"]);
    let mut bystander = ws_connect(&server, &server.token(&["device", "dev-ok"])).unwrap();
    let mut by_seq = 0u64;
    let mut by_send = |ws: &mut Ws| {
        by_seq += 1;
        ws.send(Message::text(hb_json(by_seq, 1.0, 1.0, now_ms())))
            .unwrap();
        assert!(wait_ack(ws, by_seq).is_empty());
    };

    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::text("{not json")).unwrap();
    let v = next_json(&mut ws);
    assert!(v["seq"].is_null() && v["error"].is_string(), "{v}");
    ws.send(Message::text(hb_json(1, 91.0, 0.0, now_ms())))
        .unwrap();
    let v = next_json(&mut ws);
    assert_eq!(
        (v["seq"].as_u64(), v["error"].as_str()),
        (Some(1), Some("lat_out_of_range"))
    );
    ws.send(Message::text(format!(
        r#"{{"seq":2,"id":"someone-else","lat":1,"lon":1,"ts":{}}}"#,
        now_ms()
    )))
    .unwrap();
    let v = next_json(&mut ws);
    assert_eq!(
        (v["seq"].as_u64(), v["error"].as_str()),
        (Some(2), Some("id_mismatch"))
    );
    ws.send(Message::text(hb_json(3, 1.0, 1.0, now_ms())))
        .unwrap();
    assert!(
        wait_ack(&mut ws, 3).is_empty(),
        "still open and acking after errors"
    );
    by_send(&mut bystander);

    ws.send(Message::text(hb_json(3, 1.0, 1.0, now_ms())))
        .unwrap();
    assert_eq!(wait_close(&mut ws).0, 1008);
    by_send(&mut bystander);

    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::text("x".repeat(200_000))).unwrap();
    assert_eq!(wait_close(&mut ws).0, 1009);
    by_send(&mut bystander);

    // Invalid UTF-8 in a text frame: tungstenite's client refuses to build one, so send the raw
    // frame bytes on the socket.
    let mut ws = ws_connect(&server, &tok).unwrap();
    {
        use std::io::Write;
        let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() else {
            unreachable!()
        };
        // FIN + text opcode, masked, 2-byte payload 0xC3 0x28 (invalid UTF-8), zero mask.
        s.write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]).unwrap();
    }
    assert_eq!(wait_close(&mut ws).0, 1007);
    by_send(&mut bystander);
}

#[test]
fn gateway_tokens_write_only_inside_their_prefix() {
    // A gateway must name each device; ids outside its prefix are refused per heartbeat.
    let (_d, server) = setup();
    let gw = server.token(&["gateway", "fleet-a/"]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let t = now_ms();
    let frame = format!(
        r#"[{{"seq":1,"id":"fleet-a/1","lat":1,"lon":2,"ts":{t}}},{{"seq":2,"id":"fleet-b/1","lat":1,"lon":2,"ts":{t}}},{{"seq":3,"lat":1,"lon":2,"ts":{t}}},{{"seq":4,"id":"fleet-a/2","lat":3,"lon":4,"ts":{t}}}]"#
    );
    ws.send(Message::text(frame)).unwrap();
    let errors = wait_ack(&mut ws, 4);
    let reasons: Vec<_> = errors
        .iter()
        .map(|e| (e["seq"].as_u64(), e["error"].as_str().map(String::from)))
        .collect();
    assert!(
        reasons.contains(&(Some(2), Some("id_outside_prefix".into()))),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(Some(3), Some("missing_field:id".into()))),
        "{reasons:?}"
    );
    assert_eq!(server.get("/v1/devices/fleet-a%2F2", Some(&ops)).0, 200);
    assert_eq!(server.get("/v1/devices/fleet-b%2F1", Some(&ops)).0, 404);
}

#[test]
fn an_ingest_connection_closes_with_1008_token_expired_when_its_token_expires() {
    // Issue 20 §4: an ingest connection kept getting acks after its token expired. At expiry it
    // must stop reading, ack what it read, and close with 1008 `token_expired`: the device keeps
    // sending until the close arrives; everything stored is acked, everything acked is stored,
    // and the close comes no earlier than the expiry.
    use std::time::{Duration, Instant};
    let (_d, server) = setup();
    let token = server.token(&["device", "expiring", "--ttl", "3s"]);
    // The expiry is the token's second-to-last part (gb2 and gb1 alike).
    let expires_at_s: i64 = token.rsplit('.').nth(1).unwrap().parse().unwrap();
    let mut ws = ws_connect(&server, &token).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    }
    let t0 = now_ms();
    let started = Instant::now();
    let (mut seq, mut acked) = (0u64, 0u64);
    let close = 'run: loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still open {:?} after the token expired (last ack {acked} of {seq})",
            started.elapsed()
        );
        if seq < 1000 {
            seq += 1;
            let hb = hb_json(seq, 1.0, 1.0, t0 + seq as i64);
            if ws.send(Message::text(hb)).is_err() {
                seq -= 1;
            }
        }
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let a = v["ack"].as_u64().unwrap_or_else(|| panic!("{v}"));
                    acked = acked.max(a);
                }
                Ok(Message::Close(Some(f))) => {
                    break 'run (u16::from(f.code), f.reason.to_string())
                }
                Ok(Message::Close(None)) => panic!("closed without a code"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(30));
    };
    assert_eq!(close, (1008, "token_expired".to_string()));
    assert!(
        now_ms() / 1000 >= expires_at_s,
        "closed before the expiry ({expires_at_s})"
    );
    assert!(
        acked > 10,
        "heartbeats were acked before the expiry: {acked}"
    );
    let ops = server.token(&["ops"]);
    let stored: Vec<u64> = history_all(&server, "expiring", &ops)
        .unwrap()
        .iter()
        .map(|h| (h["ts"].as_i64().unwrap() - t0) as u64)
        .collect();
    let mut stored = stored;
    stored.sort_unstable();
    assert_eq!(
        stored,
        (1..=acked).collect::<Vec<_>>(),
        "stored == acked (everything read before the close was acked)"
    );
}

/// A masked client frame (RFC 6455 §5.2) with a short payload.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn a_client_that_closes_right_after_its_heartbeats_still_gets_their_acks() {
    // The README's websocat example: a client sends its heartbeats and closes at once (here:
    // the data frames and the Close in one TCP write, so the Close is read long before the
    // fdatasync ends). The server answers with the acks first, then the close handshake; before
    // the fix tungstenite answered the Close at once and the acks were lost.
    use std::io::Write as _;
    let (_d, server) = setup();
    let tok = server.token(&["gateway", "cl-"]);
    for round in 0..5 {
        let mut ws = ws_connect(&server, &tok).unwrap();
        let t = now_ms();
        let mut bytes = Vec::new();
        for seq in 1..=3u64 {
            let hb = format!(
                r#"{{"seq":{seq},"id":"cl-{round}-{seq}","lat":1,"lon":2,"ts":{}}}"#,
                t + seq as i64
            );
            bytes.extend(client_frame(0x1, hb.as_bytes()));
        }
        bytes.extend(client_frame(0x8, &1000u16.to_be_bytes()));
        match ws.get_mut() {
            tungstenite::stream::MaybeTlsStream::Plain(s) => s.write_all(&bytes).unwrap(),
            _ => unreachable!("plain test socket"),
        }
        let mut acked = 0;
        let close = loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    acked = v["ack"].as_u64().unwrap_or_else(|| panic!("{v}"));
                }
                Ok(Message::Close(c)) => break c.map(|c| u16::from(c.code)),
                Ok(_) => {}
                Err(e) => panic!("round {round}: no close handshake after {acked} acked: {e}"),
            }
        };
        assert_eq!(acked, 3, "round {round}: acks before the close");
        assert_eq!(close, Some(1000), "round {round}");
    }
}
