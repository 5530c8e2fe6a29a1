//! One TLS server session as a byte stream, on rustls's unbuffered API
//! ([`rustls::server::UnbufferedServerConnection`]): this module owns the handshake loop, the
//! record layer's buffers (received TLS bytes, decrypted bytes not yet read, encrypted bytes not
//! yet written) and close_notify. It does not choose the configuration, bound the handshake rate
//! or time (the [`super::Acceptor`] does) or look at client certificates beyond handing them out.
//!
//! Why not rustls's buffered `ServerConnection` (through futures-rustls): it keeps a 4 KiB
//! receive buffer for the life of the connection, allocated before every socket read and never
//! shrunk below 4 KiB, so an idle connection pinned 4 KiB there. Here every buffer is released
//! as soon as it is empty, which is the idle state: an idle session holds the rustls connection
//! state and keys, and no buffer.
//!
//! Invariants: between calls, `incoming` holds at most the start of one TLS record (everything
//! complete has been processed); bytes are written in the order rustls produced them; a write is
//! accepted only once the previous one's records are on the socket (so at most one write's
//! worth, at most [`TLS_WRITE_PLAINTEXT_BYTES`] plus record overhead, is ever buffered);
//! `incoming` is bounded by [`TLS_INCOMING_BYTES_MAX`] (one handshake message or record).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, WriteTraffic};
use rustls::ServerConfig;

use crate::limits::{TLS_INCOMING_BYTES_MAX, TLS_READ_BYTES, TLS_WRITE_PLAINTEXT_BYTES};
use crate::rt::TcpStream;

/// Where the session stands after processing what it has received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The handshake needs more bytes from the client.
    Handshaking,
    /// Handshake done: application data flows.
    Traffic,
}

/// A TLS server session over a TCP socket (see the module doc).
pub struct Session {
    conn: UnbufferedServerConnection,
    sock: TcpStream,
    /// TLS bytes received and not yet processed (the start of one record at most, at rest).
    incoming: Vec<u8>,
    /// Decrypted application data not yet read, from `plain_pos` on.
    plain: Vec<u8>,
    plain_pos: usize,
    /// TLS bytes to write, from `out_pos` on.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The client sent close_notify or closed its side: reads return end of stream.
    read_eof: bool,
    /// We queued our close_notify.
    close_sent: bool,
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Frees `buf` once it is empty (the idle state holds no buffer).
fn release(buf: &mut Vec<u8>, pos: &mut usize) {
    if *pos >= buf.len() {
        *buf = Vec::new();
        *pos = 0;
    }
}

impl Session {
    /// Runs the server handshake on `sock` with `config` (no time bound here: the caller's).
    pub async fn accept(sock: TcpStream, config: Arc<ServerConfig>) -> io::Result<Session> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = Session {
            conn,
            sock,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            read_eof: false,
            close_sent: false,
        };
        loop {
            let progress = s.process()?;
            futures_lite::future::poll_fn(|cx| s.poll_write_out(cx)).await?;
            match progress {
                Progress::Traffic => return Ok(s),
                Progress::Handshaking if s.read_eof => {
                    return Err(io::ErrorKind::UnexpectedEof.into())
                }
                Progress::Handshaking => {
                    let n = futures_lite::future::poll_fn(|cx| s.poll_fill(cx)).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
    }

    /// The TCP socket under the session.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The client's certificate chain, if it presented one.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Processes every complete record in `incoming`: decrypted data goes to `plain`, records
    /// rustls wants sent go to `outgoing`.
    fn process(&mut self) -> io::Result<Progress> {
        self.drive(None)
    }

    /// [`Session::process`], and once the handshake is done, `write` with the session's
    /// encrypter and `outgoing` (at most once per call).
    fn drive(&mut self, mut write: Option<&mut WriteFn<'_>>) -> io::Result<Progress> {
        let Session {
            conn,
            incoming,
            plain,
            outgoing,
            read_eof,
            ..
        } = self;
        loop {
            let was_handshaking = conn.is_handshaking();
            let (discard, stop) = {
                let status = conn.process_tls_records(incoming);
                let discard = status.discard;
                let stop = match status.state.map_err(tls_error)? {
                    ConnectionState::ReadTraffic(mut r) => {
                        while let Some(record) = r.next_record() {
                            plain.extend_from_slice(record.map_err(tls_error)?.payload);
                        }
                        false
                    }
                    ConnectionState::ReadEarlyData(mut r) => {
                        // Not offered (no tickets, no early data size); taken as data if sent.
                        while let Some(record) = r.next_record() {
                            plain.extend_from_slice(record.map_err(tls_error)?.payload);
                        }
                        false
                    }
                    ConnectionState::EncodeTlsData(mut e) => {
                        let start = outgoing.len();
                        let mut room = 512;
                        loop {
                            outgoing.resize(start + room, 0);
                            match e.encode(&mut outgoing[start..]) {
                                Ok(n) => {
                                    outgoing.truncate(start + n);
                                    break;
                                }
                                Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                                Err(other) => return Err(tls_error(other)),
                            }
                        }
                        false
                    }
                    // `outgoing` keeps the order, so "transmitted" can be declared at once.
                    ConnectionState::TransmitTlsData(t) => {
                        t.done();
                        false
                    }
                    ConnectionState::PeerClosed => {
                        *read_eof = true;
                        false
                    }
                    ConnectionState::WriteTraffic(mut w) => {
                        if !was_handshaking {
                            if let Some(f) = write.take() {
                                f(&mut w, outgoing)?;
                            }
                        }
                        true
                    }
                    ConnectionState::BlockedHandshake => true,
                    ConnectionState::Closed => {
                        *read_eof = true;
                        true
                    }
                    other => return Err(tls_error(format!("unexpected TLS state {other:?}"))),
                };
                (discard, stop)
            };
            incoming.drain(..discard.min(incoming.len()));
            if stop {
                break;
            }
        }
        if incoming.is_empty() {
            *incoming = Vec::new();
        }
        if conn.is_handshaking() {
            Ok(Progress::Handshaking)
        } else {
            Ok(Progress::Traffic)
        }
    }

    /// Reads once from the socket into `incoming` (then processes it): the bytes read, 0 at end
    /// of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= TLS_INCOMING_BYTES_MAX {
            return Poll::Ready(Err(tls_error("TLS message larger than allowed")));
        }
        let mut chunk = [0u8; TLS_READ_BYTES];
        let n = match Pin::new(&mut self.sock).poll_read(cx, &mut chunk) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(n)) => n,
        };
        if n == 0 {
            self.read_eof = true;
            return Poll::Ready(Ok(0));
        }
        self.incoming.extend_from_slice(&chunk[..n]);
        Poll::Ready(Ok(n))
    }

    /// Writes `outgoing` to the socket until it is empty (then frees it).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            match Pin::new(&mut self.sock).poll_write(cx, &self.outgoing[self.out_pos..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out_pos += n,
            }
        }
        release(&mut self.outgoing, &mut self.out_pos);
        Poll::Ready(Ok(()))
    }

    /// Encrypts `data` (or, with `None`, a close_notify) into `outgoing`: the plaintext bytes
    /// taken (at most [`TLS_WRITE_PLAINTEXT_BYTES`]).
    fn encrypt(&mut self, data: Option<&[u8]>) -> io::Result<usize> {
        let data = data.map(|d| &d[..d.len().min(TLS_WRITE_PLAINTEXT_BYTES)]);
        let mut taken = None;
        let mut f = |w: &mut WriteTraffic<'_, ServerConnectionData>, outgoing: &mut Vec<u8>| {
            let start = outgoing.len();
            let mut room = data.map_or(64, |d| d.len() + 64);
            loop {
                outgoing.resize(start + room, 0);
                let r = match data {
                    Some(d) => w.encrypt(d, &mut outgoing[start..]),
                    None => w.queue_close_notify(&mut outgoing[start..]),
                };
                match r {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        taken = Some(data.map_or(0, <[u8]>::len));
                        return Ok(());
                    }
                    Err(EncryptError::InsufficientSize(s)) => room = s.required_size,
                    Err(e) => {
                        outgoing.truncate(start);
                        return Err(tls_error(e));
                    }
                }
            }
        };
        self.drive(Some(&mut f))?;
        // Not written: the session closed (or, impossible here, is still handshaking).
        taken.ok_or_else(|| io::ErrorKind::BrokenPipe.into())
    }
}

