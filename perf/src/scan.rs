//! The null server's frame parser: it reads just enough of a heartbeat frame to find the highest
//! `seq` in it, and nothing more. It owns no validation of coordinates, ids or timestamps (geobeat
//! proper does that); the null server exists to measure the network-and-protocol ceiling, so its
//! per-frame work is deliberately minimal. Invariant: no input makes these functions panic or read
//! outside the frame; malformed binary frames yield a [`ScanError`].
//!
//! Binary layout (little-endian): `u8 version=1, u16 count`, then per heartbeat
//! `u64 seq, f64 lat, f64 lon, i64 ts, u8 flags`, then one f32 for each of the flag bits 0..=3
//! (alt, speed, heading, acc) that is set, then `u8 id_len` + id bytes if bit 4 is set, then
//! `u16 attrs_len` + attrs bytes if bit 5 is set.

use thiserror::Error;

use crate::frame::{
    BINARY_HEADER_BYTES, BINARY_HEARTBEAT_FIXED_BYTES, BINARY_VERSION, FLAG_ACC, FLAG_ALT,
    FLAG_ATTRS, FLAG_HEADING, FLAG_ID, FLAG_SPEED,
};

/// Why a binary frame could not be scanned.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScanError {
    /// The frame ends before the header or a heartbeat is complete.
    #[error("binary frame truncated at byte {offset}")]
    Truncated {
        /// Offset at which more bytes were needed.
        offset: usize,
    },
    /// The version byte is not [`BINARY_VERSION`].
    #[error("binary frame version {version} is not supported")]
    Version {
        /// Version byte found.
        version: u8,
    },
    /// Bytes remain after the last heartbeat the header announced.
    #[error("binary frame has {extra} bytes after its last heartbeat")]
    Trailing {
        /// Number of unread bytes.
        extra: usize,
    },
    /// The frame holds no heartbeat.
    #[error("frame holds no heartbeat")]
    Empty,
}

/// Highest `seq` value in a JSON text frame, found by scanning for `"seq"` keys followed by a
/// colon and digits. Returns `None` when no such key is present. A `"seq"` string inside `attrs`
/// would also be seen; the null server accepts that imprecision in exchange for not parsing JSON.
pub fn json_max_seq(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"seq\"";
    let mut best: Option<u64> = None;
    let mut at = 0;
    while at + KEY.len() <= frame.len() {
        let Some(found) = frame[at..].windows(KEY.len()).position(|w| w == KEY) else {
            break;
        };
        let mut cursor = at + found + KEY.len();
        at = cursor;
        while cursor < frame.len() && frame[cursor].is_ascii_whitespace() {
            cursor += 1;
        }
        if cursor >= frame.len() || frame[cursor] != b':' {
            continue;
        }
        cursor += 1;
        while cursor < frame.len() && frame[cursor].is_ascii_whitespace() {
            cursor += 1;
        }
        let digits_start = cursor;
        let mut value: u64 = 0;
        let mut overflow = false;
        while cursor < frame.len() && frame[cursor].is_ascii_digit() {
            let digit = u64::from(frame[cursor] - b'0');
            match value.checked_mul(10).and_then(|v| v.checked_add(digit)) {
                Some(v) => value = v,
                None => overflow = true,
            }
            cursor += 1;
        }
        if cursor > digits_start && !overflow {
            best = Some(best.map_or(value, |b| b.max(value)));
        }
        at = cursor;
    }
    best
}

