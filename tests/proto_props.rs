//! Property tests for the pure protocol pieces: frame codecs (round trips, totality on arbitrary
//! and mutated input, the "accepted implies valid" invariant), percent-decoding, and the HTTP
//! head parser. Plus one allocation-counting test: a warmed-up decoder decodes without allocating.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use geobeat::http::parse::{parse_head, percent_decode, percent_encode, query_param, Parsed};
use geobeat::limits::{FRAME_HEARTBEATS_MAX, SEQ_MAX};
use geobeat::proto::{binary, json, Decoder, Ingest, IngestScope, Outcome, Seq, Slot};
use geobeat::record::Heartbeat;
use proptest::collection::vec;
use proptest::prelude::*;

const NOW: i64 = 1_732_200_000_000;
const DAY_MS: i64 = 86_400_000;

// ---- allocation counting (per thread, so parallel tests do not disturb each other) ----

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

// ---- generators ----

fn attrs_value(depth: u32) -> BoxedStrategy<serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|i| serde_json::json!(i)),
        (-1e9f64..1e9).prop_map(|f| serde_json::json!(f)),
        "\\PC{0,8}".prop_map(serde_json::Value::String),
        "[\u{0}-\u{1f}\"\\\\]{0,4}".prop_map(serde_json::Value::String),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        3 => leaf,
        1 => vec(attrs_value(depth - 1), 0..3).prop_map(serde_json::Value::Array),
        1 => attrs_object(depth - 1),
    ]
    .boxed()
}

fn attrs_object(depth: u32) -> BoxedStrategy<serde_json::Value> {
    vec(("[a-z]{1,6}", attrs_value(depth)), 0..4)
        .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect()))
        .boxed()
}

/// Compact attrs text within the size bound, or empty (absent).
fn attrs() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        attrs_object(3)
            .prop_map(|v| serde_json::to_vec(&v).unwrap())
            .prop_filter("attrs within bound", |b| b.len() <= 256),
    ]
}

fn device_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,64}",
        "\\PC{1,16}".prop_filter("<= 64 bytes", |s| s.len() <= 64)
    ]
}

/// A heartbeat every rule accepts (received at `NOW`).
fn valid_heartbeat() -> impl Strategy<Value = Heartbeat> {
    (
        device_id(),
        -90.0f64..=90.0,
        -180.0f64..=180.0,
        (NOW - 30 * DAY_MS)..=(NOW + 600_000),
        proptest::option::of(-1e4f32..1e5),
        proptest::option::of(0f32..500.0),
        proptest::option::of(0f32..359.9),
        proptest::option::of(0f32..1e4),
        attrs(),
    )
        .prop_map(
            |(device_id, lat, lon, ts_ms, alt_m, speed_mps, heading_deg, acc_m, attrs)| Heartbeat {
                device_id,
                lat,
                lon,
                ts_ms,
                received_ms: NOW,
                alt_m,
                speed_mps,
                heading_deg,
                acc_m,
                attrs,
            },
        )
}

/// Heartbeats with strictly increasing seqs.
fn batch() -> impl Strategy<Value = Vec<(Seq, Heartbeat)>> {
    (1u64..1000, vec((1u64..1000, valid_heartbeat()), 1..20)).prop_map(|(start, items)| {
        let mut seq = start;
        items
            .into_iter()
            .map(|(gap, hb)| {
                seq += gap;
                (Seq(seq), hb)
            })
            .collect()
    })
}

/// Any heartbeat at all, including NaNs, huge ids and non-JSON attrs.
fn arbitrary_heartbeat() -> impl Strategy<Value = (u64, Heartbeat)> {
    (
        any::<u64>(),
        "\\PC{0,80}",
        any::<f64>(),
        any::<f64>(),
        any::<i64>(),
        proptest::option::of(any::<f32>()),
        proptest::option::of(any::<f32>()),
        vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(seq, device_id, lat, lon, ts_ms, alt_m, heading_deg, attrs)| {
                (
                    seq,
                    Heartbeat {
                        device_id,
                        lat,
                        lon,
                        ts_ms,
                        alt_m,
                        heading_deg,
                        attrs,
                        ..Heartbeat::default()
                    },
                )
            },
        )
}

