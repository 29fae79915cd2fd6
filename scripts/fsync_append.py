#!/usr/bin/env python3
"""What one durable audit append costs on this disk (BENCHMARKS.md, "The hop").

Times `write` + `fdatasync` of a 400-byte record appended to a growing file (as the
audit log does) against the same record overwriting a file already written with
zeros, where the sync has no size or block change for the file system's journal to
commit. Prints the median and 90th percentile of each, in microseconds.

    python3 scripts/fsync_append.py [FOLDER] [APPENDS]
"""

import os
import sys
import tempfile
import time


def timed(path, appends, record, prewritten):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if prewritten:
            os.write(fd, b"\0" * (appends * len(record) + 4096))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        times = []
        for _ in range(appends):
            t = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.9)] * 1e6


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    appends = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    record = b"x" * 399 + b"\n"
    for run in range(3):
        a = timed(os.path.join(folder, "fsync-append.tmp"), appends, record, False)
        z = timed(os.path.join(folder, "fsync-zeroed.tmp"), appends, record, True)
        print(f"run {run + 1}: appended p50 {a[0]:.0f} µs p90 {a[1]:.0f} µs; "
              f"over zeros p50 {z[0]:.0f} µs p90 {z[1]:.0f} µs")


if __name__ == "__main__":
    main()
