//! The device ingest protocol as pure functions: decoding one WebSocket message (JSON text or
//! binary) into heartbeats, per-heartbeat verdicts (field rules, device-id resolution from the
//! token scope, timestamp policy), the per-connection abuse guards ([`SeqTracker`],
//! [`ErrorBudget`]), the ack/error frame encoders ([`ack`]) and the close codes. It does no I/O and
//! knows nothing of sockets, shards or the log: the server feeds it bytes and acts on the verdicts.
//! The wire format is specified in `docs/PROTOCOL.md`.
//!
//! Invariants: decoding never panics and never allocates per heartbeat once the [`Decoder`]'s
//! slots have grown (their strings and vectors are cleared and refilled, and what one slot keeps
//! is capped at the id and attrs bounds); a [`Slot`] whose outcome is [`Outcome::Accepted`] holds a
//! heartbeat that passed [`Heartbeat::validate`], carries the device id the token allows, is
//! stamped with the receive time and passed the timestamp window; and a frame is either refused
//! as a whole ([`FrameError`]) or every element gets its own verdict.

pub mod ack;
pub mod binary;
pub mod devices;
pub mod json;
pub mod mqtt;

use crate::limits::{
    CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_WINDOW_MS, FRAME_HEARTBEATS_MAX, SEQ_MAX,
    TS_FUTURE_MS_MAX, TS_PAST_MS_MAX,
};
use crate::record::{validate_device_id, Heartbeat, Invalid};

/// WebSocket close codes the ingest server uses (RFC 6455 §7.4.1).
pub mod close {
    /// The server is shutting down (or the connection idled out).
    pub const GOING_AWAY: u16 = 1001;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Protocol abuse: seq not strictly increasing, too many errors (see [`super::Abuse`]).
    pub const POLICY: u16 = 1008;
    /// A message exceeded the configured frame size limit.
    pub const TOO_BIG: u16 = 1009;
}

/// A heartbeat sequence number: chosen by the client, in `1..=`[`SEQ_MAX`], strictly increasing
/// on one connection. Acks name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl Seq {
    /// Checks the range rule: `1..=SEQ_MAX`.
    pub fn new(value: u64) -> Result<Seq, Reject> {
        match value {
            0 => Err(Reject::SeqNotPositive),
            v if v > SEQ_MAX => Err(Reject::SeqOutOfRange),
            v => Ok(Seq(v)),
        }
    }
}

/// A heartbeat field as named on the wire; used in reasons such as `missing_field:lat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `seq`
    Seq,
    /// `id`
    Id,
    /// `lat`
    Lat,
    /// `lon`
    Lon,
    /// `ts`
    Ts,
    /// `alt`
    Alt,
    /// `speed`
    Speed,
    /// `heading`
    Heading,
    /// `acc`
    Acc,
    /// `attrs`
    Attrs,
}

macro_rules! field_strings {
    ($self:ident, $prefix:literal) => {
        match $self {
            Field::Seq => concat!($prefix, "seq"),
            Field::Id => concat!($prefix, "id"),
            Field::Lat => concat!($prefix, "lat"),
            Field::Lon => concat!($prefix, "lon"),
            Field::Ts => concat!($prefix, "ts"),
            Field::Alt => concat!($prefix, "alt"),
            Field::Speed => concat!($prefix, "speed"),
            Field::Heading => concat!($prefix, "heading"),
            Field::Acc => concat!($prefix, "acc"),
            Field::Attrs => concat!($prefix, "attrs"),
        }
    };
}