fn ingest(scope: IngestScope<'_>) -> Ingest<'_> {
    Ingest::new(scope, NOW)
}

/// The invariant every decode must keep: an accepted heartbeat is valid, in the time window,
/// stamped with the receive time, allowed by the scope, and carries a seq in range.
fn check_slots(slots: &[Slot], ing: &Ingest<'_>) {
    assert!(slots.len() <= FRAME_HEARTBEATS_MAX);
    for s in slots {
        match s.outcome() {
            Outcome::Accepted { seq, heartbeat } => {
                assert!((1..=SEQ_MAX).contains(&seq.0));
                assert_eq!(heartbeat.validate(), Ok(()));
                assert_eq!(heartbeat.received_ms, ing.received_ms);
                assert!(ing.ts_window.contains(heartbeat.ts_ms, ing.received_ms));
                match ing.scope {
                    IngestScope::Device(id) => assert_eq!(heartbeat.device_id, id),
                    IngestScope::Gateway(p) => assert!(heartbeat.device_id.starts_with(p)),
                }
                assert!(heartbeat.attrs.is_empty() || heartbeat.attrs[0] == b'{');
            }
            Outcome::Rejected { seq, .. } => {
                assert!(seq.is_none_or(|s| (1..=SEQ_MAX).contains(&s.0)));
            }
        }
    }
}

/// Decodes and returns every accepted heartbeat with its seq, panicking on any rejection.
fn accepted(slots: &[Slot]) -> Vec<(Seq, Heartbeat)> {
    slots
        .iter()
        .map(|s| match s.outcome() {
            Outcome::Accepted { seq, heartbeat } => (seq, heartbeat.clone()),
            Outcome::Rejected { seq, reason } => {
                panic!("seq {seq:?} rejected: {}", reason.reason())
            }
        })
        .collect()
}

fn json_frame(items: &[(Seq, Heartbeat)]) -> String {
    let mut out = String::new();
    json::encode_frame(&mut out, items.iter().map(|(s, h)| (*s, h))).unwrap();
    out
}

fn binary_frame(items: &[(Seq, Heartbeat)]) -> Vec<u8> {
    let mut out = Vec::new();
    binary::encode_frame(&mut out, items.iter().map(|(s, h)| (*s, h))).unwrap();
    out
}

/// Applies byte edits (position, new byte or deletion) to a valid frame.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, Option<u8>)]) -> Vec<u8> {
    for &(pos, edit) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = pos % bytes.len();
        match edit {
            Some(b) => bytes[at] = b,
            None => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn binary_round_trip(items in batch()) {
        // Valid heartbeats survive binary encode -> decode exactly (gateway scope keeps ids).
        let frame = binary_frame(&items);
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        let slots = dec.decode_binary(&frame, &ing).unwrap();
        check_slots(slots, &ing);
        prop_assert_eq!(accepted(slots), items);
    }

    #[test]
    fn json_round_trip(items in batch()) {
        // decode(encode_json(x)) == x for valid heartbeats.
        let frame = json_frame(&items);
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        let slots = dec.decode_text(&frame, &ing).unwrap();
        check_slots(slots, &ing);
        prop_assert_eq!(accepted(slots), items);
    }

    #[test]
    fn json_device_scope_fills_the_id(items in batch()) {
        // Without `id`, a device token's id is used; seqs and fields are unchanged.
        let stripped: Vec<_> = items
            .iter()
            .map(|(s, h)| (*s, Heartbeat { device_id: String::new(), ..h.clone() }))
            .collect();
        let frame = json_frame(&stripped);
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Device("dev-9"));
        let slots = dec.decode_text(&frame, &ing).unwrap();
        let expect: Vec<_> = stripped
            .into_iter()
            .map(|(s, h)| (s, Heartbeat { device_id: "dev-9".into(), ..h }))
            .collect();
        prop_assert_eq!(accepted(slots), expect);
    }

    #[test]
    fn attrs_are_compacted(v in attrs_object(3), hb in valid_heartbeat()) {
        // Pretty-printed attrs (whitespace everywhere allowed) are stored as the compact text,
        // in JSON frames and in binary frames alike.
        let compact = serde_json::to_vec(&v).unwrap();
        prop_assume!(compact.len() <= 256);
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        let item = [(Seq(1), Heartbeat { attrs: pretty, ..hb })];
        let ing = ingest(IngestScope::Gateway(""));
        let mut dec = Decoder::new();
        let text = json_frame(&item);
        let got = accepted(dec.decode_text(&text, &ing).unwrap());
        prop_assert_eq!(&got[0].1.attrs, &compact);
        let bin = binary_frame(&item);
        if item[0].1.attrs.len() <= 256 {
            let got = accepted(dec.decode_binary(&bin, &ing).unwrap());
            prop_assert_eq!(&got[0].1.attrs, &compact);
        }
    }

    #[test]
    fn binary_arbitrary_heartbeats_keep_their_seq(raw in vec(arbitrary_heartbeat(), 1..8)) {
        // Any field values: the frame decodes, each in-range seq is reported, invariants hold.
        let items: Vec<_> = raw.iter().map(|(s, h)| (Seq(*s), h.clone())).collect();
        let mut frame = Vec::new();
        if binary::encode_frame(&mut frame, items.iter().map(|(s, h)| (*s, h))).is_err() {
            return Ok(()); // ids over 255 bytes cannot be encoded (checked in unit tests)
        }
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        let slots = dec.decode_binary(&frame, &ing).unwrap();
        check_slots(slots, &ing);
        for (slot, (seq, _)) in slots.iter().zip(&raw) {
            let in_range = (1..=SEQ_MAX).contains(seq);
            prop_assert_eq!(slot.seq(), in_range.then_some(Seq(*seq)));
        }
    }

    #[test]
    fn json_decode_is_total_on_arbitrary_text(text in "\\PC{0,300}") {
        // Arbitrary strings never panic and never yield an invalid accepted heartbeat.
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        if let Ok(slots) = dec.decode_text(&text, &ing) {
            check_slots(slots, &ing);
        }
    }

    #[test]
    fn json_decode_is_total_on_json_like_text(text in r#"[\[\]{}",:0-9a-z\\\-.eE +]{0,300}"#) {
        // Text over JSON's alphabet reaches deep parser paths; still total and sound.
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Device("d"));
        if let Ok(slots) = dec.decode_text(&text, &ing) {
            check_slots(slots, &ing);
        }
    }

    #[test]
    fn json_decode_is_total_on_mutated_frames(
        items in batch(),
        edits in vec((any::<usize>(), proptest::option::of(any::<u8>())), 1..6),
    ) {
        // Valid frames with a few bytes changed or deleted: no panic, invariants hold.
        let bytes = mutate(json_frame(&items).into_bytes(), &edits);
        let text = String::from_utf8_lossy(&bytes);
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        if let Ok(slots) = dec.decode_text(&text, &ing) {
            check_slots(slots, &ing);
        }
    }

    #[test]
    fn binary_decode_is_total(
        items in batch(),
        edits in vec((any::<usize>(), proptest::option::of(any::<u8>())), 0..6),
        garbage in vec(any::<u8>(), 0..200),
    ) {
        // Mutated valid frames and raw garbage: no panic, invariants hold.
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        for bytes in [mutate(binary_frame(&items), &edits), garbage] {
            if let Ok(slots) = dec.decode_binary(&bytes, &ing) {
                check_slots(slots, &ing);
            }
        }
    }

    #[test]
    fn percent_round_trip(s in "\\PC{0,40}", key in "[a-z%+]{1,6}") {
        // percent_decode(percent_encode(s)) == s, also through query_param with encoded keys.
        let mut enc = String::new();
        percent_encode(&s, &mut enc);
        let mut buf = Vec::new();
        prop_assert_eq!(percent_decode(&enc, &mut buf).unwrap(), s.as_str());
        let mut query = String::from("k0=1&");
        percent_encode(&key, &mut query);
        query.push('=');
        query.push_str(&enc);
        prop_assert_eq!(query_param(&query, &key, &mut buf).unwrap(), Some(s.as_str()));
    }

    #[test]
    fn percent_decode_is_total(raw in "\\PC{0,60}") {
        // Arbitrary input decodes or errors, never panics.
        let mut buf = Vec::new();
        let _ = percent_decode(&raw, &mut buf);
    }

    #[test]
    fn http_head_parser_is_total(
        bytes in vec(any::<u8>(), 0..600),
        edits in vec((any::<usize>(), proptest::option::of(any::<u8>())), 0..8),
    ) {
        // Garbage and mutated valid heads: no panic; complete heads lie within the input.
        let valid = b"GET /v1/ingest?token=a%20b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nContent-Length: 3\r\nSec-WebSocket-Version: 13\r\n\r\nabc";
        for input in [bytes, mutate(valid.to_vec(), &edits)] {
            if let Ok(Parsed::Complete(r)) = parse_head(&input) {
                prop_assert!(r.head_bytes <= input.len());
                prop_assert!(r.path.starts_with('/') || r.path == "*");
                prop_assert!(!(r.chunked && r.content_length.is_some()));
            }
        }
    }
}

