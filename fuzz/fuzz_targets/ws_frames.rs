//! Fuzz target: WebSocket frame handling after the handshake, as the ingest server does it:
//! tungstenite in the server role with geobeat's limits (4 KiB read buffer, 64 KiB frames and
//! messages) reads arbitrary bytes from an in-memory stream, and every message it yields goes to
//! the heartbeat decoder. Checks: no panic anywhere; no message exceeds the limit; the reader stops
//! after an error or a close; the decoders' invariants hold for every message.
#![no_main]

use std::io::{self, Read, Write};

use geobeat::proto::{Decoder, Ingest, IngestScope};
use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

/// The client's bytes in, the server's replies (pongs, close frames) out; reads return at most
/// `chunk` bytes at a time so frame boundaries fall anywhere in the read buffer.
struct Pipe<'a> {
    input: &'a [u8],
    chunk: usize,
    written: usize,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.chunk).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let frame_bytes_max = geobeat::limits::FRAME_BYTES_MAX;
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4 << 10;
    config.write_buffer_size = 0;
    config.max_write_buffer_size = 256 << 10;
    config.max_message_size = Some(frame_bytes_max);
    config.max_frame_size = Some(frame_bytes_max);
    let pipe = Pipe {
        input,
        chunk: usize::from(chunk).max(1) * 16,
        written: 0,
    };
    let mut ws = WebSocket::from_raw_socket(pipe, Role::Server, Some(config));
    let ingest = Ingest::new(IngestScope::Gateway(""), geobeat_fuzz::RECEIVED_MS);
    let mut decoder = Decoder::new();
    // Each read consumes input or ends; bound the loop anyway.
    for _ in 0..input.len() + 2 {
        match ws.read() {
            Ok(Message::Text(t)) => {
                assert!(t.len() <= frame_bytes_max);
                if let Ok(slots) = decoder.decode_text(t.as_str(), &ingest) {
                    geobeat_fuzz::check_slots(slots, &ingest);
                }
            }
            Ok(Message::Binary(b)) => {
                assert!(b.len() <= frame_bytes_max);
                if let Ok(slots) = decoder.decode_binary(&b, &ingest) {
                    geobeat_fuzz::check_slots(slots, &ingest);
                }
            }
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(_) => break,
        }
    }
});
