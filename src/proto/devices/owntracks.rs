//! OwnTracks JSON (HTTP mode body and MQTT payload): `_type:"location"` objects with `lat, lon,
//! tst` (seconds) and optional `acc, alt, vel` (km/h), `cog`, `batt`, `bs`, `tid`, `conn`, `t`.
//! Other `_type`s (`transition`, `waypoint`, `card`, `lwt`, ...) and empty bodies are
//! [`Parsed::Ignored`]: the caller acknowledges them without storing. `_type:"encrypted"` is
//! refused ([`DeviceError::Encrypted`]): it may carry a location, which acknowledging would drop. It owns the field mapping, not the device id:
//! the caller passes the id (HTTP: the Basic-auth user; MQTT: the `<user>` topic level).
//!
//! Mapping: `acc`→accuracy, `alt`→altitude, `vel` km/h→m/s, `cog`→heading; `batt`, `bs`
//! (battery status), `tid`, `conn` (connectivity), `t` (trigger) and `vac` go into `attrs`. Invariant: as the parent module's.

use super::{finish, measurement, Attrs, DeviceError};
use crate::limits::DEVICE_PARAMS_BYTES_MAX;
use crate::proto::TsWindow;
use crate::record::Heartbeat;

/// What one OwnTracks message turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A location: `out` holds a valid heartbeat.
    Location,
    /// Not a location (or empty): acknowledge, store nothing.
    Ignored,
}

/// Reads an optional number member; any other JSON type is `bad_value:<name>`.
fn num(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &'static str,
) -> Result<Option<f64>, DeviceError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or(DeviceError::BadValue(name)),
    }
}

/// Parses one OwnTracks message for device `device_id` into `out` (cleared first).
pub fn parse(
    body: &[u8],
    device_id: &str,
    received_ms: i64,
    window: &TsWindow,
    out: &mut Heartbeat,
) -> Result<Parsed, DeviceError> {
    out.clear();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Parsed::Ignored);
    }
    if body.len() > DEVICE_PARAMS_BYTES_MAX {
        return Err(DeviceError::TooLarge);
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| DeviceError::InvalidJson)?;
    let Some(obj) = value.as_object() else {
        return Err(DeviceError::NotAnObject);
    };
    match obj.get("_type") {
        Some(serde_json::Value::String(t)) if t == "location" => {}
        Some(serde_json::Value::String(t)) if t == "encrypted" => {
            return Err(DeviceError::Encrypted)
        }
        Some(serde_json::Value::String(_)) => return Ok(Parsed::Ignored),
        Some(_) => return Err(DeviceError::BadValue("_type")),
        None => return Err(DeviceError::Missing("_type")),
    }
    out.device_id.push_str(device_id);
    out.lat = num(obj, "lat")?.ok_or(DeviceError::Missing("lat"))?;
    out.lon = num(obj, "lon")?.ok_or(DeviceError::Missing("lon"))?;
    let tst = num(obj, "tst")?.ok_or(DeviceError::Missing("tst"))?;
    if !(0.0..1e11).contains(&tst) {
        return Err(DeviceError::BadValue("tst"));
    }
    out.ts_ms = (tst * 1000.0) as i64;
    out.acc_m = measurement(num(obj, "acc")?);
    out.alt_m = num(obj, "alt")?.map(|a| a as f32);
    out.speed_mps = measurement(num(obj, "vel")?.map(|v| v / 3.6));
    out.heading_deg = measurement(num(obj, "cog")?).filter(|h| *h < 360.0);
    let mut attrs = Attrs::default();
    for key in ["batt", "bs", "vac"] {
        if let Some(v) = num(obj, key)? {
            attrs.number(key, v);
        }
    }
    for key in ["tid", "conn", "t"] {
        // Short codes only: a long string would crowd the attrs bound.
        if let Some(serde_json::Value::String(v)) = obj.get(key) {
            if v.len() <= 16 {
                attrs.string(key, v);
            }
        }
    }
    attrs.finish(&mut out.attrs);
    finish(out, received_ms, window)?;
    Ok(Parsed::Location)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_714_564_800_000;

    fn parse_one(body: &str) -> Result<(Parsed, Heartbeat), DeviceError> {
        let mut hb = Heartbeat::default();
        parse(body.as_bytes(), "jane", NOW, &TsWindow::default(), &mut hb).map(|p| (p, hb))
    }

    #[test]
    fn documented_location_payload() {
        // The location example of OwnTracks' JSON documentation (booklet "JSON" page), with tst moved to NOW.
        let body = r#"{"_type":"location","acc":13,"alt":271,"batt":40,"conn":"w","lat":48.856826,"lon":2.292713,"t":"u","tid":"JJ","tst":1714564800,"vac":26,"vel":36,"cog":90,"BSSID":"b0:f2:8:45:94:33","SSID":"Home"}"#;
        let (p, hb) = parse_one(body).unwrap();
        assert_eq!(p, Parsed::Location);
        assert_eq!(
            (hb.device_id.as_str(), hb.lat, hb.lon, hb.ts_ms),
            ("jane", 48.856826, 2.292713, NOW)
        );
        assert_eq!(
            (hb.acc_m, hb.alt_m, hb.speed_mps, hb.heading_deg),
            (Some(13.0), Some(271.0), Some(10.0), Some(90.0))
        );
        assert_eq!(
            hb.attrs,
            br#"{"batt":40,"vac":26,"tid":"JJ","conn":"w","t":"u"}"#
        );
    }

    #[test]
    fn other_types_and_empty_are_ignored() {
        // transition / lwt / waypoint messages and empty (retain-clearing) payloads store nothing.
        for body in [
            "",
            "  ",
            r#"{"_type":"transition","event":"enter","tst":1}"#,
            r#"{"_type":"lwt","tst":1}"#,
        ] {
            assert_eq!(parse_one(body).unwrap().0, Parsed::Ignored, "{body}");
        }
        assert_eq!(
            parse_one(r#"{"lat":1}"#).unwrap_err().reason(),
            "missing:_type"
        );
        assert_eq!(
            parse_one(r#"{"_type":"location","lat":1,"lon":2}"#)
                .unwrap_err()
                .reason(),
            "missing:tst"
        );
        assert_eq!(
            parse_one(r#"{"_type":"location","lat":"1","lon":2,"tst":1}"#)
                .unwrap_err()
                .reason(),
            "bad_value:lat"
        );
        assert_eq!(
            parse_one(r#"{"_type":"location","lat":1,"lon":2,"tst":5}"#).unwrap_err(),
            DeviceError::TsOutOfRange
        );
        assert_eq!(
            parse_one(r#"{"_type":"encrypted","data":"c2VjcmV0"}"#).unwrap_err(),
            DeviceError::Encrypted,
            "an encrypted location must not be acknowledged and dropped"
        );
        assert_eq!(parse_one("[]").unwrap_err(), DeviceError::NotAnObject);
        assert_eq!(parse_one("{x").unwrap_err(), DeviceError::InvalidJson);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let mut hb = Heartbeat::default();
            let _ = parse(&b, "x", NOW, &TsWindow::default(), &mut hb);
        }
    }
}
