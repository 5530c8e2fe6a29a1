//! How one log entry is written into a sink's batch buffer: a line of JSON for audit files, a row
//! of PostgreSQL `COPY ... FROM STDIN` text for the database. Both encoders append to a reused
//! buffer and allocate nothing per heartbeat (except the rare attrs fallback below). It owns the
//! field names and their order, the number formatting and the escaping; it does not batch or
//! write anything anywhere.
//!
//! Invariants: the same entry always encodes to the same bytes (replays are byte-identical); every
//! JSON line is one line (no raw newline can appear); attrs are emitted as JSON only when they are
//! valid JSON that PostgreSQL's `jsonb` also accepts, otherwise as
//! `{"invalid_attrs_base64":"..."}` (lossless, and never able to fail a whole batch).

use std::io::Write;

use base64::Engine as _;

use crate::log::Entry;
use crate::route::ShardId;

/// Field names of an audit line, in the order they are written.
pub const AUDIT_FIELDS: [&str; 13] = [
    "id",
    "lat",
    "lon",
    "ts",
    "received_at",
    "alt",
    "speed",
    "heading",
    "acc",
    "attrs",
    "shard",
    "pos",
    "seq",
];

/// Columns of a `COPY` row, in order (the staging table's column list).
pub const COPY_COLUMNS: &str =
    "shard, pos, seq, id, lat, lon, ts, received_at, alt, speed, heading, acc, attrs";

/// Whether `raw` may be emitted as JSON as is: valid JSON, no control bytes (so a line stays a
/// line; compact attrs have none) and no `\u0000` escape (refused by PostgreSQL's `jsonb`).
fn attrs_usable(raw: &[u8]) -> bool {
    !raw.iter().any(|&b| b < 0x20)
        && !raw.windows(6).any(|w| w == b"\\u0000")
        && serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_ok()
}

/// Appends the attrs of a heartbeat as a JSON value: `null` when empty, the stored text when
/// usable, else the fallback object.
pub fn write_attrs_json(out: &mut Vec<u8>, raw: &[u8]) {
    if raw.is_empty() {
        out.extend_from_slice(b"null");
    } else if attrs_usable(raw) {
        out.extend_from_slice(raw);
    } else {
        out.extend_from_slice(b"{\"invalid_attrs_base64\":\"");
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(raw)
                .as_bytes(),
        );
        out.extend_from_slice(b"\"}");
    }
}

fn write_int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn write_opt_f32(out: &mut Vec<u8>, v: Option<f32>, null: &[u8]) {
    match v {
        // Display prints the shortest text that reads back as the same f32, never an exponent.
        Some(x) => write!(out, "{x}").expect("writing to a Vec cannot fail"),
        None => out.extend_from_slice(null),
    }
}

fn opt(v: &rkyv::option::ArchivedOption<rkyv::rend::f32_le>) -> Option<f32> {
    v.as_ref().map(|x| x.to_native())
}

/// Appends one audit line (JSON object and `\n`) for `e` of shard `shard`.
pub fn write_json_line(out: &mut Vec<u8>, shard: ShardId, e: &Entry<'_>) {
    let hb = e.hb;
    out.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut *out, hb.device_id.as_str()).expect("writing to a Vec cannot fail");
    write!(
        out,
        ",\"lat\":{},\"lon\":{},\"ts\":",
        hb.lat.to_native(),
        hb.lon.to_native()
    )
    .expect("writing to a Vec cannot fail");
    write_int(out, hb.ts_ms.to_native());
    out.extend_from_slice(b",\"received_at\":");
    write_int(out, hb.received_ms.to_native());
    out.extend_from_slice(b",\"alt\":");
    write_opt_f32(out, opt(&hb.alt_m), b"null");
    out.extend_from_slice(b",\"speed\":");
    write_opt_f32(out, opt(&hb.speed_mps), b"null");
    out.extend_from_slice(b",\"heading\":");
    write_opt_f32(out, opt(&hb.heading_deg), b"null");
    out.extend_from_slice(b",\"acc\":");
    write_opt_f32(out, opt(&hb.acc_m), b"null");
    out.extend_from_slice(b",\"attrs\":");
    write_attrs_json(out, hb.attrs.as_slice());
    out.extend_from_slice(b",\"shard\":");
    write_int(out, shard.0);
    out.extend_from_slice(b",\"pos\":");
    write_int(out, e.pos.0);
    out.extend_from_slice(b",\"seq\":");
    write_int(out, e.seq);
    out.extend_from_slice(b"}\n");
}

/// Appends `text` escaped for COPY's text format (backslash, tab, newline, carriage return).
fn write_copy_text(out: &mut Vec<u8>, text: &[u8]) {
    let mut start = 0;
    for (i, &b) in text.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&text[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&text[start..]);
}

