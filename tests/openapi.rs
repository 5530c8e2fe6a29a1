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
    // A fence for the /v1/geofences/{name} operations (re-created before each: DELETE is one).
    let fence_body = r#"{"center":[13.4,52.5],"radius_m":500}"#;
    let put_fence = |target: &str| {
        let req = format!(
            "PUT {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ops}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{fence_body}",
            fence_body.len()
        );
        raw_http(server.addr, req.as_bytes()).unwrap()
    };
    for (path, item) in paths {
        let concrete = path.replace("{id}", "oa-1").replace("{name}", "oa-fence");
        // WebSocket endpoints answer a plain request with 426 (tests/ingest.rs and
        // tests/subscribe.rs do the real upgrades and their token checks).
        let websocket = path == "/v1/ingest" || path == "/v1/subscribe";
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
            if path.starts_with("/v1/geofences/") {
                assert_eq!(put_fence(&target).0, 200);
            }
            let (st, body) = if path == "/v1/osmand" || path == "/v1/owntracks" {
                // The phone apps' endpoints: a valid location with the device's token
                // (tests/devices_http.rs drives them as the apps do).
                device_app(&server, &upper, path, &dev)
            } else if upper == "PUT" {
                put_fence(&target)
            } else if upper == "POST" {
                // The one POST is the bulk fence import: a valid one-entry batch.
                let batch = format!(r#"{{"fences":[{{"name":"oa-bulk","shape":{fence_body}}}]}}"#);
                let req = format!(
                    "POST {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ops}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{batch}",
                    batch.len()
                );
                raw_http(server.addr, req.as_bytes()).unwrap()
            } else {
                http(
                    server.addr,
                    &upper,
                    &target,
                    secured.then_some(ops.as_str()),
                )
                .unwrap()
            };
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
                    websocket,
                    "{upper} {target} should succeed with valid input, got {st}: {body}"
                );
            }
            // (WebSocket endpoints without a token need a real upgrade request.)
            if secured && !websocket {
                let (st, _) = http(server.addr, &upper, &target, None).unwrap();
                assert_eq!(st, 401, "{upper} {target} without a token");
                assert!(documented.contains(&401), "{path}: 401 not documented");
            }
            if item.get("put").is_none() {
                let (st, _) = http(server.addr, "PUT", &target, Some(&ops)).unwrap();
                assert_eq!(st, 405, "PUT {target}");
            }
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

/// A valid request of a phone app's endpoint for device `oa-1` (its token `dev`).
fn device_app(server: &Server, method: &str, path: &str, dev: &str) -> (u16, String) {
    let (target, auth, body) = match (method, path) {
        ("GET", "/v1/osmand") => (
            format!("/v1/osmand?id=oa-1&lat=52.5&lon=13.4&speed=2&token={dev}"),
            String::new(),
            String::new(),
        ),
        ("POST", "/v1/osmand") => (
            path.to_owned(),
            format!("authorization: Bearer {dev}\r\n"),
            "id=oa-1&lat=52.5&lon=13.4".to_owned(),
        ),
        ("POST", "/v1/owntracks") => {
            use base64::Engine as _;
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("oa-1:{dev}"));
            let tst = now_ms() / 1000;
            (
                path.to_owned(),
                format!("authorization: Basic {basic}\r\n"),
                format!(r#"{{"_type":"location","lat":52.5,"lon":13.4,"tst":{tst}}}"#),
            )
        }
        other => panic!("no valid request written for {other:?}"),
    };
    let req = format!(
        "{method} {target} HTTP/1.1\r\nhost: x\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_http(server.addr, req.as_bytes()).unwrap()
}

#[test]
fn area_rows_are_documented_with_the_device_fields() {
    // The AreaHit schema lists every property of the Heartbeat schema (the device endpoint's
    // body) as the same property, with the same required ones; a real area row carries the
    // optional field the device sent, as the device endpoint does.
    let doc: Value = serde_json::from_str(geobeat::net::http::OPENAPI_JSON).unwrap();
    let schemas = &doc["components"]["schemas"];
    let (hb, area) = (&schemas["Heartbeat"], &schemas["AreaHit"]);
    assert_eq!(hb["required"], area["required"]);
    for (name, prop) in hb["properties"].as_object().unwrap() {
        assert_eq!(&area["properties"][name], prop, "AreaHit.{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let ops = server.token(&["ops"]);
    let mut ws = ws_connect(&server, &server.token(&["device", "oa-2"])).unwrap();
    ws.send(Message::text(
        r#"{"seq":1,"lat":52.5,"lon":13.4,"ts":TS,"speed":3.5}"#
            .replace("TS", &now_ms().to_string()),
    ))
    .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    let (st, body) = server.get("/v1/devices?bbox=13,52,14,53", Some(&ops));
    assert_eq!(st, 200);
    let rows: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rows[0]["speed"], 3.5, "{body}");
    assert!(rows[0]["received_at"].is_i64(), "{body}");
}
