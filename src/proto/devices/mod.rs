//! Pure parsers for the phone and tracker apps' own formats, mapped onto the [`Heartbeat`]
//! record: OsmAnd / Traccar Client query or form parameters and Traccar Client's JSON body
//! ([`osmand`]), OwnTracks `_type:"location"` JSON ([`owntracks`], also the MQTT payload on
//! `owntracks/<user>/<device>`). They do no I/O and know nothing of tokens or HTTP: the caller
//! passes the bytes and the receive time, checks the device id against the token with
//! [`super::resolve_device_id`], stores, and answers 200 only once durable.
//!
//! Mapping: `lat`/`lon`, device time in ms, altitude (m), speed (m/s, converted from each app's
//! unit), heading (degrees), accuracy (m) fill the record's fields; the app's extra readings
//! (battery, hdop, OwnTracks `tid`, ...) go into `attrs` as a compact JSON object, exactly as a
//! WebSocket heartbeat's `attrs`. Negative "unknown" markers (Traccar's `-1`) read as absent.
//!
//! Invariant: parsing never panics on any input; a heartbeat is returned only if it passed the
//! timestamp window and [`Heartbeat::validate`]; every refusal is a [`DeviceError`] whose
//! [`DeviceError::reason`] is a stable string (HTTP 400 JSON body, MQTT reason string).

pub mod osmand;
pub mod owntracks;

use super::TsWindow;
use crate::limits::ATTRS_BYTES_MAX;
use crate::record::{Heartbeat, Invalid};

/// Why a device request was refused (a permanent error: the app must not retry it as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A required parameter or member is absent (`missing:<name>`).
    #[error("missing {0}")]
    Missing(&'static str),
    /// A parameter or member is not a number / not of the expected type (`bad_value:<name>`).
    #[error("bad value for {0}")]
    BadValue(&'static str),
    /// A timestamp in none of the accepted forms (`bad_timestamp`).
    #[error("timestamp in no accepted form")]
    BadTimestamp,
    /// The device time lies outside the accepted window (`ts_out_of_range`).
    #[error("timestamp outside the accepted window")]
    TsOutOfRange,
    /// The body is not valid JSON (`invalid_json`).
    #[error("invalid JSON")]
    InvalidJson,
    /// The JSON is not an object (`not_an_object`).
    #[error("JSON is not an object")]
    NotAnObject,
    /// A parameter is not valid percent-encoded UTF-8 (`bad_encoding`).
    #[error("bad percent encoding")]
    BadEncoding,
    /// The request is larger than the parsers' bound (`too_large`).
    #[error("request too large")]
    TooLarge,
    /// An OwnTracks `_type:"encrypted"` message: geobeat holds no key to read it, and
    /// acknowledging it would drop the location it carries (`encrypted_unsupported`).
    #[error("encrypted payloads are not supported")]
    Encrypted,
    /// A record rule failed (`lat_out_of_range`, `id_empty`, ...).
    #[error("{}", .0.reason())]
    Invalid(Invalid),
}

macro_rules! named {
    ($prefix:literal, $name:expr) => {
        match $name {
            "id" => concat!($prefix, "id"),
            "lat" => concat!($prefix, "lat"),
            "lon" => concat!($prefix, "lon"),
            "timestamp" => concat!($prefix, "timestamp"),
            "tst" => concat!($prefix, "tst"),
            "location" => concat!($prefix, "location"),
            "coords" => concat!($prefix, "coords"),
            "_type" => concat!($prefix, "_type"),
            "speed" => concat!($prefix, "speed"),
            "bearing" => concat!($prefix, "bearing"),
            "altitude" => concat!($prefix, "altitude"),
            "accuracy" => concat!($prefix, "accuracy"),
            "batt" => concat!($prefix, "batt"),
            "hdop" => concat!($prefix, "hdop"),
            "acc" => concat!($prefix, "acc"),
            "alt" => concat!($prefix, "alt"),
            "vel" => concat!($prefix, "vel"),
            "cog" => concat!($prefix, "cog"),
            "vac" => concat!($prefix, "vac"),
            "speed_unit" => concat!($prefix, "speed_unit"),
            "charge" => concat!($prefix, "charge"),
            "valid" => concat!($prefix, "valid"),
            "user" => concat!($prefix, "user"),
            _ => $prefix,
        }
    };
}

impl DeviceError {
    /// The stable reason string.
    pub fn reason(self) -> &'static str {
        match self {
            DeviceError::Missing(n) => named!("missing:", n),
            DeviceError::BadValue(n) => named!("bad_value:", n),
            DeviceError::BadTimestamp => "bad_timestamp",
            DeviceError::TsOutOfRange => "ts_out_of_range",
            DeviceError::InvalidJson => "invalid_json",
            DeviceError::NotAnObject => "not_an_object",
            DeviceError::BadEncoding => "bad_encoding",
            DeviceError::TooLarge => "too_large",
            DeviceError::Encrypted => "encrypted_unsupported",
            DeviceError::Invalid(i) => i.reason(),
        }
    }
}

/// Builds the compact JSON `attrs` object of extra readings (numbers and short strings).
#[derive(Debug, Default)]
pub(crate) struct Attrs {
    buf: String,
}

