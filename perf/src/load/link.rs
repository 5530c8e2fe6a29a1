//! The transport between one simulated device and the system under test. The device loop
//! (`device`) decides *when* to send and does all latency bookkeeping; a [`Link`] only carries
//! frames out and classified replies back, so every target — geobeat or the null server over
//! WebSocket, an MQTT broker, Redis or PostgreSQL behind a connection pool — is measured by the
//! same open/closed-loop schedule, in-flight window and histograms. This module owns the
//! per-target connect step and the mapping of each target's acknowledgement onto
//! [`Reply::Ack`]; it does not own pacing or statistics. Invariant: a link reports
//! `Reply::Ack(n)` only once the target has acknowledged every frame whose last seq is <= n
//! (WebSocket: the server's `{"ack":n}`; MQTT: the PUBACKs of all earlier PUBLISHes; pools: the
//! database's reply to the pipeline or transaction that carried the frame).

use std::sync::Arc;

use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::WebSocketStream;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tungstenite::client::IntoClientRequest as _;
use tungstenite::http::header::AUTHORIZATION;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, Utf8Bytes};

use super::config::Target;
use super::device::Shared;
use super::mqtt::MqttLink;
use super::pool::PoolRequest;
use super::tls::Transport;
use super::LoadError;
use crate::frame::{self, Common, Format, Sample};
use crate::reply::{parse_reply, Reply};
use crate::tokens::DeviceCredential;

/// The WebSocket stream type of a device connection (ws:// or wss://).
pub type DeviceStream = WebSocketStream<TokioAdapter<Transport>>;

/// One event from a link, classified for the device loop.
#[derive(Debug)]
pub enum Incoming {
    /// An ack or rejection.
    Reply(Reply),
    /// Something to skip (pings, pongs, acks that complete nothing new).
    Ignored,
    /// A reply that breaks the protocol; the connection goes on.
    Unexpected,
    /// The peer closed the connection.
    Closed,
    /// The connection failed (counted as a protocol error, then the device stops).
    Failed,
}

/// The link could not take the frame because the connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkClosed;

/// A device's connection to the system under test.
#[derive(Debug)]
pub enum Link {
    /// geobeat or the null server: one WebSocket per device.
    Ws(Box<WsLink>),
    /// An MQTT broker: one MQTT connection per device, QoS 1 PUBLISH per frame.
    Mqtt(Box<MqttLink>),
    /// Redis or PostgreSQL: frames go to a shared pool connection that pipelines them.
    Pool(PoolLink),
}

impl Link {
    /// Opens this device's link for `target` (pool links only register with their pool).
    pub async fn connect(
        shared: &Shared,
        global: usize,
        credential: &DeviceCredential,
        device_id: &Arc<str>,
    ) -> Result<Link, LoadError> {
        match shared.plan.target {
            Target::Ws => Ok(Link::Ws(Box::new(
                WsLink::connect(shared, credential).await?,
            ))),
            Target::Mqtt => Ok(Link::Mqtt(Box::new(
                MqttLink::connect(
                    shared.plan.addr,
                    shared.plan.tls.as_ref(),
                    device_id,
                    &credential.token,
                )
                .await?,
            ))),
            Target::Redis | Target::Postgres => {
                let pool = shared.pool.as_ref().expect("pooled targets have a pool");
                Ok(Link::Pool(PoolLink::new(
                    pool[global % pool.len()].clone(),
                    Arc::clone(device_id),
                    shared.plan.inflight_max.div_ceil(shared.plan.args.batch) + 1,
                )))
            }
        }
    }

    /// Queues one frame carrying `samples` (not necessarily written until [`Link::flush`]).
    pub async fn feed(
        &mut self,
        samples: &[Sample],
        common: &Common<'_>,
        format: Format,
    ) -> Result<(), LinkClosed> {
        match self {
            Link::Ws(ws) => ws.feed(samples, common, format).await,
            Link::Mqtt(mqtt) => mqtt.feed(samples, common),
            Link::Pool(pool) => pool.feed(samples).await,
        }
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), LinkClosed> {
        match self {
            Link::Ws(ws) => ws.ws.flush().await.map_err(|_| LinkClosed),
            Link::Mqtt(mqtt) => mqtt.flush().await,
            Link::Pool(_) => Ok(()),
        }
    }

    /// Waits for the next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Incoming {
        match self {
            Link::Ws(ws) => ws_incoming(ws.ws.next().await),
            Link::Mqtt(mqtt) => mqtt.next().await,
            Link::Pool(pool) => match pool.replies.recv().await {
                Some(reply) => Incoming::Reply(reply),
                None => Incoming::Closed,
            },
        }
    }

    /// The next event if one has already arrived, without waiting.
    pub fn next_ready(&mut self) -> Option<Incoming> {
        match self {
            Link::Ws(ws) => ws.ws.next().now_or_never().map(ws_incoming),
            Link::Mqtt(mqtt) => mqtt.next_ready(),
            Link::Pool(pool) => pool.replies.try_recv().ok().map(Incoming::Reply),
        }
    }

    /// Closes the connection politely, waiting at most `timeout`.
    pub async fn close(&mut self, timeout: std::time::Duration) {
        match self {
            Link::Ws(ws) => {
                let _ = tokio::time::timeout(timeout, ws.ws.close(None)).await;
            }
            Link::Mqtt(mqtt) => {
                let _ = tokio::time::timeout(timeout, mqtt.disconnect()).await;
            }
            Link::Pool(_) => {}
        }
    }
}

