#!/usr/bin/env python3
"""Real clients for tests/revoke.rs: a WebSocket client (the `websockets` package, sync API) and
an MQTT client (paho-mqtt 2.x) that connect with a token, prove the connection works, then stay
connected until the server ends it. Prints one JSON object per line, flushed as it happens, so
the Rust test can act the moment a line arrives (run `geobeat token revoke` once "open" shows).

Scenarios:
  ws    --url URL --token T [--hb]   connect with `Authorization: Bearer T`; refused:
        {"refused": status, "body": text}; open: {"open": true}, with --hb one heartbeat and
        {"ack": n}; then waits: {"closed": code, "reason": text, "after_s": s} (s counted from
        the "open" line), or {"timeout": true} after --timeout seconds
  mqtt  --port P --token T [--v5] --client-id ID --device ID   connect; {"connack": rc}; if
        accepted one QoS 1 PUBLISH to geobeat/<device> and {"puback": rc}; then waits:
        {"disconnect": rc, "after_s": s}, or {"timeout": true}
"""
import argparse
import json
import sys
import threading
import time


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def scenario_ws(args):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        ws = connect(
            args.url,
            additional_headers={"Authorization": "Bearer " + args.token},
            open_timeout=10,
        )
    except InvalidStatus as e:
        body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
        emit({"refused": e.response.status_code, "body": body})
        return
    with ws:
        serve_ws(ws, args, ConnectionClosed)


def serve_ws(ws, args, ConnectionClosed):
    opened = time.monotonic()
    emit({"open": True})
    try:
        if args.hb:
            ts = int(time.time() * 1000)
            ws.send(json.dumps({"seq": 1, "lat": 48.1, "lon": 11.5, "ts": ts}))
            while True:
                msg = json.loads(ws.recv(timeout=10))
                if "ack" in msg:
                    emit({"ack": msg["ack"]})
                    break
        deadline = opened + args.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                emit({"timeout": True})
                ws.close()
                return
            try:
                ws.recv(timeout=left)
            except TimeoutError:
                continue
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
        reason = e.rcvd.reason if e.rcvd else ""
        emit({"closed": code, "reason": reason, "after_s": time.monotonic() - opened})


def rc_value(rc):
    if rc is None:
        return None
    return int(getattr(rc, "value", rc))


def scenario_mqtt(args):
    import paho.mqtt.client as mqtt

    proto = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=proto,
        clean_session=None if args.v5 else True,
    )
    c.username_pw_set("", args.token)
    c.reconnect_delay_set(min_delay=3600, max_delay=3600)
    state = {"opened": None}
    done = threading.Event()
    acked = threading.Event()

    def on_connect(client, userdata, flags, rc, props):
        emit({"connack": rc_value(rc)})
        if rc_value(rc) != 0:
            done.set()
            return
        state["opened"] = time.monotonic()
        ts = int(time.time() * 1000)
        payload = json.dumps({"lat": 48.1, "lon": 11.5, "ts": ts})
        client.publish("geobeat/" + args.device, payload, qos=1)

    def on_publish(client, userdata, mid, rc, props):
        emit({"puback": rc_value(rc)})
        acked.set()

    def on_disconnect(client, userdata, flags, rc, props):
        if state["opened"] is None:
            if not done.is_set():
                emit({"connack": rc_value(rc), "closed_before_connack": True})
        else:
            emit({"disconnect": rc_value(rc), "after_s": time.monotonic() - state["opened"]})
        done.set()

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect
    c.connect("127.0.0.1", args.port, keepalive=60)
    c.loop_start()
    if not done.wait(args.timeout):
        emit({"timeout": True})
    c.loop_stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["ws", "mqtt"])
    p.add_argument("--url")
    p.add_argument("--port", type=int)
    p.add_argument("--token", required=True)
    p.add_argument("--hb", action="store_true")
    p.add_argument("--v5", action="store_true")
    p.add_argument("--client-id", default="")
    p.add_argument("--device", default="x")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    {"ws": scenario_ws, "mqtt": scenario_mqtt}[args.scenario](args)


if __name__ == "__main__":
    main()
