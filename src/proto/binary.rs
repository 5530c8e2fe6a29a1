//! Binary frames: a compact little-endian batch layout for devices that can afford neither JSON
//! text nor its parsing cost, with a decoder into the shared [`Decoder`] slots and an encoder
//! (for the load generator, tests and client libraries). It owns the byte layout only; the
//! per-heartbeat rules are the parent module's, shared with JSON frames.
//!
//! Layout (all integers and floats little-endian, no padding):
//!
//! ```text
//! frame     = version:u8 (=1) count:u16 (1..=heartbeats_max) heartbeat{count}
//! heartbeat = seq:u64 lat:f64 lon:f64 ts:i64 flags:u8
//!             [alt:f32] [speed:f32] [heading:f32] [acc:f32]   -- flags bits 0..=3, in this order
//!             [id_len:u8 id:bytes(id_len)]                     -- flags bit 4, UTF-8
//!             [attrs_len:u16 attrs:bytes(attrs_len)]           -- flags bit 5, one JSON object
//! flags bits 6 and 7 are reserved and must be zero.
//! ```
//!
//! Invariant: the frame structure (version, count, lengths, reserved bits, no trailing bytes) is
//! checked as a whole, so a frame is refused entirely or every heartbeat gets its own verdict; a
//! bad field value inside a well-framed heartbeat (a non-UTF-8 id, attrs that are not an object)
//! refuses that heartbeat only.

use super::{json, Decoder, EncodeError, Field, FrameError, Ingest, Reject, Seq};
use crate::limits::{ATTRS_BYTES_MAX, DEVICE_ID_BYTES_MAX, FRAME_BYTES_MAX};
use crate::record::{Heartbeat, Invalid};

/// The only layout version defined so far (the first byte of every binary frame).
pub const VERSION: u8 = 1;
/// `flags` bit: altitude (f32, metres) follows.
pub const FLAG_ALT: u8 = 1 << 0;
/// `flags` bit: speed (f32, m/s) follows.
pub const FLAG_SPEED: u8 = 1 << 1;
/// `flags` bit: heading (f32, degrees) follows.
pub const FLAG_HEADING: u8 = 1 << 2;
/// `flags` bit: accuracy (f32, metres) follows.
pub const FLAG_ACC: u8 = 1 << 3;
/// `flags` bit: `id_len:u8` and the id's UTF-8 bytes follow.
pub const FLAG_ID: u8 = 1 << 4;
/// `flags` bit: `attrs_len:u16` and the attrs' JSON object text follow.
pub const FLAG_ATTRS: u8 = 1 << 5;
/// Bits that must be zero.
pub const FLAGS_RESERVED: u8 =
    !(FLAG_ALT | FLAG_SPEED | FLAG_HEADING | FLAG_ACC | FLAG_ID | FLAG_ATTRS);
/// Bytes before the first heartbeat.
pub const FRAME_HEADER_BYTES: usize = 3;
/// Bytes of a heartbeat without optional parts.
pub const HEARTBEAT_FIXED_BYTES: usize = 8 + 8 + 8 + 8 + 1;

/// Reads little-endian values, reporting truncation with the offset.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, FrameError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn f64(&mut self) -> Result<f64, FrameError> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    fn f32(&mut self) -> Result<f32, FrameError> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    fn opt_f32(&mut self, flags: u8, bit: u8) -> Result<Option<f32>, FrameError> {
        if flags & bit != 0 {
            Ok(Some(self.f32()?))
        } else {
            Ok(None)
        }
    }
}

