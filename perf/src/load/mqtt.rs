//! One simulated device speaking MQTT 3.1.1 to geobeat's MQTT listener or to a broker (Mosquitto
//! in the comparison): CONNECT with a clean session, client id and user name = the device id and,
//! when the run has one, the device's geobeat token as password (docs/MQTT.md); then one QoS 1
//! PUBLISH per frame on `geobeat/<device id>`, the frame's JSON without `seq` as payload (the
//! packet id names the ack). The PUBACK is the ack. Packet encoding and decoding come from
//! `rumqttc`'s MQTT codec (no client state machine, no task per connection); this module owns
//! the socket, the packet-id allocation and the mapping of PUBACKs back to heartbeat seqs. It
//! does not own pacing or statistics. Invariant: `Reply::Ack(n)` is reported only when every
//! PUBLISH up to the one carrying seq n has been PUBACKed, even if the server acknowledged them
//! out of order.
//!
//! What a PUBACK means depends on the server: geobeat sends it once the heartbeats are durable
//! (fdatasync'd with `--durability strict`); Mosquitto as the comparison runs it (persistence
//! off, its default) once the message is in memory, and with no subscriber keeps neither history
//! nor last location. The comparison reports Mosquitto as a relay, not a store.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt as _;
use rumqttc::mqttbytes::v4::{self, ConnAck, Connect, Packet, Publish};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::link::{Incoming, LinkClosed};
use super::tls::{TlsClient, Transport};
use super::LoadError;
use crate::frame::{self, Common, Sample};
use crate::reply::Reply;

/// Topic of a device's heartbeats: geobeat's (docs/MQTT.md), used for every MQTT server so the
/// byte stream is the same.
pub const TOPIC_PREFIX: &str = "geobeat/";
/// Largest packet accepted from the broker (PUBACKs are 4 bytes).
const PACKET_BYTES_MAX: usize = 64 << 10;
/// Read buffer per connection: PUBACKs are tiny, so a small buffer keeps 10,000 connections cheap.
const READ_BUFFER_BYTES: usize = 4 << 10;
/// Keep-alive announced in CONNECT: longer than any run, so no PINGREQ is needed.
const KEEP_ALIVE_S: u16 = 600;
/// How long CONNECT may wait for its CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One PUBLISH waiting for its PUBACK.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Packet id of the PUBLISH.
    pkid: u16,
    /// Highest heartbeat seq the PUBLISH carried.
    last_seq: u64,
    /// Whether its PUBACK has arrived (out of order: waits for the ones before it).
    acked: bool,
}

/// A device's MQTT connection.
#[derive(Debug)]
pub struct MqttLink {
    /// The broker connection (TCP, or TLS for mqtts://).
    stream: Transport,
    /// Bytes received and not yet decoded.
    read_buf: BytesMut,
    /// Encoded packets not yet written.
    write_buf: BytesMut,
    /// `geobeat/<device id>`.
    topic: String,
    /// Scratch buffer for the JSON payload.
    payload: Vec<u8>,
    /// Next packet id (1..=65535; 0 is not a valid id).
    next_pkid: u16,
    /// PUBLISHes in flight, oldest first.
    pending: VecDeque<Pending>,
}

