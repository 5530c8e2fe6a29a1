//! One MQTT connection's protocol state, sans-io: CONNECT admission ([`admit`]: the token in the
//! password, the user name rule, the client id), the CONNACK, the PUBLISH topic rules
//! ([`Topic`]), and the acknowledgement bookkeeping of a [`Session`]: every PUBLISH takes the next
//! sequence number, is settled in arrival order once the store answers for it, and then gets its
//! PUBACK / PUBREC (QoS 1 / 2) or nothing (QoS 0); QoS 2's PUBREL → PUBCOMP and duplicates.
//! It does no I/O and knows nothing of shards: the connection kind (`net::mqtt`) decodes the
//! payload, stores, feeds the store's answers in with [`Session::refuse`] and
//! [`Session::settle`], and writes what the session appends to its output buffer.
//!
//! Invariants: an acknowledgement with reason code 0 (success) is written only for a PUBLISH all
//! of whose heartbeats were stored and made durable (the caller's `ack_ready` covers its
//! sequence number and no refusal was recorded for it); acknowledgements go out in PUBLISH order
//! (MQTT 3.1.1 §4.6); a refused QoS 1/2 PUBLISH is never acknowledged as stored: MQTT 5 gets the
//! reason code and a reason string, MQTT 3.1.1 (whose acks carry no code) gets
//! [`Settled::Close`] instead, after the acks of everything before it.

use std::collections::VecDeque;

use super::codec::{self, Ack, ConnAck, Connect, Packet, PropsWriter, QoS, SubAck, Version};
use crate::auth::{Claims, Scope, Secret};
use crate::limits::{
    MQTT_AWAITING_REL_MAX, MQTT_CLIENT_ID_BYTES_MAX, MQTT_INFLIGHT_MAX, MQTT_PACKET_BYTES_MAX,
    MQTT_REASON_STRING_BYTES_MAX, MQTT_TOPIC_BYTES_MAX,
};

/// MQTT 5 reason codes geobeat sends (MQTT 5 §2.4).
pub mod reason {
    /// Success.
    pub const SUCCESS: u8 = 0x00;
    /// Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Unsupported protocol version.
    pub const UNSUPPORTED_VERSION: u8 = 0x84;
    /// Client identifier not valid.
    pub const CLIENT_ID_INVALID: u8 = 0x85;
    /// Bad user name or password.
    pub const BAD_CREDENTIALS: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// Server shutting down.
    pub const SHUTTING_DOWN: u8 = 0x8b;
    /// Keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
    /// Bad authentication method: sent in the DISCONNECT that ends a connection whose token was
    /// revoked (issue 16 names this code for it).
    pub const BAD_AUTH_METHOD: u8 = 0x8c;
    /// Session taken over.
    pub const TAKEN_OVER: u8 = 0x8e;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Packet identifier not found.
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// Receive Maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic Alias invalid (geobeat allows no aliases: Topic Alias Maximum is 0).
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
}

/// MQTT 3.1.1 CONNACK return codes (§3.2.2.3).
pub mod return_code {
    /// Connection accepted.
    pub const ACCEPTED: u8 = 0x00;
    /// Unacceptable protocol version.
    pub const BAD_VERSION: u8 = 0x01;
    /// Identifier rejected.
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// A refused CONNECT: the CONNACK code for the connection's version, and why (for logs and the
/// MQTT 5 reason string; never the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRefusal {
    /// The version to answer in.
    pub version: Version,
    /// CONNACK return code (3.1.1) or reason code (5).
    pub code: u8,
    /// Short, stable reason (`missing_token`, `bad_token`, `username_mismatch`, ...).
    pub reason: &'static str,
}

/// An admitted CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Protocol level of the connection.
    pub version: Version,
    /// The client id (assigned by the server when the client sent an empty one).
    pub client_id: String,
    /// Whether the server assigned the client id (MQTT 5 returns it in the CONNACK).
    pub assigned: bool,
    /// Keep alive in force, seconds: the client's, or the server's idle timeout when the
    /// client asked for none (MQTT 5 is told so with Server Keep Alive).
    pub keep_alive_s: u16,
    /// Whether the server chose `keep_alive_s` (the client sent 0).
    pub server_keep_alive: bool,
    /// The token's claims (a device or gateway scope).
    pub claims: Claims,
    /// The device-sequence epoch declared with the CONNECT User Property `epoch` (MQTT 5,
    /// device tokens; issue 18): PUBLISHes with a User Property `seq` are then stored once.
    pub epoch: Option<u32>,
}

