//! JSON text frames: a hand-rolled, allocation-free decoder for one heartbeat object or an array
//! of them, and an encoder for clients and tests. It owns the JSON grammar (RFC 8259, strings
//! must be valid Unicode: lone surrogate escapes are refused), the field mapping, and the
//! compaction of `attrs` to its compact text; the per-heartbeat rules live in the parent module.
//! It does not own framing (WebSocket) or what happens to decoded heartbeats.
//!
//! Why hand-rolled: a single pass must both validate the whole frame (a syntax error anywhere
//! refuses the frame) and give each array element its own verdict with typed reasons
//! (`bad_type:ts`, `duplicate_field:lat`) while refilling reusable slots; serde's derive
//! reports the first error only and allocates for owned strings.
//!
//! Invariants: never panics on any input; nesting is walked iteratively with a `u64` container
//! stack (deeper than `FRAME_JSON_DEPTH_MAX` refuses the frame), so there is no recursion; what
//! is copied into a slot is capped (id at `DEVICE_ID_BYTES_MAX`, attrs at `ATTRS_BYTES_MAX`),
//! so reused slots never keep more than those bounds.

use std::fmt::Write as _;

use super::{ack::write_json_string, Decoder, EncodeError, Field, FrameError, Ingest, Reject, Seq};
use crate::limits::{
    ATTRS_BYTES_MAX, DEVICE_ID_BYTES_MAX, FRAME_BYTES_MAX, FRAME_JSON_DEPTH_MAX, JSON_DEPTH_MAX,
    JSON_KEY_BYTES_MAX,
};
use crate::record::{Heartbeat, Invalid};

/// Decodes one text frame into `dec`'s slots.
pub(super) fn decode_frame(
    dec: &mut Decoder,
    text: &str,
    ingest: &Ingest<'_>,
) -> Result<(), FrameError> {
    if text.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooBig { bytes: text.len() });
    }
    let mut p = Parser::new(text);
    p.skip_ws();
    match p.peek() {
        Some(b'{') => decode_object(dec, &mut p, ingest)?,
        Some(b'[') => {
            p.pos += 1;
            p.skip_ws();
            if p.peek() == Some(b']') {
                p.pos += 1;
                p.expect_end()?;
                return Err(FrameError::EmptyBatch);
            }
            loop {
                p.skip_ws();
                if p.peek() == Some(b'{') {
                    decode_object(dec, &mut p, ingest)?;
                } else {
                    let i = dec.next_slot(ingest.heartbeats_max)?;
                    p.walk_value(&mut Sink::discard())?;
                    dec.slots[i].reject(Reject::NotAnObject);
                }
                p.skip_ws();
                match p.bump() {
                    Some(b',') => continue,
                    Some(b']') => break,
                    _ => return Err(p.invalid_before()),
                }
            }
        }
        Some(_) => {
            // A scalar: distinguish well-formed JSON of the wrong shape from garbage.
            p.walk_value(&mut Sink::discard())?;
            p.expect_end()?;
            return Err(FrameError::ExpectedObjectOrArray);
        }
        None => return Err(p.invalid()),
    }
    p.expect_end()
}

/// Decodes one heartbeat object (the parser is at its `{`) into the next slot.
fn decode_object(
    dec: &mut Decoder,
    p: &mut Parser<'_>,
    ingest: &Ingest<'_>,
) -> Result<(), FrameError> {
    let i = dec.next_slot(ingest.heartbeats_max)?;
    p.pos += 1; // the '{' the caller saw
    let mut seen: u16 = 0;
    let mut present: u16 = 0;
    p.skip_ws();
    if p.peek() == Some(b'}') {
        p.pos += 1;
    } else {
        loop {
            p.skip_ws();
            let field = p.key(&mut dec.key_scratch)?;
            p.skip_ws();
            p.expect(b':')?;
            p.skip_ws();
            let slot = &mut dec.slots[i];
            match field {
                None => {
                    // Unknown field: ignored for forward compatibility (still syntax-checked).
                    p.walk_value(&mut Sink::discard())?;
                }
                Some(f) if seen & f.bit() != 0 => {
                    slot.reject(Reject::DuplicateField(f));
                    p.walk_value(&mut Sink::discard())?;
                }
                Some(f) => {
                    seen |= f.bit();
                    if parse_field(p, f, slot)? {
                        present |= f.bit();
                    }
                }
            }
            p.skip_ws();
            match p.bump() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(p.invalid_before()),
            }
        }
    }
    dec.finish_slot(i, present, ingest);
    Ok(())
}

