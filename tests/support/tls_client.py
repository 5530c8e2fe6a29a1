#!/usr/bin/env python3
"""Real TLS clients for tests/tls.rs: Python's `ssl` with `websockets` (wss://) and paho-mqtt
(mqtts://). Each scenario verifies the server against --ca (the client's trust store: a wrong CA
or an expired certificate makes the client refuse), optionally presents --cert/--key (mTLS), and
prints one JSON object per line, flushed as it happens.

Scenarios:
  wss    connect to --url with the token, send --count heartbeats for --device (seq 1..count),
         one every --gap-ms, and wait for the ack of the last; lines: {"connected": true,
         "cn": server certificate subject CN}, {"acked": seq} (each ack), {"done": true} or
         {"closed": code, "reason": text}; a refused handshake: {"refused": "ssl", "error": text};
         an HTTP refusal: {"refused": "http", "status": code}
  mqtts  connect (MQTT 3.1.1, or 5 with --v5) with user --device and password token, publish
         --count QoS 1 heartbeats to geobeat/<device>; lines: {"connack": rc, "cn": CN},
         {"ack": i, "rc": rc}, {"done": true}; a refused handshake: {"refused": "ssl", ...}
"""
import argparse
import asyncio
import json
import ssl
import sys
import threading
import time


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def context(args):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


def peer_cn(sslobj):
    cert = sslobj.getpeercert() if sslobj else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


async def scenario_wss(args):
    import websockets

    ctx = context(args)
    try:
        ws = await websockets.connect(
            args.url,
            ssl=ctx,
            additional_headers={"Authorization": f"Bearer {args.token}"},
            open_timeout=10,
        )
    except ssl.SSLError as e:
        emit({"refused": "ssl", "error": str(e)})
        return
    except websockets.exceptions.InvalidStatus as e:
        emit({"refused": "http", "status": e.response.status_code})
        return
    except websockets.exceptions.InvalidHandshake as e:
        # The server closed during the upgrade (a TLS alert after the handshake: TLS 1.3
        # reports a refused client certificate only when the client first reads).
        emit({"refused": "upgrade", "error": repr(e.__cause__ or e)})
        return
    except (ConnectionError, OSError, EOFError) as e:
        emit({"refused": "connection", "error": str(e)})
        return
    emit({"connected": True, "cn": peer_cn(ws.transport.get_extra_info("ssl_object"))})
    last = 0

    async def reader():
        nonlocal last
        async for msg in ws:
            m = json.loads(msg)
            if "ack" in m:
                last = m["ack"]
                emit({"acked": last})
                if last >= args.count:
                    return

    task = asyncio.create_task(reader())
    try:
        for seq in range(1, args.count + 1):
            hb = {"seq": seq, "lat": 52.5 + seq * 1e-5, "lon": 13.4, "ts": int(time.time() * 1000)}
            await ws.send(json.dumps(hb))
            if args.gap_ms:
                await asyncio.sleep(args.gap_ms / 1000)
        await asyncio.wait_for(task, timeout=args.timeout)
        emit({"done": True})
        await ws.close()
    except websockets.exceptions.ConnectionClosed as e:
        rcvd = e.rcvd
        emit({"closed": rcvd.code if rcvd else None, "reason": rcvd.reason if rcvd else None})


def scenario_mqtts(args):
    import paho.mqtt.client as mqtt

    proto = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"tls-{args.device}",
        protocol=proto,
        clean_session=None if args.v5 else True,
    )
    # paho's own TLS setup with a CA file (and a client certificate for mTLS).
    c.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key)
    c.username_pw_set(args.device, args.token)
    c.reconnect_delay_set(min_delay=3600, max_delay=3600)
    connected = threading.Event()
    acks = {}
    done = threading.Event()
    state = {}

    def value(rc):
        return int(getattr(rc, "value", rc))

    def on_connect(client, userdata, flags, rc, props):
        state["rc"] = value(rc)
        connected.set()

    def on_publish(client, userdata, mid, rc, props):
        acks[mid] = value(rc)
        if len(acks) >= args.count:
            done.set()

    def on_disconnect(client, userdata, flags, rc, props):
        state.setdefault("rc", value(rc))
        state["disconnect"] = value(rc)
        connected.set()
        done.set()

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect
    try:
        c.connect("127.0.0.1", args.port, keepalive=30)
    except ssl.SSLError as e:
        emit({"refused": "ssl", "error": str(e)})
        return
    except (ConnectionError, OSError) as e:
        emit({"refused": "connection", "error": str(e)})
        return
    c.loop_start()
    if not connected.wait(args.timeout):
        emit({"error": "no CONNACK"})
        c.loop_stop()
        return
    sock = c.socket()
    emit({"connack": state.get("rc"), "cn": peer_cn(sock) if isinstance(sock, ssl.SSLSocket) else None})
    if state.get("rc") != 0 or "disconnect" in state:
        c.loop_stop()
        return
    mids = []
    for i in range(args.count):
        hb = {"lat": 52.5 + i * 1e-5, "lon": 13.4, "ts": int(time.time() * 1000) + i}
        mids.append(c.publish(f"geobeat/{args.device}", json.dumps(hb), qos=1).mid)
    done.wait(args.timeout)
    for i, mid in enumerate(mids):
        if mid in acks:
            emit({"ack": i, "rc": acks[mid]})
    emit({"done": len(acks) >= args.count})
    c.disconnect()
    c.loop_stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["wss", "mqtts"])
    p.add_argument("--url")
    p.add_argument("--port", type=int)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--token", required=True)
    p.add_argument("--device", default="tls-1")
    p.add_argument("--v5", action="store_true")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--gap-ms", type=int, default=0)
    p.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args()
    if args.scenario == "wss":
        asyncio.run(scenario_wss(args))
    else:
        scenario_mqtts(args)


if __name__ == "__main__":
    main()
