"""Where a profiled call's time goes on the GPU timeline: per stream, the span and the busy
time, and the longest stretches the busiest stream sat idle, with the host ops that ran then.

    python bench/trace_gaps.py fusion_trace_kvc_fuse_15.json.gz [--gaps 12]

Reads the Chrome trace bench_fusion_ttft.py --profile ROW --trace writes. A gap on the compute
stream under host ops means the GPU waited for Python (launches, a sync for the selection); a
gap with the copy stream busy means compute waited for a load.
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

from kernel_timeline import union_us  # bench/, the script's folder

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)["traceEvents"]


def union_ms(intervals) -> float:
    """Length of the union of (start µs, end µs) intervals, in ms."""
    return union_us(intervals) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--gaps", type=int, default=12)
    args = parser.parse_args()
    events = [e for e in load(args.trace) if e.get("ph") == "X"]
    streams = defaultdict(list)
    for e in events:
        if e.get("cat") in GPU_CATEGORIES:
            streams[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    if not streams:
        print("no GPU activity in this trace")
        return 0
    first = min(s for items in streams.values() for s, _, _ in items)
    last = max(t for items in streams.values() for _, t, _ in items)
    print(f"GPU span {(last - first) / 1e3:.2f} ms")
    for tid, items in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        kinds = defaultdict(float)
        for start, stop, name in items:
            kinds["memcpy" if "Memcpy" in name else "kernel"] += (stop - start) / 1e3
        print(f"stream {tid}: {len(items)} ops, busy {union_ms([(s, t) for s, t, _ in items]):.2f} ms "
              f"({', '.join(f'{k} {v:.2f}' for k, v in kinds.items())}), "
              f"from +{(min(s for s, _, _ in items) - first) / 1e3:.2f} to +{(max(t for _, t, _ in items) - first) / 1e3:.2f} ms")
    compute = max(streams.values(), key=lambda items: sum(t - s for s, t, _ in items))
    compute.sort()
    others = [(s, t) for items in streams.values() if items is not compute for s, t, _ in items]
    host = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in ("cpu_op", "python_function")
                  and e["dur"] > 50)
    gaps = []
    end = first
    for start, stop, name in compute:
        if start - end > 0:
            gaps.append((start - end, end, start, name))
        end = max(end, stop)
    print(f"\nlongest idle stretches of the busiest stream (stream busy {union_ms([(s, t) for s, t, _ in compute]):.2f} ms):")
    for length, start, stop, next_name in sorted(gaps, reverse=True)[:args.gaps]:
        overlap = union_ms([(max(s, start), min(t, stop)) for s, t in others if s < stop and t > start])
        during = [n for s, t, n in host if s < stop and t > start and t - s < 4 * (stop - start) + 1e3][:4]
        print(f"  {length / 1e3:6.2f} ms at +{(start - first) / 1e3:6.2f}: other streams busy {overlap:.2f} ms; "
              f"next {next_name[:40]!r}; host: {', '.join(n[:40] for n in during)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
