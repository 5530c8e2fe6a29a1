#!/usr/bin/env python3
"""A real MQTT client (paho-mqtt 2.x) for tests/mqtt.rs: runs one scenario against geobeat's MQTT
listener and prints one JSON object per line, flushed as it happens, so the Rust test can act on a
line the moment it arrives (kill -9 the server right after a PUBACK, for instance).

--ws-path /mqtt runs any scenario over a WebSocket (--port is then the HTTP port).

Scenarios:
  publish   connect, publish --count messages (payload --payload with {i} and {ts} filled in:
            the message index and now in ms plus the index), wait until every QoS 1/2 message is
            answered or the connection ends; lines: {"connack": rc}, {"ack": i, "rc": rc,
            "reason": text}, {"disconnect": rc}, {"done": true}
  silent    connect with --keepalive and then send nothing (the network loop is not run, so no
            PINGREQ goes out); lines: {"connack": rc}, {"closed_after_s": s, "disconnect": rc}
  subscribe connect and SUBSCRIBE to --topic; lines: {"connack": rc}, {"suback": [codes]}
  takeover  connect client A, then client B with the same client id; lines: {"a_disconnect": rc},
            {"b_connack": rc}, and B still publishes: {"b_ack": rc}
"""
import argparse
import json
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rc_value(rc):
    """A paho ReasonCode (MQTT 5) or int (3.1.1) as an int."""
    if rc is None:
        return None
    value = getattr(rc, "value", rc)
    return int(value)


def client(args, client_id=None):
    proto = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id if client_id is not None else args.client_id,
        protocol=proto,
        clean_session=None if args.v5 else True,
        transport="websockets" if args.ws_path else "tcp",
    )
    if args.ws_path:
        # MQTT over WebSocket: paho offers the `mqtt` subprotocol on this path.
        c.ws_set_options(path=args.ws_path)
    if args.token is not None:
        c.username_pw_set(args.user, args.token)
    # One attempt, no hidden retries: a refused or dropped connection is what the test checks.
    c.reconnect_delay_set(min_delay=3600, max_delay=3600)
    return c


def connect_blocking(c, args, keepalive):
    got = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, rc, props):
        result["rc"] = rc_value(rc)
        got.set()

    def on_disconnect(client, userdata, flags, rc, props):
        result.setdefault("rc", rc_value(rc))
        result["disconnect"] = rc_value(rc)
        got.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.connect(args.host, args.port, keepalive=keepalive)
    return got, result


def scenario_publish(args):
    c = client(args)
    acks = {}
    done = threading.Event()
    mids = {}
    state = {"ended": False}

    def on_connect(client, userdata, flags, rc, props):
        emit({"connack": rc_value(rc)})
        if rc_value(rc) != 0:
            state["ended"] = True
            done.set()

    def on_publish(client, userdata, mid, rc, props):
        i = mids.get(mid)
        reason = None
        if props is not None and hasattr(props, "ReasonString"):
            reason = props.ReasonString
        acks[i] = rc_value(rc)
        emit({"ack": i, "rc": rc_value(rc), "reason": reason})
        if len(acks) == args.count:
            done.set()

    def on_disconnect(client, userdata, flags, rc, props):
        emit({"disconnect": rc_value(rc)})
        state["ended"] = True
        done.set()

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect
    c.connect(args.host, args.port, keepalive=args.keepalive)
    c.loop_start()
    base = int(time.time() * 1000)
    for i in range(args.count):
        payload = args.payload.replace("{i}", str(i)).replace("{ts}", str(base + i))
        if args.payload_bytes:
            payload = "x" * args.payload_bytes
        info = c.publish(args.topic, payload, qos=args.qos)
        mids[info.mid] = i
        if state["ended"]:
            break
        if args.gap_ms:
            time.sleep(args.gap_ms / 1000)
    if args.qos == 0:
        # Nothing comes back for QoS 0: give the writes a moment, then leave cleanly.
        time.sleep(0.3)
        done.set()
    done.wait(args.timeout)
    if not state["ended"]:
        c.disconnect()
    c.loop_stop()
    emit({"done": True, "acked": len(acks)})


def scenario_silent(args):
    c = client(args)
    got, result = connect_blocking(c, args, args.keepalive)
    # Only the CONNECT/CONNACK exchange runs paho's loop; then paho is never called again (it
    # would send PINGREQ), and the socket is watched directly until the server closes it.
    deadline = time.time() + 5
    while not got.is_set() and time.time() < deadline:
        c.loop(timeout=0.05)
    emit({"connack": result.get("rc")})
    started = time.time()
    sock = c.socket()
    sock.setblocking(True)
    sock.settimeout(args.timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    # An MQTT 5 DISCONNECT is 0xE0, length, reason code.
    code = data[2] if len(data) >= 3 and data[0] == 0xE0 else None
    emit({"closed_after_s": round(time.time() - started, 2), "disconnect": code})


def scenario_takeover(args):
    a = client(args)
    got_a, res_a = connect_blocking(a, args, 30)
    a.loop_start()
    got_a.wait(5)
    res_a.pop("disconnect", None)
    a_gone = threading.Event()

    def on_disconnect_a(client, userdata, flags, rc, props):
        emit({"a_disconnect": rc_value(rc)})
        a_gone.set()

    a.on_disconnect = on_disconnect_a
    b = client(args)
    acked = threading.Event()

    def on_publish_b(client, userdata, mid, rc, props):
        emit({"b_ack": rc_value(rc)})
        acked.set()

    got_b, res_b = connect_blocking(b, args, 30)
    b.on_publish = on_publish_b
    b.loop_start()
    got_b.wait(5)
    emit({"b_connack": res_b.get("rc")})
    a_gone.wait(5)
    payload = args.payload.replace("{i}", "0").replace("{ts}", str(int(time.time() * 1000)))
    b.publish(args.topic, payload, qos=1)
    acked.wait(5)
    b.disconnect()
    b.loop_stop()
    a.loop_stop()


def scenario_subscribe(args):
    c = client(args)
    got = threading.Event()

    def on_connect(client, userdata, flags, rc, props):
        emit({"connack": rc_value(rc)})
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, codes, props):
        emit({"suback": [rc_value(x) for x in codes]})
        got.set()

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.connect(args.host, args.port, keepalive=30)
    c.loop_start()
    got.wait(args.timeout)
    c.disconnect()
    c.loop_stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["publish", "silent", "subscribe", "takeover"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token")
    p.add_argument("--user", default="")
    p.add_argument("--v5", action="store_true")
    p.add_argument("--client-id", default="")
    p.add_argument("--topic", default="geobeat/x")
    p.add_argument("--payload", default="{}")
    p.add_argument("--payload-bytes", type=int, default=0)
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--gap-ms", type=int, default=0)
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--ws-path", help="speak MQTT over a WebSocket on this path (port: HTTP)")
    p.add_argument("--silent-s", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    scenarios = {
        "publish": scenario_publish,
        "silent": scenario_silent,
        "subscribe": scenario_subscribe,
        "takeover": scenario_takeover,
    }
    scenarios[args.scenario](args)


if __name__ == "__main__":
    main()
