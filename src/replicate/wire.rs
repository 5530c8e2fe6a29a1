//! The NATS client protocol as bytes, with no I/O: the client operations geobeat sends
//! (`CONNECT`, `SUB`, `PUB`, `HPUB`, `PING`, `PONG`), a parser of the server's operations
//! (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`), message headers (`NATS/1.0` status
//! line, `Key: Value` lines) and the JetStream publish acknowledgement (`PubAck`, JSON). Both
//! clients (the executors' [`super::conn`] on the runtime, the blocking [`super::blocking`] for
//! start-up, tools and tests) use it, so they speak exactly the same protocol.
//!
//! Hand-written rather than a crate: the subset geobeat needs is a dozen lines of text framing
//! (<https://docs.nats.io/reference/reference-protocols/nats-protocol>), and owning it keeps the
//! client on each executor's own thread with buffers geobeat bounds (see `replicate` module).
//!
//! Invariant: the parser never reads past a complete operation and never allocates for one that
//! is incomplete; an operation longer than [`PROTO_LINE_BYTES_MAX`] or a message larger than
//! [`NATS_MSG_BYTES_MAX`] is a protocol error, not a buffer that grows.

use crate::limits::{NATS_MSG_BYTES_MAX, PROTO_LINE_BYTES_MAX};

/// One operation from the server, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// `INFO {json}`.
    Info(&'a [u8]),
    /// `MSG` or `HMSG`.
    Msg(Msg<'a>),
    /// `PING`: answer `PONG`.
    Ping,
    /// `PONG`.
    Pong,
    /// `+OK` (only in verbose mode, which geobeat does not ask for).
    Ok,
    /// `-ERR 'text'`.
    Err(&'a [u8]),
}

/// A delivered message.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Msg<'a> {
    /// Subject it was published on (for replies: the inbox).
    pub subject: &'a [u8],
    /// Reply subject, if any.
    pub reply: Option<&'a [u8]>,
    /// The header block (`NATS/1.0 ...\r\n...\r\n\r\n`), if an `HMSG`.
    pub headers: Option<&'a [u8]>,
    /// Payload.
    pub payload: &'a [u8],
}

/// The server broke the protocol (or sent something larger than geobeat accepts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// An operation line longer than the bound.
    #[error("protocol line longer than {PROTO_LINE_BYTES_MAX} bytes")]
    LineTooLong,
    /// A message larger than the bound.
    #[error("message of {0} bytes is larger than {NATS_MSG_BYTES_MAX}")]
    MsgTooLarge(usize),
    /// An operation geobeat does not know, or malformed arguments.
    #[error("malformed protocol operation: {0}")]
    Malformed(String),
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn parse_usize(b: &[u8]) -> Result<usize, WireError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| WireError::Malformed(format!("bad number {:?}", String::from_utf8_lossy(b))))
}

/// Parses the next complete operation at the start of `buf`: `Ok(None)` if more bytes are needed,
/// else the operation and the bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(ServerOp<'_>, usize)>, WireError> {
    let Some(eol) = find_crlf(buf) else {
        if buf.len() > PROTO_LINE_BYTES_MAX {
            return Err(WireError::LineTooLong);
        }
        return Ok(None);
    };
    if eol > PROTO_LINE_BYTES_MAX {
        return Err(WireError::LineTooLong);
    }
    let line = &buf[..eol];
    let (verb, rest) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let after = eol + 2;
    let upper = verb.to_ascii_uppercase();
    let op = match upper.as_slice() {
        b"PING" => ServerOp::Ping,
        b"PONG" => ServerOp::Pong,
        b"+OK" => ServerOp::Ok,
        b"-ERR" => ServerOp::Err(rest),
        b"INFO" => ServerOp::Info(rest),
        b"MSG" | b"HMSG" => {
            let args: Vec<&[u8]> = rest
                .split(|&b| b == b' ' || b == b'\t')
                .filter(|a| !a.is_empty())
                .collect();
            let with_headers = upper.as_slice() == b"HMSG";
            // MSG subject sid [reply] size; HMSG subject sid [reply] hdr_size total_size.
            let counts = if with_headers { 2 } else { 1 };
            let reply = match args.len() - counts.min(args.len()) {
                2 => None,
                3 => Some(args[2]),
                _ => {
                    return Err(WireError::Malformed(
                        String::from_utf8_lossy(line).into_owned(),
                    ))
                }
            };
            let total = parse_usize(args[args.len() - 1])?;
            let hdr = if with_headers {
                parse_usize(args[args.len() - 2])?
            } else {
                0
            };
            if total > NATS_MSG_BYTES_MAX {
                return Err(WireError::MsgTooLarge(total));
            }
            if hdr > total {
                return Err(WireError::Malformed("header size above total size".into()));
            }
            if buf.len() < after + total + 2 {
                return Ok(None);
            }
            if &buf[after + total..after + total + 2] != b"\r\n" {
                return Err(WireError::Malformed("message not followed by CRLF".into()));
            }
            let body = &buf[after..after + total];
            let msg = Msg {
                subject: args[0],
                reply,
                headers: with_headers.then(|| &body[..hdr]),
                payload: &body[hdr..],
            };
            return Ok(Some((ServerOp::Msg(msg), after + total + 2)));
        }
        _ => {
            return Err(WireError::Malformed(
                String::from_utf8_lossy(line).into_owned(),
            ))
        }
    };
    Ok(Some((op, after)))
}