impl Field {
    /// The wire name (`"lat"`).
    pub fn name(self) -> &'static str {
        field_strings!(self, "")
    }

    /// Bit in a field-presence mask.
    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// Maps a wire name to a field; `None` for unknown names (ignored for forward compatibility).
    pub fn from_name(name: &[u8]) -> Option<Field> {
        // Names are at most 7 bytes: pack bytes and length into one u64 and compare integers.
        const fn pack(name: &[u8]) -> u64 {
            let mut v = (name.len() as u64) << 56;
            let mut i = 0;
            while i < name.len() {
                v |= (name[i] as u64) << (8 * i);
                i += 1;
            }
            v
        }
        const SEQ: u64 = pack(b"seq");
        const ID: u64 = pack(b"id");
        const LAT: u64 = pack(b"lat");
        const LON: u64 = pack(b"lon");
        const TS: u64 = pack(b"ts");
        const ALT: u64 = pack(b"alt");
        const SPEED: u64 = pack(b"speed");
        const HEADING: u64 = pack(b"heading");
        const ACC: u64 = pack(b"acc");
        const ATTRS: u64 = pack(b"attrs");
        if name.len() > 7 {
            return None;
        }
        Some(match pack(name) {
            SEQ => Field::Seq,
            ID => Field::Id,
            LAT => Field::Lat,
            LON => Field::Lon,
            TS => Field::Ts,
            ALT => Field::Alt,
            SPEED => Field::Speed,
            HEADING => Field::Heading,
            ACC => Field::Acc,
            ATTRS => Field::Attrs,
            _ => return None,
        })
    }
}

/// Why one heartbeat was refused (sent as `{"seq":N,"error":"<reason>"}`, or with `"seq":null`
/// when the seq itself is the problem). The reason strings are protocol: extend, never rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A record rule failed (see [`Invalid::reason`]).
    Invalid(Invalid),
    /// A required field is absent: `missing_field:<name>`.
    MissingField(Field),
    /// A field has the wrong JSON type (or is not an integer where one is required; for binary
    /// frames: an id that is not UTF-8 or attrs that are not one JSON object): `bad_type:<name>`.
    BadType(Field),
    /// A field appears twice in one object: `duplicate_field:<name>`.
    DuplicateField(Field),
    /// `seq` is zero or negative: `seq_not_positive`.
    SeqNotPositive,
    /// `seq` is above 2^53-1: `seq_out_of_range`.
    SeqOutOfRange,
    /// `ts` outside the accepted window around the receive time: `ts_out_of_range`.
    TsOutOfRange,
    /// `ts` outside the window, but inside it when read as seconds (a device sending
    /// seconds, not milliseconds, since the epoch): `ts_in_seconds`.
    TsInSeconds,
    /// A device token's connection sent a heartbeat naming another device: `id_mismatch`.
    IdMismatch,
    /// A gateway token's connection sent an id outside its prefix: `id_outside_prefix`.
    IdOutsidePrefix,
    /// An element of a JSON array frame is not an object: `not_an_object`.
    NotAnObject,
    /// `attrs` nests deeper than `JSON_DEPTH_MAX`: `attrs_too_deep`.
    AttrsTooDeep,
    /// An object inside `attrs` has two members with the same key (compared after unescaping):
    /// `attrs_duplicate_key`.
    AttrsDuplicateKey,
}

impl Reject {
    /// The stable reason string.
    pub fn reason(self) -> &'static str {
        match self {
            Reject::Invalid(i) => i.reason(),
            Reject::MissingField(f) => field_strings!(f, "missing_field:"),
            Reject::BadType(f) => field_strings!(f, "bad_type:"),
            Reject::DuplicateField(f) => field_strings!(f, "duplicate_field:"),
            Reject::SeqNotPositive => "seq_not_positive",
            Reject::SeqOutOfRange => "seq_out_of_range",
            Reject::TsOutOfRange => "ts_out_of_range",
            Reject::TsInSeconds => "ts_in_seconds",
            Reject::IdMismatch => "id_mismatch",
            Reject::IdOutsidePrefix => "id_outside_prefix",
            Reject::NotAnObject => "not_an_object",
            Reject::AttrsTooDeep => "attrs_too_deep",
            Reject::AttrsDuplicateKey => "attrs_duplicate_key",
        }
    }
}

