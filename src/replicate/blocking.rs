//! A blocking NATS client over `std::net` for what runs outside the executors: stream setup at
//! start-up ([`super::Plan::prepare`]), and tools and tests that read the streams back (JetStream
//! API requests: stream info, message get). One connection, one request at a time; it owns
//! nothing else.
//!
//! Invariant: a reply is matched to its request by a unique inbox subject; stale replies (to a
//! request that timed out) are skipped, never returned for a later request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::wire::{self, ServerOp};
use super::Error;
use crate::limits::{NATS_READ_CHUNK_BYTES, REPLICATE_REQUEST_TIMEOUT};

/// A message received as a reply, owned.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The header block, if any.
    pub headers: Option<Vec<u8>>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Reply {
    /// The reply of a JetStream request (an API call or a publish) to `subject` as JSON; an
    /// `error` object becomes [`Error::Api`], a 503 status (no responders: JetStream not
    /// ready) too, with code 503.
    pub fn api_json(&self, subject: &str) -> Result<serde_json::Value, Error> {
        if self.headers.as_deref().and_then(wire::status) == Some(503) {
            return Err(Error::Api {
                subject: subject.to_string(),
                err_code: 503,
                description: "no responders (JetStream not ready)".into(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&self.payload).map_err(|e| Error::Api {
                subject: subject.to_string(),
                err_code: 0,
                description: format!("reply is not JSON: {e}"),
            })?;
        if let Some(e) = v.get("error") {
            return Err(Error::Api {
                subject: subject.to_string(),
                err_code: e["err_code"].as_u64().unwrap_or(0) as u32,
                description: e["description"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(v)
    }
}

/// A message read back from a stream (`$JS.API.STREAM.MSG.GET`).
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its stream sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its header block (`NATS/1.0\r\n...`), empty if none.
    pub headers: Vec<u8>,
    /// Its payload.
    pub data: Vec<u8>,
}

/// One blocking connection (see the module comment).
pub struct Client {
    addr: String,
    sock: TcpStream,
    buf: Vec<u8>,
    inbox: String,
    next: u64,
}

impl Client {
    /// Connects to the first of `addrs` that accepts, trying them in turn until `deadline`.
    pub fn connect_until(addrs: &[String], deadline: Instant) -> Result<Client, Error> {
        let mut last = String::from("no address configured");
        loop {
            for addr in addrs {
                match Client::connect(addr) {
                    Ok(c) => return Ok(c),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Unreachable {
                    urls: addrs.join(","),
                    reason: last,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Connects to one server and completes the handshake.
    pub fn connect(addr: &str) -> Result<Client, Error> {
        let io = |source| Error::Io {
            addr: addr.to_string(),
            source,
        };
        let sa: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(io)?
            .next()
            .ok_or_else(|| io(std::io::Error::other("address resolves to nothing")))?;
        let sock = TcpStream::connect_timeout(&sa, REPLICATE_REQUEST_TIMEOUT).map_err(io)?;
        sock.set_nodelay(true).map_err(io)?;
        let mut c = Client {
            addr: addr.to_string(),
            sock,
            buf: Vec::new(),
            inbox: format!("_INBOX.{:016x}", rand::random::<u64>()),
            next: 0,
        };
        let mut out = wire::connect_ops("geobeat-tool");
        wire::sub(&mut out, &format!("{}.*", c.inbox), 1);
        c.sock.write_all(&out).map_err(io)?;
        let deadline = Instant::now() + REPLICATE_REQUEST_TIMEOUT;
        loop {
            match c.next_op(deadline, "CONNECT")? {
                Op::Pong => return Ok(c),
                Op::Msg(_) | Op::Other => {}
            }
        }
    }

    /// The server this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Reads until one operation is complete; answers PING; `-ERR` is an error.
    fn next_op(&mut self, deadline: Instant, what: &str) -> Result<Op, Error> {
        loop {
            let parsed = wire::parse(&self.buf).map_err(|source| Error::Wire {
                addr: self.addr.clone(),
                source,
            })?;
            if let Some((op, used)) = parsed {
                let op = match op {
                    ServerOp::Ping => {
                        self.sock
                            .write_all(b"PONG\r\n")
                            .map_err(|source| Error::Io {
                                addr: self.addr.clone(),
                                source,
                            })?;
                        Op::Other
                    }
                    ServerOp::Pong => Op::Pong,
                    ServerOp::Err(t) => {
                        return Err(Error::Server {
                            addr: self.addr.clone(),
                            text: String::from_utf8_lossy(t).into_owned(),
                        })
                    }
                    ServerOp::Msg(m) => Op::Msg((
                        String::from_utf8_lossy(m.subject).into_owned(),
                        Reply {
                            headers: m.headers.map(<[u8]>::to_vec),
                            payload: m.payload.to_vec(),
                        },
                    )),
                    ServerOp::Info(_) | ServerOp::Ok => Op::Other,
                };
                self.buf.drain(..used);
                return Ok(op);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    subject: what.to_string(),
                    timeout: REPLICATE_REQUEST_TIMEOUT,
                });
            }
            let io = |source| Error::Io {
                addr: self.addr.clone(),
                source,
            };
            self.sock.set_read_timeout(Some(left)).map_err(io)?;
            let mut chunk = [0u8; NATS_READ_CHUNK_BYTES];
            match self.sock.read(&mut chunk) {
                Ok(0) => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    )))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// Publishes `payload` (with `headers`) on `subject` and waits for the reply.
    pub fn request(
        &mut self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Reply, Error> {
        self.next += 1;
        let reply = format!("{}.{}", self.inbox, self.next);
        let mut out = Vec::new();
        if headers.is_empty() {
            wire::publish(&mut out, subject, &reply, payload);
        } else {
            wire::hpublish(&mut out, subject, &reply, headers, payload);
        }
        self.sock.write_all(&out).map_err(|source| Error::Io {
            addr: self.addr.clone(),
            source,
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Op::Msg((subj, r)) = self.next_op(deadline, subject)? {
                if subj == reply {
                    return Ok(r);
                }
            }
        }
    }

    /// A JetStream API request: JSON in, JSON out; an `error` object becomes [`Error::Api`], a
    /// 503 status (no responders) too, with code 503.
    pub fn api(
        &mut self,
        subject: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        let r = self.request(
            subject,
            &[],
            body.to_string().as_bytes(),
            REPLICATE_REQUEST_TIMEOUT,
        )?;
        r.api_json(subject)
    }

    /// `$JS.API.STREAM.INFO.<name>`.
    pub fn stream_info(&mut self, name: &str) -> Result<serde_json::Value, Error> {
        self.api(
            &format!("$JS.API.STREAM.INFO.{name}"),
            &serde_json::json!({}),
        )
    }

    /// `$JS.API.STREAM.CREATE.<name>` with `config`.
    pub fn stream_create(
        &mut self,
        config: &serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        let name = config["name"].as_str().expect("stream config has a name");
        self.api(&format!("$JS.API.STREAM.CREATE.{name}"), config)
    }

    /// `$JS.API.STREAM.MSG.GET.<stream>` by sequence or `last_by_subj`; `None` if no such message.
    pub fn msg_get(
        &mut self,
        stream: &str,
        req: &serde_json::Value,
    ) -> Result<Option<Stored>, Error> {
        match self.api(&format!("$JS.API.STREAM.MSG.GET.{stream}"), req) {
            Ok(v) => parse_stored(&v).map(Some),
            Err(Error::Api {
                err_code: 10037, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A `STREAM.MSG.GET` reply's message (`hdrs` and `data` are base64).
pub fn parse_stored(v: &serde_json::Value) -> Result<Stored, Error> {
    use base64::Engine;
    let m = &v["message"];
    let b64 = |k: &str| {
        m[k].as_str()
            .map(|s| base64::engine::general_purpose::STANDARD.decode(s))
            .unwrap_or(Ok(Vec::new()))
            .map_err(|e| Error::Api {
                subject: "STREAM.MSG.GET".into(),
                err_code: 0,
                description: format!("{k} is not base64: {e}"),
            })
    };
    Ok(Stored {
        seq: m["seq"].as_u64().unwrap_or(0),
        subject: m["subject"].as_str().unwrap_or("").to_string(),
        headers: b64("hdrs")?,
        data: b64("data")?,
    })
}

enum Op {
    Pong,
    Msg((String, Reply)),
    Other,
}