/// What [`Session::drive`] calls to write: the encrypter, and where its records go.
type WriteFn<'a> =
    dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()> + 'a;

impl AsyncRead for Session {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let s = self.get_mut();
        loop {
            if s.plain_pos < s.plain.len() {
                let n = buf.len().min(s.plain.len() - s.plain_pos);
                buf[..n].copy_from_slice(&s.plain[s.plain_pos..s.plain_pos + n]);
                s.plain_pos += n;
                release(&mut s.plain, &mut s.plain_pos);
                return Poll::Ready(Ok(n));
            }
            if s.read_eof {
                return Poll::Ready(Ok(0));
            }
            // Records rustls answered with (a key update): out first, but a slow reader of
            // ours must not block our reading.
            if let Poll::Ready(Err(e)) = s.poll_write_out(cx) {
                return Poll::Ready(Err(e));
            }
            match s.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    // TCP end of stream: end of data (without close_notify: truncation, which
                    // the protocols above detect by their own framing).
                    return Poll::Ready(Ok(0));
                }
                Poll::Ready(Ok(_)) => {
                    s.process()?;
                }
            }
        }
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let s = self.get_mut();
        // The previous write's records first: at most one write is ever buffered.
        if s.poll_write_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if s.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = s.encrypt(Some(buf))?;
        // Start sending now; what the socket does not take yet goes with the next call.
        if let Poll::Ready(Err(e)) = s.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = self.get_mut();
        if s.poll_write_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut s.sock).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = self.get_mut();
        if !s.close_sent {
            if s.poll_write_out(cx)?.is_pending() {
                return Poll::Pending;
            }
            s.close_sent = true;
            s.encrypt(None)?;
        }
        if s.poll_write_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut s.sock).poll_close(cx)
    }
}