fn ws_incoming(message: Option<Result<Message, tungstenite::Error>>) -> Incoming {
    match message {
        Some(Ok(Message::Text(text))) => Incoming::Reply(parse_reply(text.as_bytes())),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Incoming::Ignored,
        Some(Ok(Message::Binary(_) | Message::Frame(_))) => Incoming::Unexpected,
        Some(Ok(Message::Close(_))) | None => Incoming::Closed,
        Some(Err(_)) => Incoming::Failed,
    }
}

/// A device's WebSocket to geobeat or the null server.
#[derive(Debug)]
pub struct WsLink {
    /// The upgraded connection.
    ws: DeviceStream,
    /// Encoded size of the previous frame, to size the next frame's buffer in one allocation.
    frame_bytes_hint: usize,
}

impl WsLink {
    async fn connect(shared: &Shared, credential: &DeviceCredential) -> Result<Self, LoadError> {
        let tcp = TcpStream::connect(shared.plan.addr)
            .await
            .map_err(LoadError::Connect)?;
        tcp.set_nodelay(true).map_err(LoadError::Connect)?;
        let transport = match &shared.plan.tls {
            Some(tls) => tls.connect(tcp).await.map_err(LoadError::Tls)?,
            None => Transport::Plain(tcp),
        };
        let args = &shared.plan.args;
        let mut request = if args.token_in_query {
            let separator = if args.url.contains('?') { '&' } else { '?' };
            let url = format!(
                "{}{separator}token={}",
                args.url,
                query_escape(&credential.token)
            );
            url.into_client_request()
        } else {
            args.url.as_str().into_client_request()
        }
        .map_err(|e| LoadError::Upgrade(Box::new(e)))?;
        if !args.token_in_query {
            let value = HeaderValue::from_str(&format!("Bearer {}", credential.token))
                .map_err(|_| LoadError::TokenHeader)?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let (ws, _response) = async_tungstenite::client_async_with_config(
            request,
            TokioAdapter::new(transport),
            Some(shared.ws_config),
        )
        .await
        .map_err(|e| LoadError::Upgrade(Box::new(e)))?;
        Ok(Self {
            ws,
            frame_bytes_hint: 64 * args.batch,
        })
    }

    async fn feed(
        &mut self,
        samples: &[Sample],
        common: &Common<'_>,
        format: Format,
    ) -> Result<(), LinkClosed> {
        let mut bytes = Vec::with_capacity(self.frame_bytes_hint);
        if let Err(e) = frame::encode(format, samples, common, &mut bytes) {
            // Plan::new encoded a worst-case frame with these settings; this cannot happen.
            unreachable!("frame encoding failed after validation: {e}");
        }
        self.frame_bytes_hint = bytes.len();
        let message = match format {
            Format::Json => match Utf8Bytes::try_from(bytes) {
                Ok(text) => Message::Text(text),
                Err(_) => unreachable!("the JSON encoder writes UTF-8 only"),
            },
            Format::Binary => Message::Binary(bytes.into()),
        };
        self.ws.feed(message).await.map_err(|_| LinkClosed)
    }
}

/// Percent-escapes everything but unreserved URI characters.
pub fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A device's handle on a pool connection (Redis, PostgreSQL): frames go out as requests on the
/// pool connection's queue, acks come back on the device's own reply channel.
#[derive(Debug)]
pub struct PoolLink {
    /// The pool connection this device is pinned to (fixed, so its writes stay in order).
    requests: mpsc::Sender<PoolRequest>,
    /// Acks and rejections for this device.
    replies: mpsc::Receiver<Reply>,
    /// Handed to the pool with every request.
    reply_tx: mpsc::Sender<Reply>,
    /// The device id (database key).
    device_id: Arc<str>,
}

impl PoolLink {
    /// A link on `requests` whose reply channel holds `replies_max` replies: one per frame in
    /// flight, which the in-flight window bounds, so the pool never finds it full.
    fn new(requests: mpsc::Sender<PoolRequest>, device_id: Arc<str>, replies_max: usize) -> Self {
        let (reply_tx, replies) = mpsc::channel(replies_max);
        Self {
            requests,
            replies,
            reply_tx,
            device_id,
        }
    }

    async fn feed(&mut self, samples: &[Sample]) -> Result<(), LinkClosed> {
        let request = PoolRequest {
            device_id: Arc::clone(&self.device_id),
            samples: samples.to_vec(),
            reply: self.reply_tx.clone(),
        };
        // Waiting here when the pool connection's queue is full is the backpressure a real
        // gateway in front of the database would apply; in open loop it becomes latency.
        self.requests.send(request).await.map_err(|_| LinkClosed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escape_keeps_unreserved_and_escapes_the_rest() {
        // Checks that token characters that are special in URLs are percent-encoded.
        assert_eq!(query_escape("aZ09-._~"), "aZ09-._~");
        assert_eq!(query_escape("a+b/c=&"), "a%2Bb%2Fc%3D%26");
    }
}
