//! OsmAnd protocol (Traccar Client, OsmAnd's online tracking, GPSLogger's custom URL): query or
//! form parameters `id|deviceid, lat, lon` (or `location=lat,lon`), `timestamp, speed,
//! bearing|heading, altitude, accuracy, batt, hdop, charge, valid`, and Traccar Client ≥ 9's JSON
//! body. It owns the parameter names and units; it does not check the id against a token.
//!
//! Units: `speed` is in knots (the OsmAnd protocol's unit as Traccar's server decodes it, and
//! what Traccar Client up to 8.x sends), converted to m/s, unless `speed_unit` says `mps` (the
//! OsmAnd app's `{5}` and GPSLogger's `%SPD` are m/s) or `kmh`; the JSON body's `coords.speed` is
//! already m/s. `batt` (percent), `hdop`, `charge` and `valid=false` go into `attrs`; the JSON
//! body's `battery.level` (0..1) becomes `batt` in percent and `battery.is_charging` becomes
//! `charge`. An optional parameter sent empty (GPSLogger's `%HDOP` without a fix) reads as
//! absent, a heading of 360° as 0°. Unknown parameters are ignored (apps add their own).
//! Invariant: as the parent module's.

use std::borrow::Cow;

use serde::Deserialize;

use super::{finish, measurement, parse_timestamp, Attrs, DeviceError};
use crate::limits::DEVICE_PARAMS_BYTES_MAX;
use crate::proto::TsWindow;
use crate::record::Heartbeat;

/// m/s per knot.
const MPS_PER_KNOT: f64 = 0.514_444;

/// Speed units the `speed_unit` parameter may name (the protocol's default is knots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpeedUnit {
    Knots,
    MetresPerSecond,
    KilometresPerHour,
}

impl SpeedUnit {
    fn to_mps(self, v: f64) -> f64 {
        match self {
            SpeedUnit::Knots => v * MPS_PER_KNOT,
            SpeedUnit::MetresPerSecond => v,
            SpeedUnit::KilometresPerHour => v / 3.6,
        }
    }
}

/// Parses OsmAnd parameters (`a=1&b=2`, the query string or an `application/x-www-form-urlencoded`
/// body) into `out` (cleared first), stamped with `received_ms`.
pub fn parse_params(
    params: &str,
    received_ms: i64,
    window: &TsWindow,
    out: &mut Heartbeat,
) -> Result<(), DeviceError> {
    if params.len() > DEVICE_PARAMS_BYTES_MAX {
        return Err(DeviceError::TooLarge);
    }
    out.clear();
    let (mut lat, mut lon, mut ts, mut id) = (None, None, None, None);
    let (mut speed, mut unit) = (None, SpeedUnit::Knots);
    let mut attrs = Attrs::default();
    for pair in params.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = unescape(k)?;
        let v = unescape(v)?;
        let v = v.trim();
        let num = |name: &'static str| -> Result<f64, DeviceError> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or(DeviceError::BadValue(name))
        };
        let flag = |name: &'static str| -> Result<bool, DeviceError> {
            match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(DeviceError::BadValue(name)),
            }
        };
        let key = &*k;
        if v.is_empty() && !matches!(key, "id" | "deviceid" | "lat" | "lon" | "location") {
            continue; // an optional reading the app had no value for
        }
        match key {
            "id" | "deviceid" => id = Some(v.to_owned()),
            "lat" => lat = Some(num("lat")?),
            "lon" => lon = Some(num("lon")?),
            "location" => {
                let (a, b) = v.split_once(',').ok_or(DeviceError::BadValue("location"))?;
                let parse = |x: &str| x.trim().parse::<f64>().ok().filter(|x| x.is_finite());
                lat = Some(parse(a).ok_or(DeviceError::BadValue("location"))?);
                lon = Some(parse(b).ok_or(DeviceError::BadValue("location"))?);
            }
            "timestamp" => ts = Some(parse_timestamp(v)?),
            "speed" => speed = Some(num("speed")?),
            "speed_unit" => {
                unit = match v {
                    "kn" | "knots" => SpeedUnit::Knots,
                    "mps" | "m/s" => SpeedUnit::MetresPerSecond,
                    "kmh" | "km/h" => SpeedUnit::KilometresPerHour,
                    _ => return Err(DeviceError::BadValue("speed_unit")),
                }
            }
            "bearing" | "heading" => {
                out.heading_deg = measurement(Some(num("bearing")?)).map(|h| h % 360.0)
            }
            "altitude" => out.alt_m = Some(num("altitude")? as f32),
            "accuracy" => out.acc_m = measurement(Some(num("accuracy")?)),
            "batt" => attrs.number("batt", num("batt")?),
            "hdop" => attrs.number("hdop", num("hdop")?),
            "charge" => attrs.boolean("charge", flag("charge")?),
            // Traccar's flag for a fix the device itself marks invalid; kept when false.
            "valid" if !flag("valid")? => attrs.boolean("valid", false),
            _ => {}
        }
    }
    out.device_id = id.ok_or(DeviceError::Missing("id"))?;
    out.lat = lat.ok_or(DeviceError::Missing("lat"))?;
    out.lon = lon.ok_or(DeviceError::Missing("lon"))?;
    // -1 (and any negative) is the apps' "unknown".
    out.speed_mps = measurement(speed.map(|s| unit.to_mps(s)));
    // Without a timestamp the fix is taken as of now (as Traccar's server does).
    out.ts_ms = ts.unwrap_or(received_ms);
    attrs.finish(&mut out.attrs);
    finish(out, received_ms, window)
}

