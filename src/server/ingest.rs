//! The device side of `/v1/ingest`: one WebSocket connection from the 101 response to the close
//! frame. It owns the reader (frame limits, decoding, seq and error-budget checks, grouping the
//! accepted heartbeats by owning shard, appending locally or forwarding, and backpressure), and
//! the writer (error frames, coalesced `{"ack":N}` frames, pings, the close frame).
//!
//! Invariants: an ack is written only for seqs whose frames are complete in `exec` (durable);
//! the reader stops reading while too many frames await durability, so a slow shard slows its
//! devices instead of buffering; on shutdown the connection stops reading, waits for what it
//! received to become durable, sends the final ack and closes with 1001.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_lite::AsyncWriteExt;
use futures_util::{SinkExt, StreamExt};

use crate::proto::{self, close_code};
use crate::route::{shard_of, ShardId};
use crate::rt::{self, TcpStream};
use crate::server::exec::{received_now_ms, ConnState, Exec, CONN_ERRORS_QUEUED_MAX, CONN_FRAMES_IN_FLIGHT_MAX};
use crate::server::listen::{ConnSlot, Upgrade};
use crate::server::msg::{Batch, ConnKey, ToOwner};

/// tungstenite's read buffer per connection. Its default (128 KiB) alone would blow the 8 KiB
/// per idle connection budget; frames larger than this are still read, in several steps.
const WS_READ_BUFFER_BYTES: usize = 4 << 10;
/// Write buffer: acks and error frames are small.
const WS_WRITE_BUFFER_BYTES: usize = 0;
/// Most bytes queued for a slow reader of our acks before writes wait.
const WS_WRITE_BUFFER_BYTES_MAX: usize = 256 << 10;

/// Control flags from the reader to the writer.
#[derive(Default)]
struct Ctl {
    /// Close with this code and reason once allowed (1001 waits for pending acks).
    close: Cell<Option<(u16, &'static str)>>,
    /// Send a ping (idle check).
    ping: Cell<bool>,
}

fn ws_config(frame_bytes_max: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = WS_READ_BUFFER_BYTES;
    c.write_buffer_size = WS_WRITE_BUFFER_BYTES;
    c.max_write_buffer_size = WS_WRITE_BUFFER_BYTES_MAX;
    c.max_message_size = Some(frame_bytes_max);
    c.max_frame_size = Some(frame_bytes_max);
    c
}

/// Serves one upgraded ingest connection to its end.
pub async fn serve(exec: Rc<Exec>, mut stream: TcpStream, leftover: Vec<u8>, upgrade: Upgrade, slot: ConnSlot) {
    let _slot = slot;
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        upgrade.accept_key
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let cfg = &exec.shared.cfg;
    let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(ws_config(cfg.frame_bytes_max))).await;
    let (sink, source) = ws.split();
    let key = exec.conn_open();
    let signal = exec.with_conn(key, |c| c.signal.clone()).expect("just opened");
    let ctl = Rc::new(Ctl::default());
    let writer = rt::spawn_joinable(write_loop(exec.clone(), key, sink, ctl.clone(), signal.clone()));
    read_loop(&exec, key, source, &ctl, &upgrade).await;
    if ctl.close.get().is_none() {
        ctl.close.set(Some((close_code::NORMAL, "")));
    }
    signal.notify();
    let _ = writer.await;
    exec.conn_close(key);
}

type Source = futures_util::stream::SplitStream<WebSocketStream<TcpStream>>;
type Sink = futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>;

/// What ended a wait for the next frame.
enum Next {
    Msg(Option<Result<Message, WsError>>),
    Idle,
    Stop,
}

