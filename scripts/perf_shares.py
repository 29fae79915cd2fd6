#!/usr/bin/env python3
"""Where a gateway's CPU went, from a perf profile (BENCHMARKS.md, "CPU profile").

Reads `perf script --no-inline -F tid,ip,sym` on standard input and prints the share
of the samples in each part of a query's path. A sample belongs to the first part in
the list below that any frame of its stack names (a record of the query is counted as
the audit log's, not as the front end's that called it). Stacks that perf could not
unwind to a named part (it copies at most `--call-graph dwarf,SIZE` bytes of stack)
are listed by their innermost frame under "not attributed", so the parts are lower
bounds.

    perf script -i perf.data --no-inline -F tid,ip,sym --tid TID1,TID2 \\
        | python3 scripts/perf_shares.py [--leaves N]
"""

import collections
import re
import sys

# (part, pattern over a frame's symbol), checked in this order.
PARTS = [
    ("audit record: write and fdatasync", r"ops::audit::AuditLog::(append|write)"),
    ("metrics, status board, query record", r"record_query|ops::observe::Observer::"),
    ("coordinator planning (cache, bind, optimize, physical)", r"coordinator::Coordinator::(plan|parse)"),
    ("member planning (prepare, authorize, optimize, physical)",
     r"owner::member::(MemberEngine::(prepare|execute|bounded_task)|physical_plan_timed)"),
    ("a query's task context (DataFusion TaskContext)", r"task_for_query"),
    ("member answers read: IPC decode, shaping (ScanStream)", r"coordinator::scan::ScanStream"),
    ("answers written: IPC encode", r"arrow_ipc::encode|FlightDataEncoder|counted_chunks"),
    ("the member's database client", r"tokio_postgres|mysql_async|owner::source::"),
    ("reading files (Parquet, CSV)", r"datafusion_datasource|parquet::"),
    ("log lines and spans", r"tracing_subscriber|tracing_core::|tracing::span"),
    ("HTTP/2 server side (callers' connections)", r"h2::server|proto::h2::server"),
    ("HTTP/2 client side (connections to members)", r"h2::client|proto::h2::client"),
    ("TLS", r"rustls|ring::"),
    ("tokio scheduling and parking", r"tokio::runtime::(scheduler|time|io::driver)|park"),
    ("other DataFusion execution", r"datafusion"),
]


def samples(lines):
    """Each sample's stack, innermost frame first."""
    stack = None
    for line in lines:
        if not line.strip():
            if stack is not None:
                yield stack
            stack = None
        elif not line.startswith("\t"):
            # A sample's first line (the thread id, right-aligned); its frames follow,
            # each indented by a tab.
            stack = []
        elif stack is not None:
            parts = line.strip().split(" ", 1)
            stack.append(parts[1] if len(parts) == 2 else "?")
    if stack is not None:
        yield stack


def main():
    leaves = 12
    if len(sys.argv) == 3 and sys.argv[1] == "--leaves":
        leaves = int(sys.argv[2])
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    parts = [(name, re.compile(p)) for name, p in PARTS]
    shares, unattributed = collections.Counter(), collections.Counter()
    total = 0
    for stack in samples(sys.stdin):
        total += 1
        for name, p in parts:
            if any(p.search(f) for f in stack):
                shares[name] += 1
                break
        else:
            shares["not attributed"] += 1
            unattributed[stack[0][:90] if stack else "?"] += 1
    if not total:
        sys.exit("no samples on standard input")
    print(f"{total} samples")
    for name, n in shares.most_common():
        print(f"{100 * n / total:5.1f}%  {name}")
    print("not attributed, by innermost frame:")
    for name, n in unattributed.most_common(leaves):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