/// Percent-decodes one form component (`+` is a space).
fn unescape(s: &str) -> Result<Cow<'_, str>, DeviceError> {
    if !s.contains(['%', '+']) {
        return Ok(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or(DeviceError::BadEncoding)?;
                let hex = std::str::from_utf8(hex).map_err(|_| DeviceError::BadEncoding)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| DeviceError::BadEncoding)?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| DeviceError::BadEncoding)
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    location: Option<Location<'a>>,
    #[serde(borrow)]
    device_id: Option<IdValue<'a>>,
}

/// Traccar Client sends the id as a string; accept a number too.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdValue<'a> {
    Str(Cow<'a, str>),
    Num(serde_json::Number),
}

#[derive(Deserialize)]
struct Location<'a> {
    #[serde(borrow)]
    timestamp: Option<TsValue<'a>>,
    coords: Option<Coords>,
    battery: Option<Battery>,
    is_moving: Option<bool>,
    odometer: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TsValue<'a> {
    Num(f64),
    Str(Cow<'a, str>),
}

#[derive(Deserialize)]
struct Coords {
    latitude: Option<f64>,
    longitude: Option<f64>,
    accuracy: Option<f64>,
    speed: Option<f64>,
    heading: Option<f64>,
    altitude: Option<f64>,
}

#[derive(Deserialize)]
struct Battery {
    level: Option<f64>,
    is_charging: Option<bool>,
}