/// The `CONNECT` line (headers and no-responders on, echo and verbose off) followed by a `PING`
/// whose `PONG` confirms the server accepted it.
pub fn connect_ops(name: &str) -> Vec<u8> {
    let info = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "headers": true,
        "no_responders": true,
        "echo": false,
        "lang": "rust-geobeat",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "name": name,
    });
    format!("CONNECT {info}\r\nPING\r\n").into_bytes()
}

/// `SUB subject sid`.
pub fn sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

/// `PUB subject reply size` + payload.
pub fn publish(out: &mut Vec<u8>, subject: &str, reply: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {reply} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `HPUB subject reply hdr_size total_size` + headers + payload; `headers` are `(name, value)`
/// pairs (names and values must not contain CR or LF).
pub fn hpublish(
    out: &mut Vec<u8>,
    subject: &str,
    reply: &str,
    headers: &[(&str, &str)],
    payload: &[u8],
) {
    let mut h = String::from("NATS/1.0\r\n");
    for (k, v) in headers {
        debug_assert!(!k.contains(['\r', '\n', ':']) && !v.contains(['\r', '\n']));
        h.push_str(k);
        h.push_str(": ");
        h.push_str(v);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    out.extend_from_slice(
        format!(
            "HPUB {subject} {reply} {} {}\r\n",
            h.len(),
            h.len() + payload.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// The status code of a header block's `NATS/1.0 503` line, if it has one (503: no responders,
/// 408: request timeout).
pub fn status(headers: &[u8]) -> Option<u16> {
    let line = &headers[..find_crlf(headers).unwrap_or(headers.len())];
    let rest = line.strip_prefix(b"NATS/1.0")?;
    let code = rest.trim_ascii_start().split(|&b| b == b' ').next()?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The value of header `name` (case-sensitive, as NATS headers are) in a header block.
pub fn header<'a>(headers: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(headers).ok()?;
    text.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim())
    })
}

/// What JetStream answered to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubAck {
    /// Stored (or already stored: `duplicate`) as sequence `seq` of `stream`.
    Stored {
        /// The stream.
        stream: String,
        /// Its sequence number of the message.
        seq: u64,
        /// The message id was seen within the duplicate window: nothing was stored again.
        duplicate: bool,
    },
    /// Refused with a JetStream error (`err_code` 10071: wrong last subject sequence).
    Refused {
        /// The API error code.
        err_code: u32,
        /// Its description.
        description: String,
    },
    /// No stream answered (a `503` status: no responders, no leader yet).
    NoResponders,
}

/// JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence` check.
pub const ERR_WRONG_LAST_SEQUENCE: u32 = 10071;

/// Reads a publish reply.
pub fn pub_ack(msg: &Msg<'_>) -> Result<PubAck, WireError> {
    if msg.headers.and_then(status) == Some(503) {
        return Ok(PubAck::NoResponders);
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        err_code: u32,
        #[serde(default)]
        description: String,
    }
    #[derive(serde::Deserialize)]
    struct Raw {
        error: Option<ApiError>,
        stream: Option<String>,
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
    }
    let raw: Raw = serde_json::from_slice(msg.payload).map_err(|e| {
        WireError::Malformed(format!(
            "publish ack {:?}: {e}",
            String::from_utf8_lossy(msg.payload)
        ))
    })?;
    if let Some(e) = raw.error {
        return Ok(PubAck::Refused {
            err_code: e.err_code,
            description: e.description,
        });
    }
    match (raw.stream, raw.seq) {
        (Some(stream), Some(seq)) => Ok(PubAck::Stored {
            stream,
            seq,
            duplicate: raw.duplicate,
        }),
        _ => Err(WireError::Malformed(format!(
            "publish ack without stream or seq: {:?}",
            String::from_utf8_lossy(msg.payload)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_server_operation_and_waits_for_incomplete_ones() {
        let buf = b"PING\r\nINFO {\"a\":1}\r\nMSG in.1 7 5\r\nhello\r\n";
        let (op, n) = parse(buf).unwrap().unwrap();
        assert_eq!((op, n), (ServerOp::Ping, 6));
        let (op, m) = parse(&buf[n..]).unwrap().unwrap();
        assert_eq!(op, ServerOp::Info(b"{\"a\":1}"));
        let (op, k) = parse(&buf[n + m..]).unwrap().unwrap();
        let ServerOp::Msg(msg) = op else { panic!() };
        assert_eq!(
            (msg.subject, msg.reply, msg.payload),
            (&b"in.1"[..], None, &b"hello"[..])
        );
        assert_eq!(n + m + k, buf.len());
        // Every strict prefix of a message is "need more".
        let full = b"HMSG s 1 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]).unwrap(), None, "cut {cut}");
        }
        let (ServerOp::Msg(m), used) = parse(full).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(used, full.len());
        assert_eq!((m.reply, m.payload), (Some(&b"r"[..]), &b"hi"[..]));
        assert_eq!(m.headers, Some(&b"NATS/1.0\r\n\r\n"[..]));
    }

    #[test]
    fn refuses_oversized_and_malformed_input() {
        let long = vec![b'A'; PROTO_LINE_BYTES_MAX + 1];
        assert_eq!(parse(&long), Err(WireError::LineTooLong));
        let big = format!("MSG s 1 {}\r\n", NATS_MSG_BYTES_MAX + 1);
        assert!(matches!(
            parse(big.as_bytes()),
            Err(WireError::MsgTooLarge(_))
        ));
        assert!(matches!(parse(b"BOGUS\r\n"), Err(WireError::Malformed(_))));
        assert!(matches!(
            parse(b"MSG s 1 2\r\nabXY"),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn builds_hpub_that_round_trips_through_the_parser_as_hmsg() {
        let mut out = Vec::new();
        hpublish(
            &mut out,
            "geobeat.hb.0.64",
            "_INBOX.x.1",
            &[("Nats-Msg-Id", "64:0:4096")],
            b"data",
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HPUB geobeat.hb.0.64 _INBOX.x.1 "));
        // The server delivers the same bytes as HMSG: swap the verb and add a sid.
        let as_msg = text.replacen("HPUB geobeat.hb.0.64", "HMSG geobeat.hb.0.64 9", 1);
        let (ServerOp::Msg(m), _) = parse(as_msg.as_bytes()).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(header(m.headers.unwrap(), "Nats-Msg-Id"), Some("64:0:4096"));
        assert_eq!(m.payload, b"data");
    }

    #[test]
    fn reads_publish_acks_errors_and_no_responders() {
        let msg = |h: Option<&'static [u8]>, p: &'static [u8]| Msg {
            subject: b"i",
            reply: None,
            headers: h,
            payload: p,
        };
        assert_eq!(
            pub_ack(&msg(None, br#"{"stream":"S","seq":7,"duplicate":true}"#)).unwrap(),
            PubAck::Stored {
                stream: "S".into(),
                seq: 7,
                duplicate: true
            }
        );
        assert_eq!(
            pub_ack(&msg(
                None,
                br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#
            ))
            .unwrap(),
            PubAck::Refused { err_code: ERR_WRONG_LAST_SEQUENCE, description: "wrong last sequence: 3".into() }
        );
        assert_eq!(
            pub_ack(&msg(Some(b"NATS/1.0 503\r\n\r\n"), b"")).unwrap(),
            PubAck::NoResponders
        );
        assert!(pub_ack(&msg(None, b"{}")).is_err());
    }
}