/// Why a whole frame was refused (sent as `{"seq":null,"error":"<reason>"}`; the connection stays
/// open unless [`FrameError::close_code`] says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not valid JSON (`invalid_json`); `offset` is the byte where parsing failed.
    #[error("invalid_json at byte {offset}")]
    InvalidJson {
        /// Byte offset of the failure in the frame.
        offset: usize,
    },
    /// Valid JSON start but neither an object nor an array (`expected_object_or_array`).
    #[error("expected_object_or_array")]
    ExpectedObjectOrArray,
    /// JSON nesting deeper than `FRAME_JSON_DEPTH_MAX` (`too_deep`).
    #[error("too_deep at byte {offset}")]
    TooDeep {
        /// Byte offset where the limit was crossed.
        offset: usize,
    },
    /// More heartbeats than the configured per-frame maximum (`too_many_heartbeats`).
    #[error("too_many_heartbeats (max {max})")]
    TooManyHeartbeats {
        /// The maximum in force.
        max: usize,
    },
    /// An empty array or a binary batch of zero (`empty_batch`).
    #[error("empty_batch")]
    EmptyBatch,
    /// Binary frame with an unknown version byte (`unknown_version`).
    #[error("unknown_version {version}")]
    UnknownVersion {
        /// The version byte received.
        version: u8,
    },
    /// Binary frame ends inside a heartbeat (`truncated`).
    #[error("truncated at byte {offset}")]
    Truncated {
        /// Byte offset where more input was needed.
        offset: usize,
    },
    /// Binary frame has bytes after its last heartbeat (`trailing_bytes`).
    #[error("trailing_bytes at byte {offset}")]
    TrailingBytes {
        /// Byte offset of the first trailing byte.
        offset: usize,
    },
    /// Binary heartbeat flags with reserved bits set (`reserved_flags`): the layout of what
    /// follows is unknown, so the frame cannot be walked further.
    #[error("reserved_flags at byte {offset}")]
    ReservedFlags {
        /// Byte offset of the flags byte.
        offset: usize,
    },
    /// Frame larger than `FRAME_BYTES_MAX` (`frame_too_big`); the caller closes with 1009.
    #[error("frame_too_big ({bytes} bytes)")]
    TooBig {
        /// Frame size in bytes.
        bytes: usize,
    },
}

impl FrameError {
    /// The stable reason string for `{"seq":null,"error":"<reason>"}`.
    pub fn reason(self) -> &'static str {
        match self {
            FrameError::InvalidJson { .. } => "invalid_json",
            FrameError::ExpectedObjectOrArray => "expected_object_or_array",
            FrameError::TooDeep { .. } => "too_deep",
            FrameError::TooManyHeartbeats { .. } => "too_many_heartbeats",
            FrameError::EmptyBatch => "empty_batch",
            FrameError::UnknownVersion { .. } => "unknown_version",
            FrameError::Truncated { .. } => "truncated",
            FrameError::TrailingBytes { .. } => "trailing_bytes",
            FrameError::ReservedFlags { .. } => "reserved_flags",
            FrameError::TooBig { .. } => "frame_too_big",
        }
    }

    /// The close code the caller must close with, if the error ends the connection.
    pub fn close_code(self) -> Option<u16> {
        match self {
            FrameError::TooBig { .. } => Some(close::TOO_BIG),
            _ => None,
        }
    }
}

/// Protocol abuse: the caller sends a close frame with [`close::POLICY`] and [`Abuse::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Abuse {
    /// A seq not above the previous one on this connection.
    #[error("seq_not_increasing ({got} after {last})")]
    SeqNotIncreasing {
        /// The previous seq.
        last: u64,
        /// The offending seq.
        got: u64,
    },
    /// More error frames than the [`ErrorBudget`] allows.
    #[error("too_many_errors")]
    TooManyErrors,
}

impl Abuse {
    /// The close reason text (short, stable).
    pub fn reason(self) -> &'static str {
        match self {
            Abuse::SeqNotIncreasing { .. } => "seq_not_increasing",
            Abuse::TooManyErrors => "too_many_errors",
        }
    }

    /// Always [`close::POLICY`].
    pub fn close_code(self) -> u16 {
        close::POLICY
    }
}

/// Per-connection check that seqs strictly increase. Every heartbeat with a known seq goes
/// through it, accepted or rejected, in frame order: the seq orders the stream, not the store.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    last: u64,
}

