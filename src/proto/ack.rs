//! Server-to-device frames: acks (`{"ack":N}`) and error frames (`{"seq":N,"error":"r"}`,
//! `{"seq":null,"error":"r"}`), written into a caller-owned, reused `String`, plus the JSON
//! string escaper the rest of geobeat uses for hand-written JSON. It does not decide when to ack
//! (coalescing is the connection's business) nor send anything.
//!
//! Invariant: output is always valid JSON whatever the reason text, and writing allocates only
//! when the buffer must grow (integers via `itoa`, no formatting machinery).

use super::Seq;

/// Writes `{"ack":N}` into `out` (cleared first). Meaning: every accepted heartbeat with seq ≤ N
/// on this connection is durable.
pub fn write_ack(out: &mut String, seq: Seq) {
    out.clear();
    out.push_str("{\"ack\":");
    out.push_str(itoa::Buffer::new().format(seq.0));
    out.push('}');
}

/// Writes the resume frame `{"resume":{"epoch":E,"seq":N}}` (issue 18: the device's durable
/// high-water mark, sent first on a connection that declared an epoch) into `out` (cleared first).
pub fn write_resume(out: &mut String, epoch: u32, seq: u64) {
    out.clear();
    out.push_str("{\"resume\":{\"epoch\":");
    out.push_str(itoa::Buffer::new().format(epoch));
    out.push_str(",\"seq\":");
    out.push_str(itoa::Buffer::new().format(seq));
    out.push_str("}}");
}

/// Writes `{"seq":N,"error":"<reason>"}`, or `{"seq":null,...}` without a seq, into `out`
/// (cleared first).
pub fn write_error(out: &mut String, seq: Option<Seq>, reason: &str) {
    out.clear();
    out.push_str("{\"seq\":");
    match seq {
        Some(s) => out.push_str(itoa::Buffer::new().format(s.0)),
        None => out.push_str("null"),
    }
    out.push_str(",\"error\":");
    write_json_string(out, reason);
    out.push('}');
}

/// Appends `s` as a quoted JSON string, escaping `"`, `\` and control characters.
pub fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1F => "",
            _ => continue,
        };
        // Escaped bytes are ASCII, so `start..i` lies on char boundaries.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_acks_and_errors() {
        // Exact bytes of each frame kind, reusing one buffer.
        let mut out = String::new();
        write_ack(&mut out, Seq(42));
        assert_eq!(out, r#"{"ack":42}"#);
        write_error(&mut out, Some(Seq(7)), "missing_field:lat");
        assert_eq!(out, r#"{"seq":7,"error":"missing_field:lat"}"#);
        write_error(&mut out, None, "invalid_json");
        assert_eq!(out, r#"{"seq":null,"error":"invalid_json"}"#);
    }

    #[test]
    fn escapes_to_valid_json() {
        // Quotes, backslashes and control characters round-trip through serde_json.
        let nasty = "a\"b\\c\nd\u{1}e\u{1f}é😀";
        let mut out = String::new();
        write_json_string(&mut out, nasty);
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, nasty);
        write_error(&mut out, None, nasty);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"], nasty);
    }
}