/// Admits or refuses a CONNECT: the password must be a geobeat device or gateway token valid at
/// `now_s`; for a device token the user name, if given and not empty, must be the token's device
/// id (gateways may send any user name); the client id must fit the bound (an empty one is
/// assigned `assigned_id`, which MQTT 3.1.1 allows only with Clean Session).
pub fn admit(
    c: &Connect<'_>,
    secret: &Secret,
    now_s: u64,
    idle_timeout_s: u64,
    assigned_id: impl FnOnce() -> String,
) -> Result<Admitted, ConnectRefusal> {
    let v5 = c.version == Version::V5;
    let refuse = |code311: u8, code5: u8, reason: &'static str| ConnectRefusal {
        version: c.version,
        code: if v5 { code5 } else { code311 },
        reason,
    };
    if c.client_id.len() > MQTT_CLIENT_ID_BYTES_MAX || (c.client_id.is_empty() && !c.clean && !v5) {
        return Err(refuse(
            return_code::IDENTIFIER_REJECTED,
            reason::CLIENT_ID_INVALID,
            "client_id_invalid",
        ));
    }
    let Some(password) = c.password else {
        return Err(refuse(
            return_code::NOT_AUTHORIZED,
            reason::BAD_CREDENTIALS,
            "missing_token",
        ));
    };
    let token = std::str::from_utf8(password).map_err(|_| {
        refuse(
            return_code::NOT_AUTHORIZED,
            reason::BAD_CREDENTIALS,
            "bad_token",
        )
    })?;
    let claims = crate::auth::verify(secret, token.trim(), now_s).map_err(|e| {
        let why = match e {
            crate::auth::TokenError::Expired { .. } => "token_expired",
            _ => "bad_token",
        };
        refuse(return_code::NOT_AUTHORIZED, reason::BAD_CREDENTIALS, why)
    })?;
    match (&claims.scope, c.username) {
        (Scope::Device(id), Some(user)) if !user.is_empty() && user != id => {
            return Err(refuse(
                return_code::NOT_AUTHORIZED,
                reason::NOT_AUTHORIZED,
                "username_mismatch",
            ))
        }
        (Scope::Device(_) | Scope::Gateway(_), _) => {}
        (Scope::Ops | Scope::Subscriber(_), _) => {
            return Err(refuse(
                return_code::NOT_AUTHORIZED,
                reason::NOT_AUTHORIZED,
                "scope_not_ingest",
            ))
        }
    }
    let epoch = match codec::Props(c.props).user("epoch") {
        None => None,
        Some(e) => match (e.parse::<u32>(), &claims.scope) {
            (Ok(e), Scope::Device(_)) => Some(e),
            _ => {
                return Err(refuse(
                    return_code::NOT_AUTHORIZED,
                    reason::PROTOCOL_ERROR,
                    "bad_epoch",
                ))
            }
        },
    };
    let (client_id, assigned) = if c.client_id.is_empty() {
        (assigned_id(), true)
    } else {
        (c.client_id.to_owned(), false)
    };
    let server_keep_alive = c.keep_alive_s == 0;
    let keep_alive_s = if server_keep_alive {
        idle_timeout_s.clamp(1, u64::from(u16::MAX)) as u16
    } else {
        c.keep_alive_s
    };
    Ok(Admitted {
        version: c.version,
        client_id,
        assigned,
        keep_alive_s,
        server_keep_alive,
        claims,
        epoch,
    })
}

/// Appends the CONNACK for an admitted connection: MQTT 5 also learns the server's bounds
/// (Receive Maximum, Maximum Packet Size), that there are no topic aliases, wildcard, shared or
/// identified subscriptions, its assigned client id and the Server Keep Alive if it chose one.
/// With `resume` (a connection that declared an epoch), the device's durable high-water mark as
/// the User Property `resume` = `{"epoch":E,"seq":N}`.
pub fn connack_accepted(a: &Admitted, resume: Option<(u32, u64)>, out: &mut Vec<u8>) {
    let mut props = PropsWriter::default();
    if a.version == Version::V5 {
        use codec::prop;
        props
            .u16(prop::RECEIVE_MAXIMUM, MQTT_INFLIGHT_MAX as u16)
            .u32(prop::MAXIMUM_PACKET_SIZE, MQTT_PACKET_BYTES_MAX as u32)
            .u16(prop::TOPIC_ALIAS_MAXIMUM, 0)
            .byte(prop::WILDCARD_SUBSCRIPTION_AVAILABLE, 0)
            .byte(prop::SUBSCRIPTION_ID_AVAILABLE, 0)
            .byte(prop::SHARED_SUBSCRIPTION_AVAILABLE, 0);
        if a.assigned {
            props.str(
                prop::ASSIGNED_CLIENT_ID,
                &a.client_id,
                MQTT_CLIENT_ID_BYTES_MAX,
            );
        }
        if a.server_keep_alive {
            props.u16(prop::SERVER_KEEP_ALIVE, a.keep_alive_s);
        }
        if let Some((e, n)) = resume {
            props.user("resume", &format!("{{\"epoch\":{e},\"seq\":{n}}}"));
        }
    }
    let ack = ConnAck {
        session_present: false,
        code: 0,
        props: &props.bytes,
    };
    codec::encode(&Packet::ConnAck(ack), a.version, out);
}