/// Decodes one binary frame into `dec`'s slots.
pub(super) fn decode_frame(
    dec: &mut Decoder,
    bytes: &[u8],
    ingest: &Ingest<'_>,
) -> Result<(), FrameError> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooBig { bytes: bytes.len() });
    }
    let mut r = Reader { b: bytes, pos: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(FrameError::UnknownVersion { version });
    }
    let count = usize::from(r.u16()?);
    if count == 0 {
        return Err(FrameError::EmptyBatch);
    }
    let max = ingest
        .heartbeats_max
        .min(crate::limits::FRAME_HEARTBEATS_MAX);
    if count > max {
        return Err(FrameError::TooManyHeartbeats { max });
    }
    for _ in 0..count {
        let i = dec.next_slot(max)?;
        let slot = &mut dec.slots[i];
        let seq = r.u64()?;
        let hb = &mut slot.heartbeat;
        hb.lat = r.f64()?;
        hb.lon = r.f64()?;
        hb.ts_ms = r.i64()?;
        let flags_offset = r.pos;
        let flags = r.u8()?;
        if flags & FLAGS_RESERVED != 0 {
            return Err(FrameError::ReservedFlags {
                offset: flags_offset,
            });
        }
        hb.alt_m = r.opt_f32(flags, FLAG_ALT)?;
        hb.speed_mps = r.opt_f32(flags, FLAG_SPEED)?;
        hb.heading_deg = r.opt_f32(flags, FLAG_HEADING)?;
        hb.acc_m = r.opt_f32(flags, FLAG_ACC)?;
        let mut present = Field::Seq.bit() | Field::Lat.bit() | Field::Lon.bit() | Field::Ts.bit();
        if flags & FLAG_ID != 0 {
            present |= Field::Id.bit();
            let len = usize::from(r.u8()?);
            let id = r.take(len)?;
            if len > DEVICE_ID_BYTES_MAX {
                slot.reject(Reject::Invalid(Invalid::IdTooLong));
            } else {
                match std::str::from_utf8(id) {
                    Ok(s) => slot.heartbeat.device_id.push_str(s),
                    Err(_) => slot.reject(Reject::BadType(Field::Id)),
                }
            }
        }
        if flags & FLAG_ATTRS != 0 {
            let len = usize::from(r.u16()?);
            let attrs = r.take(len)?;
            if len > ATTRS_BYTES_MAX {
                slot.reject(Reject::Invalid(Invalid::AttrsTooLarge));
            } else {
                let result = std::str::from_utf8(attrs)
                    .map_err(|_| Reject::BadType(Field::Attrs))
                    .and_then(|text| json::compact_attrs(text, &mut slot.heartbeat.attrs));
                if let Err(reason) = result {
                    slot.heartbeat.attrs.clear();
                    slot.reject(reason);
                }
            }
        }
        slot.set_seq(seq);
        dec.finish_slot(i, present, ingest);
    }
    if r.pos != bytes.len() {
        return Err(FrameError::TrailingBytes { offset: r.pos });
    }
    Ok(())
}

