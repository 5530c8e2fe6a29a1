//! The WebSocket halves every server WebSocket connection (ingest and subscribe) uses: [`read`]
//! (the next data frame under the idle, shutdown, writer-gone and expiry rules; the partial-frame
//! bound) and [`mod@write`] (bounded writes and the close sequence). They take a connection's small
//! handles (the executor's [`crate::rt::Stop`], its partial-frame account, the timeouts), never
//! the executor; what the frames mean is the connection kind's. [`bytes`] turns a WebSocket into
//! a byte stream (MQTT over WebSocket).

pub mod bytes;
pub mod read;
pub mod write;

use std::rc::Rc;

pub use bytes::ByteStream;
pub use read::{Ctl, Data, Metered, ReadMeter, Source, WsReader};
pub use write::{Sink, WriteError, WsWriter};

/// Splits a server WebSocket read through `Metered` (whose meter is `meter`) into its halves.
pub fn split<S: crate::net::tls::Conn>(
    ws: async_tungstenite::WebSocketStream<Metered<S>>,
    meter: Rc<ReadMeter>,
) -> (Sink<S>, Source<S>) {
    let (sink, stream) = futures_util::StreamExt::split(ws);
    (sink, Source { stream, meter })
}
