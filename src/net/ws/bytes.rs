//! [`ByteStream`]: a server WebSocket seen as a byte stream, for protocols that tunnel a stream
//! through binary messages (MQTT over WebSocket: packets may span messages, and a message may
//! hold several). It owns the mapping only: reads yield the bytes of binary messages in order
//! (a close frame or the end reads as end of stream; pings are answered by tungstenite; a text
//! message is an error), each write sends one binary message, close sends the close frame. It
//! does not bound partial messages beyond the configured message size (see the caller).
//!
//! Invariant: bytes come out in the order they arrived, none dropped or duplicated.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_tungstenite::tungstenite::{Bytes, Message};
use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncRead, AsyncWrite};
use futures_util::{Sink, Stream};

/// A WebSocket carrying a byte stream in binary messages (see the module comment).
pub struct ByteStream<S> {
    ws: WebSocketStream<S>,
    /// The binary message being read, and how much of it was handed out.
    current: Bytes,
    pos: usize,
}

impl<S> ByteStream<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> ByteStream<S> {
        ByteStream {
            ws,
            current: Bytes::new(),
            pos: 0,
        }
    }
}

fn ws_error(e: async_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ByteStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.current.len() {
                let n = out.len().min(this.current.len() - this.pos);
                out[..n].copy_from_slice(&this.current[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut this.ws).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) | Poll::Ready(Some(Ok(Message::Close(_)))) => {
                    return Poll::Ready(Ok(0))
                }
                Poll::Ready(Some(Ok(Message::Binary(b)))) => {
                    this.current = b;
                    this.pos = 0;
                }
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message where binary ones carry the stream",
                    )))
                }
                Poll::Ready(Some(Ok(_))) => {} // ping, pong, raw frame
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ByteStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.ws).poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            Poll::Ready(Ok(())) => {}
        }
        Pin::new(&mut this.ws)
            .start_send(Message::binary(buf.to_vec()))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_error)
    }
}