async fn read_loop(exec: &Rc<Exec>, key: ConnKey, mut source: Source, ctl: &Ctl, upgrade: &Upgrade) {
    let cfg = &exec.shared.cfg;
    let mut decoder = proto::Decoder::new(cfg.frame_heartbeats_max);
    let mut seqs = proto::SeqTracker::default();
    let mut budget = proto::ErrorBudget::default();
    let mut groups: Vec<(ShardId, Vec<(u64, crate::record::Heartbeat)>)> = Vec::new();
    let mut idle_strikes = 0u32;
    let half_idle = cfg.idle_timeout / 2;
    loop {
        // Backpressure: stop reading while this connection has too much in flight.
        loop {
            let Some((frames, errors, signal)) =
                exec.with_conn(key, |c: &mut ConnState| (c.frames_in_flight(), c.errors.len(), c.signal.clone()))
            else {
                return;
            };
            if frames < CONN_FRAMES_IN_FLIGHT_MAX && errors < CONN_ERRORS_QUEUED_MAX {
                break;
            }
            signal.wait().await;
        }
        if exec.stopping() {
            ctl.close.set(Some((close_code::GOING_AWAY, "server shutting down")));
            return;
        }
        let next = futures_lite::future::or(
            async {
                match rt::timeout(half_idle, source.next()).await {
                    Some(m) => Next::Msg(m),
                    None => Next::Idle,
                }
            },
            async {
                exec.stop_signal.wait().await;
                Next::Stop
            },
        )
        .await;
        let msg = match next {
            Next::Stop => {
                ctl.close.set(Some((close_code::GOING_AWAY, "server shutting down")));
                return;
            }
            Next::Idle => {
                idle_strikes += 1;
                if idle_strikes >= 2 {
                    ctl.close.set(Some((close_code::GOING_AWAY, "idle timeout")));
                    return;
                }
                ctl.ping.set(true);
                exec.with_conn(key, |c| c.signal.notify());
                continue;
            }
            Next::Msg(None) => return,
            Next::Msg(Some(Err(e))) => {
                ctl.close.set(match e {
                    WsError::Capacity(_) => Some((close_code::TOO_BIG, "frame too large")),
                    WsError::Utf8(_) => Some((close_code::INVALID_PAYLOAD, "invalid UTF-8 in text frame")),
                    WsError::Protocol(_) => Some((close_code::PROTOCOL, "protocol error")),
                    _ => None,
                });
                return;
            }
            Next::Msg(Some(Ok(m))) => m,
        };
        idle_strikes = 0;
        let received_ms = received_now_ms();
        let decoded = match &msg {
            Message::Text(t) => decoder.decode_text(t.as_str(), &upgrade.scope, received_ms),
            Message::Binary(b) => decoder.decode_binary(b, &upgrade.scope, received_ms),
            Message::Close(_) => return,
            _ => continue,
        };
        let (items, rejects) = match decoded {
            Ok(parts) => parts,
            Err(frame_err) => {
                exec.with_conn(key, |c| {
                    c.errors.push_back((None, frame_err.reason()));
                    c.signal.notify();
                });
                if budget.charge(1).is_err() {
                    ctl.close.set(Some((close_code::POLICY, "too many errors")));
                    return;
                }
                continue;
            }
        };
        // Seq order across the whole frame (accepted and rejected alike): abuse closes.
        let mut abuse = false;
        for seq in decoder.frame_seqs() {
            if seqs.check(seq).is_err() {
                abuse = true;
                break;
            }
        }
        if abuse {
            ctl.close.set(Some((close_code::POLICY, "seq not increasing")));
            return;
        }
        if !rejects.is_empty() {
            let n = rejects.len();
            exec.with_conn(key, |c| {
                c.errors.extend(rejects.iter().map(|&(s, r)| (Some(s), r)));
                c.signal.notify();
            });
            if budget.charge(n).is_err() {
                ctl.close.set(Some((close_code::POLICY, "too many errors")));
                return;
            }
        }
        if items.is_empty() {
            continue;
        }
        dispatch(exec, key, items, &mut groups).await;
    }
}

