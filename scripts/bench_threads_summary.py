#!/usr/bin/env python3
"""Summarises scripts/bench_threads.sh: median over rounds of criterion's point
estimate per (tree, bench), and the after/before and 2-thread/1-thread ratios."""
import re
import statistics
import sys
from collections import defaultdict

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
times = defaultdict(list)  # (tree, bench) -> [ms]
pending = {}  # tree -> bench id whose time line has not come yet
for line in open(sys.argv[1], encoding="utf-8"):
    tree, _, rest = line.rstrip("\n").partition("\t")
    if "%" in rest or "thrpt:" in rest:
        continue  # criterion's change against its last run, throughput lines
    m = re.match(r"^(\S+)\s+time:\s+\[\S+ \S+ (\S+) (\S+) ", rest)
    if m:
        bench = rest.split()[0]
    else:
        m = re.match(r"^\s+time:\s+\[\S+ \S+ (\S+) (\S+) ", rest)
        bench = pending.get(tree)
        if m is None:
            if rest.strip() and not rest.startswith(" "):
                pending[tree] = rest.split()[0]
            continue
    value, unit = m.group(m.lastindex - 1), m.group(m.lastindex)
    times[(tree, bench)].append(float(value) * UNITS[unit])
    pending.pop(tree, None)

def med(tree, bench):
    v = times.get((tree, bench))
    return statistics.median(v) if v else None

benches = sorted({b for (_, b) in times})
print("| bench | before (ms) | after (ms) | after/before | 1 thread (ms) | 2 threads (ms) | 1→2 speed-up |")
print("|---|---:|---:|---:|---:|---:|---:|")
for b in benches:
    before, after = med("before", b), med("after", b)
    t1, t2 = med("threads1", b), med("threads2", b)
    fmt = lambda x: f"{x:.3f}" if x is not None else "—"
    ratio = f"{after / before:.2f}×" if before and after else "—"
    speed = f"{t1 / t2:.2f}×" if t1 and t2 else "—"
    print(f"| {b} | {fmt(before)} | {fmt(after)} | {ratio} | {fmt(t1)} | {fmt(t2)} | {speed} |")
