//! The heartbeat record: what one device reported at one moment, as stored in the shard log.
//! It owns the field set, the validation rules a heartbeat must pass before it may be stored, and
//! the rkyv encoding (written into the log, read back zero-copy with bytecheck validation). It does
//! not know about framing, CRCs or positions: that is `log`.
//!
//! Invariant: every `Heartbeat` that reaches the log has passed [`Heartbeat::validate`]; recovery
//! re-checks the same rules on the archived form, so the log can never yield a record the API
//! would have refused.

use rkyv::{rancor, Archive, Deserialize, Serialize};

use crate::limits::{ATTRS_BYTES_MAX, DEVICE_ID_BYTES_MAX};

/// One location heartbeat. Optional measurements are `f32`: GPS-grade values (altitude in m,
/// speed in m/s, heading in degrees, accuracy in m) need far fewer than f32's ~7 significant
/// digits, and the record stays small (the log's bandwidth is the ingest ceiling).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct Heartbeat {
    /// Device id, UTF-8, 1..=[`DEVICE_ID_BYTES_MAX`] bytes.
    pub device_id: String,
    /// Latitude in degrees, finite, in [-90, 90].
    pub lat: f64,
    /// Longitude in degrees, finite, in [-180, 180].
    pub lon: f64,
    /// Device time: milliseconds since the Unix epoch, as reported by the device.
    pub ts_ms: i64,
    /// Server receive time: milliseconds since the Unix epoch, stamped by the accepting shard.
    pub received_ms: i64,
    /// Altitude in metres, if reported.
    pub alt_m: Option<f32>,
    /// Ground speed in metres per second, if reported (finite, >= 0).
    pub speed_mps: Option<f32>,
    /// Heading in degrees, if reported (finite, [0, 360)).
    pub heading_deg: Option<f32>,
    /// Horizontal accuracy in metres, if reported (finite, >= 0).
    pub acc_m: Option<f32>,
    /// Opaque attribute blob (the compact JSON text of the `attrs` object), at most
    /// [`ATTRS_BYTES_MAX`] bytes; empty when absent.
    pub attrs: Vec<u8>,
}

/// Why a heartbeat was refused. The `reason` strings are part of the device protocol
/// (`{"seq":N,"error":"<reason>"}`): extend, never rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Device id empty.
    IdEmpty,
    /// Device id longer than [`DEVICE_ID_BYTES_MAX`] bytes.
    IdTooLong,
    /// Device id contains a control character.
    IdControl,
    /// Latitude NaN, infinite or outside [-90, 90].
    Lat,
    /// Longitude NaN, infinite or outside [-180, 180].
    Lon,
    /// An optional measurement is NaN, infinite or outside its range.
    Measurement,
    /// `attrs` larger than [`ATTRS_BYTES_MAX`] bytes.
    AttrsTooLarge,
}

impl Invalid {
    /// The stable reason string sent to devices and used as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Invalid::IdEmpty => "id_empty",
            Invalid::IdTooLong => "id_too_long",
            Invalid::IdControl => "id_invalid",
            Invalid::Lat => "lat_out_of_range",
            Invalid::Lon => "lon_out_of_range",
            Invalid::Measurement => "measurement_out_of_range",
            Invalid::AttrsTooLarge => "attrs_too_large",
        }
    }
}

/// A device id that passed [`validate_device_id`]: what crosses module boundaries once an id
/// came from a URL, a subscription or a token (the stored record keeps a plain `String`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Box<str>);

impl DeviceId {
    /// Validates `id`.
    pub fn parse(id: &str) -> Result<DeviceId, Invalid> {
        validate_device_id(id)?;
        Ok(DeviceId(id.into()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for DeviceId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a device id (also used for ids from tokens and URLs).
pub fn validate_device_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::IdEmpty);
    }
    if id.len() > DEVICE_ID_BYTES_MAX {
        return Err(Invalid::IdTooLong);
    }
    if id.chars().any(char::is_control) {
        return Err(Invalid::IdControl);
    }
    Ok(())
}

fn check_lat_lon(lat: f64, lon: f64) -> Result<(), Invalid> {
    if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
        return Err(Invalid::Lat);
    }
    if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
        return Err(Invalid::Lon);
    }
    Ok(())
}

fn check_measurements(
    alt: Option<f32>,
    speed: Option<f32>,
    heading: Option<f32>,
    acc: Option<f32>,
) -> Result<(), Invalid> {
    let finite = |v: Option<f32>| v.is_none_or(f32::is_finite);
    let non_negative = |v: Option<f32>| v.is_none_or(|x| x >= 0.0);
    let heading_ok = heading.is_none_or(|h| (0.0..360.0).contains(&h));
    if finite(alt)
        && finite(speed)
        && finite(acc)
        && non_negative(speed)
        && non_negative(acc)
        && heading_ok
    {
        Ok(())
    } else {
        Err(Invalid::Measurement)
    }
}

