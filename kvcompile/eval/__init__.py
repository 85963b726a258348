"""Quality tasks for the reference model, scored through any runner (see runner.py).

    from kvcompile.eval import HFRunner, evaluate, format_report
    report = evaluate(HFRunner(model))            # small defaults: a few minutes on 2 CPU cores
    print(format_report(report))

Tasks: "perplexity" (held-out bits per byte), "retrieval" (key→value lookup at 512/1K/2K
tokens), "cross_chunk" (variable tracking across chunks, full prefill vs full reuse).
"""
from __future__ import annotations

import time

from kvcompile.eval.cross_chunk import score_cross_chunk
from kvcompile.eval.perplexity import score_perplexity
from kvcompile.eval.retrieval import CONTEXT_LENGTHS, score_retrieval
from kvcompile.eval.runner import FUSED_MODES, HFRunner, Runner

TASKS = ("perplexity", "retrieval", "cross_chunk")

__all__ = ["TASKS", "FUSED_MODES", "HFRunner", "Runner", "evaluate", "format_report"]


def evaluate(runner, tasks=TASKS, *, count: int = 20, seed: int = 0, ppl_windows: int = 8,
             context_lengths=CONTEXT_LENGTHS, cross_chunk_modes=FUSED_MODES,
             batch_size: int = 8) -> dict:
    """Score `tasks` with `runner`; `count` prompts per retrieval length and per cross-chunk
    kind. Deterministic: the same seed gives the same prompts on every machine."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
    report: dict = {"seed": seed}
    for task in tasks:
        began = time.perf_counter()
        if task == "perplexity":
            report[task] = score_perplexity(runner, count=ppl_windows, batch_size=max(1, batch_size // 2))
        elif task == "retrieval":
            report[task] = score_retrieval(runner, context_lengths, count, seed, batch_size)
        else:
            report[task] = score_cross_chunk(runner, count, seed, modes=tuple(cross_chunk_modes))
        report[task]["seconds"] = round(time.perf_counter() - began, 2)
    return report


def format_report(report: dict) -> str:
    """A plain-text table of an evaluate() result."""
    lines = []
    if "perplexity" in report:
        p = report["perplexity"]
        lines.append(f"perplexity   held-out bits/byte {p['bpb']:.4f}  ({p['bytes']} bytes, "
                     f"python {p.get('python', '?')})")
    if "retrieval" in report:
        r = report["retrieval"]
        cells = "  ".join(f"{k}: {v:6.1%}" for k, v in r.items() if k.isdigit())
        lines.append(f"retrieval    accuracy by context  {cells}  (n={r['count']} each)")
    if "cross_chunk" in report:
        c = report["cross_chunk"]
        for kind in ("chain", "direct"):
            if kind not in c:
                continue
            cells = "  ".join(f"{m}: {v:6.1%}" for m, v in c[kind].items())
            label = "cross-chunk" if kind == "chain" else "  (control)"
            lines.append(f"{label}  {kind:6s} {cells}  (n={c['count']})")
    return "\n".join(lines)
