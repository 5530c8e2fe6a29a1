//! The executors' NATS connection, on the runtime (io_uring sockets): one per executor, owned by
//! its replication loop, which is its only user, so there are no locks, no channels and no
//! second thread. It connects (trying the configured servers in turn), publishes a round of
//! batches and collects their PubAcks, makes JetStream API requests, and keeps the connection
//! alive with PING/PONG. It does not decide what to publish or retry (`shard::replicate`).
//!
//! Why not `async-nats`: it runs on tokio, so each executor would need a tokio thread beside it
//! and channels both ways (two cross-thread hops per batch, a second runtime per core, buffers
//! that are not geobeat's to bound). The subset needed here — CONNECT, SUB, HPUB with a reply
//! inbox, MSG/HMSG, PING/PONG, a JSON PubAck — is small ([`super::wire`]).
//!
//! Invariant: a reply is matched to its publish by a unique inbox subject (`<inbox>.<round>.<i>`);
//! replies to an earlier round are skipped; the read buffer holds at most one operation plus one
//! read chunk ([`NATS_MSG_BYTES_MAX`](crate::limits::NATS_MSG_BYTES_MAX) bounds an operation).

use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::wire::{self, PubAck, ServerOp};
use super::Error;
use crate::limits::{NATS_READ_CHUNK_BYTES, REPLICATE_REQUEST_TIMEOUT};
use crate::rt::TcpStream;

/// One publish of a round.
#[derive(Debug)]
pub struct Publish<'a> {
    /// The subject.
    pub subject: &'a str,
    /// Headers (`Nats-Msg-Id`, ...).
    pub headers: &'a [(&'a str, String)],
    /// The payload.
    pub payload: &'a [u8],
}

/// One executor's connection (see the module comment).
pub struct Conn {
    addr: String,
    sock: TcpStream,
    buf: Vec<u8>,
    inbox: String,
    round: u64,
}

enum Op {
    Pong,
    Msg {
        subject: String,
        reply: Option<String>,
        headers: Option<Vec<u8>>,
        payload: Vec<u8>,
    },
    Other,
}

/// A message delivered to this connection's inbox (a pulled stream message: its reply subject
/// is JetStream's `$JS.ACK...` delivery info; or a pull's status: headers with a status line).
#[derive(Debug)]
pub struct Delivered {
    /// The inbox subject it arrived on.
    pub subject: String,
    /// Its reply subject.
    pub reply: Option<String>,
    /// Its header block, if any.
    pub headers: Option<Vec<u8>>,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Conn {
    /// Connects to the first server of `addrs`, starting at index `first`, that completes the
    /// handshake.
    pub async fn connect(addrs: &[String], first: usize, name: &str) -> Result<Conn, Error> {
        let mut last = String::from("no address configured");
        for i in 0..addrs.len() {
            let addr = &addrs[(first + i) % addrs.len()];
            match Conn::connect_one(addr, name).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Error::Unreachable {
            urls: addrs.join(","),
            reason: last,
        })
    }

    async fn connect_one(addr: &str, name: &str) -> Result<Conn, Error> {
        let io = |source: std::io::Error| Error::Io {
            addr: addr.to_string(),
            source,
        };
        let sa = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(io)?
            .next()
            .ok_or_else(|| io(std::io::Error::other("address resolves to nothing")))?;
        let sock = TcpStream::connect_timeout(sa, REPLICATE_REQUEST_TIMEOUT)
            .await
            .map_err(|e| io(e.into()))?;
        sock.set_nodelay(true).map_err(|e| io(e.into()))?;
        let mut c = Conn {
            addr: addr.to_string(),
            sock,
            buf: Vec::new(),
            inbox: format!("_INBOX.{:016x}", rand::random::<u64>()),
            round: 0,
        };
        let mut out = wire::connect_ops(name);
        wire::sub(&mut out, &format!("{}.>", c.inbox), 1);
        c.write(&out).await?;
        let deadline = Instant::now() + REPLICATE_REQUEST_TIMEOUT;
        while !matches!(c.next_op(deadline, "CONNECT").await?, Op::Pong) {}
        Ok(c)
    }

    /// The server this connection talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let r = self.sock.write_all(bytes).await;
        let r = match r {
            Ok(()) => self.sock.flush().await,
            Err(e) => Err(e),
        };
        r.map_err(|source| Error::Io {
            addr: self.addr.clone(),
            source,
        })
    }