impl Heartbeat {
    /// Checks every field rule. Timestamps are not range-checked here: that policy belongs to the
    /// ingest path (see `proto`), and the log stores whatever the ingest path accepted.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_device_id(&self.device_id)?;
        check_lat_lon(self.lat, self.lon)?;
        check_measurements(self.alt_m, self.speed_mps, self.heading_deg, self.acc_m)?;
        if self.attrs.len() > ATTRS_BYTES_MAX {
            return Err(Invalid::AttrsTooLarge);
        }
        Ok(())
    }

    /// Resets every field for reuse as a parse scratch, keeping the allocations.
    pub fn clear(&mut self) {
        self.device_id.clear();
        self.attrs.clear();
        self.lat = 0.0;
        self.lon = 0.0;
        self.ts_ms = 0;
        self.received_ms = 0;
        self.alt_m = None;
        self.speed_mps = None;
        self.heading_deg = None;
        self.acc_m = None;
    }

    /// Serializes into `out` (cleared first), reusing its allocation. The bytes are the rkyv
    /// archive whose root is at the end, as [`access`] expects.
    pub fn encode_into(&self, out: &mut rkyv::util::AlignedVec) {
        out.clear();
        let taken = std::mem::take(out);
        *out = rkyv::api::high::to_bytes_in::<_, rancor::Error>(self, taken)
            .expect("serializing a heartbeat into memory cannot fail");
    }
}

impl ArchivedHeartbeat {
    /// The same rules as [`Heartbeat::validate`], on the archived form (used by recovery and reads).
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_device_id(self.device_id.as_str())?;
        check_lat_lon(self.lat.to_native(), self.lon.to_native())?;
        let opt = |v: &rkyv::option::ArchivedOption<rkyv::rend::f32_le>| {
            v.as_ref().map(|x| x.to_native())
        };
        check_measurements(
            opt(&self.alt_m),
            opt(&self.speed_mps),
            opt(&self.heading_deg),
            opt(&self.acc_m),
        )?;
        if self.attrs.len() > ATTRS_BYTES_MAX {
            return Err(Invalid::AttrsTooLarge);
        }
        Ok(())
    }

    /// Copies into an owned heartbeat.
    pub fn to_owned_heartbeat(&self) -> Heartbeat {
        rkyv::deserialize::<Heartbeat, rancor::Error>(self)
            .expect("deserializing a validated archive cannot fail")
    }
}

/// Reads an archived heartbeat from `bytes` with full bytecheck validation plus [`ArchivedHeartbeat::validate`].
/// `bytes` must start at an 8-byte aligned address (log entries guarantee it).
pub fn access(bytes: &[u8]) -> Option<&ArchivedHeartbeat> {
    let hb = rkyv::access::<ArchivedHeartbeat, rancor::Failure>(bytes).ok()?;
    hb.validate().ok()?;
    Some(hb)
}

/// A device-scoped sequence number (issue 18): `epoch` is bumped by the device when it loses its
/// counter, `seq` increases across connections within an epoch. Ordered as the pair
/// `(epoch, seq)`. Stored beside the rkyv payload of a log entry (a trailer, see
/// [`DEVICE_SEQ_TRAILER_BYTES`] and `shards/README.md`, "Entries"), never inside the archived
/// [`Heartbeat`], so entries written before it existed still decode zero-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DeviceSeq {
    /// The device's counter generation (0 ..= u32::MAX).
    pub epoch: u32,
    /// The sequence number within the epoch (1 ..= 2^53-1 on the wire).
    pub seq: u64,
}

/// Bytes of the device-sequence trailer after an entry's rkyv payload: epoch u32, zero u32, seq u64.
pub const DEVICE_SEQ_TRAILER_BYTES: usize = 16;

/// Entry flag (entry header bytes 28..32): the payload ends with a device-sequence trailer.
pub const ENTRY_FLAG_DEVICE_SEQ: u32 = 1;
/// Every entry flag this build knows; an entry with any other bit set is refused.
pub const ENTRY_FLAGS_KNOWN: u32 = ENTRY_FLAG_DEVICE_SEQ;