/// Writes a binary frame into `out` (cleared first). The `id` part is written when `device_id` is
/// non-empty, `attrs` when non-empty, each measurement when `Some`. Only what the layout cannot
/// express is refused (see [`EncodeError`]).
pub fn encode_frame<'h>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = (Seq, &'h Heartbeat)>,
) -> Result<(), EncodeError> {
    out.clear();
    out.push(VERSION);
    out.extend_from_slice(&[0, 0]); // count, patched below
    let mut count: usize = 0;
    for (seq, hb) in items {
        count += 1;
        if count > usize::from(u16::MAX) {
            return Err(EncodeError::TooManyHeartbeats {
                count,
                max: usize::from(u16::MAX),
            });
        }
        let id_len = u8::try_from(hb.device_id.len())
            .map_err(|_| EncodeError::IdTooLong(hb.device_id.len()))?;
        let attrs_len = u16::try_from(hb.attrs.len())
            .map_err(|_| EncodeError::AttrsTooLarge(hb.attrs.len()))?;
        out.extend_from_slice(&seq.0.to_le_bytes());
        out.extend_from_slice(&hb.lat.to_le_bytes());
        out.extend_from_slice(&hb.lon.to_le_bytes());
        out.extend_from_slice(&hb.ts_ms.to_le_bytes());
        let mut flags = 0u8;
        let measurements = [
            (FLAG_ALT, hb.alt_m),
            (FLAG_SPEED, hb.speed_mps),
            (FLAG_HEADING, hb.heading_deg),
            (FLAG_ACC, hb.acc_m),
        ];
        for (bit, v) in measurements {
            if v.is_some() {
                flags |= bit;
            }
        }
        if id_len > 0 {
            flags |= FLAG_ID;
        }
        if attrs_len > 0 {
            flags |= FLAG_ATTRS;
        }
        out.push(flags);
        for (_, v) in measurements {
            if let Some(v) = v {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        if id_len > 0 {
            out.push(id_len);
            out.extend_from_slice(hb.device_id.as_bytes());
        }
        if attrs_len > 0 {
            out.extend_from_slice(&attrs_len.to_le_bytes());
            out.extend_from_slice(&hb.attrs);
        }
    }
    let count = u16::try_from(count).expect("checked in the loop");
    out[1..3].copy_from_slice(&count.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{IngestScope, Outcome};
    use super::*;

    const NOW: i64 = 1_732_200_000_500;

    fn sample(id: &str) -> Heartbeat {
        Heartbeat {
            device_id: id.into(),
            lat: 52.52,
            lon: 13.405,
            ts_ms: 1_732_200_000_123,
            received_ms: NOW,
            alt_m: Some(34.5),
            speed_mps: None,
            heading_deg: Some(271.0),
            acc_m: Some(4.0),
            attrs: br#"{"fuel":0.5}"#.to_vec(),
        }
    }

    fn reasons(bytes: &[u8]) -> Result<Vec<Result<Heartbeat, &'static str>>, FrameError> {
        let mut dec = Decoder::new();
        let ing = Ingest::new(IngestScope::Gateway("d"), NOW);
        let slots = dec.decode_binary(bytes, &ing)?;
        Ok(slots
            .iter()
            .map(|s| match s.outcome() {
                Outcome::Accepted { heartbeat, .. } => Ok(heartbeat.clone()),
                Outcome::Rejected { reason, .. } => Err(reason.reason()),
            })
            .collect())
    }

    #[test]
    fn layout_is_as_documented() {
        // A minimal heartbeat is header + 33 bytes, fields at the documented offsets.
        let hb = Heartbeat {
            lat: 1.0,
            lon: 2.0,
            ts_ms: 3,
            ..Heartbeat::default()
        };
        let mut out = Vec::new();
        encode_frame(&mut out, [(Seq(9), &hb)]).unwrap();
        assert_eq!(out.len(), FRAME_HEADER_BYTES + HEARTBEAT_FIXED_BYTES);
        assert_eq!(&out[..3], &[1, 1, 0]);
        assert_eq!(&out[3..11], &9u64.to_le_bytes());
        assert_eq!(&out[11..19], &1.0f64.to_le_bytes());
        assert_eq!(&out[27..35], &3i64.to_le_bytes());
        assert_eq!(out[35], 0);
    }

    #[test]
    fn protocol_doc_example_decodes() {
        // The byte-by-byte example in docs/PROTOCOL.md is what the encoder writes and decodes.
        let doc =
            "01 01 00 01 00 00 00 00 00 00 00 c3 f5 28 5c 8f 42 4a 40 8f c2 f5 28 5c cf 2a 40 \
                   7b 6a 2a 4f 93 01 00 00 02 00 00 c0 3f";
        let bytes: Vec<u8> = doc
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let hb = Heartbeat {
            lat: 52.52,
            lon: 13.405,
            ts_ms: 1_732_200_000_123,
            speed_mps: Some(1.5),
            ..Heartbeat::default()
        };
        let mut out = Vec::new();
        encode_frame(&mut out, [(Seq(1), &hb)]).unwrap();
        assert_eq!(out, bytes);
        let mut dec = Decoder::new();
        let ing = Ingest::new(IngestScope::Device("truck-1"), 1_732_200_000_500);
        let slots = dec.decode_binary(&bytes, &ing).unwrap();
        let Outcome::Accepted { seq, heartbeat } = slots[0].outcome() else {
            panic!("accepted expected");
        };
        assert_eq!(seq, Seq(1));
        assert_eq!(heartbeat.device_id, "truck-1");
        assert_eq!(heartbeat.speed_mps, Some(1.5));
    }

    #[test]
    fn round_trips_full_heartbeats() {
        // Every optional part survives encode -> decode.
        let a = sample("d-1");
        let mut b = sample("d-2");
        b.attrs.clear();
        b.alt_m = None;
        let mut out = Vec::new();
        encode_frame(&mut out, [(Seq(1), &a), (Seq(2), &b)]).unwrap();
        assert_eq!(reasons(&out).unwrap(), vec![Ok(a), Ok(b)]);
    }

    #[test]
    fn structural_errors_refuse_the_frame() {
        // Version, truncation, trailing bytes, reserved flags, counts.
        let mut out = Vec::new();
        encode_frame(&mut out, [(Seq(1), &sample("d-1"))]).unwrap();
        assert_eq!(
            reasons(&[]).unwrap_err(),
            FrameError::Truncated { offset: 0 }
        );
        let mut v2 = out.clone();
        v2[0] = 2;
        assert_eq!(reasons(&v2).unwrap_err().reason(), "unknown_version");
        for cut in 1..out.len() {
            assert_eq!(
                reasons(&out[..cut]).unwrap_err().reason(),
                "truncated",
                "cut at {cut}"
            );
        }
        let mut trailing = out.clone();
        trailing.push(0);
        assert_eq!(
            reasons(&trailing).unwrap_err(),
            FrameError::TrailingBytes { offset: out.len() }
        );
        let mut reserved = out.clone();
        reserved[35] |= 0x40;
        assert_eq!(reasons(&reserved).unwrap_err().reason(), "reserved_flags");
        assert_eq!(reasons(&[1, 0, 0]).unwrap_err(), FrameError::EmptyBatch);
        let mut many = out.clone();
        many[1..3].copy_from_slice(&1001u16.to_le_bytes());
        assert_eq!(reasons(&many).unwrap_err().reason(), "too_many_heartbeats");
    }

    #[test]
    fn field_errors_refuse_one_heartbeat() {
        // Bad id bytes, bad attrs, zero seq, NaN latitude: only that heartbeat is refused.
        let good = sample("d-1");
        let mut nan = sample("d-2");
        nan.lat = f64::NAN;
        let mut bad_attrs = sample("d-3");
        bad_attrs.attrs = b"[1,2]".to_vec();
        let mut out = Vec::new();
        encode_frame(
            &mut out,
            [
                (Seq(1), &good),
                (Seq(2), &nan),
                (Seq(3), &bad_attrs),
                (Seq(0), &good),
                (Seq(5), &good),
            ],
        )
        .unwrap();
        let got = reasons(&out).unwrap();
        assert_eq!(got[0], Ok(good.clone()));
        assert_eq!(got[1], Err("lat_out_of_range"));
        assert_eq!(got[2], Err("bad_type:attrs"));
        assert_eq!(got[3], Err("seq_not_positive"));
        assert_eq!(got[4], Ok(good.clone()));

        let mut bad_utf8 = Vec::new();
        encode_frame(&mut bad_utf8, [(Seq(1), &sample("d-\u{e9}"))]).unwrap();
        let at = bad_utf8.len() - 2 - good.attrs.len() - 1; // last byte of the id
        bad_utf8[at] = 0xFF;
        assert_eq!(reasons(&bad_utf8).unwrap()[0], Err("bad_type:id"));

        let long = sample(&"d".repeat(65));
        encode_frame(&mut out, [(Seq(1), &long)]).unwrap();
        assert_eq!(reasons(&out).unwrap()[0], Err("id_too_long"));
        let mut big = sample("d-1");
        big.attrs = format!("{{\"k\":\"{}\"}}", "x".repeat(300)).into_bytes();
        encode_frame(&mut out, [(Seq(1), &big)]).unwrap();
        assert_eq!(reasons(&out).unwrap()[0], Err("attrs_too_large"));
    }

    #[test]
    fn encoder_refuses_unrepresentable_lengths() {
        // Ids over 255 bytes cannot be expressed by the u8 length.
        let mut out = Vec::new();
        let hb = sample(&"x".repeat(256));
        assert_eq!(
            encode_frame(&mut out, [(Seq(1), &hb)]),
            Err(EncodeError::IdTooLong(256))
        );
    }
}