    /// Reads until one operation is complete; answers PING; `-ERR` is an error; `Ok(None)` at
    /// the deadline.
    async fn next_op(&mut self, deadline: Instant, what: &str) -> Result<Op, Error> {
        loop {
            let parsed = wire::parse(&self.buf).map_err(|source| Error::Wire {
                addr: self.addr.clone(),
                source,
            })?;
            if let Some((op, used)) = parsed {
                let op = match op {
                    ServerOp::Ping => Op::Other,
                    ServerOp::Pong => Op::Pong,
                    ServerOp::Err(t) => {
                        return Err(Error::Server {
                            addr: self.addr.clone(),
                            text: String::from_utf8_lossy(t).into_owned(),
                        })
                    }
                    ServerOp::Msg(m) => Op::Msg {
                        subject: String::from_utf8_lossy(m.subject).into_owned(),
                        reply: m.reply.map(|r| String::from_utf8_lossy(r).into_owned()),
                        headers: m.headers.map(<[u8]>::to_vec),
                        payload: m.payload.to_vec(),
                    },
                    ServerOp::Info(_) | ServerOp::Ok => Op::Other,
                };
                let ping = self.buf.starts_with(b"PING");
                self.buf.drain(..used);
                if ping {
                    self.write(b"PONG\r\n").await?;
                }
                return Ok(op);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    subject: what.to_string(),
                    timeout: REPLICATE_REQUEST_TIMEOUT,
                });
            }
            let io = |source: std::io::Error| Error::Io {
                addr: self.addr.clone(),
                source,
            };
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| io(e.into()))?;
            let mut chunk = [0u8; NATS_READ_CHUNK_BYTES];
            match self.sock.read(&mut chunk).await {
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

    /// This connection's inbox prefix: replies to `<inbox>.<anything>` arrive through
    /// [`Conn::next_delivered`].
    pub fn inbox(&self) -> &str {
        &self.inbox
    }

    /// Publishes `payload` on `subject` with reply subject `reply`, without waiting.
    pub async fn send(&mut self, subject: &str, reply: &str, payload: &[u8]) -> Result<(), Error> {
        let mut out = Vec::new();
        wire::publish(&mut out, subject, reply, payload);
        self.write(&out).await
    }

    /// The next message delivered to the inbox; `Ok(None)` if none came before `deadline`.
    pub async fn next_delivered(&mut self, deadline: Instant) -> Result<Option<Delivered>, Error> {
        loop {
            match self.next_op(deadline, "pull").await {
                Ok(Op::Msg {
                    subject,
                    reply,
                    headers,
                    payload,
                }) => {
                    return Ok(Some(Delivered {
                        subject,
                        reply,
                        headers,
                        payload,
                    }))
                }
                Ok(_) => {}
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a PING and waits for its PONG (a dead connection shows here while idle).
    pub async fn ping(&mut self) -> Result<(), Error> {
        self.write(b"PING\r\n").await?;
        let deadline = Instant::now() + REPLICATE_REQUEST_TIMEOUT;
        while !matches!(self.next_op(deadline, "PING").await?, Op::Pong) {}
        Ok(())
    }

    /// A JetStream API request: JSON in, JSON out (`error` objects and no-responders become
    /// [`Error::Api`]).
    pub async fn api(
        &mut self,
        subject: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        self.round += 1;
        let reply = format!("{}.{}.r", self.inbox, self.round);
        let mut out = Vec::new();
        wire::publish(&mut out, subject, &reply, body.to_string().as_bytes());
        self.write(&out).await?;
        let deadline = Instant::now() + REPLICATE_REQUEST_TIMEOUT;
        let (headers, payload) = loop {
            if let Op::Msg {
                subject: s,
                headers,
                payload,
                ..
            } = self.next_op(deadline, subject).await?
            {
                if s == reply {
                    break (headers, payload);
                }
            }
        };
        let api_err = |err_code, description: String| Error::Api {
            subject: subject.to_string(),
            err_code,
            description,
        };
        if headers.as_deref().and_then(wire::status) == Some(503) {
            return Err(api_err(503, "no responders".into()));
        }
        let v: serde_json::Value = serde_json::from_slice(&payload)
            .map_err(|e| api_err(0, format!("reply is not JSON: {e}")))?;
        if let Some(e) = v.get("error") {
            return Err(api_err(
                e["err_code"].as_u64().unwrap_or(0) as u32,
                e["description"].as_str().unwrap_or("").to_string(),
            ));
        }
        Ok(v)
    }

    /// Publishes every message of `pubs` at once and collects their PubAcks until `timeout`:
    /// `acks[i]` is `None` for a publish that got no answer in time. A connection error ends the
    /// round (the caller reconnects and retries what has no answer).
    pub async fn publish_round(
        &mut self,
        pubs: &[Publish<'_>],
        timeout: Duration,
        acks: &mut Vec<Option<PubAck>>,
    ) -> Result<(), Error> {
        acks.clear();
        acks.resize(pubs.len(), None);
        if pubs.is_empty() {
            return Ok(());
        }
        self.round += 1;
        let prefix = format!("{}.{}.", self.inbox, self.round);
        let mut out = Vec::new();
        for (i, p) in pubs.iter().enumerate() {
            let headers: Vec<(&str, &str)> =
                p.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            wire::hpublish(
                &mut out,
                p.subject,
                &format!("{prefix}{i}"),
                &headers,
                p.payload,
            );
        }
        self.write(&out).await?;
        let deadline = Instant::now() + timeout;
        let mut left = pubs.len();
        while left > 0 {
            let op = match self.next_op(deadline, "publish").await {
                Ok(op) => op,
                Err(Error::Timeout { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            let Op::Msg {
                subject,
                headers,
                payload,
                ..
            } = op
            else {
                continue;
            };
            let Some(i) = subject
                .strip_prefix(&prefix)
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < pubs.len())
            else {
                continue;
            };
            let msg = wire::Msg {
                subject: subject.as_bytes(),
                reply: None,
                headers: headers.as_deref(),
                payload: &payload,
            };
            let ack = wire::pub_ack(&msg).map_err(|source| Error::Wire {
                addr: self.addr.clone(),
                source,
            })?;
            if acks[i].replace(ack).is_none() {
                left -= 1;
            }
        }
        Ok(())
    }
}