#[test]
fn warmed_up_decoder_does_not_allocate() {
    // After one decode of each shape, decoding same-shaped frames (full optional fields, ids,
    // attrs, escapes) performs zero heap allocations: slots, strings and vectors are reused.
    let hb = Heartbeat {
        device_id: "fleet-\u{e9}-42".into(),
        lat: 52.52,
        lon: 13.405,
        ts_ms: NOW - 1000,
        received_ms: NOW,
        alt_m: Some(34.5),
        speed_mps: Some(3.25),
        heading_deg: Some(271.0),
        acc_m: Some(4.0),
        attrs: br#"{"fuel":0.5,"tags":["a\"b",true,null],"n":{"x":1}}"#.to_vec(),
    };
    let items: Vec<_> = (1..=200).map(|i| (Seq(i), hb.clone())).collect();
    let text = json_frame(&items);
    let bin = binary_frame(&items);
    let ing = ingest(IngestScope::Gateway("fleet-"));
    let mut dec = Decoder::new();
    let cold = allocations();
    assert_eq!(dec.decode_text(&text, &ing).unwrap().len(), 200);
    assert_eq!(dec.decode_binary(&bin, &ing).unwrap().len(), 200);
    let before = allocations();
    assert!(before > cold, "the counter sees the warm-up allocations");
    for _ in 0..3 {
        let n = dec.decode_text(&text, &ing).unwrap().len();
        let m = dec.decode_binary(&bin, &ing).unwrap().len();
        assert_eq!((n, m), (200, 200));
    }
    let after = allocations();
    check_slots(dec.slots(), &ing);
    assert_eq!(
        after - before,
        0,
        "decoding allocated {} times",
        after - before
    );
}
