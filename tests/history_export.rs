//! History paging and exports on the real binary: cursor pages over 100,000 heartbeats of one
//! device (sent over the WebSocket ingest, some late and some with equal device times) return
//! each heartbeat exactly once, newest first, while more heartbeats arrive between pages; bad
//! cursors are 400s; the old unpaged answer is unchanged; `geobeat query history --format`
//! exports validate with real tools: GPX against the GPX 1.1 schema (xmllint, Debian
//! libxml2-utils), GeoJSON with Python's `geojson` library, CSV with Python's `csv` module
//! (.ci/run installs the tools).

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const DEVICE: &str = "hx-1";
const COUNT: usize = 100_000;
/// Heartbeats per ingest frame (under the frame's 64 KiB and 1,000-heartbeat bounds).
const FRAME: usize = 400;

/// One planned heartbeat: its index `i` (carried in `acc`, exact in an f32) and device time.
struct Planned {
    i: usize,
    ts: i64,
}

/// The heartbeats in the order they are sent: device times 600 ms apart, every 50th equal to
/// its predecessor's (ties are ordered by arrival), every 10th held back and sent last (late:
/// its device time lies among older ones).
fn plan(base: i64) -> Vec<Planned> {
    let ts = |i: usize| {
        let k = if i % 50 == 7 { i - 1 } else { i };
        base + k as i64 * 600
    };
    let (late, on_time): (Vec<usize>, Vec<usize>) = (0..COUNT).partition(|i| i % 10 == 3);
    on_time
        .into_iter()
        .chain(late)
        .map(|i| Planned { i, ts: ts(i) })
        .collect()
}

