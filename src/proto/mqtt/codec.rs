//! The MQTT 3.1.1 / 5 wire codec: one packet at a time, decoded as views borrowed from the
//! caller's read buffer, encoded by appending to the caller's write buffer. It owns the byte
//! layout (fixed header, Remaining Length varint, strings, MQTT 5 properties) and the structural
//! rules of each packet type; it does not know what a topic means, which packet is allowed when,
//! or what to reply: that is [`super::session`].
//!
//! Invariants: [`decode`] never panics and never allocates; it answers `Ok(None)` for every
//! proper prefix of a packet (need more bytes), refuses a packet whose declared length is above
//! the bound before reading its body, and a decoded packet re-encodes to a packet that decodes
//! to the same value ([`encode`] writes the shortest form: MQTT 5 acks without the optional
//! reason byte when it is 0 and there are no properties). Strings are checked to be
//! UTF-8 without U+0000; properties are walked and type-checked but kept as raw bytes (read them
//! with [`Props`]).

use std::fmt;

/// The protocol level of a connection (CONNECT byte 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5 (level 5).
    V5,
}

impl Version {
    /// The protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// Why bytes are not a well-formed packet. Every variant ends the connection (MQTT 5: DISCONNECT
/// 0x81 Malformed Packet, or 0x95 for [`CodecError::TooLarge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The Remaining Length varint runs past 4 bytes.
    #[error("malformed remaining length")]
    BadLength,
    /// The declared packet is larger than the bound.
    #[error("packet of {bytes} bytes exceeds {max}")]
    TooLarge {
        /// Declared packet size (fixed header included).
        bytes: usize,
        /// The bound in force.
        max: usize,
    },
    /// Packet type 0 or 15 (AUTH before MQTT 5), or reserved flag bits set.
    #[error("bad packet type or flags in byte {byte:#04x}")]
    BadHeader {
        /// The first byte.
        byte: u8,
    },
    /// The body ends before a field it declares.
    #[error("truncated {packet} body")]
    Truncated {
        /// Packet type name.
        packet: &'static str,
    },
    /// The body has bytes after its last field.
    #[error("trailing bytes in {packet}")]
    Trailing {
        /// Packet type name.
        packet: &'static str,
    },
    /// A string is not UTF-8 or contains U+0000.
    #[error("invalid UTF-8 string in {packet}")]
    BadString {
        /// Packet type name.
        packet: &'static str,
    },
    /// CONNECT with a protocol name other than "MQTT" (level 3 "MQIsdp" included).
    #[error("protocol name is not MQTT")]
    BadProtocolName,
    /// CONNECT with a protocol level other than 4 or 5 (CONNACK 0x01 / 0x84 then close).
    #[error("unsupported protocol level {level}")]
    BadLevel {
        /// The level received.
        level: u8,
    },
    /// A field outside its allowed values (QoS 3, reserved CONNECT flag, packet id 0, ...).
    #[error("invalid field in {packet}: {what}")]
    Invalid {
        /// Packet type name.
        packet: &'static str,
        /// Which rule.
        what: &'static str,
    },
    /// An MQTT 5 property id unknown or of the wrong shape.
    #[error("bad property {id:#04x} in {packet}")]
    BadProperty {
        /// Packet type name.
        packet: &'static str,
        /// Property identifier.
        id: u8,
    },
}

/// Quality of service of a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    /// At most once: nothing is sent back.
    AtMostOnce = 0,
    /// At least once: PUBACK.
    AtLeastOnce = 1,
    /// Exactly once: PUBREC, PUBREL, PUBCOMP.
    ExactlyOnce = 2,
}

impl QoS {
    fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// CONNECT (client → server). `props`/`will_props` are raw MQTT 5 property bytes (empty for 3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    /// Protocol level.
    pub version: Version,
    /// Clean Session (3.1.1) / Clean Start (5).
    pub clean: bool,
    /// Keep Alive in seconds (0 = none).
    pub keep_alive_s: u16,
    /// CONNECT properties.
    pub props: &'a [u8],
    /// Client identifier (may be empty).
    pub client_id: &'a str,
    /// Will: (properties, topic, payload, qos, retain), if the Will flag is set.
    pub will: Option<Will<'a>>,
    /// User Name, if present.
    pub username: Option<&'a str>,
    /// Password, if present (binary).
    pub password: Option<&'a [u8]>,
}