impl MqttLink {
    /// Connects to `addr` as client `device_id` and waits for the CONNACK. A non-empty `token`
    /// goes as the password with the device id as user name (MQTT 3.1.1 needs a user name with a
    /// password; geobeat wants the token's device id there).
    pub async fn connect(
        addr: SocketAddr,
        tls: Option<&TlsClient>,
        device_id: &str,
        token: &str,
    ) -> Result<Self, LoadError> {
        let tcp = TcpStream::connect(addr).await.map_err(LoadError::Connect)?;
        tcp.set_nodelay(true).map_err(LoadError::Connect)?;
        let stream = match tls {
            Some(tls) => tls.connect(tcp).await.map_err(LoadError::Tls)?,
            None => Transport::Plain(tcp),
        };
        let mut link = Self {
            stream,
            read_buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            write_buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            topic: format!("{TOPIC_PREFIX}{device_id}"),
            payload: Vec::new(),
            next_pkid: 1,
            pending: VecDeque::new(),
        };
        let mut connect = Connect::new(device_id);
        connect.keep_alive = KEEP_ALIVE_S;
        connect.clean_session = true;
        if !token.is_empty() {
            connect.set_login(device_id, token);
        }
        connect
            .write(&mut link.write_buf)
            .map_err(|e| LoadError::Mqtt(format!("encode CONNECT: {e:?}")))?;
        link.flush()
            .await
            .map_err(|_| LoadError::Mqtt("connection closed while sending CONNECT".into()))?;
        match tokio::time::timeout(CONNACK_TIMEOUT, link.read_packet()).await {
            Ok(Ok(Packet::ConnAck(ConnAck {
                code: v4::ConnectReturnCode::Success,
                ..
            }))) => Ok(link),
            Ok(Ok(Packet::ConnAck(ConnAck { code, .. }))) => Err(LoadError::Mqtt(format!(
                "CONNACK refused the connection: {code:?}"
            ))),
            Ok(Ok(other)) => Err(LoadError::Mqtt(format!(
                "expected a successful CONNACK, got {other:?}"
            ))),
            Ok(Err(message)) => Err(LoadError::Mqtt(message)),
            Err(_) => Err(LoadError::ConnectTimeout),
        }
    }