impl Attrs {
    pub(crate) fn number(&mut self, key: &str, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.key(key);
        // Integers print without a fraction (battery 85, not 85.0).
        if v.fract() == 0.0 && v.abs() < 1e15 {
            self.buf.push_str(itoa::Buffer::new().format(v as i64));
        } else {
            self.buf.push_str(
                &serde_json::Number::from_f64(v).map_or_else(String::new, |n| n.to_string()),
            );
        }
    }

    pub(crate) fn string(&mut self, key: &str, v: &str) {
        self.key(key);
        self.buf.push_str(&serde_json::Value::from(v).to_string());
    }

    pub(crate) fn boolean(&mut self, key: &str, v: bool) {
        self.key(key);
        self.buf.push_str(if v { "true" } else { "false" });
    }

    fn key(&mut self, key: &str) {
        self.buf.push(if self.buf.is_empty() { '{' } else { ',' });
        self.buf.push('"');
        self.buf.push_str(key);
        self.buf.push_str("\":");
    }

    /// Writes the object into `out` (empty when there were no readings).
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) {
        out.clear();
        if !self.buf.is_empty() {
            self.buf.push('}');
            out.extend_from_slice(self.buf.as_bytes());
        }
    }
}

/// The last steps every parser shares: the timestamp window, the receive stamp, validation.
pub(crate) fn finish(
    hb: &mut Heartbeat,
    received_ms: i64,
    window: &TsWindow,
) -> Result<(), DeviceError> {
    if !window.contains(hb.ts_ms, received_ms) {
        return Err(DeviceError::TsOutOfRange);
    }
    hb.received_ms = received_ms;
    if hb.attrs.len() > ATTRS_BYTES_MAX {
        return Err(DeviceError::Invalid(Invalid::AttrsTooLarge));
    }
    hb.validate().map_err(DeviceError::Invalid)
}

/// An optional measurement: absent, negative (the apps' "unknown") or non-finite reads as `None`.
pub(crate) fn measurement(v: Option<f64>) -> Option<f32> {
    v.filter(|x| x.is_finite() && *x >= 0.0).map(|x| x as f32)
}

/// Parses a device timestamp: integer or decimal seconds, milliseconds (values of 10^11 and
/// above: 10^11 s is the year 5138, 10^11 ms is 1973), ISO 8601 (`2024-05-01T12:00:00Z`,
/// fraction and `±hh:mm` offset allowed) or `yyyy-MM-dd HH:mm:ss` (UTC). Returns ms since the epoch.
pub fn parse_timestamp(s: &str) -> Result<i64, DeviceError> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        if !v.is_finite() || v < 0.0 {
            return Err(DeviceError::BadTimestamp);
        }
        let ms = if v >= 1e11 { v } else { v * 1000.0 };
        if ms > 1e15 {
            return Err(DeviceError::BadTimestamp);
        }
        return Ok(ms as i64);
    }
    parse_datetime(s.as_bytes()).ok_or(DeviceError::BadTimestamp)
}

fn parse_datetime(b: &[u8]) -> Option<i64> {
    fn num(b: &[u8], at: usize, len: usize) -> Option<i64> {
        let d = b.get(at..at + len)?;
        d.iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    }
    let (y, mo, d) = (num(b, 0, 4)?, num(b, 5, 2)?, num(b, 8, 2)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let (h, mi, s) = (num(b, 11, 2)?, num(b, 14, 2)?, num(b, 17, 2)?);
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                frac_ms = frac_ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..3 {
            frac_ms *= 10;
        }
    }
    let offset_min = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = num(b, i + 1, 2)?;
            let (om, end) = if b.get(i + 3) == Some(&b':') {
                (num(b, i + 4, 2)?, i + 6)
            } else {
                (num(b, i + 3, 2)?, i + 5)
            };
            if end != b.len() || oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if sign == b'+' {
                m
            } else {
                -m
            }
        }
        Some(_) => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_every_form() {
        // The same instant written in each accepted form gives the same ms.
        let ms = 1_714_564_800_000; // 2024-05-01T12:00:00Z
        for s in [
            "1714564800",
            "1714564800000",
            "2024-05-01T12:00:00Z",
            "2024-05-01T12:00:00.000Z",
            "2024-05-01 12:00:00",
            "2024-05-01T14:00:00+02:00",
            "2024-05-01T07:00:00-0500",
        ] {
            assert_eq!(parse_timestamp(s), Ok(ms), "{s}");
        }
        assert_eq!(parse_timestamp("1714564800.5"), Ok(ms + 500));
        assert_eq!(parse_timestamp("2024-05-01T12:00:00.25Z"), Ok(ms + 250));
        for bad in [
            "",
            "yesterday",
            "-5",
            "2024-13-01T00:00:00Z",
            "2024-05-01T12:00:00Zx",
            "2024-05-01",
            "NaN",
            "1e300",
        ] {
            assert_eq!(
                parse_timestamp(bad),
                Err(DeviceError::BadTimestamp),
                "{bad}"
            );
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn reasons_are_stable() {
        // Reasons compose the field name; unknown names fall back to the bare prefix.
        assert_eq!(DeviceError::Missing("lat").reason(), "missing:lat");
        assert_eq!(DeviceError::BadValue("speed").reason(), "bad_value:speed");
        assert_eq!(
            DeviceError::Invalid(Invalid::Lat).reason(),
            "lat_out_of_range"
        );
    }

    proptest::proptest! {
        #[test]
        fn timestamps_never_panic(s in "\\PC{0,40}") {
            let _ = parse_timestamp(&s);
        }
    }
}
