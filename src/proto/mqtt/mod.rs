//! MQTT 3.1.1 and 5 ingest, sans-io: [`codec`] turns bytes into packets and back, [`session`]
//! is one connection's state machine (CONNECT validation, keep-alive deadline, PUBLISH topic and
//! payload rules, QoS 1/2 bookkeeping against the durable ack, SUBSCRIBE mapping). Neither does
//! I/O, spawns, or knows the runtime: the connection kind in the server feeds bytes in, acts on
//! [`session::Event`]s, writes [`session::Session::output`] and calls
//! [`session::Session::durable`] / [`session::Session::refused`] when the store answers.
//!
//! Why a codec of our own: the crates that fit the server-side need were checked (see
//! `docs/MQTT.md` once written; summary here). `mqtt-protocol-core` (sans-io, v3.1.1 + v5) is a
//! single-author 0.x crate that went through seven breaking minor versions in months, owns
//! packet-id and session state in its own `Connection` (its automatic PUBACK path must be turned
//! off for a durable ack, leaving only its codec), and builds owned packets per decode. rumqttc's
//! `mqttbytes` modules are not a crate of their own: rumqttc depends on tokio, and its v4/v5
//! decoders build `Bytes`/`String`s per packet; the standalone `mqttbytes` crate has had no
//! release since 2021. geobeat ingests from its side only ~15 packet shapes, and the hot path
//! (PUBLISH → borrowed topic and payload slices from the read buffer, no allocation) is a few
//! hundred lines, property-tested against the spec's layout here.

pub mod codec;
pub mod session;
