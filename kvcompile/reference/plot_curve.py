"""Plot a train_log.jsonl as the training curve PNG (bits per byte against tokens seen).

    python -m kvcompile.reference.plot_curve .ckpt/run2/train_log.jsonl docs/reference_training_curve.png
    python -m kvcompile.reference.plot_curve build/ckpt/long1/train_log.jsonl docs/reference_long_training_curve.png

A log with long-program sources or retrieval scored beyond 2048 tokens is the long model's:
its panels are titled for it, plot every retrieval length, and mark the sequence-length
switches of its curriculum.
"""
from __future__ import annotations

import json
import sys


def load_log(path: str) -> tuple[list[dict], list[dict]]:
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "eval" in record:
                evals.append(record)
            elif "loss" in record:
                steps.append(record)
    return steps, evals


def plot(log_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = load_log(log_path)
    retrieval_keys = sorted({k for r in evals for k in r["eval"] if k.startswith("retrieval_")},
                            key=lambda k: int(k.split("_")[1]))
    is_long = any("bpb_long_program" in r for r in steps) or retrieval_keys not in ([], ["retrieval_2048"])
    if is_long:
        return _plot_long(steps, evals, retrieval_keys, log_path, png_path, plt)
    tokens_at = {r["step"]: r["tokens"] for r in steps}
    per_step = steps[1]["tokens"] / steps[1]["step"] if len(steps) > 1 else 1

    def tokens(step: int) -> float:
        return tokens_at.get(step, step * per_step) / 1e6

    fig, (ax, ax_tasks) = plt.subplots(1, 2, figsize=(13, 4.8))
    x = [tokens(r["step"]) for r in steps]
    for key, label in (("bpb_text", "train: stdlib text"), ("bpb_program", "train: programs"),
                       ("bpb_retrieval", "train: retrieval tables")):
        ax.plot(x, [r[key] for r in steps], lw=0.8, label=label)
    ax.plot([tokens(r["step"]) for r in evals], [r["eval"]["heldout_bpb"] for r in evals],
            "k.-", lw=1.5, label="held-out stdlib modules")
    ax.set(xlabel="tokens seen (M)", ylabel="bits per byte", ylim=(0, 3.0),
           title="Reference model: loss (bits per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    with_tasks = [r for r in evals if "retrieval_2048" in r["eval"]]
    xt = [tokens(r["step"]) for r in with_tasks]
    for key, label in (("retrieval_2048", "retrieval @2048"),
                       ("cross_chunk_prefill", "cross-chunk, full prefill*"),
                       ("cross_chunk_reuse", "cross-chunk, full reuse*")):
        ax_tasks.plot(xt, [r["eval"][key] for r in with_tasks], "o-", label=label)
    ax_tasks.set(xlabel="tokens seen (M)", ylabel="accuracy (16 prompts)", ylim=(-0.02, 1.02),
                 title="Quick evals during training")
    ax_tasks.text(0.02, 0.55, "* run 1: two-digit values; run 2: one-token names/values,\n"
                  "  scored here on 12 letters never used as names in training\n"
                  "  (the shipped task uses the training letters; see the doc)",
                  transform=ax_tasks.transAxes, fontsize=8, va="top")
    ax_tasks.grid(alpha=0.3)
    ax_tasks.legend()
    resumes = [r for r in steps if r.get("elapsed_s", 0) and r["step"] > 0]
    for r_prev, r_next in zip(resumes, resumes[1:]):
        if r_next["elapsed_s"] < r_prev["elapsed_s"]:  # a new job started (resume)
            for a in (ax, ax_tasks):
                a.axvline(tokens(r_next["step"]), color="gray", ls="--", lw=0.8)
            ax.text(tokens(r_next["step"]), 0.1, " job 2 (resume)", fontsize=8, color="gray")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def _plot_long(steps, evals, retrieval_keys, log_path, png_path, plt) -> None:
    with open(log_path) as f:
        events = [r for r in map(json.loads, f) if r.get("event") in ("phase", "decay")]
    tokens_at = {r["step"]: r["tokens"] for r in steps}
    per_step = steps[-1]["tokens"] / steps[-1]["step"] if steps else 1

    def tokens(step: int) -> float:
        return tokens_at.get(step, step * per_step) / 1e6

    fig, (ax, ax_tasks) = plt.subplots(1, 2, figsize=(13, 4.8))
    x = [tokens(r["step"]) for r in steps]
    for key, label in (("bpb_text", "train: stdlib text"), ("bpb_program", "train: programs"),
                       ("bpb_long_program", "train: long programs"), ("bpb_chain", "train: chain documents"),
                       ("bpb_retrieval", "train: retrieval tables")):
        if steps and key in steps[0]:
            ax.plot(x, [r[key] for r in steps], lw=0.8, label=label)
    ax.plot([tokens(r["step"]) for r in evals], [r["eval"]["heldout_bpb"] for r in evals],
            "k.-", lw=1.5, label="held-out stdlib modules (2048-byte windows)")
    ax.set(xlabel="tokens seen (M)", ylabel="bits per byte", ylim=(0, 3.0),
           title="reference-long: loss (bits per byte)")
    with_tasks = [r for r in evals if "cross_chunk_prefill" in r["eval"]]
    for key in retrieval_keys + ["cross_chunk_prefill", "cross_chunk_reuse", "cross_chunk_2x128_prefill"]:
        points = [(tokens(r["step"]), r["eval"][key]) for r in with_tasks if key in r["eval"]]
        label = (f"retrieval @{key.split('_')[1]}" if key.startswith("retrieval_")
                 else "cross-chunk 2x128, full prefill" if key == "cross_chunk_2x128_prefill"
                 else "cross-chunk 6x512, " + ("full prefill" if key.endswith("prefill") else "full reuse"))
        if points:
            ax_tasks.plot(*zip(*points), "o-", label=label)
    ax_tasks.set(xlabel="tokens seen (M)", ylabel="accuracy (16 prompts)", ylim=(-0.02, 1.02),
                 title="Quick evals during training")
    for event in events:
        for a in (ax, ax_tasks):
            a.axvline(tokens(event["step"]), color="gray", ls="--" if event["event"] == "phase" else ":", lw=0.8)
        text = f" {event['seq_len']}" if event["event"] == "phase" else " decay"
        ax.text(tokens(event["step"]), 2.85, text, fontsize=8, color="gray")
    for a in (ax, ax_tasks):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
