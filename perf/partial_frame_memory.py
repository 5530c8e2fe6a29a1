#!/usr/bin/env python3
"""Server memory held by partial WebSocket frames (issue 20 §7).

Starts `geobeat serve` (the binary given as argv[1]), opens N ingest connections (a gateway token)
that each send the header of a 64 KiB binary frame and HOLD bytes of its payload without ever
finishing it, then reports the server's anonymous RSS before and while they are held.
Usage: partial_frame_memory.py <geobeat binary> [connections=10000] [hold_kib=60]
"""
import os, socket, subprocess, sys, tempfile, time

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
hold = (int(sys.argv[3]) if len(sys.argv) > 3 else 60) << 10
frame = 64 << 10

def rss_anon_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

d = tempfile.mkdtemp()
port = free_port()
srv = subprocess.Popen([binary, "serve", "--data-dir", d, "--listen", f"127.0.0.1:{port}",
                        "--connections-max", str(n + 1000), "--idle-timeout-s", "600",
                        "--log-level", "warn"])
try:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
        except OSError:
            time.sleep(0.1)
    time.sleep(1)
    tok = subprocess.check_output([binary, "token", "gateway", "held-", "--data-dir", d]).decode().strip()
    before = rss_anon_kb(srv.pid)
    req = ("GET /v1/ingest HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
           "sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           f"authorization: Bearer {tok}\r\n\r\n").encode()
    # Binary frame, FIN, masked, 64-bit length; mask zero so the payload is sent as is.
    head = bytes([0x82, 0x80 | 127]) + frame.to_bytes(8, "big") + b"\0\0\0\0"
    payload = b"\x01" * hold
    socks = []
    t0 = time.time()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit(f"connection {i} closed during the upgrade: {got!r}")
            got += chunk
        if not got.startswith(b"HTTP/1.1 101"):
            raise SystemExit(f"connection {i}: {got[:80]!r}")
        s.setblocking(False)
        data = head + payload
        sent = 0
        while sent < len(data):
            try:
                sent += s.send(data[sent:])
            except BlockingIOError:
                time.sleep(0.001)
        socks.append(s)
    setup = time.time() - t0
    time.sleep(3)
    during = rss_anon_kb(srv.pid)
    held = n * hold
    print(f"connections={n} held_per_connection={hold} setup_s={setup:.1f}")
    print(f"server RssAnon: {before} kB before, {during} kB while held")
    print(f"growth {(during - before) / 1024:.0f} MiB for {held / (1 << 20):.0f} MiB of partial frames "
          f"({(during - before) * 1024 / held:.2f}x), {(during - before) * 1024 // n} bytes per connection")
    for s in socks:
        s.close()
finally:
    srv.kill(); srv.wait()
    subprocess.run(["rm", "-rf", d])