impl SeqTracker {
    /// A tracker that has seen nothing (any seq >= 1 passes first).
    pub fn new() -> SeqTracker {
        SeqTracker::default()
    }

    /// Accepts `seq` if it is above every seq seen before, and remembers it.
    pub fn check(&mut self, seq: Seq) -> Result<(), Abuse> {
        if seq.0 <= self.last {
            return Err(Abuse::SeqNotIncreasing {
                last: self.last,
                got: seq.0,
            });
        }
        self.last = seq.0;
        Ok(())
    }

    /// The last seq accepted by [`SeqTracker::check`].
    pub fn last(&self) -> Option<Seq> {
        (self.last > 0).then_some(Seq(self.last))
    }
}

/// Per-connection error rate limit, a generic cell rate algorithm (GCRA): a burst of
/// `errors_max` errors, then one more every `window_ms / errors_max`. Integer-only, two words.
#[derive(Debug, Clone)]
pub struct ErrorBudget {
    /// Theoretical arrival time of the next error, in ms; starts at 0 ("no debt").
    tat_ms: u64,
    interval_ms: u64,
    tolerance_ms: u64,
}

impl Default for ErrorBudget {
    fn default() -> Self {
        ErrorBudget::new(CONN_ERRORS_PER_WINDOW_MAX, CONN_ERRORS_WINDOW_MS)
    }
}

impl ErrorBudget {
    /// A budget of `errors_max` errors per `window_ms`. Panics if either is zero (a programming
    /// error: the bounds are constants or validated configuration).
    pub fn new(errors_max: u32, window_ms: u64) -> ErrorBudget {
        assert!(
            errors_max > 0 && window_ms > 0,
            "error budget must be positive"
        );
        let interval_ms = (window_ms / u64::from(errors_max)).max(1);
        ErrorBudget {
            tat_ms: 0,
            interval_ms,
            tolerance_ms: interval_ms * u64::from(errors_max),
        }
    }

    /// Records one error at `now_ms` (a monotonic or wall clock in ms, never going backwards by
    /// much); `Err` once the budget is exhausted (and for every error after that).
    pub fn charge(&mut self, now_ms: u64) -> Result<(), Abuse> {
        let tat = self.tat_ms.max(now_ms) + self.interval_ms;
        if tat - now_ms > self.tolerance_ms {
            return Err(Abuse::TooManyErrors);
        }
        self.tat_ms = tat;
        Ok(())
    }
}

/// The accepted window for device time `ts` relative to the receive time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsWindow {
    /// How far before the receive time `ts` may lie, in ms.
    pub past_ms: i64,
    /// How far after the receive time `ts` may lie, in ms.
    pub future_ms: i64,
}

impl Default for TsWindow {
    fn default() -> Self {
        TsWindow {
            past_ms: TS_PAST_MS_MAX,
            future_ms: TS_FUTURE_MS_MAX,
        }
    }
}

impl TsWindow {
    /// Whether `ts_ms` lies in `[received_ms - past_ms, received_ms + future_ms]`.
    pub fn contains(&self, ts_ms: i64, received_ms: i64) -> bool {
        let low = received_ms.saturating_sub(self.past_ms);
        let high = received_ms.saturating_add(self.future_ms);
        (low..=high).contains(&ts_ms)
    }
}