impl DeviceSeq {
    /// The trailer bytes appended after the rkyv payload.
    pub fn trailer(self) -> [u8; DEVICE_SEQ_TRAILER_BYTES] {
        let mut b = [0u8; DEVICE_SEQ_TRAILER_BYTES];
        b[0..4].copy_from_slice(&self.epoch.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Parses a trailer; `None` if its reserved bytes are not zero.
    pub fn from_trailer(b: &[u8]) -> Option<DeviceSeq> {
        if b.len() != DEVICE_SEQ_TRAILER_BYTES || b[4..8] != [0; 4] {
            return None;
        }
        Some(DeviceSeq {
            epoch: u32::from_le_bytes(b[0..4].try_into().ok()?),
            seq: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
    }
}

/// Reads an entry payload written with entry `flags`: the archived heartbeat (validated as by
/// [`access`]) and, when [`ENTRY_FLAG_DEVICE_SEQ`] is set, the device sequence of its trailer.
/// `None` for unknown flags, a bad trailer or a payload that fails validation.
pub fn access_payload(
    payload: &[u8],
    flags: u32,
) -> Option<(&ArchivedHeartbeat, Option<DeviceSeq>)> {
    if flags & !ENTRY_FLAGS_KNOWN != 0 {
        return None;
    }
    if flags & ENTRY_FLAG_DEVICE_SEQ == 0 {
        return access(payload).map(|hb| (hb, None));
    }
    let split = payload.len().checked_sub(DEVICE_SEQ_TRAILER_BYTES)?;
    let dseq = DeviceSeq::from_trailer(&payload[split..])?;
    access(&payload[..split]).map(|hb| (hb, Some(dseq)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Heartbeat {
        Heartbeat {
            device_id: "truck-0042".into(),
            lat: 52.52,
            lon: 13.405,
            ts_ms: 1_732_200_000_123,
            received_ms: 1_732_200_000_200,
            alt_m: Some(34.5),
            speed_mps: None,
            heading_deg: Some(271.0),
            acc_m: Some(4.0),
            attrs: br#"{"fuel":0.5}"#.to_vec(),
        }
    }

    #[test]
    fn round_trips_through_rkyv_with_validation() {
        // Encodes a full heartbeat, reads it back zero-copy, and compares every field.
        let hb = sample();
        let mut buf = rkyv::util::AlignedVec::new();
        hb.encode_into(&mut buf);
        let archived = access(&buf).expect("valid archive");
        assert_eq!(archived.to_owned_heartbeat(), hb);
    }

    #[test]
    fn refuses_out_of_range_fields() {
        // Each bad field maps to its own stable reason.
        let mut hb = sample();
        hb.lat = f64::NAN;
        assert_eq!(hb.validate(), Err(Invalid::Lat));
        hb.lat = 90.0;
        hb.lon = 180.5;
        assert_eq!(hb.validate(), Err(Invalid::Lon));
        hb.lon = -180.0;
        hb.heading_deg = Some(360.0);
        assert_eq!(hb.validate(), Err(Invalid::Measurement));
        hb.heading_deg = None;
        hb.device_id = "x".repeat(65);
        assert_eq!(hb.validate(), Err(Invalid::IdTooLong));
        hb.device_id.clear();
        assert_eq!(hb.validate(), Err(Invalid::IdEmpty));
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        // Random bytes must never validate as a heartbeat.
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        buf.extend_from_slice(
            &(0..200u32)
                .map(|i| (i * 37 % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        assert!(access(&buf).is_none());
    }

    #[test]
    fn device_seq_trailer_round_trips_and_old_payloads_still_decode() {
        // A payload without the flag (every entry written before device sequences) decodes as
        // before; with the flag the trailer comes back exactly; a damaged trailer or an unknown
        // flag bit is refused.
        let hb = sample();
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        buf.extend_from_slice(&{
            let mut b = rkyv::util::AlignedVec::new();
            hb.encode_into(&mut b);
            b.to_vec()
        });
        let (old, none) = access_payload(&buf, 0).expect("flagless payload");
        assert_eq!(old.to_owned_heartbeat(), hb);
        assert_eq!(none, None);
        let d = DeviceSeq {
            epoch: 7,
            seq: (1 << 53) - 1,
        };
        buf.extend_from_slice(&d.trailer());
        let (got, dseq) = access_payload(&buf, ENTRY_FLAG_DEVICE_SEQ).expect("trailer");
        assert_eq!(got.to_owned_heartbeat(), hb);
        assert_eq!(dseq, Some(d));
        assert!(access_payload(&buf, 2).is_none(), "unknown flag");
        let n = buf.len();
        buf[n - 12] = 1; // reserved trailer byte
        assert!(access_payload(&buf, ENTRY_FLAG_DEVICE_SEQ).is_none());
        assert!(access_payload(&buf[..8], ENTRY_FLAG_DEVICE_SEQ).is_none());
        assert!(DeviceSeq { epoch: 1, seq: 1 } > DeviceSeq { epoch: 0, seq: 99 });
    }
}