/// Groups a frame's accepted heartbeats by owning shard, registers the frame, and appends each
/// group locally or forwards it to its owner (waiting for room in the mesh: backpressure).
async fn dispatch(
    exec: &Rc<Exec>,
    key: ConnKey,
    items: &mut [(u64, crate::record::Heartbeat)],
    groups: &mut Vec<(ShardId, Vec<(u64, crate::record::Heartbeat)>)>,
) {
    let shards = exec.shared.shard_count;
    let seq_max = items.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let first_shard = shard_of(&items[0].1.device_id, shards);
    if items.iter().all(|(_, hb)| shard_of(&hb.device_id, shards) == first_shard) {
        // The common case (a device connection, or a gateway frame for one shard): no regrouping.
        let frame = exec.frame_begin(key, seq_max, 1);
        send_group(exec, key, frame, first_shard, items).await;
        return;
    }
    groups.clear();
    for item in items.iter_mut() {
        let shard = shard_of(&item.1.device_id, shards);
        let idx = match groups.iter().position(|(s, _)| *s == shard) {
            Some(i) => i,
            None => {
                groups.push((shard, exec.take_batch_vec()));
                groups.len() - 1
            }
        };
        let v = &mut groups[idx].1;
        v.push((item.0, std::mem::take(&mut item.1)));
    }
    let frame = exec.frame_begin(key, seq_max, groups.len() as u32);
    for (shard, mut v) in groups.drain(..) {
        send_group(exec, key, frame, shard, &mut v).await;
    }
}

async fn send_group(
    exec: &Rc<Exec>,
    key: ConnKey,
    frame: u64,
    shard: ShardId,
    items: &mut [(u64, crate::record::Heartbeat)],
) {
    let (owner, _) = exec.shared.owner(shard);
    if owner == exec.index {
        exec.append_local(shard, key, frame, items);
        return;
    }
    let mut v = exec.take_batch_vec();
    v.clear();
    for item in items.iter_mut() {
        v.push((item.0, std::mem::take(&mut item.1)));
    }
    let batch = Batch {
        conn: key,
        frame,
        items: v,
        failed: Vec::new(),
    };
    if exec.requests.send_to(owner, ToOwner::Append { shard, batch }).await.is_err() {
        tracing::error!(owner, "request mesh closed; heartbeats not stored and not acked");
    }
}

async fn write_loop(exec: Rc<Exec>, key: ConnKey, mut sink: Sink, ctl: Rc<Ctl>, signal: Rc<rt::Signal>) {
    let mut acked = 0u64;
    let mut text = String::with_capacity(64);
    loop {
        let wait = signal.wait();
        let Some((errors, ack_ready, in_flight)) = exec.with_conn(key, |c| {
            let errors: Vec<_> = c.errors.drain(..).collect();
            (errors, c.ack_ready, c.frames_in_flight())
        }) else {
            return;
        };
        let mut wrote = false;
        for (seq, reason) in errors {
            proto::write_error(&mut text, seq, reason);
            if sink.feed(Message::text(text.as_str())).await.is_err() {
                return;
            }
            wrote = true;
        }
        if ack_ready > acked {
            proto::write_ack(&mut text, ack_ready);
            if sink.feed(Message::text(text.as_str())).await.is_err() {
                return;
            }
            acked = ack_ready;
            wrote = true;
        }
        if ctl.ping.replace(false) {
            if sink.feed(Message::Ping(Default::default())).await.is_err() {
                return;
            }
            wrote = true;
        }
        if wrote && sink.flush().await.is_err() {
            return;
        }
        if let Some((code, reason)) = ctl.close.get() {
            // A graceful close (shutdown, idle, client close) first waits until everything
            // received is durable and acked (the ack above covered every completed frame);
            // abuse and protocol errors close at once.
            let graceful = code == close_code::GOING_AWAY || code == close_code::NORMAL;
            if !graceful || in_flight == 0 {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                let _ = rt::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                let _ = rt::timeout(Duration::from_secs(1), sink.close()).await;
                return;
            }
        }
        wait.await;
    }
}