fn hb_text(seq: u64, p: &Planned) -> String {
    let mut s = format!(
        r#"{{"seq":{seq},"id":"{DEVICE}","lat":{},"lon":{},"ts":{},"acc":{}"#,
        45.0 + (p.i % 1000) as f64 * 0.001,
        -179.5 + (p.i as f64) * 0.000_01,
        p.ts,
        p.i
    );
    if p.i % 7 == 0 {
        s.push_str(&format!(
            r#","alt":{},"speed":3.5,"heading":270"#,
            p.i % 300
        ));
    }
    if p.i % 1000 == 1 {
        // CSV quoting: a comma and quotes inside the attributes.
        s.push_str(r#","attrs":{"note":"a,b \"q\"","n":1}"#);
    }
    s.push('}');
    s
}

/// Sends `hbs` for [`DEVICE`] in frames, pipelined, and waits until all are durable.
fn send(ws: &mut Ws, hbs: &[Planned], seq0: u64) -> u64 {
    let mut seq = seq0;
    for chunk in hbs.chunks(FRAME) {
        let items: Vec<String> = chunk
            .iter()
            .map(|p| {
                seq += 1;
                hb_text(seq, p)
            })
            .collect();
        ws.send(Message::text(format!("[{}]", items.join(","))))
            .unwrap();
    }
    let errors = wait_ack(ws, seq);
    assert!(errors.is_empty(), "{errors:?}");
    seq
}

/// Pages with `cursor` through [`DEVICE`]'s history (`extra` query parameters), calling
/// `between` after each page; the `acc` (index) of every item in order.
fn page_all(server: &Server, token: &str, extra: &str, mut between: impl FnMut()) -> Vec<usize> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let (st, body) = history_page(
            server,
            DEVICE,
            &format!("limit=10000{extra}&cursor={cursor}"),
            token,
        );
        assert_eq!(st, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let items = v["items"].as_array().unwrap();
        out.extend(items.iter().map(|h| h["acc"].as_f64().unwrap() as usize));
        pages += 1;
        assert!(pages <= 100, "the cursor does not advance");
        match v["next"].as_str() {
            Some(c) => {
                assert_eq!(items.len(), 10_000, "a page with a next is full");
                cursor = c.to_owned();
            }
            None => return out,
        }
        between();
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (.ci/run installs the tools)"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn export(server: &Server, token: &str, format: &str, window: &str, file: &Path) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(["query", "--url", &format!("http://{}", server.addr)])
        .args(["--token", token, "history", DEVICE, "--format", format])
        .args(window.split(' '))
        .args(["--limit", "6000", "--out", &file.display().to_string()])
        .env("GEOBEAT_QUERY_CONFIG", "")
        .env("HOME", &server.dir);
    run(
        &mut cmd,
        &format!("geobeat query history --format {format}"),
    )
}

#[test]
fn paging_and_exports_of_100k_heartbeats() {
    // Sends 100,000 heartbeats (10% late, 2% with tied device times), pages through them 10,000
    // at a time while sending more between pages (new ones and late ones inside the range):
    // the pages hold exactly the heartbeats stored before the first page, each once, newest
    // first by device time (ties: newest arrival first). Then the refusals, the unchanged
    // unpaged answer, and the three export formats checked by real parsers.
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &[]);
    let ops = server.token(&["ops"]);
    let gw = server.token(&["gateway", "hx-"]);
    let mut ws = ws_connect(&server, &gw).unwrap();
    let base = now_ms() - COUNT as i64 * 600 - 3_600_000;
    let planned = plan(base);
    let started = std::time::Instant::now();
    let mut seq = send(&mut ws, &planned, 0);
    eprintln!("sent {COUNT} heartbeats in {:?}", started.elapsed());

    // The expected order: device time descending, ties by arrival descending.
    let mut expected: Vec<(i64, usize, usize)> = planned
        .iter()
        .enumerate()
        .map(|(arrival, p)| (p.ts, arrival, p.i))
        .collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    let expected: Vec<usize> = expected.into_iter().map(|(_, _, i)| i).collect();

    // Between pages: a new heartbeat, and a late one in the middle of the range.
    let mut n = 0;
    let started = std::time::Instant::now();
    let got = page_all(&server, &ops, "", || {
        n += 1;
        let extra = [
            Planned {
                i: COUNT + 2 * n,
                ts: now_ms(),
            },
            Planned {
                i: COUNT + 2 * n + 1,
                ts: base + 50_000 * 600 + 1,
            },
        ];
        seq = send(&mut ws, &extra, seq);
    });
    eprintln!("paged {} heartbeats in {:?}", got.len(), started.elapsed());
    assert!(n >= 9, "{n} pages");
    assert_eq!(got.len(), COUNT);
    let first_diff = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "pages differ from the expected order");
    // A new paging sees the heartbeats that arrived during the last one: the new ones first,
    // the late ones in their place.
    let (st, body) = history_page(&server, DEVICE, "limit=100&cursor=", &ops);
    assert_eq!(st, 200, "{body}");
    let first: Vec<usize> = serde_json::from_str::<Value>(&body).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["acc"].as_f64().unwrap() as usize)
        .collect();
    let new_ones: Vec<usize> = (1..=n).rev().map(|k| COUNT + 2 * k).collect();
    assert_eq!(first[..n], new_ones[..]);
    let late_ts = base + 50_000 * 600 + 1;
    let (_, body) = history_page(
        &server,
        DEVICE,
        &format!("from={late_ts}&to={late_ts}"),
        &ops,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        n
    );

    // A window, paged: the same heartbeats as the window of the expected order.
    let (from, to) = (base + 20_000 * 600, base + 32_000 * 600 - 1);
    let window = format!("&from={from}&to={to}");
    let in_window = |i: &usize| {
        let ts = base + (if i % 50 == 7 { i - 1 } else { *i }) as i64 * 600;
        *i < COUNT && ts >= from && ts <= to
    };
    let want_window: Vec<usize> = expected.iter().copied().filter(in_window).collect();
    assert_eq!(want_window.len(), 12_000);
    assert_eq!(page_all(&server, &ops, &window, || {}), want_window);

    // Refusals: a malformed cursor, another device's, another range's; a bad format; the old
    // limit bound.
    let (_, body) = history_page(&server, DEVICE, "limit=5&cursor=", &ops);
    let cursor = serde_json::from_str::<Value>(&body).unwrap()["next"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = "hx-2";
    let mut ws2 = ws_connect(&server, &gw).unwrap();
    ws2.send(Message::text(
        r#"{"seq":1,"id":"hx-2","lat":1,"lon":180,"ts":TS}"#.replace("TS", &now_ms().to_string()),
    ))
    .unwrap();
    assert!(wait_ack(&mut ws2, 1).is_empty());
    let mut damaged = cursor.clone().into_bytes();
    damaged[10] = if damaged[10] == b'A' { b'B' } else { b'A' };
    let damaged = String::from_utf8(damaged).unwrap();
    for (id, query) in [
        (DEVICE, "cursor=zzz".to_owned()),
        (DEVICE, "cursor=%ZZ".to_owned()),
        (DEVICE, format!("cursor={}", "A".repeat(500))),
        (DEVICE, format!("cursor={damaged}")),
        (other, format!("cursor={cursor}")),
        (DEVICE, format!("cursor={cursor}&from=5")),
        (DEVICE, "format=kml".to_owned()),
        (DEVICE, "format=gpx&limit=10001".to_owned()),
    ] {
        let (st, body) = history_page(&server, id, &query, &ops);
        assert_eq!(st, 400, "{query}: {body}");
        let v: Value = serde_json::from_str(&body).expect("a JSON error");
        assert!(v["error"].is_string() && v["param"].is_string(), "{body}");
    }
    let (st, _) = history_page(&server, "hx-none", "cursor=", &ops);
    assert_eq!(st, 404);
    // The cursor still works with its range repeated.
    let (st, body) = history_page(
        &server,
        DEVICE,
        &format!("cursor={cursor}&from={}&to={}", i64::MIN, i64::MAX),
        &ops,
    );
    assert_eq!(st, 200, "{body}");
    // Every CSV row's cursor continues right after that row.
    let (st, body) = history_page(&server, DEVICE, "format=csv&limit=5", &ops);
    assert_eq!(st, 200, "{body}");
    let rows: Vec<(usize, &str)> = body
        .split("\r\n")
        .skip(1)
        .filter(|r| !r.is_empty())
        .map(|r| {
            let acc = r.split(',').nth(8).unwrap().parse().unwrap();
            (acc, r.rsplit_once(',').unwrap().1)
        })
        .collect();
    assert_eq!(rows.len(), 5, "{body}");
    let (_, body) = history_page(
        &server,
        DEVICE,
        &format!("limit=2&cursor={}", rows[1].1),
        &ops,
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    let after: Vec<usize> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["acc"].as_f64().unwrap() as usize)
        .collect();
    assert_eq!(after, [rows[2].0, rows[3].0], "{body}");
    // The page carries what docs/openapi.json's HistoryPage requires.
    let doc: Value = serde_json::from_str(geobeat::net::http::OPENAPI_JSON).unwrap();
    let page: Value = serde_json::from_str(&body).unwrap();
    for k in doc["components"]["schemas"]["HistoryPage"]["required"]
        .as_array()
        .unwrap()
    {
        assert!(
            page.get(k.as_str().unwrap()).is_some(),
            "{k} missing: {body}"
        );
    }
    // Old clients: no cursor, no format: the plain array, default limit.
    let (st, body) = history_page(&server, DEVICE, "", &ops);
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1000));

    // One GPX page straight from the server (its cursor in the metadata) validates.
    let xsd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpx/gpx-1.1.xsd");
    let xmllint = |file: &Path| {
        run(
            Command::new("xmllint")
                .args(["--noout", "--schema"])
                .arg(&xsd)
                .arg(file),
            "xmllint (Debian libxml2-utils)",
        )
    };
    let (st, body) = history_page(&server, DEVICE, "format=gpx&limit=50", &ops);
    assert_eq!(st, 200);
    assert!(body.contains("<geobeat:next>"), "{body}");
    let page = tmp.path().join("page.gpx");
    std::fs::write(&page, &body).unwrap();
    xmllint(&page);
    // Longitude 180 (outside the schema's [-180, 180)) is written as -180.
    let (st, body) = history_page(&server, other, "format=gpx", &ops);
    assert_eq!(st, 200);
    assert!(body.contains(r#"lon="-180""#), "{body}");
    std::fs::write(&page, &body).unwrap();
    xmllint(&page);
    // An id with XML and CSV specials is escaped and quoted.
    let odd = r#"hx-&<q>,"'"#;
    ws2.send(Message::text(
        r#"{"seq":2,"id":"hx-&<q>,\"'","lat":1,"lon":2,"ts":TS}"#
            .replace("TS", &now_ms().to_string()),
    ))
    .unwrap();
    assert!(wait_ack(&mut ws2, 2).is_empty());
    let (st, body) = history_page(&server, odd, "format=gpx", &ops);
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains("<name>hx-&amp;&lt;q&gt;,&quot;&apos;</name>"),
        "{body}"
    );
    std::fs::write(&page, &body).unwrap();
    xmllint(&page);
    let (st, body) = history_page(&server, odd, "format=csv", &ops);
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\r\n\"hx-&<q>,\"\"'\","), "{body}");

    // The exports of the window, each spliced from 2 pages of 6,000 by the command line.
    let window_args = format!("--from {from} --to {to}");
    let gpx = tmp.path().join("w.gpx");
    let said = export(&server, &ops, "gpx", &window_args, &gpx);
    assert!(said.contains("exported 12000 heartbeats"), "{said}");
    xmllint(&gpx);
    let text = std::fs::read_to_string(&gpx).unwrap();
    assert_eq!(text.matches("<trkpt ").count(), 12_000);
    assert!(
        !text.contains("geobeat:next"),
        "no cursor left in the export"
    );
    let geo = tmp.path().join("w.geojson");
    export(&server, &ops, "geojson", &window_args, &geo);
    // CSV through `geobeat history export`, the same export under its own command.
    let csv = tmp.path().join("w.csv");
    let mut cmd = Command::new(bin());
    cmd.args(["history", "export", DEVICE, "--format", "csv"])
        .args(["--url", &format!("http://{}", server.addr), "--token", &ops])
        .args(window_args.split(' '))
        .args(["--page", "6000", "--out", &csv.display().to_string()])
        .env("GEOBEAT_QUERY_CONFIG", "")
        .env("HOME", &server.dir);
    let said = run(&mut cmd, "geobeat history export --format csv");
    assert!(said.contains("exported 12000 heartbeats"), "{said}");
    // Python: geojson's validation, csv's reader; both report the indices in order.
    let script = r#"
