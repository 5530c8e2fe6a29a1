//! How a device's location is written for clients: [`LastLocationBody`] (the body of
//! `GET /v1/devices/{id}`, the rows of area queries and history, and subscription events), fence
//! events, and the frame text of an event with its subscription name. It owns these JSON shapes
//! (docs/PROTOCOL.md, docs/openapi.json); it does not decide who receives them.
//!
//! Invariant: a heartbeat event is byte for byte the device body with `"sub"` in front, so a
//! client parses both with one type.

use serde::Serialize;

use crate::fence::Transition;
use crate::record::Heartbeat;

/// The last location of a device as returned by `GET /v1/devices/{id}`.
#[derive(Serialize)]
pub struct LastLocationBody {
    /// Device id.
    pub id: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Device time, ms since the Unix epoch.
    pub ts: i64,
    /// Server receive time, ms since the Unix epoch.
    pub received_at: i64,
    /// Altitude, m.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alt: Option<f32>,
    /// Speed, m/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<f32>,
    /// Heading, degrees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heading: Option<f32>,
    /// Accuracy, m.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f32>,
    /// Attributes as sent (a JSON object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attrs: Option<Box<serde_json::value::RawValue>>,
}

impl LastLocationBody {
    /// Renders a stored heartbeat.
    pub fn from_heartbeat(hb: &crate::record::Heartbeat) -> LastLocationBody {
        let attrs = (!hb.attrs.is_empty())
            .then(|| std::str::from_utf8(&hb.attrs).ok())
            .flatten()
            .and_then(|s| serde_json::value::RawValue::from_string(s.to_owned()).ok());
        LastLocationBody {
            id: hb.device_id.clone(),
            lat: hb.lat,
            lon: hb.lon,
            ts: hb.ts_ms,
            received_at: hb.received_ms,
            alt: hb.alt_m,
            speed: hb.speed_mps,
            heading: hb.heading_deg,
            acc: hb.acc_m,
            attrs,
        }
    }
}

/// The JSON object of a heartbeat event without `"sub"`: exactly the body of
/// `GET /v1/devices/{id}`.
pub fn render_heartbeat(hb: &Heartbeat) -> String {
    serde_json::to_string(&LastLocationBody::from_heartbeat(hb)).expect("serializable")
}

/// The JSON object of a fence event without `"sub"`:
/// `{"fence":..,"id":..,"event":"enter"|"exit","ts":<device ts ms>}`.
pub fn render_fence_event(fence: &str, device_id: &str, t: Transition, ts_ms: i64) -> String {
    serde_json::json!({"fence": fence, "id": device_id, "event": t.as_str(), "ts": ts_ms})
        .to_string()
}

/// Writes the frame text of an event: `{"sub":"<sub>",` + the rest of `text`.
pub fn write_event(out: &mut String, sub: &str, text: &str) {
    debug_assert!(text.starts_with('{') && text.len() > 2);
    out.clear();
    out.push_str(r#"{"sub":"#);
    // Subscription names are [A-Za-z0-9._-]: nothing to escape.
    out.push('"');
    out.push_str(sub);
    out.push_str("\",");
    out.push_str(&text[1..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_text_is_the_device_body_with_sub_first() {
        // The written event is the GET /v1/devices/{id} body with "sub" added in front.
        let h = Heartbeat {
            device_id: "t\"1".into(),
            lat: 1.5,
            lon: 2.5,
            ts_ms: 7,
            received_ms: 8,
            speed_mps: Some(3.0),
            attrs: br#"{"k":1}"#.to_vec(),
            ..Default::default()
        };
        let mut s = String::new();
        write_event(&mut s, "s1", &render_heartbeat(&h));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"sub":"s1","id":"t\"1","lat":1.5,"lon":2.5,"ts":7,"received_at":8,"speed":3.0,"attrs":{"k":1}})
        );
        assert!(s.starts_with(r#"{"sub":"s1","id""#));
    }
}
