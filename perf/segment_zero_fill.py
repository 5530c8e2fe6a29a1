#!/usr/bin/env python3
"""Cost of preparing one log segment, as src/log/segment.rs does it: fallocate alone (before issue
20 §2) against fallocate + zero-fill + fdatasync (now, on a helper thread ahead of the rollover).
Same system calls as the server, run on the file system of DIR (default: a temporary directory
under ./shards' parent). Usage: python3 perf/segment_zero_fill.py [DIR] [MIB] [ROUNDS]
Prints one line per run, alternating the two (A B A B), and the medians."""
import os, statistics, sys, tempfile, time

base = sys.argv[1] if len(sys.argv) > 1 else "."
mib = int(sys.argv[2]) if len(sys.argv) > 2 else 64
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
size, chunk = mib << 20, bytes(1 << 20)


def prepare(path, zero_fill):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    os.posix_fallocate(fd, 0, size)
    if zero_fill:
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk, off)
    os.fdatasync(fd)
    ms = (time.perf_counter() - start) * 1000
    os.close(fd)
    os.unlink(path)
    return ms


with tempfile.TemporaryDirectory(dir=base) as d:
    path = os.path.join(d, "segment.tmp")
    got = {False: [], True: []}
    for _ in range(rounds):
        for zero_fill in (False, True):
            ms = prepare(path, zero_fill)
            got[zero_fill].append(ms)
            print(f"{'zero-fill' if zero_fill else 'fallocate'} {mib} MiB: {ms:.1f} ms")
    print(f"median: fallocate {statistics.median(got[False]):.1f} ms, "
          f"fallocate + zero-fill + fdatasync {statistics.median(got[True]):.1f} ms")