/// Appends one `COPY` text row (columns [`COPY_COLUMNS`], tab-separated, `\N` for null, `\n`).
/// `scratch` is a reused buffer for the attrs JSON.
pub fn write_copy_row(out: &mut Vec<u8>, scratch: &mut Vec<u8>, shard: ShardId, e: &Entry<'_>) {
    let hb = e.hb;
    write_int(out, shard.0);
    out.push(b'\t');
    write_int(out, e.pos.0);
    out.push(b'\t');
    write_int(out, e.seq);
    out.push(b'\t');
    write_copy_text(out, hb.device_id.as_bytes());
    write!(out, "\t{}\t{}\t", hb.lat.to_native(), hb.lon.to_native())
        .expect("writing to a Vec cannot fail");
    write_int(out, hb.ts_ms.to_native());
    out.push(b'\t');
    write_int(out, hb.received_ms.to_native());
    for v in [&hb.alt_m, &hb.speed_mps, &hb.heading_deg, &hb.acc_m] {
        out.push(b'\t');
        write_opt_f32(out, opt(v), b"\\N");
    }
    out.push(b'\t');
    if hb.attrs.is_empty() {
        out.extend_from_slice(b"\\N");
    } else {
        scratch.clear();
        write_attrs_json(scratch, hb.attrs.as_slice());
        write_copy_text(out, scratch);
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogConfig, LogPos};
    use crate::record::Heartbeat;

    fn sample(attrs: &[u8]) -> Heartbeat {
        Heartbeat {
            device_id: "tab\\id \"q\" é".into(),
            lat: 52.52,
            lon: -13.405,
            ts_ms: 1_732_200_000_123,
            received_ms: 1_732_200_000_200,
            alt_m: Some(34.5),
            speed_mps: None,
            heading_deg: Some(0.1),
            acc_m: Some(4.0),
            attrs: attrs.to_vec(),
        }
    }

    fn with_entry(hb: &Heartbeat, f: impl FnOnce(&Entry<'_>)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            dir: dir.path().to_path_buf(),
            shard: ShardId(5),
            segment_bytes: crate::limits::SEGMENT_BYTES_MIN,
            write_mode: crate::log::WriteMode::default(),
        };
        let (mut log, _) = Log::open(&cfg, |_, _| {}).unwrap();
        let pos = log.append(hb, None).unwrap();
        assert_eq!(pos, LogPos(4096));
        f(&log.read(pos).unwrap());
    }

    #[test]
    fn json_line_has_every_field_in_order_and_round_trips() {
        // A line parses as JSON, has exactly the documented fields in order, and its values equal
        // the heartbeat's (f32 values read back exactly as f32).
        with_entry(&sample(br#"{"fuel":0.5}"#), |e| {
            let mut out = Vec::new();
            write_json_line(&mut out, ShardId(5), e);
            assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
            assert!(out.ends_with(b"\n"));
            let v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&out).unwrap();
            assert_eq!(
                v.keys().cloned().collect::<Vec<_>>().len(),
                AUDIT_FIELDS.len()
            );
            let text = std::str::from_utf8(&out).unwrap();
            let mut at = 0;
            for f in AUDIT_FIELDS {
                let i = text[at..].find(&format!("\"{f}\":")).expect(f) + at;
                at = i;
            }
            assert_eq!(v["id"], "tab\\id \"q\" é");
            assert_eq!(v["lat"], 52.52);
            assert_eq!(v["lon"], -13.405);
            assert_eq!(v["ts"], 1_732_200_000_123i64);
            assert_eq!(v["received_at"], 1_732_200_000_200i64);
            assert_eq!(v["alt"].as_f64().unwrap() as f32, 34.5);
            assert!(v["speed"].is_null());
            assert_eq!(v["heading"].as_f64().unwrap() as f32, 0.1f32);
            assert_eq!(v["attrs"]["fuel"], 0.5);
            assert_eq!(
                (v["shard"].as_u64(), v["pos"].as_u64(), v["seq"].as_u64()),
                (Some(5), Some(4096), Some(1))
            );
        });
    }

    #[test]
    fn unusable_attrs_fall_back_losslessly() {
        // Attrs that are not JSON, hold a control byte, or a \u0000 escape become the base64
        // fallback object, which decodes back to the stored bytes; empty attrs are null.
        for raw in [&b"{not json"[..], b"{\"a\":\"\\u0000\"}", b"{\"a\":\n1}"] {
            let mut out = Vec::new();
            write_attrs_json(&mut out, raw);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let b64 = v["invalid_attrs_base64"].as_str().unwrap();
            let back = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            assert_eq!(back, raw);
        }
        let mut out = Vec::new();
        write_attrs_json(&mut out, b"");
        assert_eq!(out, b"null");
    }

    #[test]
    fn copy_row_escapes_and_nulls() {
        // Thirteen tab-separated columns; backslashes in the id are doubled; absent measurements
        // are \N; attrs JSON is escaped the same way.
        with_entry(&sample(br#"{"p":"a\\b"}"#), |e| {
            let mut out = Vec::new();
            let mut scratch = Vec::new();
            write_copy_row(&mut out, &mut scratch, ShardId(5), e);
            let line = std::str::from_utf8(&out).unwrap();
            assert!(line.ends_with('\n'));
            let cols: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
            assert_eq!(cols.len(), COPY_COLUMNS.split(',').count());
            assert_eq!(cols[0..3], ["5", "4096", "1"]);
            assert_eq!(cols[3], "tab\\\\id \"q\" é");
            assert_eq!(cols[8], "34.5");
            assert_eq!(cols[9], "\\N");
            assert_eq!(cols[12], r#"{"p":"a\\\\b"}"#);
        });
    }
}
