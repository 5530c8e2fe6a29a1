#!/usr/bin/env python3
"""Reads folded stacks (inferno-collapse-perf output: `frame;frame;... count` per line) on stdin
and prints, for each concern of geobeat's ingest path, the share of all samples whose stack
contains one of its frames (inclusive, so shares overlap and do not add up to 100%). Used by
flamegraphs/profile.sh to say whether the hot spots are the work geobeat means to do."""

import re
import sys

# (concern, regular expression over one frame name); first match per frame is not required:
# a stack counts for a concern if any frame matches.
CONCERNS = [
    ("JSON decode (geobeat::proto::json)", r"geobeat::proto::json"),
    ("binary decode (geobeat::proto::binary)", r"geobeat::proto::binary"),
    ("heartbeat validation (validate)", r"validate"),
    ("log append (geobeat::log::Log::append)", r"geobeat::log::Log::append"),
    ("rkyv serialization", r"rkyv"),
    ("CRC32C", r"crc32c"),
    ("last-location table (geobeat::table)", r"geobeat::table"),
    ("fdatasync (kernel: vfs_fsync / ext4_sync_file)", r"vfs_fsync|ext4_sync_file|file_write_and_wait"),
    ("page faults (first writes to mapped pages)", r"asm_exc_page_fault|handle_mm_fault"),
    ("WebSocket framing (tungstenite)", r"tungstenite"),
    ("socket receive (kernel recvmsg)", r"tcp_recvmsg|sock_recvmsg|__sys_recvmsg|io_recvmsg|io_recv\b"),
    ("socket send (kernel sendmsg/write)", r"tcp_sendmsg|sock_sendmsg|__sys_sendmsg|io_sendmsg|io_send\b"),
    ("io_uring submit/complete (kernel)", r"io_uring|io_submit_sqes|__io_run_local_work|io_cqring_wait"),
    ("glommio executor / reactor", r"glommio::"),
    ("cross-core channels (geobeat::server::msg, glommio channels)", r"geobeat::server::msg|glommio::channels"),
    ("group commit (geobeat commit loop)", r"commit_loop|commit_slot|commit_begin|commit_end|sync_file"),
    ("timekeeping (clock_gettime)", r"clock_gettime"),
    ("scheduler / context switches (kernel)", r"schedule$|__schedule|finish_task_switch"),
    ("interrupt / softirq (kernel)", r"irqentry|handle_softirqs|do_softirq"),
]


def main():
    compiled = [(name, re.compile(pattern)) for name, pattern in CONCERNS]
    totals = {name: 0 for name, _ in CONCERNS}
    all_samples = 0
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        all_samples += n
        frames = stack.split(";")
        for name, pattern in compiled:
            if any(pattern.search(frame) for frame in frames):
                totals[name] += n
    if all_samples == 0:
        print("(no samples)")
        return
    print(f"total weight {all_samples} (cpu-clock: nanoseconds sampled)")
    for name, _ in sorted(CONCERNS, key=lambda c: -totals[c[0]]):
        share = 100.0 * totals[name] / all_samples
        print(f"{share:6.1f}%  {name}")


if __name__ == "__main__":
    main()