/// Parses the value of field `f` into `slot`; `Ok(true)` if the field counts as present (an
/// optional field given as `null` counts as absent). Type errors are recorded on the slot.
fn parse_field(p: &mut Parser<'_>, f: Field, slot: &mut super::Slot) -> Result<bool, FrameError> {
    let hb = &mut slot.heartbeat;
    let optional = !matches!(f, Field::Seq | Field::Lat | Field::Lon | Field::Ts);
    match p.peek() {
        Some(b'n') if optional => {
            p.literal(b"null")?;
            return Ok(false);
        }
        Some(b'-' | b'0'..=b'9') if !matches!(f, Field::Id | Field::Attrs) => {
            let num = p.number()?;
            match f {
                Field::Seq => match num.magnitude() {
                    _ if !num.int => slot.reject_seq(Reject::BadType(Field::Seq)),
                    Some(0) => slot.reject_seq(Reject::SeqNotPositive),
                    Some(_) if num.neg => slot.reject_seq(Reject::SeqNotPositive),
                    Some(v) => slot.set_seq(v),
                    None if num.neg => slot.reject_seq(Reject::SeqNotPositive),
                    None => slot.reject_seq(Reject::SeqOutOfRange),
                },
                // `1732200000123.0` or `1.732200000123e12` (what a float-typed clock prints) is
                // the same millisecond as the integer: accepted. A fraction of a ms is refused.
                Field::Ts => match num.as_i64() {
                    Some(v) => hb.ts_ms = v,
                    None if num.int => slot.reject(Reject::TsOutOfRange),
                    None => match num.integral_i64() {
                        Some(v) => hb.ts_ms = v,
                        None => slot.reject(Reject::BadType(Field::Ts)),
                    },
                },
                Field::Lat => match num.to_f64() {
                    Some(v) => hb.lat = v,
                    None => slot.reject(Reject::BadType(f)),
                },
                Field::Lon => match num.to_f64() {
                    Some(v) => hb.lon = v,
                    None => slot.reject(Reject::BadType(f)),
                },
                Field::Alt | Field::Speed | Field::Heading | Field::Acc => match num.to_f32() {
                    Some(v) => *measurement(hb, f) = Some(v),
                    None => slot.reject(Reject::BadType(f)),
                },
                Field::Id | Field::Attrs => unreachable!("excluded by the match guard"),
            }
            return Ok(true);
        }
        Some(b'"') if f == Field::Id => {
            let overflow = p.string(Some(&mut hb.device_id), DEVICE_ID_BYTES_MAX)?;
            if overflow {
                slot.reject(Reject::Invalid(Invalid::IdTooLong));
            }
            return Ok(true);
        }
        Some(b'{') if f == Field::Attrs => {
            let mut sink = Sink::new(&mut hb.attrs, ATTRS_BYTES_MAX);
            let walk = p.walk_value(&mut sink)?;
            if sink.overflow {
                slot.reject(Reject::Invalid(Invalid::AttrsTooLarge));
            } else if walk.depth_max > JSON_DEPTH_MAX {
                slot.reject(Reject::AttrsTooDeep);
            } else if walk.huge_number {
                slot.reject(Reject::BadType(Field::Attrs));
            } else if has_duplicate_key(&hb.attrs) {
                slot.reject(Reject::AttrsDuplicateKey);
            }
            return Ok(true);
        }
        _ => {}
    }
    p.walk_value(&mut Sink::discard())?;
    if f == Field::Seq {
        slot.reject_seq(Reject::BadType(f));
    } else {
        slot.reject(Reject::BadType(f));
    }
    Ok(true)
}

/// The heartbeat field behind an optional measurement.
fn measurement(hb: &mut Heartbeat, f: Field) -> &mut Option<f32> {
    match f {
        Field::Alt => &mut hb.alt_m,
        Field::Speed => &mut hb.speed_mps,
        Field::Heading => &mut hb.heading_deg,
        _ => &mut hb.acc_m,
    }
}

/// Checks that `text` is exactly one JSON object (surrounding whitespace allowed), nested at most
/// `JSON_DEPTH_MAX` deep, and writes its compact form (insignificant whitespace removed, strings
/// and numbers verbatim) into `out` (cleared first). Used for binary frames' attrs.
pub(super) fn compact_attrs(text: &str, out: &mut Vec<u8>) -> Result<(), Reject> {
    out.clear();
    let mut p = Parser::new(text);
    p.skip_ws();
    if p.peek() != Some(b'{') {
        return Err(Reject::BadType(Field::Attrs));
    }
    let mut sink = Sink::new(out, ATTRS_BYTES_MAX);
    let walk = p
        .walk_value(&mut sink)
        .map_err(|_| Reject::BadType(Field::Attrs))?;
    let overflow = sink.overflow;
    if p.expect_end().is_err() {
        return Err(Reject::BadType(Field::Attrs));
    }
    if overflow {
        return Err(Reject::Invalid(Invalid::AttrsTooLarge));
    }
    if walk.depth_max > JSON_DEPTH_MAX {
        return Err(Reject::AttrsTooDeep);
    }
    if walk.huge_number {
        return Err(Reject::BadType(Field::Attrs));
    }
    if has_duplicate_key(out) {
        return Err(Reject::AttrsDuplicateKey);
    }
    Ok(())
}

/// Whether an object anywhere in `compact` (compact JSON text as a [`Sink`] writes it, at most
/// `ATTRS_BYTES_MAX` bytes, nested at most `JSON_DEPTH_MAX` deep) has two members with the same
/// key. Keys are compared as raw text when neither holds an escape, else after unescaping
/// (`"a"` and `"\u0061"` are the same key). Stored attrs must read back the same in every JSON
/// library, and libraries disagree on duplicates (first wins, last wins, or an error), so such
/// attrs are refused (`attrs_duplicate_key`) rather than stored as given. Allocation-free: one
/// pass with fixed arrays; a compact member takes at least 4 bytes (`"":0`), which bounds the
/// keys held at once.
fn has_duplicate_key(compact: &[u8]) -> bool {
    const KEYS_MAX: usize = ATTRS_BYTES_MAX / 4 + 1;
    let b = compact;
    // Spans (quotes included) of the keys of every open object, innermost last.
    let mut keys = [(0usize, 0usize); KEYS_MAX];
    let mut keys_len = 0;
    // Open containers: whether it is an object, and where its keys start in `keys`.
    let mut open = [(false, 0usize); JSON_DEPTH_MAX + 1];
    let mut depth = 0;
    let mut expect_key = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            c @ (b'{' | b'[') => {
                let Some(top) = open.get_mut(depth) else {
                    return false; // deeper than allowed: refused as attrs_too_deep instead
                };
                *top = (c == b'{', keys_len);
                depth += 1;
                expect_key = c == b'{';
                i += 1;
            }
            b'}' | b']' => {
                let Some(d) = depth.checked_sub(1) else {
                    return false;
                };
                depth = d;
                keys_len = open[d].1;
                expect_key = false;
                i += 1;
            }
            b',' => {
                expect_key = depth > 0 && open[depth - 1].0;
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                if expect_key && depth > 0 {
                    let key = &b[start..i];
                    let first = open[depth - 1].1;
                    if keys[first..keys_len]
                        .iter()
                        .any(|&(s, e)| same_key(&b[s..e], key))
                    {
                        return true;
                    }
                    let Some(slot) = keys.get_mut(keys_len) else {
                        return false;
                    };
                    *slot = (start, i);
                    keys_len += 1;
                    expect_key = false;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// Whether two JSON string tokens (quotes included, valid JSON) name the same string.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    if !a.contains(&b'\\') && !b.contains(&b'\\') {
        return false;
    }
    let (mut x, mut y) = ([0u8; ATTRS_BYTES_MAX + 4], [0u8; ATTRS_BYTES_MAX + 4]);
    unescape(a, &mut x) == unescape(b, &mut y)
}

/// The bytes a JSON string token (quotes included) stands for, written into `buf`; an unescaped
/// string is never longer than its token. A malformed token yields what was decoded so far.
fn unescape<'b>(token: &[u8], buf: &'b mut [u8; ATTRS_BYTES_MAX + 4]) -> &'b [u8] {
    let Ok(text) = std::str::from_utf8(token) else {
        return &buf[..0];
    };
    let mut p = Parser::new(text);
    p.pos = 1;
    let mut n = 0;
    while n + 4 <= buf.len() {
        match p.bump() {
            None | Some(b'"') => break,
            Some(b'\\') => match p.escape() {
                Ok(ch) => n += ch.encode_utf8(&mut buf[n..]).len(),
                Err(_) => break,
            },
            Some(c) => {
                buf[n] = c;
                n += 1;
            }
        }
    }
    &buf[..n]
}