/// Appends the CONNACK of a refusal (MQTT 5 with the reason string).
pub fn connack_refused(r: &ConnectRefusal, out: &mut Vec<u8>) {
    let props = reason_string(r.version, r.reason);
    let ack = ConnAck {
        session_present: false,
        code: r.code,
        props: &props,
    };
    codec::encode(&Packet::ConnAck(ack), r.version, out);
}

/// [`disconnect`] naming another server to use (MQTT 5 Server Reference, with reason 0x9C).
pub fn disconnect_to(
    version: Version,
    code: u8,
    why: &str,
    reference: Option<&str>,
    out: &mut Vec<u8>,
) {
    let Some(to) = reference.filter(|_| version == Version::V5) else {
        return disconnect(version, code, why, out);
    };
    let mut p = PropsWriter::default();
    p.str(
        codec::prop::SERVER_REFERENCE,
        to,
        MQTT_REASON_STRING_BYTES_MAX,
    );
    p.str(
        codec::prop::REASON_STRING,
        why,
        MQTT_REASON_STRING_BYTES_MAX,
    );
    codec::encode(
        &Packet::Disconnect(codec::Reasoned {
            code,
            props: &p.bytes,
        }),
        version,
        out,
    );
}

/// Appends an MQTT 5 DISCONNECT with `code` and a reason string (nothing for 3.1.1, whose server
/// never sends DISCONNECT: it just closes).
pub fn disconnect(version: Version, code: u8, why: &str, out: &mut Vec<u8>) {
    if version == Version::V5 {
        let props = reason_string(version, why);
        codec::encode(
            &Packet::Disconnect(codec::Reasoned {
                code,
                props: &props,
            }),
            version,
            out,
        );
    }
}

fn reason_string(version: Version, why: &str) -> Vec<u8> {
    let mut p = PropsWriter::default();
    if version == Version::V5 && !why.is_empty() {
        p.str(
            codec::prop::REASON_STRING,
            why,
            MQTT_REASON_STRING_BYTES_MAX,
        );
    }
    p.bytes
}

/// What a PUBLISH topic names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// `geobeat/<device id>`: a JSON heartbeat object (without `seq`) or an array of them.
    Geobeat {
        /// The device id (everything after `geobeat/`, `/` included).
        device: &'a str,
    },
    /// `owntracks/<user>/<device>`: an OwnTracks message; the device id stored is `<user>`.
    OwnTracks {
        /// The `<user>` level: the device id.
        user: &'a str,
        /// The `<device>` level (the app's device name; kept nowhere).
        device: &'a str,
    },
    /// `owntracks/<user>/<device>/<more>`: the app's other topics (`event`, `info`,
    /// `waypoints`, `status`, ...), which carry no location: acknowledged, not stored.
    OwnTracksOther {
        /// The `<user>` level (still checked against the token).
        user: &'a str,
    },
}

/// Why a PUBLISH was not stored: the MQTT 5 reason code and a stable reason string (a heartbeat
/// rejection reason of docs/PROTOCOL.md, or a topic rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// MQTT 5 reason code (0x80 or above).
    pub code: u8,
    /// Why (the MQTT 5 reason string, the metric label).
    pub reason: &'static str,
}

impl Refused {
    /// The payload does not decode into valid heartbeats (0x99).
    pub fn payload(reason: &'static str) -> Refused {
        Refused {
            code: reason::PAYLOAD_FORMAT_INVALID,
            reason,
        }
    }

    /// The token does not allow the device (0x87).
    pub fn not_authorized(reason: &'static str) -> Refused {
        Refused {
            code: reason::NOT_AUTHORIZED,
            reason,
        }
    }

    /// The store's refusal of a heartbeat (reasons of `shard::core`): full or over a budget is
    /// Quota exceeded (0x97, retry later), a record the log refuses is 0x99, anything else
    /// (an unavailable, poisoned log) Unspecified error (0x80).
    pub fn storage(reason: &'static str) -> Refused {
        let code = match reason {
            "storage_full" | "table_full" | "sink_backlog_full" => reason::QUOTA_EXCEEDED,
            "invalid" => reason::PAYLOAD_FORMAT_INVALID,
            _ => reason::UNSPECIFIED,
        };
        Refused { code, reason }
    }
}