    /// Reads until one whole packet has arrived (used only during connect).
    async fn read_packet(&mut self) -> Result<Packet, String> {
        loop {
            match v4::read(&mut self.read_buf, PACKET_BYTES_MAX) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("bad packet from broker: {e:?}")),
            }
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => return Err("broker closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Encodes one QoS 1 PUBLISH carrying `samples` as a JSON frame.
    pub fn feed(&mut self, samples: &[Sample], common: &Common<'_>) -> Result<(), LinkClosed> {
        self.payload.clear();
        if let Err(e) = frame::encode_json_seqless(samples, common, &mut self.payload) {
            unreachable!("frame encoding failed after validation: {e}");
        }
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let mut publish = Publish::new(self.topic.as_str(), QoS::AtLeastOnce, &self.payload[..]);
        publish.pkid = pkid;
        if publish.write(&mut self.write_buf).is_err() {
            // Only a topic or payload beyond MQTT's size limits fails; ours are small.
            unreachable!("a heartbeat PUBLISH always encodes");
        }
        let last_seq = samples.last().map_or(0, |s| s.seq);
        self.pending.push_back(Pending {
            pkid,
            last_seq,
            acked: false,
        });
        Ok(())
    }

    /// Writes every encoded packet.
    pub async fn flush(&mut self) -> Result<(), LinkClosed> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.write_buf).await;
        self.write_buf.clear();
        result.map_err(|_| LinkClosed)
    }

    /// Decodes one buffered packet, if a whole one is there.
    fn decode(&mut self) -> Option<Incoming> {
        match v4::read(&mut self.read_buf, PACKET_BYTES_MAX) {
            Ok(Packet::PubAck(ack)) => Some(self.on_puback(ack.pkid)),
            Ok(Packet::PingResp) => Some(Incoming::Ignored),
            Ok(_) => Some(Incoming::Unexpected),
            Err(mqttbytes::Error::InsufficientBytes(_)) => None,
            Err(_) => Some(Incoming::Failed),
        }
    }

    /// Marks `pkid` acknowledged and reports the highest seq now acknowledged without gaps.
    fn on_puback(&mut self, pkid: u16) -> Incoming {
        match self.pending.iter_mut().find(|p| p.pkid == pkid && !p.acked) {
            Some(pending) => pending.acked = true,
            None => return Incoming::Unexpected,
        }
        let mut acked_seq = None;
        while let Some(front) = self.pending.front() {
            if !front.acked {
                break;
            }
            acked_seq = Some(front.last_seq);
            self.pending.pop_front();
        }
        match acked_seq {
            Some(seq) => Incoming::Reply(Reply::Ack(seq)),
            None => Incoming::Ignored,
        }
    }

    /// Waits for the next event. Cancel-safe: `read_buf` keeps partial packets.
    pub async fn next(&mut self) -> Incoming {
        loop {
            if let Some(incoming) = self.decode() {
                return incoming;
            }
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => return Incoming::Closed,
                Ok(_) => {}
                Err(_) => return Incoming::Failed,
            }
        }
    }

    /// The next event if one is already buffered or readable without waiting.
    pub fn next_ready(&mut self) -> Option<Incoming> {
        if let Some(incoming) = self.decode() {
            return Some(incoming);
        }
        self.read_buf.reserve(READ_BUFFER_BYTES);
        let read = match self.stream.plain() {
            Some(tcp) => tcp.try_read_buf(&mut self.read_buf),
            // TLS: one poll of the session's read (cancel-safe, like `read_buf` everywhere).
            None => self
                .stream
                .read_buf(&mut self.read_buf)
                .now_or_never()
                .unwrap_or_else(|| Err(std::io::ErrorKind::WouldBlock.into())),
        };
        match read {
            Ok(0) => Some(Incoming::Closed),
            Ok(_) => self.decode(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(_) => Some(Incoming::Failed),
        }
    }

    /// Sends DISCONNECT (MQTT's clean close).
    pub async fn disconnect(&mut self) {
        self.write_buf.extend_from_slice(&[0xE0, 0x00]);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pubacks_complete_frames_in_order_even_when_out_of_order() {
        // Checks the CONNECT credentials (client id and user name = device id, token as
        // password), the PUBLISHes (QoS 1 on `geobeat/<id>`, JSON without `seq`) and the
        // PUBACK-to-seq mapping: three PUBLISHes; the server acks the second first (nothing is
        // complete yet), then the first (both complete: ack of seq 2), then the third.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            loop {
                match v4::read(&mut buf, PACKET_BYTES_MAX) {
                    Ok(Packet::Connect(connect)) => {
                        assert_eq!(connect.client_id, "dev-1");
                        assert_eq!(connect.login, Some(v4::Login::new("dev-1", "tok-1")));
                        assert!(connect.clean_session);
                        break;
                    }
                    Ok(other) => panic!("expected CONNECT, got {other:?}"),
                    Err(_) => {
                        socket.read_buf(&mut buf).await.unwrap();
                    }
                }
            }
            let mut out = BytesMut::new();
            ConnAck::new(v4::ConnectReturnCode::Success, false)
                .write(&mut out)
                .unwrap();
            socket.write_all(&out).await.unwrap();
            let mut publishes = Vec::new();
            while publishes.len() < 3 {
                match v4::read(&mut buf, PACKET_BYTES_MAX) {
                    Ok(Packet::Publish(publish)) => publishes.push(publish),
                    Ok(other) => panic!("expected PUBLISH, got {other:?}"),
                    Err(_) => {
                        socket.read_buf(&mut buf).await.unwrap();
                    }
                }
            }
            (socket, publishes)
        });
        let mut link = MqttLink::connect(addr, None, "dev-1", "tok-1")
            .await
            .unwrap();
        let sample = |seq| Sample {
            seq,
            lat: 1.0,
            lon: 2.0,
            ts_ms: 3,
            alt_m: None,
            speed_mps: None,
            heading_deg: None,
            acc_m: None,
        };
        for seq in 1..=3 {
            link.feed(&[sample(seq)], &Common::default()).unwrap();
        }
        link.flush().await.unwrap();
        let (mut socket, publishes) = server.await.unwrap();
        for (publish, pkid) in publishes.iter().zip(1u16..) {
            assert_eq!(publish.topic, "geobeat/dev-1");
            assert_eq!(publish.qos, QoS::AtLeastOnce);
            assert_eq!(publish.pkid, pkid);
            let value: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
            assert!(value.get("seq").is_none(), "{value}");
            assert_eq!(value["lat"], 1.0);
        }
        let mut out = BytesMut::new();
        for pkid in [2u16, 1, 3] {
            v4::PubAck::new(pkid).write(&mut out).unwrap();
        }
        socket.write_all(&out).await.unwrap();
        assert!(matches!(link.next().await, Incoming::Ignored));
        assert!(matches!(link.next().await, Incoming::Reply(Reply::Ack(2))));
        assert!(matches!(link.next().await, Incoming::Reply(Reply::Ack(3))));
        // A PUBACK for nothing in flight is a protocol error, not an ack.
        let mut out = BytesMut::new();
        v4::PubAck::new(9).write(&mut out).unwrap();
        socket.write_all(&out).await.unwrap();
        assert!(matches!(link.next().await, Incoming::Unexpected));
    }
}
