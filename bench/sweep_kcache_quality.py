"""KCache quality sweep on the reference model: perplexity and retrieval vs top-N and selection.

For every (topn, select) the same prompts run through the compiled model:
- perplexity: held-out windows of `--window` bytes; all but the last `--ppl-tail` are prefilled,
  the tail is fed one token at a time as decode steps (so every scored token reads the top-N
  cache); bits per byte over the decoded tail, against the full cache on the same bytes;
- retrieval: key→value lookup at 512/1K/2K tokens; the context is prefilled and the question
  tokens are decoded (decode_tail=16), so the lookup itself goes through top-N retrieval.

    python bench/sweep_kcache_quality.py --out results/ [--device cuda] [--samples 20]
Writes kcache_quality.json and kcache_quality.png into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kvcompile
from kvcompile.eval.perplexity import heldout_windows
from kvcompile.eval.retrieval import score_retrieval
from kvcompile.runtime.eval_runner import CompiledRunner

TOPNS = (16, 32, 64, 128, 256, 512, 1024)
QUESTION_TAIL = 16


def tail_bits_per_byte(runner, windows, tail: int, batch: int) -> float:
    nats, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = torch.tensor(windows[start:start + batch])
        logits = runner.logits(ids).float().cpu()  # [B, T, V]
        scored = slice(ids.shape[1] - tail - 1, ids.shape[1] - 1)
        nats += float(F.cross_entropy(logits[:, scored].reshape(-1, logits.shape[-1]),
                                      ids[:, scored.start + 1:].reshape(-1), reduction="sum"))
        count += ids[:, scored.start + 1:].numel()
    return nats / count / math.log(2)


def measure(model, config, windows, args) -> dict:
    compiled = kvcompile.compile(model, config)
    began = time.perf_counter()
    bpb = tail_bits_per_byte(CompiledRunner(compiled, decode_tail=args.ppl_tail), windows, args.ppl_tail, args.batch)
    retrieval = score_retrieval(CompiledRunner(compiled, decode_tail=QUESTION_TAIL), count=args.samples,
                                batch_size=args.samples)
    return {"bpb": bpb, "retrieval": {k: v for k, v in retrieval.items() if k.isdigit()},
            "seconds": round(time.perf_counter() - began, 1)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = results["full"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for select, marker in (("head", "o"), ("layer", "s")):
        for renormalize, style in ((False, "-"), (True, "--")):
            rows = [r for r in results["kcache"] if r["select"] == select and bool(r["renormalize"]) == renormalize]
            if not rows:
                continue
            ns = [r["topn"] for r in rows]
            label = f"{select}{', renorm' if renormalize else ''}"
            left.plot(ns, [100 * (r["bpb"] / exact["bpb"] - 1) for r in rows], style, marker=marker, label=label)
            right.plot(ns, [r["retrieval"]["2048"] * 100 for r in rows], style, marker=marker, label=label)
    left.axhline(1.0, color="grey", ls="--", lw=1, label="+1% target")
    right.axhline(99 * exact["retrieval"]["2048"], color="grey", ls="--", lw=1, label="99% of exact")
    for axis, title in ((left, "bits/byte increase vs full cache (%)"), (right, "retrieval accuracy at 2K (%)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("top-N")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_table(results: dict) -> str:
    """The sweep as a markdown table, with each row's ratio to the full cache."""
    exact = results["full"]
    lengths = sorted(exact["retrieval"], key=int)
    head = "| select | renormalize | full_layers | top-N | bits/byte | vs full | " + " | ".join(f"retrieval {n}" for n in lengths) + " |"
    lines = [head, "|" + " --- |" * (6 + len(lengths))]
    cells = " | ".join(f"{exact['retrieval'][n]:.0%}" for n in lengths)
    lines.append(f"| full cache | - | - | - | {exact['bpb']:.4f} | 1.000 | {cells} |")
    for row in results["kcache"]:
        cells = " | ".join(f"{row['retrieval'][n]:.0%}" for n in lengths)
        lines.append(f"| {row['select']} | {'yes' if row.get('renormalize') else 'no'} | {row.get('full_layers', 0)} | {row['topn']} | "
                     f"{row['bpb']:.4f} | {row['bpb'] / exact['bpb']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--ppl-tail", type=int, default=1024, help="tokens per window scored as decode steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--topn", type=int, nargs="*", default=list(TOPNS))
    parser.add_argument("--renormalize", type=int, nargs="*", default=[0, 1], choices=[0, 1],
                        help="sweep without (0) and/or with (1) renormalising over the kept positions")
    parser.add_argument("--full-layers", type=int, default=0, help="first layers keeping V on the device")
    parser.add_argument("--selects", nargs="*", default=["head", "layer"], choices=["head", "layer"])
    parser.add_argument("--from-json", help="only redraw the plot and table of an earlier run's JSON")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        plot(results, out / "kcache_quality.png")
        (out / "kcache_quality.md").write_text(markdown_table(results))
        return
    model = kvcompile.load_model("reference", dtype=torch.float32, device=args.device)
    windows = heldout_windows(args.window, args.windows)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "window": args.window, "ppl_tail": args.ppl_tail, "windows": len(windows),
               "samples": args.samples, "kcache": []}
    results["full"] = measure(model, kvcompile.CacheConfig(kind="full"), windows, args)
    print("full", results["full"], flush=True)
    for renormalize in map(bool, args.renormalize):
        for select in args.selects:
            for topn in args.topn:
                config = kvcompile.CacheConfig(kind="kcache", topn=topn, select=select, renormalize=renormalize,
                                               full_layers=args.full_layers)
                row = {"topn": topn, "select": select, "renormalize": renormalize, "full_layers": args.full_layers,
                       **measure(model, config, windows, args)}
                results["kcache"].append(row)
                print(row, flush=True)
                # written as it goes, so a run cut short still leaves its rows
                (out / "kcache_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "kcache_quality.png")
    (out / "kcache_quality.md").write_text(markdown_table(results))


if __name__ == "__main__":
    main()