/// A number token: its text, shape, and the decimal mantissa/exponent accumulated while scanning
/// (so integers need no second pass and most floats take the exact fast path).
struct Num<'a> {
    text: &'a str,
    /// No fraction and no exponent.
    int: bool,
    neg: bool,
    /// All digits (integer and fraction) as one integer; `None` beyond 19 digits (where it
    /// might not fit `u64`; such integers exceed every range the protocol accepts anyway).
    mantissa: Option<u64>,
    /// Decimal exponent: value = mantissa * 10^exp10 (clamped far outside any fast-path range).
    exp10: i32,
}

/// Powers of ten exactly representable as `f64` (10^22 is the largest).
const POW10_F64: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];
/// Powers of ten exactly representable as `f32` (10^10 is the largest).
const POW10_F32: [f32; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

impl Num<'_> {
    /// The absolute value of an integer token, `None` beyond 19 digits (or not an integer).
    fn magnitude(&self) -> Option<u64> {
        if self.int {
            self.mantissa
        } else {
            None
        }
    }

    /// The value of an integer token as `i64`, `None` if out of range (or not an integer).
    fn as_i64(&self) -> Option<i64> {
        let m = i128::from(self.magnitude()?);
        i64::try_from(if self.neg { -m } else { m }).ok()
    }

    /// The value of a token with a fraction or exponent (`12.0`, `1.2e1`) that denotes an
    /// integer in `i64` range; `None` if it has a non-zero fraction, is out of range, or has
    /// more than 19 significant digits.
    fn integral_i64(&self) -> Option<i64> {
        let m = self.mantissa?;
        let p = 10u64.checked_pow(self.exp10.unsigned_abs())?;
        let v = if self.exp10 < 0 {
            (m % p == 0).then_some(m / p)?
        } else {
            m.checked_mul(p)?
        };
        let v = i128::from(v);
        i64::try_from(if self.neg { -v } else { v }).ok()
    }

    /// The correctly rounded `f64`. Fast path (Clinger): a mantissa below 2^53 and |exp10| <= 22
    /// are both exact in `f64`, so one multiplication or division rounds correctly; otherwise the
    /// standard library's parser.
    fn to_f64(&self) -> Option<f64> {
        if let Some(m) = self.mantissa.filter(|&m| m < 1 << 53) {
            if let Some(&p) = POW10_F64.get(self.exp10.unsigned_abs() as usize) {
                let v = if self.exp10 < 0 {
                    m as f64 / p
                } else {
                    m as f64 * p
                };
                return Some(if self.neg { -v } else { v });
            }
        }
        self.text.parse().ok()
    }

    /// The correctly rounded `f32`, by the same reasoning with 2^24 and 10^10.
    fn to_f32(&self) -> Option<f32> {
        if let Some(m) = self.mantissa.filter(|&m| m < 1 << 24) {
            if let Some(&p) = POW10_F32.get(self.exp10.unsigned_abs() as usize) {
                let v = if self.exp10 < 0 {
                    m as f32 / p
                } else {
                    m as f32 * p
                };
                return Some(if self.neg { -v } else { v });
            }
        }
        self.text.parse().ok()
    }
}

/// Result of walking one value.
struct Walk {
    /// Deepest container nesting inside the value (a scalar is 0, `{}` is 1).
    depth_max: usize,
    /// A kept number (one written to a sink) is beyond `f64` (`1e999`): valid JSON grammar, but
    /// strict JSON readers refuse a document holding it, so it must not be stored.
    huge_number: bool,
}

/// Where a walked value's compact text goes, capped; once the cap would be crossed nothing more
/// is written and `overflow` is set.
struct Sink<'s> {
    out: Option<&'s mut Vec<u8>>,
    cap: usize,
    overflow: bool,
}

