"""Where a decode step's device time goes: the kernels of a few calls recorded with the torch
profiler (CUPTI; CUDA-graph replays included), grouped by stage, and how the host-link fetch
overlaps the rest.

The question it answers for the KCache runtimes: the fetch of kept V rows (the gather kernel)
is bound by the host link, everything else by HBM or latency, so a step can be no shorter than
the link's busy time. `link_busy_fraction` says how much of the step the link had work; the
gather's mean duration beside a score pass vs alone says whether running together slows it.

    summary = profile_kernels(fn, calls=2)   # fn: one decode step (or one op call)
"""
from __future__ import annotations

import json
import os
import re
import tempfile

# Kernel names (demangled, as CUPTI reports them) to the stage they belong to; first match wins.
STAGES = (
    ("fetch", re.compile(r"gather_kernel")),
    ("kcache_finalize", re.compile(r"finalize_kernel")),
    ("selection", re.compile(r"selection_score")),  # before "scores": its name ends in score_kernel
    ("scores", re.compile(r"score_mma_kernel|score_kernel")),
    ("softmax_stats", re.compile(r"softmax_stats")),
    ("topn", re.compile(r"topn_select")),
    ("full_attention", re.compile(r"flash|fmha|cudnn|attention|merge", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|sm90_|wgmma", re.I)),
)


def stage_of(name: str) -> str:
    for stage, pattern in STAGES:
        if pattern.search(name):
            return stage
    return "other"


def union_us(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def overlap_us(interval, others) -> float:
    """How long `interval` overlaps the union of `others` (sorted by start)."""
    s, e = interval
    covered = [(max(s, a), min(e, b)) for a, b in others if a < e and b > s]
    return union_us(covered)


def recorded_kernels(fn, calls: int) -> list[dict]:
    """(name, stage, stream, start µs, end µs) of every kernel `calls` calls of fn ran."""
    import torch  # here, so that reading a trace (union_us, summarize) needs no torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    kernels = []
    for event in trace.get("traceEvents", []):
        if event.get("cat") != "kernel" or "dur" not in event:
            continue
        name = event.get("name", "")
        start = float(event["ts"])
        kernels.append(dict(name=name, stage=stage_of(name), stream=event.get("args", {}).get("stream"),
                            start=start, end=start + float(event["dur"])))
    return sorted(kernels, key=lambda k: k["start"])


def summarize(kernels: list[dict], calls: int) -> dict:
    """Per-call device time by stage, the span, the link's busy share and the fetch's slowdown
    beside a score pass."""
    if not kernels:
        return dict(error="the profiler recorded no kernels")
    span = max(k["end"] for k in kernels) - kernels[0]["start"]
    by_stage = {}
    for k in kernels:
        entry = by_stage.setdefault(k["stage"], dict(kernel_us=0.0, count=0))
        entry["kernel_us"] += k["end"] - k["start"]
        entry["count"] += 1
    for stage, entry in by_stage.items():
        entry["busy_us"] = union_us([(k["start"], k["end"]) for k in kernels if k["stage"] == stage]) / calls
        entry["kernel_us"] /= calls
        entry["count"] /= calls
    fetches = [(k["start"], k["end"]) for k in kernels if k["stage"] == "fetch"]
    scores = sorted((k["start"], k["end"]) for k in kernels if k["stage"] == "scores")
    hbm = sorted((k["start"], k["end"]) for k in kernels if k["stage"] in ("scores", "gemm", "full_attention"))
    beside, alone = [], []
    for f in fetches:  # a fetch "beside" scores: at least half of it runs next to a score pass
        (beside if overlap_us(f, scores) >= 0.5 * (f[1] - f[0]) else alone).append(f[1] - f[0])
    summary = dict(
        calls=calls, span_us_per_call=span / calls,
        stages={s: {k: round(v, 1) for k, v in e.items()} for s, e in sorted(by_stage.items())},
        streams=sorted({str(k["stream"]) for k in kernels}),
        busy_us_per_call=union_us([(k["start"], k["end"]) for k in kernels]) / calls,
    )
    if fetches:
        link_busy = union_us(fetches)
        summary.update(
            link_busy_us_per_call=link_busy / calls, link_busy_fraction=link_busy / span,
            fetch_overlapped_by_hbm_work_fraction=sum(overlap_us(f, hbm) for f in fetches) / sum(e - s for s, e in fetches),
            fetch_kernels_beside_scores=len(beside), fetch_mean_us_beside_scores=sum(beside) / len(beside) if beside else None,
            fetch_kernels_alone=len(alone), fetch_mean_us_alone=sum(alone) / len(alone) if alone else None)
    return summary


def profile_kernels(fn, calls: int = 2) -> dict:
    """summarize(recorded_kernels(fn, calls)), rounded for a JSON record."""
    summary = summarize(recorded_kernels(fn, calls), calls)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}