/// What a connection's token allows it to ingest (only device and gateway tokens may ingest; the
/// caller refuses other scopes before the upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestScope<'a> {
    /// Exactly this device; a heartbeat's `id`, if present, must equal it.
    Device(&'a str),
    /// Any device whose id starts with this prefix; `id` is required.
    Gateway(&'a str),
}

impl<'a> IngestScope<'a> {
    /// The ingest scope of a token scope, `None` for scopes that may not ingest.
    pub fn from_scope(scope: &'a crate::auth::Scope) -> Option<IngestScope<'a>> {
        match scope {
            crate::auth::Scope::Device(id) => Some(IngestScope::Device(id)),
            crate::auth::Scope::Gateway(prefix) => Some(IngestScope::Gateway(prefix)),
            crate::auth::Scope::Ops | crate::auth::Scope::Subscriber(_) => None,
        }
    }
}

/// Resolves the device id of one heartbeat: `claimed` is the heartbeat's own `id` (`None` if
/// absent); on success `out` holds the id to store (reusing its allocation).
pub fn resolve_device_id(
    scope: IngestScope<'_>,
    claimed: Option<&str>,
    out: &mut String,
) -> Result<(), Reject> {
    out.clear();
    if let Some(c) = claimed {
        out.push_str(c);
    }
    resolve_in_place(scope, out, claimed.is_some())
}

/// [`resolve_device_id`] on an id already decoded into the heartbeat (`present`: whether the
/// heartbeat carried one), so the common path copies nothing.
fn resolve_in_place(scope: IngestScope<'_>, id: &mut String, present: bool) -> Result<(), Reject> {
    match scope {
        IngestScope::Device(token_id) if !present => {
            id.clear();
            id.push_str(token_id);
            Ok(())
        }
        IngestScope::Device(token_id) if id == token_id => Ok(()),
        IngestScope::Device(_) => Err(Reject::IdMismatch),
        IngestScope::Gateway(_) if !present => Err(Reject::MissingField(Field::Id)),
        IngestScope::Gateway(prefix) => {
            validate_device_id(id).map_err(Reject::Invalid)?;
            if id.starts_with(prefix) {
                Ok(())
            } else {
                Err(Reject::IdOutsidePrefix)
            }
        }
    }
}

/// Everything a decode needs besides the bytes.
#[derive(Debug, Clone, Copy)]
pub struct Ingest<'a> {
    /// What the connection's token allows.
    pub scope: IngestScope<'a>,
    /// Receive time stamped on every accepted heartbeat, ms since the Unix epoch.
    pub received_ms: i64,
    /// Most heartbeats per frame (configuration; at most `FRAME_HEARTBEATS_MAX`).
    pub heartbeats_max: usize,
    /// Accepted device-time window.
    pub ts_window: TsWindow,
}

impl<'a> Ingest<'a> {
    /// A context with the default limits.
    pub fn new(scope: IngestScope<'a>, received_ms: i64) -> Ingest<'a> {
        Ingest {
            scope,
            received_ms,
            heartbeats_max: FRAME_HEARTBEATS_MAX,
            ts_window: TsWindow::default(),
        }
    }
}

/// What became of one element of a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome<'a> {
    /// Valid and allowed: store it, then ack `seq`.
    Accepted {
        /// The heartbeat's seq.
        seq: Seq,
        /// The heartbeat, ready to store.
        heartbeat: &'a Heartbeat,
    },
    /// Refused: send `{"seq":<seq or null>,"error":"<reason>"}`.
    Rejected {
        /// The seq, if it was present and in range.
        seq: Option<Seq>,
        /// Why.
        reason: Reject,
    },
}

/// One decoded element: a reusable heartbeat plus its verdict.
#[derive(Debug, Default, Clone)]
pub struct Slot {
    seq: Option<Seq>,
    verdict: Option<Reject>,
    heartbeat: Heartbeat,
}

impl Slot {
    /// The element's seq, if present and in range (for the [`SeqTracker`]).
    pub fn seq(&self) -> Option<Seq> {
        self.seq
    }

    /// The verdict, with the heartbeat if accepted.
    pub fn outcome(&self) -> Outcome<'_> {
        match (self.seq, self.verdict) {
            (Some(seq), None) => Outcome::Accepted {
                seq,
                heartbeat: &self.heartbeat,
            },
            (seq, Some(reason)) => Outcome::Rejected { seq, reason },
            (None, None) => unreachable!("a slot without seq always carries a verdict"),
        }
    }

    /// Mutable access to an accepted heartbeat (e.g. to `std::mem::take` it), `None` if rejected.
    pub fn accepted_mut(&mut self) -> Option<&mut Heartbeat> {
        match (self.seq, self.verdict) {
            (Some(_), None) => Some(&mut self.heartbeat),
            _ => None,
        }
    }

    /// Resets for reuse, keeping allocations.
    fn reset(&mut self) {
        self.seq = None;
        self.verdict = None;
        self.heartbeat.clear();
    }

    /// Records a rejection unless an earlier one is already recorded (the first problem wins).
    fn reject(&mut self, reason: Reject) {
        if self.verdict.is_none() {
            self.verdict = Some(reason);
        }
    }

    /// Records a seq problem, overriding any other: without a seq the reply cannot name the
    /// heartbeat, so the client most needs to learn why its seq was refused.
    fn reject_seq(&mut self, reason: Reject) {
        self.seq = None;
        self.verdict = Some(reason);
    }

    /// Records a parsed seq (or its problem).
    fn set_seq(&mut self, value: u64) {
        match Seq::new(value) {
            Ok(seq) => self.seq = Some(seq),
            Err(r) => self.reject_seq(r),
        }
    }
}