import csv, json, sys, geojson
with open(sys.argv[1]) as f:
    fc = geojson.load(f)
assert isinstance(fc, geojson.FeatureCollection), type(fc)
assert fc.is_valid, fc.errors()
points = [f for f in fc["features"] if f["geometry"]["type"] == "Point"]
lines = [f for f in fc["features"] if f["geometry"]["type"] == "LineString"]
assert len(lines) == 1, len(lines)
assert [list(p["geometry"]["coordinates"]) for p in points] == [list(c) for c in lines[0]["geometry"]["coordinates"]]
# (the library rounds geometry coordinates to 6 decimals)
for p in points:
    lon, lat = p["geometry"]["coordinates"]
    assert abs(lon - p["properties"]["lon"]) < 1e-6 and abs(lat - p["properties"]["lat"]) < 1e-6
with open(sys.argv[2], newline="") as f:
    rows = list(csv.reader(f))
header = rows[0]
assert header == ["id","ts","time","lat","lon","alt","speed","heading","acc","received_at","attrs"], header
body = [dict(zip(header, r)) for r in rows[1:]]
assert all(len(r) == len(header) for r in rows), "ragged rows"
attrs = [json.loads(r["attrs"]) for r in body if r["attrs"]]
assert attrs and all(a["note"] == 'a,b "q"' for a in attrs), attrs[:3]
assert all(r["id"] == "hx-1" and r["time"].endswith("Z") for r in body)
print(json.dumps({
    "geojson": [int(p["properties"]["acc"]) for p in points],
    "csv": [int(float(r["acc"])) for r in body],
}))
"#;
    let out = run(
        Command::new("python3")
            .args(["-c", script])
            .arg(&geo)
            .arg(&csv),
        "python3 with geojson (python3 -m pip install geojson)",
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let indices = |k: &str| -> Vec<usize> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    assert_eq!(indices("geojson"), want_window);
    assert_eq!(indices("csv"), want_window);
}
