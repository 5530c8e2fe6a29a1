//! Encoders for geobeat's device-protocol frames: the JSON text form (one object, or an array of
//! objects) and the little-endian binary batch form. This module owns the byte layout the load
//! generator puts on the wire; it does not own transport (WebSocket framing) nor decoding (the null
//! server's scanner lives in `scan`). Invariant: every frame written here holds 1..=
//! [`FRAME_HEARTBEATS_MAX`] heartbeats with strictly increasing `seq`, and encoders only append to
//! the output buffer, so a caller can reuse one buffer for every frame.

use std::io::Write as _;

use thiserror::Error;

/// Most heartbeats one frame may carry (mirrors `geobeat::limits::FRAME_HEARTBEATS_MAX`).
pub const FRAME_HEARTBEATS_MAX: usize = 1000;
/// Largest frame the server accepts, in bytes (mirrors `geobeat::limits::FRAME_BYTES_MAX`).
pub const FRAME_BYTES_MAX: usize = 64 << 10;
/// Longest device id, in bytes (mirrors `geobeat::limits::DEVICE_ID_BYTES_MAX`).
pub const DEVICE_ID_BYTES_MAX: usize = 64;
/// Largest `attrs` blob, in bytes (mirrors `geobeat::limits::ATTRS_BYTES_MAX`).
pub const ATTRS_BYTES_MAX: usize = 256;
/// Version byte at the start of every binary frame.
pub const BINARY_VERSION: u8 = 1;

/// Binary flag bit: an `alt` f32 follows.
pub const FLAG_ALT: u8 = 1 << 0;
/// Binary flag bit: a `speed` f32 follows.
pub const FLAG_SPEED: u8 = 1 << 1;
/// Binary flag bit: a `heading` f32 follows.
pub const FLAG_HEADING: u8 = 1 << 2;
/// Binary flag bit: an `acc` f32 follows.
pub const FLAG_ACC: u8 = 1 << 3;
/// Binary flag bit: `u8 id_len` plus id bytes follow.
pub const FLAG_ID: u8 = 1 << 4;
/// Binary flag bit: `u16 attrs_len` plus attrs bytes follow.
pub const FLAG_ATTRS: u8 = 1 << 5;

/// Fixed bytes of one binary heartbeat before its optional parts: seq, lat, lon, ts, flags.
pub const BINARY_HEARTBEAT_FIXED_BYTES: usize = 8 + 8 + 8 + 8 + 1;
/// Bytes of the binary frame header: version and count.
pub const BINARY_HEADER_BYTES: usize = 1 + 2;

const _: () = assert!(FRAME_HEARTBEATS_MAX <= u16::MAX as usize);
const _: () = assert!(DEVICE_ID_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(ATTRS_BYTES_MAX <= u16::MAX as usize);

/// Wire format of the heartbeat frames a load run sends.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Text frames: one JSON object, or an array of objects when a frame carries several.
    Json,
    /// Binary frames in the little-endian batch layout.
    Binary,
}

/// One heartbeat's per-sample values (the parts that change from heartbeat to heartbeat).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Per-connection sequence number; positive and strictly increasing.
    pub seq: u64,
    /// Latitude in degrees, within [-90, 90].
    pub lat: f64,
    /// Longitude in degrees, within [-180, 180].
    pub lon: f64,
    /// Device clock, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Altitude in metres, if reported.
    pub alt_m: Option<f32>,
    /// Ground speed in metres per second, if reported.
    pub speed_mps: Option<f32>,
    /// Heading in degrees clockwise from north, if reported.
    pub heading_deg: Option<f32>,
    /// Horizontal accuracy in metres, if reported.
    pub acc_m: Option<f32>,
}

/// Parts shared by every heartbeat of one connection's frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct Common<'a> {
    /// Device id carried in every heartbeat (required with a gateway token, omitted otherwise).
    pub id: Option<&'a str>,
    /// Compact JSON object text sent as `attrs` (JSON: inserted verbatim; binary: as bytes).
    pub attrs_json: Option<&'a str>,
}

/// Why a frame could not be encoded: the inputs break a protocol bound.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The batch is empty or larger than [`FRAME_HEARTBEATS_MAX`].
    #[error("a frame carries 1..={max} heartbeats, got {count}", max = FRAME_HEARTBEATS_MAX)]
    Count {
        /// Heartbeats offered.
        count: usize,
    },
    /// The device id is empty or longer than [`DEVICE_ID_BYTES_MAX`].
    #[error("device id must be 1..={max} bytes, got {len}", max = DEVICE_ID_BYTES_MAX)]
    IdLength {
        /// Length offered, in bytes.
        len: usize,
    },
    /// The attrs blob is longer than [`ATTRS_BYTES_MAX`].
    #[error("attrs must be at most {max} bytes, got {len}", max = ATTRS_BYTES_MAX)]
    AttrsLength {
        /// Length offered, in bytes.
        len: usize,
    },
}