/// Reusable decoding state. Decoding is synchronous, so one `Decoder` per executor thread serves
/// every connection on it; the slots returned by a decode must be consumed before the next one.
#[derive(Debug, Default)]
pub struct Decoder {
    slots: Vec<Slot>,
    len: usize,
    /// Decoded object keys that contain escapes (rare); bounded by the key cap in `json`.
    key_scratch: String,
    /// Set for the duration of [`Decoder::decode_text_seqless`]: an element without `seq`
    /// takes its 1-based position in the frame as its seq.
    seqless: bool,
}

impl Decoder {
    /// An empty decoder (slots grow on first use and are then reused).
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes a text frame: one JSON heartbeat object or an array of them.
    pub fn decode_text(
        &mut self,
        text: &str,
        ingest: &Ingest<'_>,
    ) -> Result<&mut [Slot], FrameError> {
        self.len = 0;
        if let Err(e) = json::decode_frame(self, text, ingest) {
            self.len = 0;
            return Err(e);
        }
        Ok(&mut self.slots[..self.len])
    }

    /// Decodes a JSON text whose heartbeats carry no `seq` (MQTT payloads, where the packet id
    /// names the ack): an element without `seq` gets its 1-based position in the frame, so each
    /// accepted [`Slot`] still has a seq; a `seq` that is present is checked as usual.
    pub fn decode_text_seqless(
        &mut self,
        text: &str,
        ingest: &Ingest<'_>,
    ) -> Result<&mut [Slot], FrameError> {
        self.len = 0;
        self.seqless = true;
        let r = json::decode_frame(self, text, ingest);
        self.seqless = false;
        if let Err(e) = r {
            self.len = 0;
            return Err(e);
        }
        Ok(&mut self.slots[..self.len])
    }

    /// Decodes a binary frame (layout in [`binary`]).
    pub fn decode_binary(
        &mut self,
        bytes: &[u8],
        ingest: &Ingest<'_>,
    ) -> Result<&mut [Slot], FrameError> {
        self.len = 0;
        if let Err(e) = binary::decode_frame(self, bytes, ingest) {
            self.len = 0;
            return Err(e);
        }
        Ok(&mut self.slots[..self.len])
    }

    /// The slots of the last successful decode.
    pub fn slots(&self) -> &[Slot] {
        &self.slots[..self.len]
    }

    /// Starts the next element, returning its cleared slot; `Err` past `heartbeats_max`.
    fn next_slot(&mut self, heartbeats_max: usize) -> Result<usize, FrameError> {
        let max = heartbeats_max.min(FRAME_HEARTBEATS_MAX);
        if self.len >= max {
            return Err(FrameError::TooManyHeartbeats { max });
        }
        if self.len == self.slots.len() {
            self.slots.push(Slot::default());
        }
        let i = self.len;
        self.len += 1;
        self.slots[i].reset();
        Ok(i)
    }