/// A CONNECT's Will message (decoded so the packet can be walked; geobeat never publishes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    /// Will properties (MQTT 5).
    pub props: &'a [u8],
    /// Will topic.
    pub topic: &'a str,
    /// Will payload.
    pub payload: &'a [u8],
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
}

/// CONNACK (server → client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck<'a> {
    /// Session Present.
    pub session_present: bool,
    /// Return code (3.1.1) / reason code (5).
    pub code: u8,
    /// CONNACK properties (MQTT 5).
    pub props: &'a [u8],
}

/// PUBLISH (either direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (no wildcards; may be empty in MQTT 5 only with a Topic Alias).
    pub topic: &'a str,
    /// Packet id, present iff QoS > 0 (never 0).
    pub packet_id: Option<u16>,
    /// PUBLISH properties (MQTT 5).
    pub props: &'a [u8],
    /// Application payload.
    pub payload: &'a [u8],
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP and (MQTT 5) their reason code and properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    /// Packet id (never 0).
    pub packet_id: u16,
    /// Reason code (0 = success; always 0 in 3.1.1).
    pub code: u8,
    /// Properties (MQTT 5), e.g. a Reason String.
    pub props: &'a [u8],
}

/// SUBSCRIBE / UNSUBSCRIBE: the filter list is kept raw and walked with [`Filters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribe<'a> {
    /// Packet id (never 0).
    pub packet_id: u16,
    /// Properties (MQTT 5).
    pub props: &'a [u8],
    /// The validated filter list (string, then an options byte for SUBSCRIBE).
    pub filters: Filters<'a>,
}

/// SUBACK / UNSUBACK: one return/reason code per filter (UNSUBACK 3.1.1 has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubAck<'a> {
    /// Packet id.
    pub packet_id: u16,
    /// Properties (MQTT 5).
    pub props: &'a [u8],
    /// Codes, one per filter.
    pub codes: &'a [u8],
}

/// DISCONNECT (either direction) and AUTH (MQTT 5): reason code and properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoned<'a> {
    /// Reason code (0 = normal).
    pub code: u8,
    /// Properties.
    pub props: &'a [u8],
}