fn check_common(count: usize, common: &Common<'_>) -> Result<(), EncodeError> {
    if count == 0 || count > FRAME_HEARTBEATS_MAX {
        return Err(EncodeError::Count { count });
    }
    if let Some(id) = common.id {
        if id.is_empty() || id.len() > DEVICE_ID_BYTES_MAX {
            return Err(EncodeError::IdLength { len: id.len() });
        }
    }
    if let Some(attrs) = common.attrs_json {
        if attrs.len() > ATTRS_BYTES_MAX {
            return Err(EncodeError::AttrsLength { len: attrs.len() });
        }
    }
    Ok(())
}

/// Appends `samples` as one JSON text frame to `out`: a bare object for one sample, an array for
/// several. Numbers use Rust's shortest round-trip formatting, so decoding gives the same values.
pub fn encode_json(
    samples: &[Sample],
    common: &Common<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    write_json(samples, common, true, out)
}

/// Like [`encode_json`] but without `seq`: the MQTT payload of geobeat's `geobeat/<id>` topic,
/// where the PUBLISH's packet id names the acknowledgement (docs/MQTT.md).
pub fn encode_json_seqless(
    samples: &[Sample],
    common: &Common<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    write_json(samples, common, false, out)
}

fn write_json(
    samples: &[Sample],
    common: &Common<'_>,
    with_seq: bool,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_common(samples.len(), common)?;
    let array = samples.len() > 1;
    if array {
        out.push(b'[');
    }
    for (index, sample) in samples.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        // Writing into a Vec cannot fail; the results are ignored for that reason.
        out.push(b'{');
        if with_seq {
            let _ = write!(out, "\"seq\":{},", sample.seq);
        }
        let _ = write!(
            out,
            "\"lat\":{},\"lon\":{},\"ts\":{}",
            sample.lat, sample.lon, sample.ts_ms
        );
        if let Some(id) = common.id {
            out.extend_from_slice(b",\"id\":");
            push_json_string(id, out);
        }
        for (name, value) in [
            ("alt", sample.alt_m),
            ("speed", sample.speed_mps),
            ("heading", sample.heading_deg),
            ("acc", sample.acc_m),
        ] {
            if let Some(value) = value {
                let _ = write!(out, ",\"{name}\":{value}");
            }
        }
        if let Some(attrs) = common.attrs_json {
            out.extend_from_slice(b",\"attrs\":");
            out.extend_from_slice(attrs.as_bytes());
        }
        out.push(b'}');
    }
    if array {
        out.push(b']');
    }
    Ok(())
}