    /// Applies the per-heartbeat rules once all fields of slot `i` are parsed: seq, required
    /// fields (given as a presence mask), device id, timestamp window, record validation.
    fn finish_slot(&mut self, i: usize, present: u16, ingest: &Ingest<'_>) {
        let slot = &mut self.slots[i];
        if self.seqless && present & Field::Seq.bit() == 0 {
            slot.seq = Some(Seq(i as u64 + 1));
        }
        if slot.seq.is_none() {
            // A seq that was present but bad has its own verdict already; the seq problem is
            // reported in preference to any other (the reply cannot name the heartbeat).
            if present & Field::Seq.bit() == 0 {
                slot.verdict = Some(Reject::MissingField(Field::Seq));
            }
            debug_assert!(
                slot.verdict.is_some(),
                "a bad seq is recorded while parsing"
            );
            return;
        }
        if slot.verdict.is_some() {
            return;
        }
        for f in [Field::Lat, Field::Lon, Field::Ts] {
            if present & f.bit() == 0 {
                slot.verdict = Some(Reject::MissingField(f));
                return;
            }
        }
        let has_id = present & Field::Id.bit() != 0;
        if let Err(r) = resolve_in_place(ingest.scope, &mut slot.heartbeat.device_id, has_id) {
            slot.verdict = Some(r);
            return;
        }
        let (ts_ms, window) = (slot.heartbeat.ts_ms, &ingest.ts_window);
        if !window.contains(ts_ms, ingest.received_ms) {
            // A 10-digit `ts` that is now when read as seconds is the commonest device bug
            // (`time()` instead of milliseconds): its reason says so.
            let seconds = ts_ms
                .checked_mul(1000)
                .is_some_and(|ms| window.contains(ms, ingest.received_ms));
            slot.verdict = Some(if seconds {
                Reject::TsInSeconds
            } else {
                Reject::TsOutOfRange
            });
            return;
        }
        slot.heartbeat.received_ms = ingest.received_ms;
        if let Err(e) = slot.heartbeat.validate() {
            slot.verdict = Some(Reject::Invalid(e));
        }
    }
}

