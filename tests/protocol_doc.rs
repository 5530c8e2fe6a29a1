//! The Python example in docs/PROTOCOL.md, run as written (only the address is changed) with
//! the real `websockets` library against the real server: it must print the durable ack. Keeps
//! the document's example true.

mod common;
use common::*;

#[test]
fn the_python_example_in_the_protocol_document_gets_a_durable_ack() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let start = doc.find("```python\n").expect("a python example") + "```python\n".len();
    let end = start + doc[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let script = doc[start..end].replace("ws://127.0.0.1:8080", &format!("ws://{}", server.addr));
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