/// Appends `text` as a JSON string literal, escaping what JSON requires.
fn push_json_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1f => {
                let _ = write!(out, "\\u{byte:04x}");
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// Appends `samples` as one binary frame to `out` (layout in the module docs of `scan` and in
/// `perf/README.md`).
pub fn encode_binary(
    samples: &[Sample],
    common: &Common<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_common(samples.len(), common)?;
    out.push(BINARY_VERSION);
    // Bounded by FRAME_HEARTBEATS_MAX <= u16::MAX (const-asserted above).
    out.extend_from_slice(&(samples.len() as u16).to_le_bytes());
    for sample in samples {
        out.extend_from_slice(&sample.seq.to_le_bytes());
        out.extend_from_slice(&sample.lat.to_le_bytes());
        out.extend_from_slice(&sample.lon.to_le_bytes());
        out.extend_from_slice(&sample.ts_ms.to_le_bytes());
        let mut flags = 0u8;
        for (bit, present) in [
            (FLAG_ALT, sample.alt_m.is_some()),
            (FLAG_SPEED, sample.speed_mps.is_some()),
            (FLAG_HEADING, sample.heading_deg.is_some()),
            (FLAG_ACC, sample.acc_m.is_some()),
            (FLAG_ID, common.id.is_some()),
            (FLAG_ATTRS, common.attrs_json.is_some()),
        ] {
            if present {
                flags |= bit;
            }
        }
        out.push(flags);
        for value in [
            sample.alt_m,
            sample.speed_mps,
            sample.heading_deg,
            sample.acc_m,
        ]
        .into_iter()
        .flatten()
        {
            out.extend_from_slice(&value.to_le_bytes());
        }
        if let Some(id) = common.id {
            // Bounded by DEVICE_ID_BYTES_MAX <= u8::MAX (checked in check_common).
            out.push(id.len() as u8);
            out.extend_from_slice(id.as_bytes());
        }
        if let Some(attrs) = common.attrs_json {
            out.extend_from_slice(&(attrs.len() as u16).to_le_bytes());
            out.extend_from_slice(attrs.as_bytes());
        }
    }
    Ok(())
}

/// Appends `samples` in `format` to `out`.
pub fn encode(
    format: Format,
    samples: &[Sample],
    common: &Common<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    match format {
        Format::Json => encode_json(samples, common, out),
        Format::Binary => encode_binary(samples, common, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Sample {
        Sample {
            seq,
            lat: 52.52 + seq as f64 * 1e-5,
            lon: 13.405,
            ts_ms: 1_732_200_000_123 + seq as i64,
            alt_m: None,
            speed_mps: None,
            heading_deg: None,
            acc_m: None,
        }
    }

    #[test]
    fn json_single_object_round_trips_through_serde() {
        // Checks that one sample encodes as a bare object whose fields decode to the same values.
        let mut out = Vec::new();
        let s = sample(7);
        encode_json(&[s], &Common::default(), &mut out).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(value.is_object());
        assert_eq!(value["seq"], 7);
        // serde_json's default float parser may be off by one ulp; the text itself is exact.
        assert!((value["lat"].as_f64().unwrap() - s.lat).abs() < 1e-9);
        assert!((value["lon"].as_f64().unwrap() - s.lon).abs() < 1e-9);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains(&format!("\"lat\":{},", s.lat)), "{text}");
        assert_eq!(value["ts"].as_i64().unwrap(), s.ts_ms);
        assert!(value.get("id").is_none());
        assert!(value.get("alt").is_none());
    }

    #[test]
    fn seqless_json_is_the_same_heartbeat_without_seq() {
        // Checks the MQTT payload: the same text as the WebSocket frame minus the `seq` member,
        // for one heartbeat and for an array.
        for samples in [vec![sample(7)], vec![sample(1), sample(2)]] {
            let common = Common {
                id: Some("sim-3"),
                attrs_json: None,
            };
            let (mut with, mut without) = (Vec::new(), Vec::new());
            encode_json(&samples, &common, &mut with).unwrap();
            encode_json_seqless(&samples, &common, &mut without).unwrap();
            let mut stripped = String::from_utf8(with).unwrap();
            for s in &samples {
                stripped = stripped.replace(&format!("\"seq\":{},", s.seq), "");
            }
            assert_eq!(String::from_utf8(without.clone()).unwrap(), stripped);
            let value: serde_json::Value = serde_json::from_slice(&without).unwrap();
            let first = if value.is_array() { &value[0] } else { &value };
            assert!(first.get("seq").is_none());
            assert_eq!(first["id"], "sim-3");
        }
    }

    #[test]
    fn json_batch_is_an_array_with_id_extras_and_attrs() {
        // Checks that several samples encode as an array, each carrying id, extras and attrs, and
        // that awkward id characters are escaped into valid JSON.
        let mut out = Vec::new();
        let mut samples = [sample(1), sample(2), sample(3)];
        samples[1].alt_m = Some(34.5);
        samples[1].speed_mps = Some(3.25);
        samples[1].heading_deg = Some(270.0);
        samples[1].acc_m = Some(4.0);
        let common = Common {
            id: Some("dev\"1\\\n"),
            attrs_json: Some(r#"{"fw":"1.2"}"#),
        };
        encode_json(&samples, &common, &mut out).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let items = value.as_array().unwrap();
        assert_eq!(items.len(), 3);
        for (item, s) in items.iter().zip(&samples) {
            assert_eq!(item["seq"].as_u64().unwrap(), s.seq);
            assert_eq!(item["id"].as_str().unwrap(), "dev\"1\\\n");
            assert_eq!(item["attrs"]["fw"], "1.2");
        }
        assert_eq!(items[1]["alt"].as_f64().unwrap(), 34.5);
        assert_eq!(items[1]["speed"].as_f64().unwrap(), 3.25);
        assert_eq!(items[1]["heading"].as_f64().unwrap(), 270.0);
        assert_eq!(items[1]["acc"].as_f64().unwrap(), 4.0);
        assert!(items[0].get("alt").is_none());
    }

    #[test]
    fn binary_layout_matches_the_protocol_byte_for_byte() {
        // Checks the exact bytes of a two-heartbeat binary frame, decoding it by hand at the
        // offsets the protocol defines.
        let mut samples = [sample(1), sample(2)];
        samples[1].speed_mps = Some(1.5);
        samples[1].acc_m = Some(9.0);
        let common = Common {
            id: Some("ab"),
            attrs_json: Some("{}"),
        };
        let mut out = Vec::new();
        encode_binary(&samples, &common, &mut out).unwrap();
        assert_eq!(out[0], BINARY_VERSION);
        assert_eq!(u16::from_le_bytes([out[1], out[2]]), 2);
        let mut at = BINARY_HEADER_BYTES;
        let take8 = |at: &mut usize| {
            let v: [u8; 8] = out[*at..*at + 8].try_into().unwrap();
            *at += 8;
            v
        };
        // First heartbeat: no extras, id and attrs.
        assert_eq!(u64::from_le_bytes(take8(&mut at)), 1);
        assert_eq!(f64::from_le_bytes(take8(&mut at)), samples[0].lat);
        assert_eq!(f64::from_le_bytes(take8(&mut at)), samples[0].lon);
        assert_eq!(i64::from_le_bytes(take8(&mut at)), samples[0].ts_ms);
        assert_eq!(out[at], FLAG_ID | FLAG_ATTRS);
        at += 1;
        assert_eq!(out[at], 2);
        assert_eq!(&out[at + 1..at + 3], b"ab");
        at += 3;
        assert_eq!(u16::from_le_bytes([out[at], out[at + 1]]), 2);
        assert_eq!(&out[at + 2..at + 4], b"{}");
        at += 4;
        // Second heartbeat: speed and acc present, in protocol order.
        assert_eq!(u64::from_le_bytes(take8(&mut at)), 2);
        at += 24;
        assert_eq!(out[at], FLAG_SPEED | FLAG_ACC | FLAG_ID | FLAG_ATTRS);
        at += 1;
        assert_eq!(f32::from_le_bytes(out[at..at + 4].try_into().unwrap()), 1.5);
        assert_eq!(
            f32::from_le_bytes(out[at + 4..at + 8].try_into().unwrap()),
            9.0
        );
        at += 8 + 3 + 4;
        assert_eq!(at, out.len());
    }

    #[test]
    fn encoders_reject_protocol_bound_violations() {
        // Checks that empty and oversized batches, bad id lengths and oversized attrs are refused
        // by both encoders instead of producing a frame the server would reject.
        let mut out = Vec::new();
        let too_many: Vec<Sample> = (1..=FRAME_HEARTBEATS_MAX as u64 + 1).map(sample).collect();
        let long_id = "x".repeat(DEVICE_ID_BYTES_MAX + 1);
        let long_attrs = format!("{{\"a\":\"{}\"}}", "y".repeat(ATTRS_BYTES_MAX));
        for format in [Format::Json, Format::Binary] {
            assert_eq!(
                encode(format, &[], &Common::default(), &mut out),
                Err(EncodeError::Count { count: 0 })
            );
            assert!(matches!(
                encode(format, &too_many, &Common::default(), &mut out),
                Err(EncodeError::Count { .. })
            ));
            let common = Common {
                id: Some(&long_id),
                attrs_json: None,
            };
            assert!(matches!(
                encode(format, &[sample(1)], &common, &mut out),
                Err(EncodeError::IdLength { .. })
            ));
            let common = Common {
                id: Some(""),
                attrs_json: None,
            };
            assert!(matches!(
                encode(format, &[sample(1)], &common, &mut out),
                Err(EncodeError::IdLength { len: 0 })
            ));
            let common = Common {
                id: None,
                attrs_json: Some(&long_attrs),
            };
            assert!(matches!(
                encode(format, &[sample(1)], &common, &mut out),
                Err(EncodeError::AttrsLength { .. })
            ));
        }
        assert!(out.is_empty(), "failed encodes must not write");
    }

    #[test]
    fn full_binary_batch_fits_the_frame_byte_limit() {
        // Checks that the largest binary batch of plain heartbeats with a 12-byte id fits the
        // server's frame byte limit, so `--format binary --batch 1000` is usable (JSON at that
        // batch size does not fit; the load generator checks its frame size before a run).
        let samples: Vec<Sample> = (1..=FRAME_HEARTBEATS_MAX as u64).map(sample).collect();
        let id = "d".repeat(12);
        let common = Common {
            id: Some(&id),
            attrs_json: None,
        };
        let mut out = Vec::new();
        encode_binary(&samples, &common, &mut out).unwrap();
        assert!(
            out.len() <= FRAME_BYTES_MAX,
            "binary frame is {} bytes",
            out.len()
        );
    }
}
