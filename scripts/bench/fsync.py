#!/usr/bin/env python3
"""fdatasync after each append, in a file that grows against one written ahead as zeros and one
only fallocated (issue 19; what the log's prepared segments rest on). Each round appends N
blocks of BLOCK bytes to a fresh file in DIR and times every fdatasync; it prints the median and
p99 per kind, kinds alternating within a round.

Usage: scripts/bench/fsync.py [DIR=/var/cache/apex/fsync-bench] [ROUNDS=3] [N=3000] [BLOCK=4096]
"""
import os
import statistics
import sys
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "/var/cache/apex/fsync-bench"
rounds, n, block = (int(a) for a in (sys.argv[2:5] + ["3", "3000", "4096"][len(sys.argv[2:5]):]))
os.makedirs(directory, exist_ok=True)


def run(kind):
    path = os.path.join(directory, f"{kind}.wal")
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    size = (n + 1) * block
    if kind == "zeroed":
        chunk = b"\0" * (1 << 20)
        for _ in range(size // len(chunk) + 1):
            os.write(fd, chunk)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    elif kind == "fallocated":
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    data, times = b"x" * block, []
    for _ in range(n):
        os.write(fd, data)
        start = time.perf_counter()
        os.fdatasync(fd)
        times.append(time.perf_counter() - start)
    os.close(fd)
    os.remove(path)
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.99)] * 1e3


for r in range(1, rounds + 1):
    for kind in ("growing", "zeroed", "fallocated"):
        median, p99 = run(kind)
        print(f"round {r}  {kind:10s}  fdatasync median {median:.3f} ms  p99 {p99:.3f} ms", flush=True)