impl<'s> Sink<'s> {
    fn new(out: &'s mut Vec<u8>, cap: usize) -> Sink<'s> {
        out.clear();
        Sink {
            out: Some(out),
            cap,
            overflow: false,
        }
    }

    fn discard() -> Sink<'static> {
        Sink {
            out: None,
            cap: 0,
            overflow: false,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        if let Some(out) = self.out.as_deref_mut() {
            if self.overflow || out.len() + bytes.len() > self.cap {
                self.overflow = true;
            } else {
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// A cursor over the frame text.
struct Parser<'a> {
    text: &'a str,
    b: &'a [u8],
    pos: usize,
    /// Set whenever `skip_ws` skips something (lets `walk_value` copy already-compact values
    /// in one piece).
    ws_skipped: bool,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser {
            text,
            b: text.as_bytes(),
            pos: 0,
            ws_skipped: false,
        }
    }

    fn invalid(&self) -> FrameError {
        FrameError::InvalidJson { offset: self.pos }
    }

    /// Error at the byte just consumed by `bump`.
    fn invalid_before(&self) -> FrameError {
        FrameError::InvalidJson {
            offset: self.pos.saturating_sub(1),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn skip_ws(&mut self) {
        let start = self.pos;
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
        self.ws_skipped |= self.pos != start;
    }

    fn expect(&mut self, c: u8) -> Result<(), FrameError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.invalid())
        }
    }

    /// Only whitespace may remain.
    fn expect_end(&mut self) -> Result<(), FrameError> {
        self.skip_ws();
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(self.invalid())
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), FrameError> {
        if self.b[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.invalid())
        }
    }

    /// Parses a number token (JSON grammar), accumulating its mantissa and exponent.
    fn number(&mut self) -> Result<Num<'a>, FrameError> {
        let start = self.pos;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.pos += 1;
        }
        // Digits fold into `acc` (wrapping); with at most 19 digits it cannot have wrapped.
        let mut acc = 0u64;
        let mut count = match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                1
            }
            Some(b'1'..=b'9') => self.digits_into(&mut acc),
            _ => return Err(self.invalid()),
        };
        let mut int = true;
        let mut exp10: i32 = 0;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            int = false;
            let n = self.digits_into(&mut acc);
            if n == 0 {
                return Err(self.invalid());
            }
            count += n;
            // A fraction longer than any frame is impossible; saturate to stay total.
            exp10 = -i32::try_from(n).unwrap_or(i32::MAX);
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            int = false;
            let exp_neg = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    true
                }
                Some(b'+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let mut e: i32 = 0;
            let digits_start = self.pos;
            while let Some(d @ b'0'..=b'9') = self.peek() {
                // Clamp: anything beyond 10^6 is far outside the fast path and the parser's
                // own range handling takes over.
                e = (e * 10 + i32::from(d - b'0')).min(1_000_000);
                self.pos += 1;
            }
            if self.pos == digits_start {
                return Err(self.invalid());
            }
            exp10 = exp10.saturating_add(if exp_neg { -e } else { e });
        }
        let mantissa = (count <= 19).then_some(acc);
        Ok(Num {
            text: &self.text[start..self.pos],
            int,
            neg,
            mantissa,
            exp10,
        })
    }

    /// Consumes digits, folding them into `acc` (wrapping: callers bound the digit count);
    /// returns how many digits were consumed.
    fn digits_into(&mut self, acc: &mut u64) -> usize {
        let start = self.pos;
        while let Some(&c) = self.b.get(self.pos) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            *acc = acc.wrapping_mul(10).wrapping_add(u64::from(d));
            self.pos += 1;
        }
        self.pos - start
    }

    /// Parses a string (the cursor is at its opening quote), decoding it into `out` (cleared
    /// first) while it fits in `cap` bytes; returns whether it overflowed. With `out == None`
    /// the string is only validated.
    fn string(&mut self, mut out: Option<&mut String>, cap: usize) -> Result<bool, FrameError> {
        self.expect(b'"')?;
        if let Some(o) = out.as_deref_mut() {
            o.clear();
        }
        let mut overflow = false;
        let mut push = |out: &mut Option<&mut String>, s: &str| {
            if let Some(o) = out.as_deref_mut() {
                if overflow || o.len() + s.len() > cap {
                    overflow = true;
                } else {
                    o.push_str(s);
                }
            }
        };
        loop {
            let start = self.pos;
            while let Some(&c) = self.b.get(self.pos) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // Delimiters are ASCII, so `start..pos` lies on char boundaries.
            push(&mut out, &self.text[start..self.pos]);
            match self.bump() {
                Some(b'"') => return Ok(overflow),
                Some(b'\\') => {
                    let ch = self.escape()?;
                    push(&mut out, ch.encode_utf8(&mut [0u8; 4]));
                }
                _ => return Err(self.invalid_before()),
            }
        }
    }

    /// Decodes the escape after a backslash.
    fn escape(&mut self) -> Result<char, FrameError> {
        let c = match self.bump() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let hi = self.hex4()?;
                let code = match hi {
                    0xD800..=0xDBFF => {
                        if self.bump() != Some(b'\\') || self.bump() != Some(b'u') {
                            return Err(self.invalid_before());
                        }
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(self.invalid());
                        }
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(self.invalid()),
                    _ => hi,
                };
                return char::from_u32(code).ok_or_else(|| self.invalid());
            }
            _ => return Err(self.invalid_before()),
        };
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, FrameError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.bump() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.invalid_before()),
            };
            v = v << 4 | u32::from(d);
        }
        Ok(v)
    }

    /// Parses an object key and maps it to a known field (`None`: unknown).
    fn key(&mut self, scratch: &mut String) -> Result<Option<Field>, FrameError> {
        if self.peek() != Some(b'"') {
            return Err(self.invalid());
        }
        let start = self.pos + 1;
        let mut end = start;
        while let Some(&c) = self.b.get(end) {
            if c == b'"' {
                // Fast path: no escapes, compare the raw bytes.
                self.pos = end + 1;
                return Ok(Field::from_name(&self.b[start..end]));
            }
            if c == b'\\' || c < 0x20 {
                break;
            }
            end += 1;
        }
        let overflow = self.string(Some(scratch), JSON_KEY_BYTES_MAX)?;
        Ok(if overflow {
            None
        } else {
            Field::from_name(scratch.as_bytes())
        })
    }

    /// Walks one complete value of any type, syntax-checking it and writing its compact text to
    /// `sink`. Values without insignificant whitespace (what serializers emit) are checked, then
    /// copied in one piece; others are walked a second time, emitting token by token.
    fn walk_value(&mut self, sink: &mut Sink<'_>) -> Result<Walk, FrameError> {
        if sink.out.is_none() {
            return self.walk_tokens(sink, false);
        }
        self.skip_ws();
        let start = self.pos;
        self.ws_skipped = false;
        let walk = self.walk_tokens(&mut Sink::discard(), true)?;
        if !self.ws_skipped {
            sink.put(&self.b[start..self.pos]);
            return Ok(walk);
        }
        let end = self.pos;
        self.pos = start;
        let walk = self.walk_tokens(sink, true)?;
        debug_assert_eq!(self.pos, end, "both walks cover the same value");
        Ok(walk)
    }

    /// The walk itself. Iterative: bit `d` of `stack` says whether the container at depth `d` is
    /// an object.
    /// `kept`: the value is being stored, so numbers are checked to fit an `f64`.
    fn walk_tokens(&mut self, sink: &mut Sink<'_>, kept: bool) -> Result<Walk, FrameError> {
        let mut stack: u64 = 0;
        let mut depth: usize = 0;
        let mut depth_max: usize = 0;
        let mut huge_number = false;
        'value: loop {
            self.skip_ws();
            let start = self.pos;
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    if depth == FRAME_JSON_DEPTH_MAX {
                        return Err(FrameError::TooDeep { offset: self.pos });
                    }
                    let is_obj = open == b'{';
                    if is_obj {
                        stack |= 1 << depth;
                    } else {
                        stack &= !(1 << depth);
                    }
                    depth += 1;
                    depth_max = depth_max.max(depth);
                    self.pos += 1;
                    sink.put(&[open]);
                    self.skip_ws();
                    let close = if is_obj { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        sink.put(&[close]);
                        depth -= 1;
                    } else {
                        if is_obj {
                            self.member_key(sink)?;
                        }
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    self.string(None, 0)?;
                    sink.put(&self.b[start..self.pos]);
                }
                Some(b'-' | b'0'..=b'9') => {
                    let num = self.number()?;
                    if kept && num.text.parse::<f64>().map_or(true, |v| !v.is_finite()) {
                        huge_number = true;
                    }
                    sink.put(&self.b[start..self.pos]);
                }
                Some(b't') => {
                    self.literal(b"true")?;
                    sink.put(b"true");
                }
                Some(b'f') => {
                    self.literal(b"false")?;
                    sink.put(b"false");
                }
                Some(b'n') => {
                    self.literal(b"null")?;
                    sink.put(b"null");
                }
                _ => return Err(self.invalid()),
            }
            // After a complete value: close containers or move to the next member.
            loop {
                if depth == 0 {
                    return Ok(Walk {
                        depth_max,
                        huge_number,
                    });
                }
                self.skip_ws();
                let top_is_obj = (stack >> (depth - 1)) & 1 == 1;
                match self.bump() {
                    Some(b',') => {
                        sink.put(b",");
                        if top_is_obj {
                            self.skip_ws();
                            self.member_key(sink)?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if top_is_obj => {
                        sink.put(b"}");
                        depth -= 1;
                    }
                    Some(b']') if !top_is_obj => {
                        sink.put(b"]");
                        depth -= 1;
                    }
                    _ => return Err(self.invalid_before()),
                }
            }
        }
    }

    /// A member key and its colon inside a walked object.
    fn member_key(&mut self, sink: &mut Sink<'_>) -> Result<(), FrameError> {
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return Err(self.invalid());
        }
        self.string(None, 0)?;
        sink.put(&self.b[start..self.pos]);
        self.skip_ws();
        self.expect(b':')?;
        sink.put(b":");
        Ok(())
    }
}

