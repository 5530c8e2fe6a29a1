//! Shared oracles for geobeat's fuzz targets: how a fuzz input picks the decoding context, and the
//! invariants every decode must satisfy. It owns no target and no I/O; the targets in
//! `fuzz_targets/` feed bytes to geobeat and call these checks.
//!
//! Key invariant checked: whatever the input, a decode never panics, and every heartbeat it
//! accepts obeys the protocol's promises (validates, carries an id the token allows, lies in the
//! timestamp window, is stamped with the receive time, survives the log's encoding unchanged, and
//! decodes identically from the other wire format).
#![deny(missing_docs)]

use geobeat::limits::{ATTRS_BYTES_MAX, FRAME_HEARTBEATS_MAX, SEQ_MAX};
use geobeat::proto::{binary::encode_frame, Decoder, Ingest, IngestScope, Outcome, Seq, Slot};
use geobeat::record::Heartbeat;

/// Receive time used by every target, so the timestamp window is deterministic.
pub const RECEIVED_MS: i64 = 1_732_200_000_000;

/// Token scopes the decoders are fuzzed under (picked by the first input byte).
pub const SCOPES: [IngestScope<'static>; 4] = [
    IngestScope::Device("truck-1"),
    IngestScope::Gateway(""),
    IngestScope::Gateway("fleet-a/"),
    IngestScope::Device("\u{e9}t\u{e9}"),
];

/// Splits a fuzz input into a decoding context (first byte: scope; second: heartbeats per frame
/// limit) and the frame bytes.
pub fn context(data: &[u8]) -> Option<(Ingest<'static>, &[u8])> {
    let (&sel, rest) = data.split_first()?;
    let (&max, frame) = rest.split_first()?;
    let mut ingest = Ingest::new(SCOPES[usize::from(sel) % SCOPES.len()], RECEIVED_MS);
    // Mostly the default; sometimes a small limit to reach too_many_heartbeats cheaply.
    ingest.heartbeats_max = if max < 200 {
        FRAME_HEARTBEATS_MAX
    } else {
        usize::from(max - 199)
    };
    Some((ingest, frame))
}

/// The invariants of one decode's slots.
pub fn check_slots(slots: &[Slot], ingest: &Ingest<'_>) {
    assert!(slots.len() <= ingest.heartbeats_max.min(FRAME_HEARTBEATS_MAX));
    let mut text = String::new();
    let mut enc = rkyv::util::AlignedVec::<16>::new();
    for slot in slots {
        match slot.outcome() {
            Outcome::Accepted { seq, heartbeat } => {
                assert_eq!(slot.seq(), Some(seq));
                assert!((1..=SEQ_MAX).contains(&seq.0), "seq {seq:?}");
                heartbeat
                    .validate()
                    .expect("an accepted heartbeat validates");
                assert_eq!(heartbeat.received_ms, ingest.received_ms);
                assert!(ingest
                    .ts_window
                    .contains(heartbeat.ts_ms, ingest.received_ms));
                match ingest.scope {
                    IngestScope::Device(id) => assert_eq!(heartbeat.device_id, id),
                    IngestScope::Gateway(prefix) => {
                        assert!(heartbeat.device_id.starts_with(prefix))
                    }
                }
                if !heartbeat.attrs.is_empty() {
                    check_attrs(&heartbeat.attrs);
                }
                // What the log stores reads back identically.
                heartbeat.encode_into(&mut enc);
                let archived = geobeat::record::access(&enc).expect("log record accepted");
                assert_eq!(&archived.to_owned_heartbeat(), heartbeat);
            }
            Outcome::Rejected { seq, reason } => {
                if let Some(s) = seq {
                    assert!((1..=SEQ_MAX).contains(&s.0));
                }
                // The error frame is valid JSON naming the seq and a stable reason.
                geobeat::proto::ack::write_error(&mut text, seq, reason.reason());
                let v: serde_json::Value =
                    serde_json::from_str(&text).expect("error frames are JSON");
                assert_eq!(v["error"].as_str(), Some(reason.reason()));
            }
        }
    }
}

/// Stored attrs are one JSON object within the size bound that a strict reader (serde_json, which
/// refuses numbers beyond `f64`, as Go's encoding/json does) parses: the read API returns them
/// verbatim. `GEOBEAT_FUZZ_LENIENT_ATTRS=1` checks the grammar only, to fuzz past that known
/// issue (fuzz/artifacts-fixed/proto_json/attrs-number-beyond-f64) until it is fixed.
pub fn check_attrs(attrs: &[u8]) {
    static LENIENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let lenient = *LENIENT.get_or_init(|| std::env::var_os("GEOBEAT_FUZZ_LENIENT_ATTRS").is_some());
    assert!(attrs.len() <= ATTRS_BYTES_MAX);
    assert_eq!(attrs.first(), Some(&b'{'), "stored attrs are one object");
    if lenient {
        serde_json::from_slice::<serde::de::IgnoredAny>(attrs).expect("stored attrs are JSON");
    } else {
        let v: serde_json::Value =
            serde_json::from_slice(attrs).expect("stored attrs are JSON a strict reader parses");
        assert!(v.is_object(), "stored attrs are one object");
    }
}

/// The accepted heartbeats of a decode, as owned values.
pub fn accepted(slots: &[Slot]) -> Vec<(Seq, Heartbeat)> {
    slots
        .iter()
        .filter_map(|s| match s.outcome() {
            Outcome::Accepted { seq, heartbeat } => Some((seq, heartbeat.clone())),
            Outcome::Rejected { .. } => None,
        })
        .collect()
}

/// The outcomes of a decode in a comparable form.
pub fn outcomes(slots: &[Slot]) -> Vec<String> {
    slots.iter().map(|s| format!("{:?}", s.outcome())).collect()
}

/// Re-encodes accepted heartbeats as a binary frame (id included) and checks the binary decoder
/// accepts every one of them unchanged: the two wire formats agree.
pub fn check_binary_agrees(accepted: &[(Seq, Heartbeat)], ingest: &Ingest<'_>) {
    if accepted.is_empty() {
        return;
    }
    let mut frame = Vec::new();
    encode_frame(&mut frame, accepted.iter().map(|(s, h)| (*s, h))).expect("encodable");
    let mut decoder = Decoder::new();
    let slots = decoder
        .decode_binary(&frame, ingest)
        .expect("a frame of accepted heartbeats decodes");
    let again: Vec<(Seq, Heartbeat)> = self::accepted(slots);
    assert_eq!(
        again.len(),
        accepted.len(),
        "binary refused what JSON accepted"
    );
    for ((s1, h1), (s2, h2)) in accepted.iter().zip(&again) {
        assert_eq!(s1, s2);
        assert_eq!(h1, h2);
    }
}
