#!/usr/bin/env python3
"""An MQTT 5 device with device-scoped sequence numbers (issue 18) for tests/device_seq.rs, on
paho-mqtt 2: CONNECT with the User Property epoch=E, print the CONNACK's `resume` User Property,
then PUBLISH (QoS 1) one heartbeat per sequence number in --seqs (a comma list of numbers or
a-b ranges, in order), each with the User Property seq=N and ts = --base-ms + N, and wait for
every PUBACK. Output: JSON lines ({"resume":...}, {"acked":n}); exit 1 on any failure.
"""

import argparse
import json
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def seqs(text):
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            yield from range(int(a), int(b) + 1)
        elif part:
            yield int(part)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--seqs", required=True)
    p.add_argument("--base-ms", type=int, required=True)
    a = p.parse_args()
    connected = threading.Event()
    resume = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        for k, v in getattr(properties, "UserProperty", []) or []:
            if k == "resume":
                resume.update(json.loads(v))
        resume["rc"] = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
        connected.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"seq-{a.device}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(a.device, a.token)
    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.UserProperty = ("epoch", str(a.epoch))
    c.connect("127.0.0.1", a.port, 30, properties=props)
    c.loop_start()
    if not connected.wait(10) or resume.get("rc") != 0:
        print(json.dumps({"error": "no CONNACK", "resume": resume}), flush=True)
        sys.exit(1)
    print(json.dumps({"resume": {"epoch": resume.get("epoch"), "seq": resume.get("seq")}}),
          flush=True)
    infos = []
    for n in seqs(a.seqs):
        pp = Properties(PacketTypes.PUBLISH)
        pp.UserProperty = ("seq", str(n))
        body = json.dumps({"lat": (n % 90) / 2.0, "lon": 1.5, "ts": a.base_ms + n})
        infos.append(c.publish(f"geobeat/{a.device}", body, qos=1, properties=pp))
    for i in infos:
        i.wait_for_publish(10)
        if not i.is_published():
            print(json.dumps({"error": "no PUBACK"}), flush=True)
            sys.exit(1)
    print(json.dumps({"acked": len(infos)}), flush=True)
    c.disconnect()
    c.loop_stop()


if __name__ == "__main__":
    main()