/// Appends one heartbeat as a JSON object: `seq`, `id` (if non-empty), `lat`, `lon`, `ts`, the
/// present measurements, `attrs` (if non-empty, written as is: it must be JSON object text).
/// `received_ms` is not part of the device protocol and is not written.
pub fn encode_heartbeat(out: &mut String, seq: Seq, hb: &Heartbeat) -> Result<(), EncodeError> {
    let finite64 = |v: f64, f: Field| {
        if v.is_finite() {
            Ok(v)
        } else {
            Err(EncodeError::NonFinite(f))
        }
    };
    let lat = finite64(hb.lat, Field::Lat)?;
    let lon = finite64(hb.lon, Field::Lon)?;
    let attrs = std::str::from_utf8(&hb.attrs).map_err(|_| EncodeError::AttrsNotText)?;
    let mut itoa = itoa::Buffer::new();
    out.push_str("{\"seq\":");
    out.push_str(itoa.format(seq.0));
    if !hb.device_id.is_empty() {
        out.push_str(",\"id\":");
        write_json_string(out, &hb.device_id);
    }
    // Display for floats prints the shortest text that parses back to the same value.
    write!(out, ",\"lat\":{lat},\"lon\":{lon},\"ts\":").expect("writing to a String cannot fail");
    out.push_str(itoa.format(hb.ts_ms));
    for (f, v) in [
        (Field::Alt, hb.alt_m),
        (Field::Speed, hb.speed_mps),
        (Field::Heading, hb.heading_deg),
        (Field::Acc, hb.acc_m),
    ] {
        if let Some(v) = v {
            if !v.is_finite() {
                return Err(EncodeError::NonFinite(f));
            }
            write!(out, ",\"{}\":{v}", f.name()).expect("writing to a String cannot fail");
        }
    }
    if !attrs.is_empty() {
        out.push_str(",\"attrs\":");
        out.push_str(attrs);
    }
    out.push('}');
    Ok(())
}