/// Highest `seq` in a binary frame, walking every heartbeat to check the layout is complete.
pub fn binary_max_seq(frame: &[u8]) -> Result<u64, ScanError> {
    if frame.len() < BINARY_HEADER_BYTES {
        return Err(ScanError::Truncated {
            offset: frame.len(),
        });
    }
    if frame[0] != BINARY_VERSION {
        return Err(ScanError::Version { version: frame[0] });
    }
    let count = u16::from_le_bytes([frame[1], frame[2]]);
    if count == 0 {
        return Err(ScanError::Empty);
    }
    let mut at = BINARY_HEADER_BYTES;
    let mut best = 0u64;
    for _ in 0..count {
        let fixed_end = at + BINARY_HEARTBEAT_FIXED_BYTES;
        if fixed_end > frame.len() {
            return Err(ScanError::Truncated {
                offset: frame.len(),
            });
        }
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&frame[at..at + 8]);
        best = best.max(u64::from_le_bytes(seq_bytes));
        let flags = frame[fixed_end - 1];
        at = fixed_end;
        let floats = [FLAG_ALT, FLAG_SPEED, FLAG_HEADING, FLAG_ACC]
            .iter()
            .filter(|&&bit| flags & bit != 0)
            .count();
        at += floats * 4;
        if flags & FLAG_ID != 0 {
            let len = *frame.get(at).ok_or(ScanError::Truncated { offset: at })?;
            at += 1 + usize::from(len);
        }
        if flags & FLAG_ATTRS != 0 {
            if at + 2 > frame.len() {
                return Err(ScanError::Truncated { offset: at });
            }
            let len = u16::from_le_bytes([frame[at], frame[at + 1]]);
            at += 2 + usize::from(len);
        }
        if at > frame.len() {
            return Err(ScanError::Truncated {
                offset: frame.len(),
            });
        }
    }
    if at != frame.len() {
        return Err(ScanError::Trailing {
            extra: frame.len() - at,
        });
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_binary, encode_json, Common, Sample};

    fn samples(seqs: &[u64]) -> Vec<Sample> {
        seqs.iter()
            .map(|&seq| Sample {
                seq,
                lat: -33.9,
                lon: 151.2,
                ts_ms: 1_732_200_000_000,
                alt_m: Some(1.0),
                speed_mps: None,
                heading_deg: Some(90.0),
                acc_m: None,
            })
            .collect()
    }

    #[test]
    fn json_scan_finds_the_highest_seq() {
        // Checks the scanner on encoder output (object and array) and on hand-written JSON with
        // whitespace around the colon.
        let mut out = Vec::new();
        encode_json(&samples(&[41]), &Common::default(), &mut out).unwrap();
        assert_eq!(json_max_seq(&out), Some(41));
        out.clear();
        let common = Common {
            id: Some("gw-7"),
            attrs_json: Some(r#"{"k":1}"#),
        };
        encode_json(&samples(&[5, 9, 7]), &common, &mut out).unwrap();
        assert_eq!(json_max_seq(&out), Some(9));
        assert_eq!(
            json_max_seq(br#"[{"seq" : 3}, {"lat":1,"seq":12}]"#),
            Some(12)
        );
    }

    #[test]
    fn json_scan_ignores_non_numbers_and_overflow() {
        // Checks that keys without a numeric value, truncated input and overflowing numbers are
        // skipped rather than misread.
        assert_eq!(json_max_seq(b""), None);
        assert_eq!(json_max_seq(br#"{"seq":null}"#), None);
        assert_eq!(json_max_seq(br#"{"seq""#), None);
        assert_eq!(json_max_seq(br#"{"seq":"4"}"#), None);
        assert_eq!(json_max_seq(br#"{"seq":99999999999999999999999}"#), None);
        assert_eq!(json_max_seq(br#"{"seqx":4,"seq":2}"#), Some(2));
    }

    #[test]
    fn binary_scan_matches_encoder_output() {
        // Checks that the scanner walks encoder output with every optional part present and
        // reports the highest seq regardless of position.
        let common = Common {
            id: Some("device-1"),
            attrs_json: Some(r#"{"fw":"2"}"#),
        };
        let mut out = Vec::new();
        encode_binary(&samples(&[3, 10, 4]), &common, &mut out).unwrap();
        assert_eq!(binary_max_seq(&out), Ok(10));
        out.clear();
        encode_binary(&samples(&[1]), &Common::default(), &mut out).unwrap();
        assert_eq!(binary_max_seq(&out), Ok(1));
    }

    #[test]
    fn binary_scan_rejects_malformed_frames() {
        // Checks that every truncation point of a valid frame, a bad version, a zero count and
        // trailing bytes are reported as errors, never as a seq and never as a panic.
        let common = Common {
            id: Some("d"),
            attrs_json: Some("{}"),
        };
        let mut out = Vec::new();
        encode_binary(&samples(&[1, 2]), &common, &mut out).unwrap();
        for cut in 0..out.len() {
            assert!(
                binary_max_seq(&out[..cut]).is_err(),
                "cut at {cut} was accepted"
            );
        }
        let mut bad = out.clone();
        bad[0] = 2;
        assert_eq!(binary_max_seq(&bad), Err(ScanError::Version { version: 2 }));
        assert_eq!(binary_max_seq(&[1, 0, 0]), Err(ScanError::Empty));
        let mut long = out.clone();
        long.push(0);
        assert_eq!(binary_max_seq(&long), Err(ScanError::Trailing { extra: 1 }));
    }
}