/// Why heartbeats could not be encoded. The encoders (for clients, tests and the load generator)
/// refuse only what their format cannot represent; they deliberately do not apply the protocol's
/// rules (seq range, coordinate ranges, id and attrs bounds), so tests can craft frames the
/// decoder must refuse. On error the output buffer's content is unspecified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// More heartbeats than the binary count field can carry.
    #[error("{count} heartbeats exceed the encodable maximum of {max}")]
    TooManyHeartbeats {
        /// Heartbeats given.
        count: usize,
        /// The maximum.
        max: usize,
    },
    /// A float field is NaN or infinite (not representable in JSON).
    #[error("field {} is not finite", .0.name())]
    NonFinite(Field),
    /// Device id longer than the binary length byte can express.
    #[error("device id of {0} bytes is too long to encode")]
    IdTooLong(usize),
    /// Attrs longer than the binary length field can express.
    #[error("attrs of {0} bytes are too long to encode")]
    AttrsTooLarge(usize),
    /// Attrs are not UTF-8 text (JSON text frames cannot carry them).
    #[error("attrs are not UTF-8 JSON text")]
    AttrsNotText,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_stable_strings() {
        // The reason table is protocol: spot-check composed and plain reasons.
        assert_eq!(
            Reject::MissingField(Field::Lat).reason(),
            "missing_field:lat"
        );
        assert_eq!(Reject::BadType(Field::Ts).reason(), "bad_type:ts");
        assert_eq!(
            Reject::DuplicateField(Field::Attrs).reason(),
            "duplicate_field:attrs"
        );
        assert_eq!(Reject::Invalid(Invalid::Lat).reason(), "lat_out_of_range");
        assert_eq!(Reject::SeqNotPositive.reason(), "seq_not_positive");
        for unknown in [
            &b""[..],
            b"s",
            b"seqq",
            b"Lat",
            b"headings",
            b"\0\0\0\0\0\0\0\x03",
        ] {
            assert_eq!(Field::from_name(unknown), None);
        }
        assert_eq!(
            FrameError::TooManyHeartbeats { max: 3 }.reason(),
            "too_many_heartbeats"
        );
        for f in [
            Field::Seq,
            Field::Id,
            Field::Lat,
            Field::Lon,
            Field::Ts,
            Field::Alt,
            Field::Speed,
            Field::Heading,
            Field::Acc,
            Field::Attrs,
        ] {
            assert_eq!(Field::from_name(f.name().as_bytes()), Some(f));
            let mut padded = f.name().as_bytes().to_vec();
            padded.push(0);
            assert_eq!(
                Field::from_name(&padded),
                None,
                "NUL padding is not the same name"
            );
            assert_eq!(Field::from_name(&padded[1..]), None);
            assert_eq!(
                Reject::BadType(f).reason(),
                format!("bad_type:{}", f.name())
            );
        }
    }

    #[test]
    fn seq_tracker_requires_strict_increase() {
        // Equal and smaller seqs are abuse; gaps are fine.
        let mut t = SeqTracker::new();
        assert_eq!(t.last(), None);
        t.check(Seq(1)).unwrap();
        t.check(Seq(5)).unwrap();
        assert_eq!(
            t.check(Seq(5)),
            Err(Abuse::SeqNotIncreasing { last: 5, got: 5 })
        );
        assert!(t.check(Seq(3)).is_err());
        t.check(Seq(6)).unwrap();
        assert_eq!(t.last(), Some(Seq(6)));
    }

    #[test]
    fn error_budget_allows_burst_then_rate() {
        // 100 errors at once pass, the 101st fails; after 600 ms (60 s / 100) one more passes.
        let mut b = ErrorBudget::new(100, 60_000);
        let t0 = 1_000_000;
        for _ in 0..100 {
            b.charge(t0).unwrap();
        }
        assert_eq!(b.charge(t0), Err(Abuse::TooManyErrors));
        assert_eq!(b.charge(t0 + 599), Err(Abuse::TooManyErrors));
        b.charge(t0 + 600).unwrap();
        assert!(b.charge(t0 + 600).is_err());
        // After a full quiet window the whole burst is available again.
        let t1 = t0 + 600 + 60_000;
        for _ in 0..100 {
            b.charge(t1).unwrap();
        }
        assert!(b.charge(t1).is_err());
    }

    #[test]
    fn ts_window_bounds_are_inclusive() {
        // Exactly at both edges passes, one ms beyond fails, extreme values do not overflow.
        let w = TsWindow {
            past_ms: 1000,
            future_ms: 10,
        };
        assert!(w.contains(0, 1000));
        assert!(!w.contains(-1, 1000));
        assert!(w.contains(1010, 1000));
        assert!(!w.contains(1011, 1000));
        assert!(!w.contains(i64::MIN, i64::MAX));
        assert!(TsWindow::default().contains(i64::MAX, i64::MAX));
    }

    #[test]
    fn device_ids_resolve_per_scope() {
        // Device tokens fix the id; gateway tokens require a valid id under the prefix.
        let mut out = String::new();
        resolve_device_id(IngestScope::Device("d1"), None, &mut out).unwrap();
        assert_eq!(out, "d1");
        resolve_device_id(IngestScope::Device("d1"), Some("d1"), &mut out).unwrap();
        assert_eq!(
            resolve_device_id(IngestScope::Device("d1"), Some("d2"), &mut out),
            Err(Reject::IdMismatch)
        );
        let gw = IngestScope::Gateway("fleet-");
        assert_eq!(
            resolve_device_id(gw, None, &mut out),
            Err(Reject::MissingField(Field::Id))
        );
        assert_eq!(
            resolve_device_id(gw, Some("other-1"), &mut out),
            Err(Reject::IdOutsidePrefix)
        );
        assert_eq!(
            resolve_device_id(gw, Some(""), &mut out),
            Err(Reject::Invalid(Invalid::IdEmpty))
        );
        resolve_device_id(gw, Some("fleet-7"), &mut out).unwrap();
        assert_eq!(out, "fleet-7");
    }

    #[test]
    fn seq_range_is_checked() {
        // 0 and 2^53 are refused with distinct reasons; the bounds themselves pass.
        assert_eq!(Seq::new(0), Err(Reject::SeqNotPositive));
        assert_eq!(Seq::new(SEQ_MAX + 1), Err(Reject::SeqOutOfRange));
        assert_eq!(Seq::new(1), Ok(Seq(1)));
        assert_eq!(Seq::new(SEQ_MAX), Ok(Seq(SEQ_MAX)));
    }
}
