//! Server-to-device replies: `{"ack":N}` (every heartbeat with seq <= N on this connection is
//! durable) and `{"seq":N,"error":"reason"}` / `{"seq":null,"error":"reason"}` (a rejection). This
//! module owns formatting acks (for the null server) and classifying replies (for the load
//! generator); it does not track which heartbeats are outstanding (see `inflight`). Invariant: the
//! ack fast path allocates nothing; only the rare rejection path allocates its reason string.

use std::io::Write as _;

/// One reply from the server, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Every heartbeat with `seq <= N` on this connection is durable.
    Ack(u64),
    /// The server refused a heartbeat (`seq` is `Some`) or a whole frame (`seq` is `None`).
    Rejected {
        /// The refused heartbeat's seq, if the server named one.
        seq: Option<u64>,
        /// The server's stable reason string.
        reason: String,
    },
    /// Anything else: not JSON, or JSON of an unknown shape.
    Unrecognized,
}

/// Appends `{"ack":N}` to `out`.
pub fn encode_ack(seq: u64, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{{\"ack\":{seq}}}");
}

/// Classifies one text reply. The common `{"ack":N}` form is parsed by hand; anything else goes
/// through serde_json.
pub fn parse_reply(text: &[u8]) -> Reply {
    if let Some(seq) = parse_ack_fast(text) {
        return Reply::Ack(seq);
    }
    #[derive(serde::Deserialize)]
    struct Wire {
        ack: Option<u64>,
        #[serde(default)]
        seq: Option<u64>,
        error: Option<String>,
    }
    match serde_json::from_slice::<Wire>(text) {
        Ok(Wire {
            ack: Some(ack),
            error: None,
            ..
        }) => Reply::Ack(ack),
        Ok(Wire {
            error: Some(reason),
            seq,
            ..
        }) => Reply::Rejected { seq, reason },
        _ => Reply::Unrecognized,
    }
}

/// Parses exactly `{"ack":<digits>}`; `None` for any other text.
fn parse_ack_fast(text: &[u8]) -> Option<u64> {
    const PREFIX: &[u8] = b"{\"ack\":";
    let rest = text.strip_prefix(PREFIX)?;
    let digits = rest.strip_suffix(b"}")?;
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in digits {
        if !byte.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_round_trips_through_encode_and_parse() {
        // Checks that encoded acks parse back to the same seq, including the extremes.
        for seq in [0, 1, 42, u64::MAX] {
            let mut out = Vec::new();
            encode_ack(seq, &mut out);
            assert_eq!(parse_reply(&out), Reply::Ack(seq));
        }
    }

    #[test]
    fn rejections_and_odd_shapes_are_classified() {
        // Checks per-heartbeat and per-frame rejections, an ack with spaces (slow path) and
        // garbage.
        assert_eq!(
            parse_reply(br#"{"seq":7,"error":"ts_out_of_range"}"#),
            Reply::Rejected {
                seq: Some(7),
                reason: "ts_out_of_range".into()
            }
        );
        assert_eq!(
            parse_reply(br#"{"seq":null,"error":"bad_json"}"#),
            Reply::Rejected {
                seq: None,
                reason: "bad_json".into()
            }
        );
        assert_eq!(parse_reply(br#"{ "ack" : 9 }"#), Reply::Ack(9));
        assert_eq!(
            parse_reply(b"{\"ack\":99999999999999999999}"),
            Reply::Unrecognized
        );
        assert_eq!(parse_reply(b"hello"), Reply::Unrecognized);
        assert_eq!(parse_reply(br#"{"other":1}"#), Reply::Unrecognized);
    }
}