/// Parses a PUBLISH topic name into what it names.
pub fn topic(name: &str) -> Result<Topic<'_>, Refused> {
    let invalid = |reason| Refused {
        code: reason::TOPIC_NAME_INVALID,
        reason,
    };
    if name.len() > MQTT_TOPIC_BYTES_MAX {
        return Err(invalid("topic_too_long"));
    }
    if name.contains(['+', '#']) {
        return Err(invalid("topic_wildcard"));
    }
    if let Some(device) = name.strip_prefix("geobeat/") {
        if device.is_empty() {
            return Err(invalid("topic_device_empty"));
        }
        return Ok(Topic::Geobeat { device });
    }
    if let Some(rest) = name.strip_prefix("owntracks/") {
        let (user, device) = rest.split_once('/').unwrap_or((rest, ""));
        if user.is_empty() || device.is_empty() || device.starts_with('/') {
            return Err(invalid("topic_not_owntracks"));
        }
        // `owntracks/<user>/<device>` carries locations; the app's other topics
        // (`.../event`, `.../info`, `.../waypoints`, ...) have a fourth level.
        return Ok(match device.split_once('/') {
            None => Topic::OwnTracks { user, device },
            Some(_) => Topic::OwnTracksOther { user },
        });
    }
    Err(invalid("topic_unknown"))
}

/// One PUBLISH waiting to be settled.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Its sequence number (the store acks by it).
    seq: u64,
    /// Packet id (QoS 1 and 2).
    packet_id: Option<u16>,
    /// QoS.
    qos: QoS,
    /// Why it was refused, if it was (the first refusal wins).
    refused: Option<Refused>,
}

/// What [`Session::publish`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Store it under this sequence number (every heartbeat of the PUBLISH carries it) and
    /// settle it when the store answers.
    Store(u64),
    /// A QoS 2 PUBLISH already received (its PUBREC is queued, or went out again just now):
    /// do not store it again.
    Duplicate,
}

/// What settling found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Everything settled was answered; carry on.
    Open,
    /// An MQTT 3.1.1 QoS 1/2 PUBLISH was refused: close the connection once what was appended
    /// before it is written (3.1.1 acks cannot say "refused").
    Close(Refused),
}

/// Counts of what a session did, for the caller's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// PUBLISHes acknowledged as stored (QoS 1 and 2).
    pub acked: u64,
    /// QoS 1/2 PUBLISHes answered with a refusal (MQTT 5).
    pub refused_acked: u64,
    /// QoS 0 PUBLISHes refused (nothing can be sent).
    pub refused_qos0: u64,
}

/// The acknowledgement state of one connection (see the module comment).
#[derive(Debug)]
pub struct Session {
    version: Version,
    /// PUBLISHes not yet settled, in arrival order (sequence numbers rise).
    pending: VecDeque<Pending>,
    /// QoS 2 packet ids whose PUBREC was sent and whose PUBREL has not arrived.
    awaiting_rel: Vec<u16>,
    /// The next sequence number (the first is 1).
    next_seq: u64,
    /// Counters since the last [`Session::take_tally`].
    tally: Tally,
}

impl Session {
    /// A session of a connection at `version`.
    pub fn new(version: Version) -> Session {
        Session {
            version,
            pending: VecDeque::new(),
            awaiting_rel: Vec::new(),
            next_seq: 1,
            tally: Tally::default(),
        }
    }

    /// The connection's protocol level.
    pub fn version(&self) -> Version {
        self.version
    }