/// Writes a text frame into `out` (cleared first): a single object for one heartbeat, an array
/// otherwise.
pub fn encode_frame<'h>(
    out: &mut String,
    items: impl IntoIterator<Item = (Seq, &'h Heartbeat)>,
) -> Result<(), EncodeError> {
    out.clear();
    let mut items = items.into_iter().peekable();
    let Some((seq, hb)) = items.next() else {
        out.push_str("[]");
        return Ok(());
    };
    if items.peek().is_none() {
        return encode_heartbeat(out, seq, hb);
    }
    out.push('[');
    encode_heartbeat(out, seq, hb)?;
    for (seq, hb) in items {
        out.push(',');
        encode_heartbeat(out, seq, hb)?;
    }
    out.push(']');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{IngestScope, Outcome};
    use super::*;

    const NOW: i64 = 1_732_200_000_500;

    fn ingest(scope: IngestScope<'_>) -> Ingest<'_> {
        Ingest::new(scope, NOW)
    }

    /// One element's verdict in test form: (seq, heartbeat or reason).
    type Verdict = (Option<u64>, Result<Heartbeat, &'static str>);

    /// Decodes `text` with a gateway scope accepting every id, or a device scope "dev-1" when
    /// `device` is set, returning each outcome as (seq, Ok(heartbeat) | Err(reason)).
    fn decode(text: &str, device: bool) -> Result<Vec<Verdict>, FrameError> {
        let scope = if device {
            IngestScope::Device("dev-1")
        } else {
            IngestScope::Gateway("")
        };
        let mut dec = Decoder::new();
        let slots = dec.decode_text(text, &ingest(scope))?;
        Ok(slots
            .iter()
            .map(|s| match s.outcome() {
                Outcome::Accepted { seq, heartbeat } => (Some(seq.0), Ok(heartbeat.clone())),
                Outcome::Rejected { seq, reason } => (seq.map(|s| s.0), Err(reason.reason())),
            })
            .collect())
    }

    fn reason_of(text: &str) -> (Option<u64>, &'static str) {
        let out = decode(text, true).expect("frame decodes");
        assert_eq!(out.len(), 1);
        (
            out[0].0,
            out[0].1.clone().expect_err("heartbeat is rejected"),
        )
    }

    #[test]
    fn decodes_minimal_object_for_device_token() {
        // The brief's example: a device token supplies the id, receive time is stamped.
        let out = decode(
            r#"{"seq":1,"lat":52.52,"lon":13.405,"ts":1732200000123}"#,
            true,
        )
        .unwrap();
        let hb = out[0].1.clone().unwrap();
        assert_eq!(out[0].0, Some(1));
        assert_eq!(hb.device_id, "dev-1");
        assert_eq!(
            (hb.lat, hb.lon, hb.ts_ms, hb.received_ms),
            (52.52, 13.405, 1732200000123, NOW)
        );
        assert_eq!(hb.alt_m, None);
        assert!(hb.attrs.is_empty());
    }

    #[test]
    fn decodes_all_fields_and_compacts_attrs() {
        // Optional fields, escapes in id, unknown fields ignored, attrs whitespace removed.
        let text = r#" { "seq" : 7 , "id" : "dev-\u0031", "lat":-1.5e1, "lon":0, "ts":1732200000000,
            "alt": 12.5, "speed": 3, "heading": 359.5, "acc": null, "future": {"x":[1,{"y":null}]},
            "attrs": { "fuel" : 0.5, "tags": [ "a b", true ] } } "#;
        let out = decode(text, true).unwrap();
        let hb = out[0].1.clone().unwrap();
        assert_eq!(hb.device_id, "dev-1");
        assert_eq!(hb.lat, -15.0);
        assert_eq!(hb.alt_m, Some(12.5));
        assert_eq!(hb.speed_mps, Some(3.0));
        assert_eq!(hb.heading_deg, Some(359.5));
        assert_eq!(hb.acc_m, None);
        assert_eq!(hb.attrs, br#"{"fuel":0.5,"tags":["a b",true]}"#);
    }

    #[test]
    fn ts_as_an_integral_float_is_accepted_and_a_fraction_is_not() {
        // A float-typed clock prints whole milliseconds as `123.0` or `1.23e2`: the same
        // millisecond, accepted. A fraction of a millisecond is not an integer: `bad_type:ts`.
        for ts in [
            "1732200000123.0",
            "1732200000123.000",
            "1.732200000123e12",
            "17322000001230e-1",
        ] {
            let out = decode(&format!(r#"{{"seq":1,"lat":1,"lon":1,"ts":{ts}}}"#), true).unwrap();
            assert_eq!(
                out[0].1.as_ref().map(|hb| hb.ts_ms),
                Ok(1732200000123),
                "{ts}"
            );
        }
        for ts in ["1732200000123.5", "1.7322000001235e12"] {
            assert_eq!(
                reason_of(&format!(r#"{{"seq":3,"lat":1,"lon":1,"ts":{ts}}}"#)),
                (Some(3), "bad_type:ts"),
                "{ts}"
            );
        }
    }

    #[test]
    fn ts_in_seconds_gets_a_reason_that_says_so() {
        // Ten digits (seconds since the epoch) read as milliseconds lie in 1970: refused with
        // a reason that names the mistake. Other out-of-window values keep `ts_out_of_range`.
        let secs = NOW / 1000;
        assert_eq!(
            reason_of(&format!(r#"{{"seq":3,"lat":1,"lon":1,"ts":{secs}}}"#)),
            (Some(3), "ts_in_seconds")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"lat":1,"lon":1,"ts":{}}}"#,
                secs - 40 * 86_400
            )),
            (Some(3), "ts_out_of_range")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"lat":1,"lon":1,"ts":{}}}"#,
                NOW * 1000
            )),
            (Some(3), "ts_out_of_range")
        );
    }

    #[test]
    fn array_elements_get_their_own_verdicts() {
        // A bad element does not spoil the good ones, and a non-object element is named.
        let text = r#"[{"seq":1,"lat":1,"lon":2,"ts":1732200000000},
                      {"seq":2,"lat":91,"lon":2,"ts":1732200000000},
                      5,
                      {"seq":4,"lat":1,"lon":2,"ts":1732200000000}]"#;
        let out = decode(text, true).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out[0].1.is_ok());
        assert_eq!(out[1], (Some(2), Err("lat_out_of_range")));
        assert_eq!(out[2], (None, Err("not_an_object")));
        assert!(out[3].1.is_ok());
    }

    #[test]
    fn per_heartbeat_reasons() {
        // Each rule maps to its reason, with the seq known where it is valid.
        let ts = "1732200000000";
        assert_eq!(
            reason_of(&format!(r#"{{"seq":3,"lon":1,"ts":{ts}}}"#)),
            (Some(3), "missing_field:lat")
        );
        assert_eq!(
            reason_of(r#"{"seq":3,"lat":1,"lon":1}"#),
            (Some(3), "missing_field:ts")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"lat":1,"lon":1,"ts":{ts}}}"#)),
            (None, "missing_field:seq")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":0,"lat":1,"lon":1,"ts":{ts}}}"#)),
            (None, "seq_not_positive")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":-4,"lat":1,"lon":1,"ts":{ts}}}"#)),
            (None, "seq_not_positive")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":1.5,"lat":1,"lon":1,"ts":{ts}}}"#)),
            (None, "bad_type:seq")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":"1","lat":1,"lon":1,"ts":{ts}}}"#)),
            (None, "bad_type:seq")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":9007199254740992,"lat":1,"lon":1,"ts":{ts}}}"#
            )),
            (None, "seq_out_of_range")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":99999999999999999999999,"lat":1,"lon":1,"ts":{ts}}}"#
            )),
            (None, "seq_out_of_range")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":3,"lat":"1","lon":1,"ts":{ts}}}"#)),
            (Some(3), "bad_type:lat")
        );
        assert_eq!(
            reason_of(r#"{"seq":3,"lat":1,"lon":1,"ts":1.5}"#),
            (Some(3), "bad_type:ts")
        );
        assert_eq!(
            reason_of(r#"{"seq":3,"lat":1,"lon":1,"ts":0}"#),
            (Some(3), "ts_out_of_range")
        );
        assert_eq!(
            reason_of(r#"{"seq":3,"lat":1,"lon":1,"ts":99999999999999999999}"#),
            (Some(3), "ts_out_of_range")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":3,"lat":1,"lat":2,"lon":1,"ts":{ts}}}"#)),
            (Some(3), "duplicate_field:lat")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"id":"dev-2","lat":1,"lon":1,"ts":{ts}}}"#
            )),
            (Some(3), "id_mismatch")
        );
        assert_eq!(
            reason_of(&format!(r#"{{"seq":3,"id":7,"lat":1,"lon":1,"ts":{ts}}}"#)),
            (Some(3), "bad_type:id")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"lat":1,"lon":1,"ts":{ts},"speed":-1}}"#
            )),
            (Some(3), "measurement_out_of_range")
        );
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"lat":1,"lon":1,"ts":{ts},"attrs":[1]}}"#
            )),
            (Some(3), "bad_type:attrs")
        );
        let deep = format!("{}{}", "{\"a\":".repeat(9), "1".to_owned() + &"}".repeat(9));
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"lat":1,"lon":1,"ts":{ts},"attrs":{deep}}}"#
            )),
            (Some(3), "attrs_too_deep")
        );
        let big = format!("{{\"k\":\"{}\"}}", "x".repeat(300));
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"lat":1,"lon":1,"ts":{ts},"attrs":{big}}}"#
            )),
            (Some(3), "attrs_too_large")
        );
        let long_id = "x".repeat(65);
        assert_eq!(
            reason_of(&format!(
                r#"{{"seq":3,"id":"{long_id}","lat":1,"lon":1,"ts":{ts}}}"#
            )),
            (Some(3), "id_too_long")
        );
        // A seq problem wins over an earlier field problem: the reply cannot name the heartbeat.
        assert_eq!(
            reason_of(&format!(r#"{{"lat":"x","seq":0,"lon":1,"ts":{ts}}}"#)),
            (None, "seq_not_positive")
        );
    }

    #[test]
    fn gateway_scope_requires_prefixed_id() {
        // Gateway tokens need `id` and it must start with the prefix.
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway("fleet-"));
        let text = r#"[{"seq":1,"lat":1,"lon":1,"ts":1732200000000},
                      {"seq":2,"id":"x-1","lat":1,"lon":1,"ts":1732200000000},
                      {"seq":3,"id":"fleet-1","lat":1,"lon":1,"ts":1732200000000}]"#;
        let slots = dec.decode_text(text, &ing).unwrap();
        let reasons: Vec<_> = slots
            .iter()
            .map(|s| match s.outcome() {
                Outcome::Accepted { heartbeat, .. } => heartbeat.device_id.clone(),
                Outcome::Rejected { reason, .. } => reason.reason().to_owned(),
            })
            .collect();
        assert_eq!(
            reasons,
            ["missing_field:id", "id_outside_prefix", "fleet-1"]
        );
    }

    #[test]
    fn frame_level_errors() {
        // Syntax errors anywhere, wrong shapes, empty and oversized batches refuse the frame.
        let err = |t: &str| decode(t, true).unwrap_err().reason();
        assert_eq!(err(""), "invalid_json");
        assert_eq!(err("{"), "invalid_json");
        assert_eq!(err(r#"{"seq":1,}"#), "invalid_json");
        assert_eq!(
            err(r#"[{"seq":1,"lat":1,"lon":1,"ts":1732200000000}, {"seq":2"#),
            "invalid_json"
        );
        assert_eq!(err(r#"{"seq":1} x"#), "invalid_json");
        assert_eq!(err(r#"{"id":"\ud800"}"#), "invalid_json");
        assert_eq!(err(r#"{"x":"\ud800"}"#), "invalid_json");
        assert_eq!(err("{\"id\":\"a\u{1}\"}"), "invalid_json");
        assert_eq!(err("01"), "invalid_json");
        assert_eq!(err("nul"), "invalid_json");
        assert_eq!(err("42"), "expected_object_or_array");
        assert_eq!(err(r#""hello""#), "expected_object_or_array");
        assert_eq!(err(" [ ] "), "empty_batch");
        assert_eq!(
            err(&format!("{{\"x\":{}1{}}}", "[".repeat(70), "]".repeat(70))),
            "too_deep"
        );
        let many = format!("[{}]", vec!["{}"; 1001].join(","));
        assert_eq!(err(&many), "too_many_heartbeats");
        let mut dec = Decoder::new();
        let mut ing = ingest(IngestScope::Device("d"));
        ing.heartbeats_max = 2;
        assert_eq!(
            dec.decode_text("[{},{},{}]", &ing).unwrap_err(),
            FrameError::TooManyHeartbeats { max: 2 }
        );
        assert!(dec.slots().is_empty());
    }

    #[test]
    fn surrogate_pairs_decode() {
        // A valid pair becomes one 4-byte character in the id.
        let out = decode(
            r#"{"seq":1,"id":"\ud83d\ude00","lat":1,"lon":1,"ts":1732200000000}"#,
            false,
        )
        .unwrap();
        assert_eq!(out[0].1.clone().unwrap().device_id, "\u{1F600}");
    }

    #[test]
    fn slots_are_reused_without_stale_fields() {
        // A second decode into the same decoder must not see fields from the first.
        let mut dec = Decoder::new();
        let ing = ingest(IngestScope::Gateway(""));
        dec.decode_text(
            r#"{"seq":1,"id":"a","lat":1,"lon":1,"ts":1732200000000,"alt":5,"attrs":{"k":1}}"#,
            &ing,
        )
        .unwrap();
        let slots = dec
            .decode_text(
                r#"{"seq":2,"id":"b","lat":1,"lon":1,"ts":1732200000000}"#,
                &ing,
            )
            .unwrap();
        let Outcome::Accepted { heartbeat, .. } = slots[0].outcome() else {
            panic!("accepted expected");
        };
        assert_eq!(heartbeat.alt_m, None);
        assert!(heartbeat.attrs.is_empty());
        assert_eq!(heartbeat.device_id, "b");
    }

    #[test]
    fn encoder_round_trips() {
        // encode_frame then decode yields the same heartbeats (receive time aside).
        let hb = Heartbeat {
            device_id: "q\"uote\\".into(),
            lat: 52.52,
            lon: -13.405,
            ts_ms: 1_732_200_000_123,
            received_ms: NOW,
            alt_m: Some(34.5),
            speed_mps: None,
            heading_deg: Some(0.1),
            acc_m: Some(4.0),
            attrs: br#"{"fuel":0.5}"#.to_vec(),
        };
        let mut text = String::new();
        encode_frame(&mut text, [(Seq(5), &hb), (Seq(6), &hb)]).unwrap();
        let out = decode(&text, false).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], (Some(6), Ok(hb.clone())));
        let mut bad = hb.clone();
        bad.lat = f64::NAN;
        assert_eq!(
            encode_frame(&mut text, [(Seq(1), &bad)]),
            Err(EncodeError::NonFinite(Field::Lat))
        );
    }

    fn parse_num(text: &str) -> (Option<f64>, Option<f32>, Option<i64>) {
        let mut p = Parser::new(text);
        let n = p.number().expect("valid number");
        assert_eq!(p.pos, text.len(), "whole token consumed");
        (n.to_f64(), n.to_f32(), n.as_i64())
    }

    proptest::proptest! {
        #[test]
        fn number_fast_paths_match_std(text in "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?") {
            // The mantissa/exponent fast paths give bit-identical results to std's parsers.
            let (f64v, f32v, i64v) = parse_num(&text);
            let want64: f64 = text.parse().unwrap();
            let want32: f32 = text.parse().unwrap();
            proptest::prop_assert_eq!(f64v.map(f64::to_bits), Some(want64.to_bits()));
            proptest::prop_assert_eq!(f32v.map(f32::to_bits), Some(want32.to_bits()));
            proptest::prop_assert_eq!(i64v, text.parse::<i64>().ok());
        }

        #[test]
        fn number_display_forms_match_std(v in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
            // Display and exponent forms of any finite float parse exactly as std parses them.
            let narrow = v as f32;
            let mut forms = vec![format!("{v}"), format!("{v:e}")];
            if narrow.is_finite() {
                forms.extend([format!("{narrow}"), format!("{narrow:e}")]);
            }
            for text in forms {
                let (f64v, f32v, _) = parse_num(&text);
                proptest::prop_assert_eq!(f64v.map(f64::to_bits), Some(text.parse::<f64>().unwrap().to_bits()));
                proptest::prop_assert_eq!(f32v.map(f32::to_bits), Some(text.parse::<f32>().unwrap().to_bits()));
            }
        }
    }

    #[test]
    fn compact_attrs_validates_binary_attrs() {
        // Exactly one object, compacted; anything else is bad_type:attrs.
        let mut out = Vec::new();
        compact_attrs(" { \"a\" : [ 1 , 2 ] } ", &mut out).unwrap();
        assert_eq!(out, br#"{"a":[1,2]}"#);
        assert_eq!(
            compact_attrs("[1]", &mut out),
            Err(Reject::BadType(Field::Attrs))
        );
        assert_eq!(
            compact_attrs("{} {}", &mut out),
            Err(Reject::BadType(Field::Attrs))
        );
        assert_eq!(
            compact_attrs("{", &mut out),
            Err(Reject::BadType(Field::Attrs))
        );
    }

    #[test]
    fn attrs_with_a_key_twice_in_one_object_are_refused_and_unknown_fields_twice_ignored() {
        // Issue 20 §8: duplicate keys inside `attrs` were stored as given. Any object inside
        // attrs with a key twice (compared after unescaping) is refused with
        // attrs_duplicate_key, in text and binary frames; the same key in different objects,
        // or as a string value, is fine. An unknown top-level field given twice is ignored like
        // any unknown field.
        let hb = |attrs: &str| format!(r#"{{"seq":3,"lat":1,"lon":1,"ts":{NOW},"attrs":{attrs}}}"#);
        for dup in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"b":2,"a":{}}"#,
            r#"{"x":{"k":[1],"k":null}}"#,
            r#"{"l":[{"z":1,"y":2,"z":3}]}"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"{"\u00e9":1,"é":2}"#,
            r#"{"q\"":1,"q\u0022":2}"#,
            r#"{"\ud83d\ude00":1,"😀":2}"#,
            r#" { "a" : 1 , "a" : 1 } "#,
        ] {
            assert_eq!(
                reason_of(&hb(dup)),
                (Some(3), "attrs_duplicate_key"),
                "{dup}"
            );
            let mut out = Vec::new();
            assert_eq!(
                compact_attrs(dup, &mut out),
                Err(Reject::AttrsDuplicateKey),
                "{dup}"
            );
        }
        for fine in [
            r#"{}"#,
            r#"{"a":1,"b":{"a":2}}"#,
            r#"{"a":{"b":1},"b":{"a":2},"c":[{"a":1},{"a":1}]}"#,
            r#"{"k":"a","a":"k"}"#,
            r#"{"a":1,"A":2,"a ":3,"\\a":4}"#,
            r#"{"{\"a\":1,":1,"a":2}"#,
        ] {
            let out = decode(&hb(fine), true).unwrap();
            assert!(out[0].1.is_ok(), "{fine}: {:?}", out[0].1);
            let mut out = Vec::new();
            assert_eq!(compact_attrs(fine, &mut out), Ok(()), "{fine}");
        }
        let twice = format!(r#"{{"seq":3,"lat":1,"lon":1,"ts":{NOW},"x-new":1,"x-new":2}}"#);
        assert!(decode(&twice, true).unwrap()[0].1.is_ok());
    }
}