/// One MQTT control packet, borrowed from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// CONNECT.
    Connect(Connect<'a>),
    /// CONNACK.
    ConnAck(ConnAck<'a>),
    /// PUBLISH.
    Publish(Publish<'a>),
    /// PUBACK.
    PubAck(Ack<'a>),
    /// PUBREC.
    PubRec(Ack<'a>),
    /// PUBREL.
    PubRel(Ack<'a>),
    /// PUBCOMP.
    PubComp(Ack<'a>),
    /// SUBSCRIBE.
    Subscribe(Subscribe<'a>),
    /// SUBACK.
    SubAck(SubAck<'a>),
    /// UNSUBSCRIBE.
    Unsubscribe(Subscribe<'a>),
    /// UNSUBACK.
    UnsubAck(SubAck<'a>),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect(Reasoned<'a>),
    /// AUTH (MQTT 5 only).
    Auth(Reasoned<'a>),
}

impl Packet<'_> {
    /// The packet type name (for errors, logs and metric labels).
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// A SUBSCRIBE/UNSUBSCRIBE filter list, validated when decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Filters<'a> {
    raw: &'a [u8],
    /// SUBSCRIBE entries carry an options byte after each filter.
    options: bool,
}

impl fmt::Debug for Filters<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Filters<'a> {
    /// Builds a list for [`encode`] from raw entry bytes (as [`Filters::raw`] returns them).
    pub fn from_raw(raw: &'a [u8], options: bool) -> Filters<'a> {
        Filters { raw, options }
    }

    /// The raw entry bytes.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Each filter with its options byte (0 for UNSUBSCRIBE).
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, u8)> + 'a {
        let mut r = Reader::new(self.raw, "SUBSCRIBE");
        let options = self.options;
        std::iter::from_fn(move || {
            if r.is_empty() {
                return None;
            }
            // Validated at decode time (or built by a test): a failure ends the walk.
            let filter = r.string().ok()?;
            let opts = if options { r.u8().ok()? } else { 0 };
            Some((filter, opts))
        })
    }

    /// Number of filters.
    pub fn count(&self) -> usize {
        self.iter().count()
    }
}

/// Appends one SUBSCRIBE/UNSUBSCRIBE entry to `raw` (for building packets in tests and clients).
pub fn push_filter(raw: &mut Vec<u8>, filter: &str, options: Option<u8>) {
    put_str(raw, filter);
    if let Some(o) = options {
        raw.push(o);
    }
}

/// Decodes one packet from the front of `buf`. `version` is the connection's protocol level
/// (`None` before CONNECT: only the CONNECT layout is self-describing, any other first packet is
/// decoded as 3.1.1). `Ok(None)`: `buf` holds a proper prefix of a packet, read more. `Ok(Some((
/// packet, used)))`: the packet and the bytes it took.
pub fn decode(
    buf: &[u8],
    version: Option<Version>,
    packet_bytes_max: usize,
) -> Result<Option<(Packet<'_>, usize)>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len: usize = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i == 5 {
            return Err(CodecError::BadLength);
        }
    }
    // Canonical form only: a varint with a redundant trailing zero group is malformed.
    if i > 2 && buf[i - 1] == 0 {
        return Err(CodecError::BadLength);
    }
    let total = i + len;
    if total > packet_bytes_max {
        return Err(CodecError::TooLarge {
            bytes: total,
            max: packet_bytes_max,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let packet = decode_body(first, body, version)?;
    Ok(Some((packet, total)))
}

fn decode_body(first: u8, body: &[u8], version: Option<Version>) -> Result<Packet<'_>, CodecError> {
    let kind = first >> 4;
    let flags = first & 0x0f;
    let v5 = version == Some(Version::V5);
    let bad = CodecError::BadHeader { byte: first };
    let fixed_flags = match kind {
        3 => flags,
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != fixed_flags {
        return Err(bad);
    }
    let packet = match kind {
        1 => Packet::Connect(decode_connect(body)?),
        2 => {
            let mut r = Reader::new(body, "CONNACK");
            let ack_flags = r.u8()?;
            if ack_flags & !1 != 0 {
                return Err(r.invalid("reserved acknowledge flags"));
            }
            let code = r.u8()?;
            let props = if v5 { r.props()? } else { &[] };
            r.end()?;
            Packet::ConnAck(ConnAck {
                session_present: ack_flags == 1,
                code,
                props,
            })
        }
        3 => {
            let mut r = Reader::new(body, "PUBLISH");
            let qos = QoS::from_bits((flags >> 1) & 3).ok_or(r.invalid("QoS 3"))?;
            let dup = flags & 0b1000 != 0;
            if dup && qos == QoS::AtMostOnce {
                return Err(r.invalid("DUP with QoS 0"));
            }
            let topic = r.string()?;
            let packet_id = if qos == QoS::AtMostOnce {
                None
            } else {
                Some(r.packet_id()?)
            };
            let props = if v5 { r.props()? } else { &[] };
            Packet::Publish(Publish {
                dup,
                qos,
                retain: flags & 1 != 0,
                topic,
                packet_id,
                props,
                payload: r.rest(),
            })
        }
        4..=7 => {
            let name = ["PUBACK", "PUBREC", "PUBREL", "PUBCOMP"][usize::from(kind - 4)];
            let mut r = Reader::new(body, name);
            let packet_id = r.packet_id()?;
            let (code, props) = if v5 && !r.is_empty() {
                let code = r.u8()?;
                let props = if r.is_empty() { &[][..] } else { r.props()? };
                (code, props)
            } else {
                (0, &[][..])
            };
            r.end()?;
            let ack = Ack {
                packet_id,
                code,
                props,
            };
            match kind {
                4 => Packet::PubAck(ack),
                5 => Packet::PubRec(ack),
                6 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        }
        8 | 10 => {
            let sub = kind == 8;
            let mut r = Reader::new(body, if sub { "SUBSCRIBE" } else { "UNSUBSCRIBE" });
            let packet_id = r.packet_id()?;
            let props = if v5 { r.props()? } else { &[] };
            let raw = r.rest();
            let mut w = Reader::new(raw, r.packet);
            if w.is_empty() {
                return Err(w.invalid("no topic filter"));
            }
            while !w.is_empty() {
                w.string()?;
                if sub {
                    let o = w.u8()?;
                    // Reserved bits: 3.1.1 allows only QoS bits; 5 adds NL, RAP, RH (3 invalid).
                    let reserved = if v5 {
                        o & 0xc0 != 0 || (o >> 4) & 3 == 3
                    } else {
                        o & !3 != 0
                    };
                    if reserved || o & 3 == 3 {
                        return Err(w.invalid("subscription options"));
                    }
                }
            }
            let s = Subscribe {
                packet_id,
                props,
                filters: Filters { raw, options: sub },
            };
            if sub {
                Packet::Subscribe(s)
            } else {
                Packet::Unsubscribe(s)
            }
        }
        9 | 11 => {
            let mut r = Reader::new(body, if kind == 9 { "SUBACK" } else { "UNSUBACK" });
            let packet_id = r.packet_id()?;
            let props = if v5 { r.props()? } else { &[] };
            let a = SubAck {
                packet_id,
                props,
                codes: r.rest(),
            };
            if kind == 9 {
                Packet::SubAck(a)
            } else {
                Packet::UnsubAck(a)
            }
        }
        12 | 13 => {
            Reader::new(body, "PING").end()?;
            if kind == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 | 15 => {
            if kind == 15 && !v5 {
                return Err(bad);
            }
            let mut r = Reader::new(body, if kind == 14 { "DISCONNECT" } else { "AUTH" });
            let (code, props) = if v5 && !r.is_empty() {
                let code = r.u8()?;
                let props = if r.is_empty() { &[][..] } else { r.props()? };
                (code, props)
            } else {
                (0, &[][..])
            };
            r.end()?;
            let x = Reasoned { code, props };
            if kind == 14 {
                Packet::Disconnect(x)
            } else {
                Packet::Auth(x)
            }
        }
        _ => return Err(bad),
    };
    Ok(packet)
}

fn decode_connect(body: &[u8]) -> Result<Connect<'_>, CodecError> {
    let mut r = Reader::new(body, "CONNECT");
    if r.string()? != "MQTT" {
        return Err(CodecError::BadProtocolName);
    }
    let version = match r.u8()? {
        4 => Version::V311,
        5 => Version::V5,
        level => return Err(CodecError::BadLevel { level }),
    };
    let v5 = version == Version::V5;
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(r.invalid("reserved connect flag"));
    }
    let will_flag = flags & 0b100 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 3).ok_or(r.invalid("will QoS 3"))?;
    let will_retain = flags & 0b10_0000 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(r.invalid("will QoS/retain without will"));
    }
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !v5 && has_password && !has_username {
        return Err(r.invalid("password without user name"));
    }
    let keep_alive_s = r.u16()?;
    let props = if v5 { r.props()? } else { &[] };
    let client_id = r.string()?;
    let will = if will_flag {
        let props = if v5 { r.props()? } else { &[] };
        Some(Will {
            props,
            topic: r.string()?,
            payload: r.binary()?,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    r.end()?;
    Ok(Connect {
        version,
        clean: flags & 0b10 != 0,
        keep_alive_s,
        props,
        client_id,
        will,
        username,
        password,
    })
}

/// Appends `packet` to `out` in canonical form for a connection at `version` (`props` fields are
/// written only for MQTT 5 and must be well-formed property bytes, e.g. from [`PropsWriter`]).
pub fn encode(packet: &Packet<'_>, version: Version, out: &mut Vec<u8>) {
    let v5 = version == Version::V5;
    let mut body = Vec::new();
    let first: u8 = match packet {
        Packet::Connect(c) => {
            put_str(&mut body, "MQTT");
            body.push(c.version.level());
            let mut flags = 0u8;
            if c.clean {
                flags |= 0b10;
            }
            if let Some(w) = &c.will {
                flags |= 0b100 | ((w.qos as u8) << 3);
                if w.retain {
                    flags |= 0b10_0000;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            body.push(flags);
            body.extend_from_slice(&c.keep_alive_s.to_be_bytes());
            let cv5 = c.version == Version::V5;
            if cv5 {
                put_props(&mut body, c.props);
            }
            put_str(&mut body, c.client_id);
            if let Some(w) = &c.will {
                if cv5 {
                    put_props(&mut body, w.props);
                }
                put_str(&mut body, w.topic);
                put_bin(&mut body, w.payload);
            }
            if let Some(u) = c.username {
                put_str(&mut body, u);
            }
            if let Some(p) = c.password {
                put_bin(&mut body, p);
            }
            0x10
        }
        Packet::ConnAck(a) => {
            body.push(u8::from(a.session_present));
            body.push(a.code);
            if v5 {
                put_props(&mut body, a.props);
            }
            0x20
        }
        Packet::Publish(p) => {
            put_str(&mut body, p.topic);
            if let Some(id) = p.packet_id {
                body.extend_from_slice(&id.to_be_bytes());
            }
            if v5 {
                put_props(&mut body, p.props);
            }
            body.extend_from_slice(p.payload);
            0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            body.extend_from_slice(&a.packet_id.to_be_bytes());
            if v5 && (a.code != 0 || !a.props.is_empty()) {
                body.push(a.code);
                if !a.props.is_empty() {
                    put_props(&mut body, a.props);
                }
            }
            match packet {
                Packet::PubAck(_) => 0x40,
                Packet::PubRec(_) => 0x50,
                Packet::PubRel(_) => 0x62,
                _ => 0x70,
            }
        }
        Packet::Subscribe(s) | Packet::Unsubscribe(s) => {
            body.extend_from_slice(&s.packet_id.to_be_bytes());
            if v5 {
                put_props(&mut body, s.props);
            }
            body.extend_from_slice(s.filters.raw);
            if matches!(packet, Packet::Subscribe(_)) {
                0x82
            } else {
                0xa2
            }
        }
        Packet::SubAck(a) | Packet::UnsubAck(a) => {
            body.extend_from_slice(&a.packet_id.to_be_bytes());
            if v5 {
                put_props(&mut body, a.props);
            }
            body.extend_from_slice(a.codes);
            if matches!(packet, Packet::SubAck(_)) {
                0x90
            } else {
                0xb0
            }
        }
        Packet::PingReq => 0xc0,
        Packet::PingResp => 0xd0,
        Packet::Disconnect(d) | Packet::Auth(d) => {
            if v5 && (d.code != 0 || !d.props.is_empty()) {
                body.push(d.code);
                if !d.props.is_empty() {
                    put_props(&mut body, d.props);
                }
            }
            if matches!(packet, Packet::Disconnect(_)) {
                0xe0
            } else {
                0xf0
            }
        }
    };
    out.push(first);
    put_varint(out, body.len());
    out.extend_from_slice(&body);
}

/// MQTT 5 property identifiers geobeat reads or writes.
pub mod prop {
    /// Session Expiry Interval (u32).
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    /// Assigned Client Identifier (string).
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    /// Server Keep Alive (u16).
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    /// Server Reference (string): where a client should connect instead (with reason 0x9C).
    pub const SERVER_REFERENCE: u8 = 0x1c;
    /// Reason String (string).
    pub const REASON_STRING: u8 = 0x1f;
    /// Receive Maximum (u16).
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    /// Topic Alias Maximum (u16).
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    /// Topic Alias (u16).
    pub const TOPIC_ALIAS: u8 = 0x23;
    /// Retain Available (byte).
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    /// Maximum Packet Size (u32).
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    /// Wildcard Subscription Available (byte).
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    /// Subscription Identifier Available (byte).
    pub const SUBSCRIPTION_ID_AVAILABLE: u8 = 0x29;
    /// Shared Subscription Available (byte).
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2a;
    /// User Property (string pair).
    pub const USER_PROPERTY: u8 = 0x26;
}

/// The value of one MQTT 5 property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropValue<'a> {
    /// One-byte integer.
    Byte(u8),
    /// Two-byte integer.
    U16(u16),
    /// Four-byte integer.
    U32(u32),
    /// Variable byte integer.
    VarInt(u32),
    /// UTF-8 string.
    Str(&'a str),
    /// Binary data.
    Bin(&'a [u8]),
    /// UTF-8 string pair (User Property).
    Pair(&'a str, &'a str),
}

#[derive(Clone, Copy)]
enum PropKind {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

fn prop_kind(id: u8) -> Option<PropKind> {
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => PropKind::Byte,
        0x13 | 0x21 | 0x22 | 0x23 => PropKind::U16,
        0x02 | 0x11 | 0x18 | 0x27 => PropKind::U32,
        0x0b => PropKind::VarInt,
        0x03 | 0x08 | 0x12 | 0x15 | 0x1a | 0x1c | 0x1f => PropKind::Str,
        0x09 | 0x16 => PropKind::Bin,
        0x26 => PropKind::Pair,
        _ => return None,
    })
}

/// A walk over raw MQTT 5 property bytes (validated when the packet was decoded).
#[derive(Debug, Clone, Copy)]
pub struct Props<'a>(pub &'a [u8]);

impl<'a> Props<'a> {
    /// Every (id, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, PropValue<'a>)> + 'a {
        let mut r = Reader::new(self.0, "properties");
        std::iter::from_fn(move || {
            if r.is_empty() {
                return None;
            }
            read_prop(&mut r).ok()
        })
    }

    /// The first value of property `id`.
    pub fn get(&self, id: u8) -> Option<PropValue<'a>> {
        self.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    /// The value of the first User Property named `name`.
    pub fn user(&self, name: &str) -> Option<&'a str> {
        self.iter().find_map(|(_, v)| match v {
            PropValue::Pair(k, v) if k == name => Some(v),
            _ => None,
        })
    }
}

fn read_prop<'a>(r: &mut Reader<'a>) -> Result<(u8, PropValue<'a>), CodecError> {
    let id = r.u8()?;
    let bad = CodecError::BadProperty {
        packet: r.packet,
        id,
    };
    let v = match prop_kind(id).ok_or(bad)? {
        PropKind::Byte => PropValue::Byte(r.u8()?),
        PropKind::U16 => PropValue::U16(r.u16()?),
        PropKind::U32 => PropValue::U32(r.u32()?),
        PropKind::VarInt => PropValue::VarInt(r.varint()?),
        PropKind::Str => PropValue::Str(r.string()?),
        PropKind::Bin => PropValue::Bin(r.binary()?),
        PropKind::Pair => PropValue::Pair(r.string()?, r.string()?),
    };
    Ok((id, v))
}

/// Builds MQTT 5 property bytes.
#[derive(Debug, Default)]
pub struct PropsWriter {
    /// The bytes written so far (without the length prefix).
    pub bytes: Vec<u8>,
}

impl PropsWriter {
    /// Appends a one-byte property.
    pub fn byte(&mut self, id: u8, v: u8) -> &mut Self {
        self.bytes.extend_from_slice(&[id, v]);
        self
    }
    /// Appends a two-byte property.
    pub fn u16(&mut self, id: u8, v: u16) -> &mut Self {
        self.bytes.push(id);
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a four-byte property.
    pub fn u32(&mut self, id: u8, v: u32) -> &mut Self {
        self.bytes.push(id);
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a User Property (both strings short: geobeat's own names and values).
    pub fn user(&mut self, name: &str, value: &str) -> &mut Self {
        debug_assert!(name.len() <= 255 && value.len() <= 255);
        self.bytes.push(prop::USER_PROPERTY);
        put_str(&mut self.bytes, name);
        put_str(&mut self.bytes, value);
        self
    }
    /// Appends a string property, truncated at a char boundary to `bytes_max` bytes.
    pub fn str(&mut self, id: u8, v: &str, bytes_max: usize) -> &mut Self {
        let mut end = v.len().min(bytes_max).min(usize::from(u16::MAX));
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes.push(id);
        put_str(&mut self.bytes, &v[..end]);
        self
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    debug_assert!(
        n <= 268_435_455,
        "remaining length beyond the varint's range"
    );
    loop {
        let mut b = (n & 0x7f) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    assert!(
        b.len() <= usize::from(u16::MAX),
        "MQTT string over 65535 bytes"
    );
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_props(out: &mut Vec<u8>, props: &[u8]) {
    put_varint(out, props.len());
    out.extend_from_slice(props);
}

/// A bounds-checked cursor over one packet body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    packet: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], packet: &'static str) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            packet,
        }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn truncated(&self) -> CodecError {
        CodecError::Truncated {
            packet: self.packet,
        }
    }

    fn invalid(&self, what: &'static str) -> CodecError {
        CodecError::Invalid {
            packet: self.packet,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(self.truncated())?;
        let s = self.buf.get(self.pos..end).ok_or(self.truncated())?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u32, CodecError> {
        let mut v: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(self.invalid("non-canonical variable byte integer"));
                }
                return Ok(v);
            }
        }
        Err(self.invalid("variable byte integer over 4 bytes"))
    }

    fn packet_id(&mut self) -> Result<u16, CodecError> {
        match self.u16()? {
            0 => Err(self.invalid("packet id 0")),
            id => Ok(id),
        }
    }

    fn binary(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<&'a str, CodecError> {
        let b = self.binary()?;
        let bad = CodecError::BadString {
            packet: self.packet,
        };
        let s = std::str::from_utf8(b).map_err(|_| bad)?;
        if s.contains('\0') {
            return Err(bad);
        }
        Ok(s)
    }

    /// Reads a length-prefixed property block and checks every property's id and shape.
    fn props(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.varint()? as usize;
        let raw = self.take(n)?;
        let mut r = Reader::new(raw, self.packet);
        while !r.is_empty() {
            read_prop(&mut r)?;
        }
        Ok(raw)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }

    fn end(&self) -> Result<(), CodecError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(CodecError::Trailing {
                packet: self.packet,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MQTT_PACKET_BYTES_MAX;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest, Strategy};

    fn roundtrip(p: &Packet<'_>, v: Version) {
        let mut out = Vec::new();
        encode(p, v, &mut out);
        let ver = if matches!(p, Packet::Connect(_)) {
            None
        } else {
            Some(v)
        };
        let (back, used) = decode(&out, ver, MQTT_PACKET_BYTES_MAX).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(&back, p);
        // Every proper prefix needs more bytes.
        for cut in 0..out.len() {
            assert_eq!(
                decode(&out[..cut], ver, MQTT_PACKET_BYTES_MAX),
                Ok(None),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn decodes_a_mosquitto_pub_connect() {
        // Bytes of `mosquitto_pub -V mqttv311 -i c1 -u dev1 -P tok -k 60` CONNECT, written from
        // the 3.1.1 spec's layout (§3.1): name, level 4, flags 0xc2, keep alive 60.
        let bytes = b"\x10\x19\x00\x04MQTT\x04\xc2\x00\x3c\x00\x02c1\x00\x04dev1\x00\x03tok";
        let (p, used) = decode(bytes, None, 1024).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let Packet::Connect(c) = p else {
            panic!("{p:?}")
        };
        assert_eq!(c.version, Version::V311);
        assert!(c.clean);
        assert_eq!(c.keep_alive_s, 60);
        assert_eq!(
            (c.client_id, c.username, c.password),
            ("c1", Some("dev1"), Some(&b"tok"[..]))
        );
    }

    #[test]
    fn refuses_malformed_headers_and_bodies() {
        // Each structural rule has its own error; lengths above the bound are refused early.
        let max = MQTT_PACKET_BYTES_MAX;
        assert_eq!(
            decode(b"\x00\x00", None, max),
            Err(CodecError::BadHeader { byte: 0 })
        );
        assert_eq!(
            decode(b"\xc1\x00", None, max),
            Err(CodecError::BadHeader { byte: 0xc1 })
        );
        assert_eq!(
            decode(b"\xf0\x00", Some(Version::V311), max),
            Err(CodecError::BadHeader { byte: 0xf0 })
        );
        assert_eq!(
            decode(b"\x30\xff\xff\xff\xff\x01", None, max),
            Err(CodecError::BadLength)
        );
        assert_eq!(
            decode(b"\x30\x80\x00", None, max),
            Err(CodecError::BadLength)
        );
        assert_eq!(
            decode(b"\x30\xff\x7f", None, 100),
            Err(CodecError::TooLarge {
                bytes: 16_386,
                max: 100
            })
        );
        // PUBLISH QoS 3.
        assert!(matches!(
            decode(b"\x36\x03\x00\x01a", None, max),
            Err(CodecError::Invalid { .. })
        ));
        // Packet id 0.
        assert!(matches!(
            decode(b"\x40\x02\x00\x00", None, max),
            Err(CodecError::Invalid { .. })
        ));
        // Topic with U+0000.
        assert!(matches!(
            decode(b"\x30\x03\x00\x01\x00", None, max),
            Err(CodecError::BadString { .. })
        ));
        assert_eq!(
            decode(b"\xc0\x01\x00", None, max),
            Err(CodecError::Trailing { packet: "PING" })
        );
        assert_eq!(
            decode(b"\x10\x07\x00\x04MQTT\x03", None, max),
            Err(CodecError::BadLevel { level: 3 })
        );
        assert_eq!(
            decode(b"\x10\x06\x00\x04MQIs", None, max),
            Err(CodecError::BadProtocolName)
        );
        // SUBSCRIBE without filters.
        assert!(matches!(
            decode(b"\x82\x02\x00\x01", None, max),
            Err(CodecError::Invalid { .. })
        ));
        // Unknown MQTT 5 property.
        assert_eq!(
            decode(b"\x40\x05\x00\x01\x00\x01\x7f", Some(Version::V5), max),
            Err(CodecError::BadProperty {
                packet: "PUBACK",
                id: 0x7f
            })
        );
    }

    #[test]
    fn v5_acks_have_optional_reason_and_properties() {
        // Remaining length 2 means success; a reason string round-trips.
        let (p, _) = decode(b"\x40\x02\x00\x07", Some(Version::V5), 64)
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            Packet::PubAck(Ack {
                packet_id: 7,
                code: 0,
                props: &[]
            })
        );
        let mut w = PropsWriter::default();
        w.str(prop::REASON_STRING, "ts_out_of_range", 128);
        roundtrip(
            &Packet::PubAck(Ack {
                packet_id: 7,
                code: 0x99,
                props: &w.bytes,
            }),
            Version::V5,
        );
        assert_eq!(
            Props(&w.bytes).get(prop::REASON_STRING),
            Some(PropValue::Str("ts_out_of_range"))
        );
        roundtrip(
            &Packet::PubRec(Ack {
                packet_id: 9,
                code: 0x87,
                props: &[],
            }),
            Version::V5,
        );
    }

    fn arb_str() -> impl Strategy<Value = String> {
        "[a-z0-9/#+é-]{0,20}"
    }

    fn arb_props() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::option::of(arb_str()),
            proptest::option::of(any::<u16>()),
        )
            .prop_map(|(s, n)| {
                let mut w = PropsWriter::default();
                if let Some(n) = n {
                    w.u16(prop::RECEIVE_MAXIMUM, n);
                }
                if let Some(s) = s {
                    w.str(prop::REASON_STRING, &s, 100);
                }
                w.bytes
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                       v in 0u8..3) {
            // Any input decodes, asks for more, or is refused; a decoded packet re-encodes to
            // the bytes it came from (the codec accepts only canonical forms).
            let ver = [None, Some(Version::V311), Some(Version::V5)][usize::from(v)];
            if let Ok(Some((p, used))) = decode(&bytes, ver, 150) {
                prop_assert!(used <= bytes.len());
                let enc_ver = match p { Packet::Connect(c) => c.version, _ => ver.unwrap_or(Version::V311) };
                let mut out = Vec::new();
                encode(&p, enc_ver, &mut out);
                let again = decode(&out, ver, usize::MAX).unwrap().unwrap();
                prop_assert_eq!(again, (p, out.len()));
                prop_assert!(out.len() <= used, "the canonical form is never longer");
            }
        }

        #[test]
        fn publish_roundtrips(topic in arb_str(), payload in proptest::collection::vec(any::<u8>(), 0..300),
                              qos in 0u8..3, retain: bool, dup: bool, id in 1u16.., props in arb_props(), v5: bool) {
            let qos = QoS::from_bits(qos).unwrap();
            let v = if v5 { Version::V5 } else { Version::V311 };
            let p = Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic: &topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                props: if v5 { &props } else { &[] },
                payload: &payload,
            });
            roundtrip(&p, v);
        }

        #[test]
        fn control_packets_roundtrip(id in 1u16.., code in any::<u8>(), props in arb_props(),
                                     filters in proptest::collection::vec((arb_str(), 0u8..3), 1..4),
                                     client_id in arb_str(), user in proptest::option::of(arb_str()),
                                     pass in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)),
                                     keep in any::<u16>(), clean: bool, v5: bool) {
            let v = if v5 { Version::V5 } else { Version::V311 };
            let props: &[u8] = if v5 { &props } else { &[] };
            let code = if v5 { code } else { 0 };
            let user = if pass.is_some() && !v5 { Some(user.unwrap_or_default()) } else { user };
            roundtrip(&Packet::Connect(Connect {
                version: v, clean, keep_alive_s: keep, props, client_id: &client_id, will: None,
                username: user.as_deref(), password: pass.as_deref(),
            }), v);
            roundtrip(&Packet::ConnAck(ConnAck { session_present: clean, code, props }), v);
            for ack in [Packet::PubAck, Packet::PubRec, Packet::PubRel, Packet::PubComp] {
                roundtrip(&ack(Ack { packet_id: id, code, props }), v);
            }
            let mut raw = Vec::new();
            for (f, o) in &filters {
                push_filter(&mut raw, f, Some(*o));
            }
            let sub = Subscribe { packet_id: id, props, filters: Filters::from_raw(&raw, true) };
            roundtrip(&Packet::Subscribe(sub), v);
            prop_assert_eq!(sub.filters.count(), filters.len());
            let mut raw = Vec::new();
            for (f, _) in &filters {
                push_filter(&mut raw, f, None);
            }
            roundtrip(&Packet::Unsubscribe(Subscribe { packet_id: id, props, filters: Filters::from_raw(&raw, false) }), v);
            roundtrip(&Packet::SubAck(SubAck { packet_id: id, props, codes: &[0, 0x80] }), v);
            roundtrip(&Packet::PingReq, v);
            roundtrip(&Packet::PingResp, v);
            roundtrip(&Packet::Disconnect(Reasoned { code, props }), v);
        }
    }
}
