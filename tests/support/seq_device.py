#!/usr/bin/env python3
"""A device with device-scoped sequence numbers (issue 18) for tests/device_seq.rs.

It keeps its state in a JSON file (written atomically before every send and after every ack), so
it can be killed at any moment and carry on in the next run, like a device that persists its
outbox: the next sequence number, every heartbeat sent but not acked, and the numbers it skipped
on purpose. Each run connects to /v1/ingest?epoch=E with the websockets library, reads the
resume frame (and checks that the mark covers everything ever acked: acks mean durable), resends
everything unacked (below the mark too: those must be acked and not stored again), then sends
`--count` new heartbeats in batches, skipping one number every `--skip-every`. With
`--die-after-batches N` it exits abruptly (os._exit, no close frame) after N new batches;
otherwise it waits until everything is acked and closes. If the server goes away (killed by the
test) it saves its state and exits with status 4.

Output: JSON lines on stdout (`{"resume":...}`, `{"done":...}`).
"""

import argparse
import asyncio
import json
import os
import sys
import time

from websockets.exceptions import ConnectionClosed

try:  # websockets >= 13
    from websockets.asyncio.client import connect
    HEADERS_ARG = "additional_headers"
except ImportError:  # websockets 12 (.ci/run accepts >= 12)
    from websockets.client import connect
    HEADERS_ARG = "extra_headers"


def load(path, epoch):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"epoch": epoch, "next": 1, "unacked": [], "skipped": [], "acked_max": 0,
                "generated": [], "base_ms": int(time.time() * 1000) - 3_600_000}


def save(path, state):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def out(obj):
    print(json.dumps(obj), flush=True)


async def run(a):
    st = load(a.state, a.epoch)
    if st["epoch"] != a.epoch:
        # The device lost its counter: a new epoch starts at 1 (its outbox was all acked).
        assert not st["unacked"], "an epoch bump with heartbeats still unacked"
        st["epoch"] = a.epoch
        st["next"] = 1
        st["acked_max"] = 0
        save(a.state, st)
    url = f"{a.url}?epoch={a.epoch}"
    headers = {"Authorization": f"Bearer {a.token}"}
    try:
        async with connect(url, max_size=None, **{HEADERS_ARG: headers}) as ws:
            first = json.loads(await ws.recv())
            resume = first.get("resume")
            assert resume is not None, f"first frame is not a resume frame: {first}"
            out({"resume": resume})
            if resume["epoch"] == a.epoch:
                assert resume["seq"] >= st["acked_max"], \
                    f"mark {resume} below an acked seq {st['acked_max']}: an ack was not durable"
            errors = []

            async def receive():
                try:
                    await receive_acks()
                except ConnectionClosed:
                    pass

            async def receive_acks():
                async for msg in ws:
                    j = json.loads(msg)
                    if "ack" in j:
                        n = j["ack"]
                        st["unacked"] = [h for h in st["unacked"] if h["seq"] > n]
                        st["acked_max"] = max(st["acked_max"], n)
                        save(a.state, st)
                    else:
                        errors.append(j)

            receiver = asyncio.create_task(receive())

            async def send(hbs):
                await ws.send(json.dumps(hbs))

            resend = sorted(st["unacked"], key=lambda h: h["seq"])
            for i in range(0, len(resend), a.batch):
                await send(resend[i:i + a.batch])
            made = 0
            batches = 0
            while made < a.count:
                batch = []
                while len(batch) < a.batch and made < a.count:
                    seq = st["next"]
                    if a.skip_every and seq % a.skip_every == 0:
                        st["skipped"].append([a.epoch, seq])
                        seq += 1
                    st["next"] = seq + 1
                    hb = {"seq": seq, "ts": st["base_ms"] + a.epoch * 1_000_000 + seq,
                          "lat": (seq % 1000) / 100.0, "lon": a.epoch + 0.5}
                    st["generated"].append([a.epoch, seq])
                    st["unacked"].append(hb)
                    batch.append(hb)
                    made += 1
                save(a.state, st)  # the outbox first, as a device with flash storage would
                await send(batch)
                batches += 1
                if a.die_after_batches is not None and batches >= a.die_after_batches:
                    sys.stdout.flush()
                    os._exit(3)
                if a.pause_ms:
                    await asyncio.sleep(a.pause_ms / 1000)
            deadline = time.monotonic() + a.timeout
            while st["unacked"] and time.monotonic() < deadline and not receiver.done():
                await asyncio.sleep(0.01)
            assert not errors, f"error frames: {errors[:5]}"
            if st["unacked"] and receiver.done():
                # The connection ended (the server was killed) before every ack arrived: what is
                # unacked stays in the outbox for the next run, like any other drop.
                if receiver.exception() is not None:
                    raise receiver.exception()
                raise ConnectionError(f"closed with {len(st['unacked'])} heartbeats unacked")
            assert not st["unacked"], f"{len(st['unacked'])} heartbeats never acked"
            receiver.cancel()
            out({"done": {"acked_max": st["acked_max"], "next": st["next"]}})
    except (ConnectionClosed, ConnectionError, OSError) as e:
        save(a.state, st)
        out({"dropped": str(e)})
        sys.exit(4)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--skip-every", type=int, default=0)
    p.add_argument("--die-after-batches", type=int)
    p.add_argument("--pause-ms", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