/// Parses Traccar Client ≥ 9's JSON body (`{"location":{"timestamp":..,"coords":{..},
/// "battery":{..}},"device_id":..}`) into `out` (cleared first).
pub fn parse_traccar_json(
    body: &[u8],
    received_ms: i64,
    window: &TsWindow,
    out: &mut Heartbeat,
) -> Result<(), DeviceError> {
    if body.len() > DEVICE_PARAMS_BYTES_MAX {
        return Err(DeviceError::TooLarge);
    }
    out.clear();
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| DeviceError::InvalidJson)?;
    if !value.is_object() {
        return Err(DeviceError::NotAnObject);
    }
    let b: Body<'_> = serde_json::from_slice(body).map_err(|_| DeviceError::InvalidJson)?;
    out.device_id = match b.device_id.ok_or(DeviceError::Missing("id"))? {
        IdValue::Str(s) => s.into_owned(),
        IdValue::Num(n) => n.to_string(),
    };
    let loc = b.location.ok_or(DeviceError::Missing("location"))?;
    let c = loc.coords.ok_or(DeviceError::Missing("coords"))?;
    out.lat = c.latitude.ok_or(DeviceError::Missing("lat"))?;
    out.lon = c.longitude.ok_or(DeviceError::Missing("lon"))?;
    out.ts_ms = match loc.timestamp.ok_or(DeviceError::Missing("timestamp"))? {
        TsValue::Num(v) => parse_timestamp(&v.to_string())?,
        TsValue::Str(s) => parse_timestamp(&s)?,
    };
    out.acc_m = measurement(c.accuracy);
    out.speed_mps = measurement(c.speed);
    out.heading_deg = measurement(c.heading).filter(|h| *h < 360.0);
    out.alt_m = c.altitude.filter(|a| a.is_finite()).map(|a| a as f32);
    let mut attrs = Attrs::default();
    if let Some(bat) = loc.battery {
        if let Some(level) = bat.level.filter(|l| (0.0..=1.0).contains(l)) {
            attrs.number("batt", (level * 100.0).round());
        }
        if let Some(ch) = bat.is_charging {
            attrs.boolean("charge", ch);
        }
    }
    if let Some(m) = loc.is_moving {
        attrs.boolean("motion", m);
    }
    if let Some(o) = loc.odometer {
        attrs.number("odometer", o.round());
    }
    attrs.finish(&mut out.attrs);
    finish(out, received_ms, window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Invalid;

    const NOW: i64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z

    fn params(q: &str) -> Result<Heartbeat, DeviceError> {
        let mut hb = Heartbeat::default();
        parse_params(q, NOW + 5_000, &TsWindow::default(), &mut hb).map(|()| hb)
    }

    #[test]
    fn traccar_client_query() {
        // The query Traccar Client (OsmAnd protocol) sends, as in Traccar's OsmAnd documentation:
        // `?id=123456&lat={0}&lon={1}&timestamp={2}&hdop={3}&altitude={4}&speed={5}`.
        let hb = params("id=123456&lat=52.52&lon=13.405&timestamp=1714564800&hdop=1.5&altitude=34.5&speed=10&bearing=270&accuracy=8&batt=85").unwrap();
        assert_eq!(hb.device_id, "123456");
        assert_eq!((hb.lat, hb.lon, hb.ts_ms), (52.52, 13.405, NOW));
        assert_eq!(hb.received_ms, NOW + 5_000);
        assert_eq!(hb.alt_m, Some(34.5));
        assert!(
            (hb.speed_mps.unwrap() - 5.14444).abs() < 1e-4,
            "knots → m/s"
        );
        assert_eq!((hb.heading_deg, hb.acc_m), (Some(270.0), Some(8.0)));
        assert_eq!(hb.attrs, br#"{"hdop":1.5,"batt":85}"#);
    }

    #[test]
    fn gpslogger_template_and_encodings() {
        // GPSLogger's custom URL with %LAT etc. filled in; `deviceid` alias, ISO time, `+`/%20 spaces.
        let hb = params("deviceid=my%20phone&lat=-33.8688&lon=151.2093&timestamp=2024-05-01T12:00:00Z&speed=0&altitude=-3").unwrap();
        assert_eq!(hb.device_id, "my phone");
        assert_eq!(
            (hb.ts_ms, hb.alt_m, hb.speed_mps),
            (NOW, Some(-3.0), Some(0.0))
        );
        assert!(hb.attrs.is_empty());
        let hb = params("id=a&lat=1&lon=2&timestamp=2024-05-01+12:00:00").unwrap();
        assert_eq!(hb.ts_ms, NOW);
        let hb = params("id=a&lat=1&lon=2&timestamp=1714564800000&speed=-1&bearing=-1").unwrap();
        assert_eq!(
            (hb.ts_ms, hb.speed_mps, hb.heading_deg),
            (NOW, None, None),
            "-1 is unknown"
        );
    }

    #[test]
    fn bad_params_have_reasons() {
        // Each missing or malformed parameter is named; record rules and the window apply.
        assert_eq!(params("lat=1&lon=2").unwrap_err().reason(), "missing:id");
        assert_eq!(params("id=a&lon=2").unwrap_err().reason(), "missing:lat");
        assert_eq!(
            params("id=a&lat=x&lon=2").unwrap_err().reason(),
            "bad_value:lat"
        );
        assert_eq!(
            params("id=a&lat=1&lon=2&timestamp=soon").unwrap_err(),
            DeviceError::BadTimestamp
        );
        assert_eq!(
            params("id=a&lat=91&lon=2").unwrap_err(),
            DeviceError::Invalid(Invalid::Lat)
        );
        assert_eq!(
            params("id=&lat=1&lon=2").unwrap_err(),
            DeviceError::Invalid(Invalid::IdEmpty)
        );
        assert_eq!(
            params("id=a&lat=1&lon=2&timestamp=1000").unwrap_err(),
            DeviceError::TsOutOfRange
        );
        assert_eq!(
            params("id=%zz&lat=1&lon=2").unwrap_err(),
            DeviceError::BadEncoding
        );
        assert_eq!(
            params("id=%ff&lat=1&lon=2").unwrap_err(),
            DeviceError::BadEncoding
        );
    }

    #[test]
    fn what_each_app_sends() {
        // Traccar Client 8.x (ProtocolFormatter): seconds, knots, every reading present.
        let hb = params("id=4711&timestamp=1714564800&lat=52.52&lon=13.405&speed=19.438&bearing=360.0&altitude=34.0&accuracy=5.0&batt=77.0").unwrap();
        assert!((hb.speed_mps.unwrap() - 10.0).abs() < 1e-3, "knots");
        assert_eq!(hb.heading_deg, Some(0.0), "360 degrees is north");
        assert_eq!(hb.attrs, br#"{"batt":77}"#);
        // The OsmAnd app's template: ms timestamps, m/s speed declared with speed_unit.
        let hb = params("id=p1&speed_unit=mps&lat=52.52&lon=13.405&timestamp=1714564800000&hdop=3.0&altitude=40.1&speed=2.5&bearing=90.0").unwrap();
        assert_eq!((hb.ts_ms, hb.speed_mps), (NOW, Some(2.5)));
        let hb = params("id=p1&speed=36&speed_unit=kmh&lat=1&lon=2").unwrap();
        assert_eq!(hb.speed_mps, Some(10.0), "unit may follow the speed");
        // GPSLogger with no fix quality: %HDOP empty reads as absent, not as a bad value.
        let hb = params(
            "id=g&lat=1&lon=2&timestamp=2024-05-01T12:00:00.000Z&hdop=&acc=&charge=true&valid=0",
        )
        .unwrap();
        assert_eq!(hb.attrs, br#"{"charge":true,"valid":false}"#);
        // Traccar's `location=lat,lon` form.
        let hb = params("id=a&location=-33.5,151.25").unwrap();
        assert_eq!((hb.lat, hb.lon, hb.ts_ms), (-33.5, 151.25, NOW + 5_000));
        for (q, reason) in [
            ("id=a&location=1", "bad_value:location"),
            (
                "id=a&lat=1&lon=2&speed_unit=furlongs",
                "bad_value:speed_unit",
            ),
            ("id=a&lat=1&lon=2&charge=maybe", "bad_value:charge"),
            ("id=a&lat=&lon=2", "bad_value:lat"),
        ] {
            assert_eq!(params(q).unwrap_err().reason(), reason, "{q}");
        }
    }

    fn json(body: &str) -> Result<Heartbeat, DeviceError> {
        let mut hb = Heartbeat::default();
        parse_traccar_json(body.as_bytes(), NOW + 5_000, &TsWindow::default(), &mut hb).map(|()| hb)
    }

    #[test]
    fn traccar_client_json_body() {
        // The body Traccar Client 9 posts (its background-geolocation location object).
        let body = r#"{"location":{"timestamp":"2024-05-01T12:00:00.000Z","coords":{"latitude":52.52,"longitude":13.405,"accuracy":4.7,"speed":1.5,"heading":-1,"altitude":34},"is_moving":true,"odometer":1234.5,"event":"motionchange","battery":{"level":0.85,"is_charging":false},"activity":{"type":"walking"},"extras":{}},"device_id":"123456"}"#;
        let hb = json(body).unwrap();
        assert_eq!(
            (hb.device_id.as_str(), hb.lat, hb.lon, hb.ts_ms),
            ("123456", 52.52, 13.405, NOW)
        );
        assert_eq!(
            (hb.acc_m, hb.speed_mps, hb.heading_deg, hb.alt_m),
            (Some(4.7), Some(1.5), None, Some(34.0))
        );
        assert_eq!(
            hb.attrs,
            br#"{"batt":85,"charge":false,"motion":true,"odometer":1235}"#
        );
        assert_eq!(
            json(r#"{"device_id":"a"}"#).unwrap_err().reason(),
            "missing:location"
        );
        assert_eq!(
            json(r#"{"location":{"coords":{"latitude":1,"longitude":2}},"device_id":"a"}"#)
                .unwrap_err()
                .reason(),
            "missing:timestamp"
        );
        assert_eq!(json(r#"{"location":{"timestamp":1714564800000,"coords":{"latitude":1,"longitude":2}},"device_id":7}"#).unwrap().device_id, "7");
        assert_eq!(json("[1]").unwrap_err(), DeviceError::NotAnObject);
        assert_eq!(json("{").unwrap_err(), DeviceError::InvalidJson);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_params_never_panic(q in "[a-z=&%0-9.+:T-]{0,80}") {
            let _ = params(&q);
            let _ = params(&format!("id=x&lat=1&lon=2&{q}"));
        }

        #[test]
        fn arbitrary_json_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let mut hb = Heartbeat::default();
            let _ = parse_traccar_json(&b, NOW, &TsWindow::default(), &mut hb);
        }
    }
}
