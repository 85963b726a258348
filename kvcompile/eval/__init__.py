"""Quality tasks for the reference models, scored through any runner (see runner.py).

    from kvcompile.eval import HFRunner, evaluate, format_report, suite_for_context
    report = evaluate(HFRunner(model))            # small defaults: a few minutes on 2 CPU cores
    report = evaluate(HFRunner(model), **suite_for_context(8192).as_kwargs())   # reference-long
    print(format_report(report))

Tasks: "perplexity" (held-out bits per byte), "retrieval" (key→value lookup at a model's
lengths: 512/1K/2K for `reference`, 2K/4K/8K for `reference-long`), "cross_chunk" (variable
tracking across chunks, full prefill vs full reuse; 4 chunks x 16 lines, or the fusion
benchmark's 6 chunks x 512 tokens for long-context models).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from kvcompile.eval.cross_chunk import score_cross_chunk
from kvcompile.eval.perplexity import score_perplexity
from kvcompile.eval.retrieval import CONTEXT_LENGTHS, score_retrieval
from kvcompile.eval.runner import FUSED_MODES, HFRunner, Runner

TASKS = ("perplexity", "retrieval", "cross_chunk")
LONG_CONTEXT_FROM = 4096  # models with at least this context get the fusion benchmark's layout

__all__ = ["TASKS", "FUSED_MODES", "HFRunner", "Runner", "Suite", "evaluate", "format_report",
           "suite_for_context"]


@dataclass(frozen=True)
class Suite:
    """The task lengths a model is judged at."""
    context_lengths: tuple = CONTEXT_LENGTHS
    n_chunks: int = 4
    lines_per_chunk: int = 16
    chunk_tokens: int | None = None  # set: chunks filled to this many tokens (lines_per_chunk unused)
    ppl_window: int = 2048

    def as_kwargs(self) -> dict:
        return dict(context_lengths=self.context_lengths, n_chunks=self.n_chunks,
                    lines_per_chunk=self.lines_per_chunk, chunk_tokens=self.chunk_tokens,
                    ppl_window=self.ppl_window)


def suite_for_context(context: int) -> Suite:
    """A long-context model (>= 4K): retrieval at context/4, /2 and the full context, cross-chunk
    as the fusion benchmark lays it out (6 x 512 tokens). Shorter ones: the first reference
    model's suite (512/1K/2K, 4 chunks x 16 lines). Bits per byte over 2048-byte windows for
    every model, so the numbers compare across models."""
    if context >= LONG_CONTEXT_FROM:
        return Suite((context // 4, context // 2, context), n_chunks=6, chunk_tokens=512, ppl_window=2048)
    return Suite()


def evaluate(runner, tasks=TASKS, *, count: int = 20, seed: int = 0, ppl_windows: int = 8,
             context_lengths=CONTEXT_LENGTHS, cross_chunk_modes=FUSED_MODES,
             batch_size: int = 8, n_chunks: int = 4, lines_per_chunk: int = 16,
             chunk_tokens: int | None = None, ppl_window: int = 2048,
             heldout_text: bytes | None = None) -> dict:
    """Score `tasks` with `runner`; `count` prompts per retrieval length and per cross-chunk
    kind. Deterministic: the same seed gives the same prompts on every machine.
    heldout_text: the held-out bytes for perplexity (default: this Python's held-out modules)."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
    report: dict = {"seed": seed}
    for task in tasks:
        began = time.perf_counter()
        if task == "perplexity":
            report[task] = score_perplexity(runner, window=ppl_window, count=ppl_windows,
                                            batch_size=max(1, batch_size // 2), text=heldout_text)
        elif task == "retrieval":
            report[task] = score_retrieval(runner, context_lengths, count, seed, batch_size)
        else:
            report[task] = score_cross_chunk(runner, count, seed, modes=tuple(cross_chunk_modes),
                                             n_chunks=n_chunks, lines_per_chunk=lines_per_chunk,
                                             chunk_tokens=chunk_tokens)
        report[task]["seconds"] = round(time.perf_counter() - began, 2)
    return report


def format_report(report: dict) -> str:
    """A plain-text table of an evaluate() result."""
    lines = []
    if "perplexity" in report:
        p = report["perplexity"]
        lines.append(f"perplexity   held-out bits/byte {p['bpb']:.4f}  ({p['bytes']} bytes in windows of "
                     f"{p.get('window', '?')}, python {p.get('python', '?')})")
    if "retrieval" in report:
        r = report["retrieval"]
        cells = "  ".join(f"{k}: {v:6.1%}" for k, v in r.items() if k.isdigit())
        lines.append(f"retrieval    accuracy by context  {cells}  (n={r['count']} each)")
    if "cross_chunk" in report:
        c = report["cross_chunk"]
        if c.get("chunk_tokens"):
            layout = f"{c['n_chunks']} chunks <= {c['chunk_tokens']} tokens, {c['prompt_tokens']} tokens in all"
        else:
            layout = f"{c['n_chunks']} chunks x {c['lines_per_chunk']} lines"
        for kind in ("chain", "direct"):
            if kind not in c:
                continue
            cells = "  ".join(f"{m}: {v:6.1%}" for m, v in c[kind].items())
            label = "cross-chunk" if kind == "chain" else "  (control)"
            lines.append(f"{label}  {kind:6s} {cells}  (n={c['count']}; {layout})")
    return "\n".join(lines)