    /// QoS 1/2 PUBLISHes not fully acknowledged (waiting for the store, or a QoS 2 waiting for
    /// its PUBREL): what MQTT 5's Receive Maximum ([`MQTT_INFLIGHT_MAX`]) bounds.
    pub fn inflight(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| p.qos != QoS::AtMostOnce)
            .count()
            + self.awaiting_rel.len()
    }

    /// PUBLISHes of any QoS not settled yet (waiting for the store): the caller stops reading
    /// at [`MQTT_INFLIGHT_MAX`]. QoS 2 PUBLISHes waiting for their PUBREL do not count: the
    /// connection must be read to see those PUBRELs.
    pub fn unsettled(&self) -> usize {
        self.pending.len()
    }

    /// Whether one more QoS 1/2 PUBLISH breaks the bound: MQTT 5's Receive Maximum (the client
    /// was told, DISCONNECT 0x93), or, for 3.1.1, QoS 2 PUBLISHes never released
    /// ([`MQTT_AWAITING_REL_MAX`]).
    pub fn over_inflight(&self, qos: QoS) -> bool {
        match (self.version, qos) {
            (_, QoS::AtMostOnce) => false,
            (Version::V5, _) => self.inflight() >= MQTT_INFLIGHT_MAX,
            (Version::V311, QoS::AtLeastOnce) => false,
            (Version::V311, QoS::ExactlyOnce) => self.awaiting_rel.len() >= MQTT_AWAITING_REL_MAX,
        }
    }

    /// Registers a PUBLISH (`refused`: already refused before storing, e.g. its payload). A
    /// QoS 2 PUBLISH whose packet id is still in flight is a duplicate: if its PUBREC already
    /// went out, it is sent again into `out`.
    pub fn publish(
        &mut self,
        qos: QoS,
        packet_id: Option<u16>,
        refused: Option<Refused>,
        out: &mut Vec<u8>,
    ) -> Publish {
        debug_assert_eq!(packet_id.is_some(), qos != QoS::AtMostOnce);
        if qos == QoS::ExactlyOnce {
            let id = packet_id.expect("QoS 2 has a packet id");
            if self.awaiting_rel.contains(&id) {
                self.ack(QoS::ExactlyOnce, id, reason::SUCCESS, "", out);
                return Publish::Duplicate;
            }
            if self.pending.iter().any(|p| p.packet_id == Some(id)) {
                return Publish::Duplicate;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(Pending {
            seq,
            packet_id,
            qos,
            refused,
        });
        Publish::Store(seq)
    }

    /// Records the store's refusal of (a heartbeat of) the PUBLISH numbered `seq`.
    pub fn refuse(&mut self, seq: u64, why: Refused) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) {
            p.refused.get_or_insert(why);
        }
    }

    /// Settles, in order, every PUBLISH numbered up to `ack_ready` (the store answered for all
    /// of them), appending their acknowledgements to `out`.
    pub fn settle(&mut self, ack_ready: u64, out: &mut Vec<u8>) -> Settled {
        while let Some(p) = self.pending.front().copied() {
            if p.seq > ack_ready {
                break;
            }
            let Some(id) = p.packet_id else {
                self.pending.pop_front();
                if p.refused.is_some() {
                    self.tally.refused_qos0 += 1;
                }
                continue;
            };
            match p.refused {
                Some(why) if self.version == Version::V311 => {
                    // Leave it pending: the connection closes, nothing after it is answered.
                    return Settled::Close(why);
                }
                Some(why) => {
                    self.pending.pop_front();
                    self.tally.refused_acked += 1;
                    self.ack(p.qos, id, why.code, why.reason, out);
                }
                None => {
                    self.pending.pop_front();
                    self.tally.acked += 1;
                    self.ack(p.qos, id, reason::SUCCESS, "", out);
                    if p.qos == QoS::ExactlyOnce {
                        self.awaiting_rel.push(id);
                    }
                }
            }
        }
        Settled::Open
    }

    /// A PUBREL: appends the PUBCOMP (MQTT 5: Packet Identifier not found if none was waiting).
    pub fn pubrel(&mut self, packet_id: u16, out: &mut Vec<u8>) {
        let code = match self.awaiting_rel.iter().position(|&i| i == packet_id) {
            Some(i) => {
                self.awaiting_rel.swap_remove(i);
                reason::SUCCESS
            }
            None => reason::PACKET_ID_NOT_FOUND,
        };
        let ack = Ack {
            packet_id,
            code,
            props: &[],
        };
        codec::encode(&Packet::PubComp(ack), self.version, out);
    }

    /// The SUBACK refusing every filter of a SUBSCRIBE (geobeat serves no subscriptions over
    /// MQTT: 0x80 Failure in 3.1.1, 0x87 Not authorized in MQTT 5).
    pub fn suback_refused(&self, packet_id: u16, filters: usize, out: &mut Vec<u8>) {
        let code = match self.version {
            Version::V311 => 0x80,
            Version::V5 => reason::NOT_AUTHORIZED,
        };
        let codes = vec![code; filters];
        let props = reason_string(self.version, "subscriptions are not served over MQTT");
        let ack = SubAck {
            packet_id,
            props: &props,
            codes: &codes,
        };
        codec::encode(&Packet::SubAck(ack), self.version, out);
    }

    /// The UNSUBACK of an UNSUBSCRIBE (MQTT 5: 0x11 No subscription existed, per filter).
    pub fn unsuback(&self, packet_id: u16, filters: usize, out: &mut Vec<u8>) {
        let codes = match self.version {
            Version::V311 => Vec::new(),
            Version::V5 => vec![0x11; filters],
        };
        let ack = SubAck {
            packet_id,
            props: &[],
            codes: &codes,
        };
        codec::encode(&Packet::UnsubAck(ack), self.version, out);
    }

    /// Takes the counters accumulated since the last call.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    fn ack(&self, qos: QoS, packet_id: u16, code: u8, why: &str, out: &mut Vec<u8>) {
        let props = if code == reason::SUCCESS {
            Vec::new()
        } else {
            reason_string(self.version, why)
        };
        let ack = Ack {
            packet_id,
            code,
            props: &props,
        };
        let packet = match qos {
            QoS::ExactlyOnce => Packet::PubRec(ack),
            _ => Packet::PubAck(ack),
        };
        codec::encode(&packet, self.version, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mqtt::codec::decode;

    fn packets(bytes: &[u8], v: Version) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (p, n) = decode(&bytes[at..], Some(v), 1 << 20).unwrap().unwrap();
            out.push(match p {
                Packet::PubAck(a) => format!("PUBACK {} {:#x}", a.packet_id, a.code),
                Packet::PubRec(a) => format!("PUBREC {} {:#x}", a.packet_id, a.code),
                Packet::PubComp(a) => format!("PUBCOMP {} {:#x}", a.packet_id, a.code),
                other => other.name().to_string(),
            });
            at += n;
        }
        out
    }

    fn connect<'a>(v: Version, user: Option<&'a str>, password: Option<&'a [u8]>) -> Connect<'a> {
        Connect {
            version: v,
            clean: true,
            keep_alive_s: 30,
            props: &[],
            client_id: "c1",
            will: None,
            username: user,
            password,
        }
    }

    #[test]
    fn connect_needs_an_ingest_token_and_a_matching_user_name() {
        // The password is the token; a device token's user name is its id or empty; ops tokens
        // and bad tokens are refused with the version's code.
        let secret = Secret::generate();
        let now = 1_700_000_000;
        let mint = |scope| crate::auth::mint(&secret, &scope, now + 3600);
        let dev = mint(Scope::Device("car-1".into()));
        let ops = mint(Scope::Ops);
        let ok = |user, pw: &str, v| {
            admit(
                &connect(v, user, Some(pw.as_bytes())),
                &secret,
                now,
                60,
                || "x".into(),
            )
        };
        for user in [None, Some(""), Some("car-1")] {
            let a = ok(user, &dev, Version::V311).unwrap();
            assert_eq!(a.claims.scope, Scope::Device("car-1".into()));
            assert_eq!((a.keep_alive_s, a.server_keep_alive), (30, false));
        }
        let code = |user, pw: &str, v| ok(user, pw, v).unwrap_err().code;
        assert_eq!(code(Some("car-2"), &dev, Version::V311), 0x05);
        assert_eq!(code(Some("car-2"), &dev, Version::V5), 0x87);
        assert_eq!(code(None, &ops, Version::V5), 0x87);
        assert_eq!(code(None, "garbage", Version::V311), 0x05);
        assert_eq!(code(None, "garbage", Version::V5), 0x86);
        let none = admit(&connect(Version::V5, None, None), &secret, now, 60, || {
            "x".into()
        });
        assert_eq!(none.unwrap_err().reason, "missing_token");
        let expired = admit(
            &connect(Version::V311, None, Some(dev.as_bytes())),
            &secret,
            now + 7200,
            60,
            || "x".into(),
        );
        assert_eq!(expired.unwrap_err().reason, "token_expired");
    }

    #[test]
    fn the_v5_connack_states_the_bounds_and_the_assigned_id() {
        // An MQTT 5 client learns Receive Maximum, Maximum Packet Size, no topic aliases, its
        // assigned client id and the Server Keep Alive the server chose; 3.1.1 gets 2 bytes.
        let secret = Secret::generate();
        let now = 1_700_000_000;
        let tok = crate::auth::mint(&secret, &Scope::Device("d".into()), now + 60);
        let mut c = connect(Version::V5, None, Some(tok.as_bytes()));
        c.client_id = "";
        c.keep_alive_s = 0;
        let a = admit(&c, &secret, now, 45, || "geobeat-0-1".into()).unwrap();
        assert_eq!(
            (a.keep_alive_s, a.server_keep_alive, a.assigned),
            (45, true, true)
        );
        let mut out = Vec::new();
        connack_accepted(&a, Some((2, 41)), &mut out);
        let (p, _) = decode(&out, Some(Version::V5), 1 << 20).unwrap().unwrap();
        let Packet::ConnAck(ack) = p else {
            panic!("{p:?}")
        };
        use codec::{prop, PropValue, Props};
        let props = Props(ack.props);
        assert_eq!(ack.code, 0);
        assert_eq!(
            props.get(prop::RECEIVE_MAXIMUM),
            Some(PropValue::U16(MQTT_INFLIGHT_MAX as u16))
        );
        assert_eq!(
            props.get(prop::MAXIMUM_PACKET_SIZE),
            Some(PropValue::U32(MQTT_PACKET_BYTES_MAX as u32))
        );
        assert_eq!(
            props.get(prop::TOPIC_ALIAS_MAXIMUM),
            Some(PropValue::U16(0))
        );
        assert_eq!(
            props.get(prop::ASSIGNED_CLIENT_ID),
            Some(PropValue::Str("geobeat-0-1"))
        );
        assert_eq!(props.get(prop::SERVER_KEEP_ALIVE), Some(PropValue::U16(45)));
        assert_eq!(props.user("resume"), Some(r#"{"epoch":2,"seq":41}"#));
        let mut c311 = connect(Version::V311, Some("d"), Some(tok.as_bytes()));
        c311.client_id = "";
        c311.clean = false;
        let refused = admit(&c311, &secret, now, 45, || "x".into()).unwrap_err();
        assert_eq!(refused.code, return_code::IDENTIFIER_REJECTED);
        c311.clean = true;
        let mut out = Vec::new();
        connack_accepted(
            &admit(&c311, &secret, now, 45, || "x".into()).unwrap(),
            None,
            &mut out,
        );
        assert_eq!(out, [0x20, 2, 0, 0]);
    }

    #[test]
    fn topics_name_a_device() {
        assert_eq!(topic("geobeat/a/b"), Ok(Topic::Geobeat { device: "a/b" }));
        assert_eq!(
            topic("owntracks/jane/phone"),
            Ok(Topic::OwnTracks {
                user: "jane",
                device: "phone"
            })
        );
        assert_eq!(
            topic("owntracks/jane/phone/event"),
            Ok(Topic::OwnTracksOther { user: "jane" })
        );
        for bad in [
            "geobeat/",
            "owntracks/jane",
            "owntracks//phone",
            "other/x",
            "geobeat/+",
        ] {
            assert_eq!(topic(bad).unwrap_err().code, 0x90, "{bad}");
        }
    }

    #[test]
    fn acks_wait_for_the_store_and_keep_publish_order() {
        // Three QoS 1 PUBLISHes: nothing is acked before the store answers; the second is
        // refused (MQTT 5: PUBACK 0x97), the others succeed, in order.
        let mut s = Session::new(Version::V5);
        let mut out = Vec::new();
        let seqs: Vec<_> = (1..=3)
            .map(|id| s.publish(QoS::AtLeastOnce, Some(id), None, &mut out))
            .collect();
        assert_eq!(
            seqs,
            [Publish::Store(1), Publish::Store(2), Publish::Store(3)]
        );
        assert_eq!(s.settle(0, &mut out), Settled::Open);
        assert!(out.is_empty());
        s.refuse(2, Refused::storage("storage_full"));
        assert_eq!(s.settle(2, &mut out), Settled::Open);
        assert_eq!(
            packets(&out, Version::V5),
            ["PUBACK 1 0x0", "PUBACK 2 0x97"]
        );
        out.clear();
        assert_eq!(s.settle(3, &mut out), Settled::Open);
        assert_eq!(packets(&out, Version::V5), ["PUBACK 3 0x0"]);
        assert_eq!(s.inflight(), 0);
        assert_eq!(
            s.take_tally(),
            Tally {
                acked: 2,
                refused_acked: 1,
                refused_qos0: 0
            }
        );
    }

    #[test]
    fn a_refusal_closes_a_3_1_1_connection_after_the_earlier_acks() {
        let mut s = Session::new(Version::V311);
        let mut out = Vec::new();
        s.publish(QoS::AtLeastOnce, Some(7), None, &mut out);
        let bad = Refused::payload("invalid_json");
        s.publish(QoS::AtLeastOnce, Some(8), Some(bad), &mut out);
        assert_eq!(s.settle(2, &mut out), Settled::Close(bad));
        assert_eq!(packets(&out, Version::V311), ["PUBACK 7 0x0"]);
    }

    #[test]
    fn qos2_is_recorded_once_and_completed_by_pubrel() {
        // PUBREC only once durable; a duplicate PUBLISH before it is not stored again, one after
        // it gets the PUBREC again; PUBREL completes; an unknown PUBREL gets 0x92 in MQTT 5.
        let mut s = Session::new(Version::V5);
        let mut out = Vec::new();
        assert_eq!(
            s.publish(QoS::ExactlyOnce, Some(9), None, &mut out),
            Publish::Store(1)
        );
        assert_eq!(
            s.publish(QoS::ExactlyOnce, Some(9), None, &mut out),
            Publish::Duplicate
        );
        assert!(out.is_empty());
        s.settle(1, &mut out);
        assert_eq!(
            s.publish(QoS::ExactlyOnce, Some(9), None, &mut out),
            Publish::Duplicate
        );
        assert_eq!(s.inflight(), 1, "waiting for PUBREL");
        s.pubrel(9, &mut out);
        s.pubrel(10, &mut out);
        assert_eq!(
            packets(&out, Version::V5),
            [
                "PUBREC 9 0x0",
                "PUBREC 9 0x0",
                "PUBCOMP 9 0x0",
                "PUBCOMP 10 0x92"
            ]
        );
        assert_eq!(s.inflight(), 0);
    }

    proptest::proptest! {
        /// Model check: PUBLISHes of random QoS (QoS 2 ids unique), some refused before
        /// storing, some refused by the store later, settled in random steps. Every QoS 1/2
        /// PUBLISH is answered exactly once, in PUBLISH order, with success iff it was never
        /// refused (MQTT 5); MQTT 3.1.1 answers the prefix before the first refused QoS 1/2
        /// PUBLISH with success and then closes, answering nothing after it.
        #[test]
        fn acks_follow_publish_order_and_never_claim_a_refusal_stored(
            v5 in proptest::bool::ANY,
            ops in proptest::collection::vec((0u8..3, 0u8..4, 0u8..3), 1..40),
        ) {
            let version = if v5 { Version::V5 } else { Version::V311 };
            let mut s = Session::new(version);
            let mut out = Vec::new();
            // Model: (seq, packet id, qos, refused) per PUBLISH.
            let mut model: Vec<(u64, Option<u16>, QoS, bool)> = Vec::new();
            let mut next_id = 1u16;
            let mut ack_ready = 0u64;
            let mut closed = false;
            for (qos, refuse_now, step) in ops {
                let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][qos as usize];
                let id = (qos != QoS::AtMostOnce).then(|| { next_id += 1; next_id });
                let refused = refuse_now == 0;
                let why = refused.then(|| Refused::payload("x"));
                let Publish::Store(seq) = s.publish(qos, id, why, &mut out) else {
                    panic!("fresh ids are never duplicates");
                };
                model.push((seq, id, qos, refused));
                if refuse_now == 1 {
                    // The store refuses an earlier, unsettled PUBLISH.
                    let k = model.len() / 2;
                    if model[k].0 > ack_ready {
                        s.refuse(model[k].0, Refused::storage("storage_full"));
                        model[k].3 = true;
                    }
                }
                if step > 0 && !closed {
                    ack_ready = (ack_ready + u64::from(step)).min(model.len() as u64);
                    if let Settled::Close(_) = s.settle(ack_ready, &mut out) {
                        closed = true;
                    }
                }
            }
            if !closed {
                closed = matches!(s.settle(model.len() as u64, &mut out), Settled::Close(_));
            }
            let got = packets(&out, version);
            let answered: Vec<_> = model.iter().filter(|m| m.2 != QoS::AtMostOnce).collect();
            let expect: Vec<String> = match version {
                Version::V5 => answered
                    .iter()
                    .map(|(_, id, qos, _)| {
                        let kind = if *qos == QoS::ExactlyOnce { "PUBREC" } else { "PUBACK" };
                        format!("{kind} {}", id.unwrap())
                    })
                    .collect(),
                Version::V311 => answered
                    .iter()
                    .take_while(|m| !m.3)
                    .map(|(_, id, qos, _)| {
                        let kind = if *qos == QoS::ExactlyOnce { "PUBREC" } else { "PUBACK" };
                        format!("{kind} {}", id.unwrap())
                    })
                    .collect(),
            };
            let got_ids: Vec<String> = got
                .iter()
                .map(|g| g.rsplit_once(' ').unwrap().0.to_string())
                .collect();
            proptest::prop_assert_eq!(&got_ids, &expect);
            // Success exactly for PUBLISHes never refused.
            let answered_n = if v5 { answered.len() } else { expect.len() };
            for (g, m) in got.iter().zip(answered.iter().take(answered_n)) {
                let success = g.ends_with(" 0x0");
                proptest::prop_assert_eq!(success, !m.3, "{} for {:?}", g, m);
            }
            let any_refused = answered.iter().any(|m| m.3);
            proptest::prop_assert_eq!(closed, !v5 && any_refused);
        }
    }

    #[test]
    fn qos0_is_settled_silently() {
        let mut s = Session::new(Version::V311);
        let mut out = Vec::new();
        s.publish(QoS::AtMostOnce, None, Some(Refused::payload("x")), &mut out);
        s.publish(QoS::AtMostOnce, None, None, &mut out);
        assert_eq!(s.settle(2, &mut out), Settled::Open);
        assert!(out.is_empty());
        assert_eq!(s.take_tally().refused_qos0, 1);
    }
}
