//! Keeps `/openapi.json` true: every documented operation, called on the real binary with and
//! without a token, answers with a status the document lists, 200 bodies carry the schema's
//! required properties, documented paths refuse other methods with 405, and undocumented paths
//! are 404s.

mod common;
use common::*;

use serde_json::Value;

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks the required properties of `schema` (objects, and the items of arrays) on `value`.
fn check_required(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    match schema["type"].as_str() {
        Some("array") => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array: {value}"));
            for v in items {
                check_required(doc, &schema["items"], v, at);
            }
        }
        Some("object") => {
            for req in schema["required"].as_array().into_iter().flatten() {
                let k = req.as_str().unwrap();
                assert!(
                    value.get(k).is_some(),
                    "{at}: missing required `{k}` in {value}"
                );
            }
        }
        _ => {}
    }
}

#[test]
fn every_documented_operation_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let dev = server.token(&["device", "oa-1"]);
    let mut ws = ws_connect(&server, &dev).unwrap();
    ws.send(Message::text(
        r#"{"seq":1,"lat":52.5,"lon":13.4,"ts":TS,"speed":3.5}"#
            .replace("TS", &now_ms().to_string()),
    ))
    .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());

    let (st, body) = server.get("/openapi.json", None);
    assert_eq!(st, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 9, "{:?}", paths.keys());
    for (path, item) in paths {
        let concrete = path.replace("{id}", "oa-1");
        for (method, op) in item.as_object().unwrap() {
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            let secured = op.get("security").is_some();
            let query = match path.as_str() {
                "/v1/devices" => "?bbox=13,52,14,53",
                _ => "",
            };
            let target = format!("{concrete}{query}");
            let upper = method.to_uppercase();
            let (st, body) = http(
                server.addr,
                &upper,
                &target,
                secured.then_some(ops.as_str()),
            )
            .unwrap();
            assert!(
                documented.contains(&st),
                "{upper} {target}: {st} not in {documented:?}: {body}"
            );
            if st == 200 {
                if let Some(schema) = op["responses"]["200"]["content"]
                    .get("application/json")
                    .map(|c| &c["schema"])
                {
                    let v: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|e| panic!("{target}: {e}: {body}"));
                    check_required(&doc, schema, &v, &target);
                }
            } else {
                assert!(
                    path == "/v1/ingest",
                    "{upper} {target} should succeed with valid input, got {st}: {body}"
                );
            }
            // (/v1/ingest without a token needs a real upgrade request: tests/ingest.rs.)
            if secured && path != "/v1/ingest" {
                let (st, _) = http(server.addr, &upper, &target, None).unwrap();
                assert_eq!(st, 401, "{upper} {target} without a token");
                assert!(documented.contains(&401), "{path}: 401 not documented");
            }
            let (st, _) = http(server.addr, "PUT", &target, Some(&ops)).unwrap();
            assert_eq!(st, 405, "PUT {target}");
        }
    }
    for undocumented in [
        "/",
        "/v1",
        "/v1/nope",
        "/v1/devices/oa-1/nope",
        "/metrics/x",
    ] {
        assert_eq!(
            server.get(undocumented, Some(&ops)).0,
            404,
            "{undocumented}"
        );
    }
}
