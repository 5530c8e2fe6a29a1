//! MQTT 3.1.1 and 5 ingest, sans-io: [`codec`] turns bytes into packets and back, [`session`]
//! holds one connection's protocol state (CONNECT admission with the token, the CONNACK, the
//! PUBLISH topic rules, QoS 1/2 bookkeeping against the durable ack, the SUBACK refusing
//! subscriptions). Neither does I/O, spawns, or knows the runtime: the connection kind in the
//! server (`net::mqtt`) reads packets, decodes payloads, stores them, feeds the store's answers
//! to [`session::Session::refuse`] / [`session::Session::settle`] and writes what they append.
//!
//! Why a codec of our own: the crates that fit the server-side need were checked (summary here;
//! `docs/MQTT.md` has the user's side). `mqtt-protocol-core` (sans-io, v3.1.1 + v5) is a
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
