#!/usr/bin/env python3
"""TLS figures for perf/RESULTS.md ("TLS"), measured from outside a running `geobeat serve`:

  handshakes  full TLS handshakes (no resumption: a fresh session each time) against
              --tls-listen from --workers client processes for --seconds; prints the server's CPU
              time per handshake (utime+stime of --pid from /proc, so the client's own CPU is not
              counted) and the handshakes/s one server core sustains at that cost.
  idle        opens --conns WebSocket device connections to /v1/ingest (wss:// with --ca, or
              ws:// without) with one gateway token, each sending one heartbeat, then holds them
              idle; prints the server's RssAnon before and with them open, and the difference per
              connection (user-space memory per idle connection); --no-heartbeat: connect only,
              so the figure holds no per-device state (last location, sequence) either.
  rate        --conns wss:// or ws:// device connections sending --rate heartbeats/s in total for
              --seconds; prints the server's CPU time per acked heartbeat.

Needs `websockets` (PyPI). Run through perf/tls.sh, which starts the server and makes the keys.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import ssl
import time


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def rss_anon_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon")


def handshake_worker(args, stop_at, counter, failures):
    ctx = ssl.create_default_context(cafile=args.ca)
    n = fails = 0
    while time.time() < stop_at:
        try:
            with socket.create_connection((args.host, args.port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.do_handshake()
            n += 1
        except OSError:
            fails += 1
    with counter.get_lock():
        counter.value += n
    with failures.get_lock():
        failures.value += fails


def handshakes(args):
    stop_at = time.time() + args.seconds
    counter = multiprocessing.Value("l", 0)
    failures = multiprocessing.Value("l", 0)
    c0 = cpu_s(args.pid)
    t0 = time.time()
    procs = [
        multiprocessing.Process(target=handshake_worker, args=(args, stop_at, counter, failures))
        for _ in range(args.workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.time() - t0
    # Let the server finish closing the last connections before reading its CPU time.
    time.sleep(0.3)
    cpu = cpu_s(args.pid) - c0
    n = counter.value
    out = {
        "handshakes": n,
        "failed": failures.value,
        "wall_s": round(wall, 2),
        "client_rate_per_s": round(n / wall, 1),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_handshake": round(cpu / n * 1e6, 1) if n else None,
        "handshakes_per_s_per_core": round(n / cpu, 0) if cpu else None,
    }
    print(json.dumps(out))


async def open_conn(args, ctx, i, held):
    import websockets

    scheme = "wss" if ctx else "ws"
    ws = await websockets.connect(
        f"{scheme}://localhost:{args.port}/v1/ingest",
        ssl=ctx,
        additional_headers={"Authorization": f"Bearer {args.token}"},
        open_timeout=30,
        ping_interval=None,
        max_queue=1,
    )
    if not args.no_heartbeat:
        await ws.send(json.dumps({"seq": 1, "id": f"idle-{i}", "lat": 52.5, "lon": 13.4,
                                  "ts": int(time.time() * 1000)}))
        await ws.recv()
    held.append(ws)


async def idle(args):
    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else None
    before = rss_anon_kb(args.pid)
    held = []
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i):
        async with sem:
            await open_conn(args, ctx, i, held)

    await asyncio.gather(*(one(i) for i in range(args.conns)))
    await asyncio.sleep(2)
    during = rss_anon_kb(args.pid)
    print(json.dumps({
        "tls": bool(ctx),
        "connections": len(held),
        "rss_anon_kb_before": before,
        "rss_anon_kb_during": during,
        "bytes_per_idle_connection": round((during - before) * 1024 / len(held)),
    }))
    for ws in held:
        await ws.close()


async def rate(args):
    import websockets

    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else None
    scheme = "wss" if ctx else "ws"
    conns = []
    for i in range(args.conns):
        conns.append(await websockets.connect(
            f"{scheme}://localhost:{args.port}/v1/ingest", ssl=ctx,
            additional_headers={"Authorization": f"Bearer {args.token}"}, ping_interval=None))
    acked = 0

    async def reader(ws):
        nonlocal acked
        async for m in ws:
            if '"ack"' in m:
                acked = acked + 1

    readers = [asyncio.create_task(reader(ws)) for ws in conns]
    per_conn_gap = args.conns / args.rate
    c0 = cpu_s(args.pid)
    t0 = time.time()
    sent = 0

    async def sender(i, ws):
        nonlocal sent
        seq = 0
        await asyncio.sleep(per_conn_gap * i / args.conns)
        next_at = time.time()
        while time.time() - t0 < args.seconds:
            seq += 1
            await ws.send(json.dumps({"seq": seq, "id": f"rate-{i}", "lat": 52.5, "lon": 13.4,
                                      "ts": int(time.time() * 1000)}))
            sent += 1
            next_at += per_conn_gap
            await asyncio.sleep(max(0, next_at - time.time()))

    await asyncio.gather(*(sender(i, ws) for i, ws in enumerate(conns)))
    await asyncio.sleep(1)
    cpu = cpu_s(args.pid) - c0
    wall = time.time() - t0
    print(json.dumps({
        "tls": bool(ctx),
        "connections": args.conns,
        "sent": sent,
        "acks": acked,
        "rate_per_s": round(sent / wall, 1),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_heartbeat": round(cpu / sent * 1e6, 2),
    }))
    for r in readers:
        r.cancel()
    for ws in conns:
        await ws.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["handshakes", "idle", "rate"])
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca")
    p.add_argument("--token")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64, help="idle: connections opened at once")
    p.add_argument("--no-heartbeat", action="store_true",
                   help="idle: connect only (no heartbeat, so no per-device state on the server)")
    p.add_argument("--rate", type=float, default=2000)
    args = p.parse_args()
    if args.mode == "handshakes":
        handshakes(args)
    elif args.mode == "idle":
        asyncio.run(idle(args))
    else:
        asyncio.run(rate(args))


if __name__ == "__main__":
    main()
