"""KV fusion quality on the reference model's cross-chunk task: full prefill, full reuse, and
fusion at several recompute ratios for each token selector, in one run.

The task (kvcompile/eval/cross_chunk.py) needs information to flow between chunks: "chain"
examples are answered right only if a later chunk's tokens saw an earlier chunk (full reuse
falls for a stale "trap" value); "direct" examples are the control. Each chunk is precomputed
alone (CompiledModel.precompute_chunk) and fused with the question (generate_fused).

    python bench/sweep_fusion_quality.py --out docs/ [--samples 40] [--ratios 0.05,0.1,0.15,0.2,0.3]
Writes fusion_quality.json and fusion_quality.png into --out, and prints a markdown table.

    python bench/sweep_fusion_quality.py --combine docs/a.json docs/b.json --out docs/ --name fusion_quality
puts the selectors of several runs (each against its own full prefill / full reuse) in one table
and one plot, without running anything.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvcompile
from kvcompile.eval.cross_chunk import score_cross_chunk
from kvcompile.fusion import TokenSelector
from kvcompile.runtime.eval_runner import CompiledRunner


class FusionRunner(CompiledRunner):
    """The cross-chunk runner protocol, with modes "fuse:<selector>:<ratio>" beside the two
    references (full_prefill, full_reuse), which CompiledRunner runs."""

    def __init__(self, compiled, check_layer=None):
        super().__init__(compiled)
        self.check_layer = check_layer
        self.chunk_caches: dict = {}

    def chunk(self, ids):
        key = tuple(ids)
        if key not in self.chunk_caches:
            self.chunk_caches[key] = self.compiled.precompute_chunk(torch.tensor(ids))
        return self.chunk_caches[key]

    def greedy_fused(self, chunks, question, max_new_tokens: int, mode: str) -> list:
        if not mode.startswith("fuse:"):
            return super().greedy_fused(chunks, question, max_new_tokens, mode)
        _, selector, ratio = mode.split(":")
        caches = [self.chunk(c) for c in chunks]
        out = self.compiled.generate_fused(caches, torch.tensor(question), float(ratio), max_new_tokens,
                                           selector=selector, check_layer=self.check_layer)
        return out[0].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--samples", type=int, default=40, help="examples per kind")
    parser.add_argument("--ratios", default="0.05,0.1,0.15,0.2,0.3")
    parser.add_argument("--selectors", default=",".join(TokenSelector.names()))
    parser.add_argument("--check-layer", type=int, default=None, help="default: each selector's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="reference", help="a bundled model: reference, or reference-long "
                        "(the fusion benchmark's layout, 6 chunks x 512 tokens)")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation prompts' seed")
    parser.add_argument("--name", default="fusion_quality", help="file name of the JSON and PNG")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="runs to put in one table and plot")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, Path(args.out), args.name)
    ratios = [float(r) for r in args.ratios.split(",")]
    selectors = args.selectors.split(",")
    from kvcompile.eval import suite_for_context

    model = kvcompile.load_model(args.model).to(args.device)
    compiled = kvcompile.compile(model)
    suite = suite_for_context(compiled.spec.max_context)  # the layout `kvcompile eval` scores this model with
    runner = FusionRunner(compiled, args.check_layer)
    modes = ["full_prefill", "full_reuse"] + [f"fuse:{s}:{r}" for s in selectors for r in ratios]
    started = time.perf_counter()
    scores = score_cross_chunk(runner, count=args.samples, seed=args.seed, modes=tuple(modes), n_chunks=suite.n_chunks,
                               lines_per_chunk=suite.lines_per_chunk, chunk_tokens=suite.chunk_tokens)
    check_layers = {s: compiled.fusion.resolve_check_layer(TokenSelector.parse(s, "selector"), args.check_layer) for s in selectors}
    results = {"samples": args.samples, "ratios": ratios, "selectors": selectors, "check_layers": check_layers,
               "seconds": round(time.perf_counter() - started, 1), "scores": scores,
               "torch": torch.__version__, "device": args.device, "model": args.model, "seed": args.seed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    plot(results, out / f"{args.name}.png")
    return 0


def recovered(chain: dict, mode: str) -> float:
    """Share of the reuse→prefill gap a mode closes on the chain task."""
    gap = chain["full_prefill"] - chain["full_reuse"]
    return (chain[mode] - chain["full_reuse"]) / gap if gap > 0 else float("nan")


def table(results: dict) -> str:
    chain, direct = results["scores"]["chain"], results["scores"]["direct"]
    lines = [f"full prefill: chain {chain['full_prefill']:.0%} (trap {chain['full_prefill_trap']:.0%}), direct "
             f"{direct['full_prefill']:.0%}; full reuse: chain {chain['full_reuse']:.0%} (trap "
             f"{chain['full_reuse_trap']:.0%}), direct {direct['full_reuse']:.0%}", "",
             "| selector | " + " | ".join(f"{r:.0%}" for r in results["ratios"]) + " |",
             "| --- | " + " | ".join("---" for _ in results["ratios"]) + " |"]
    for selector in results["selectors"]:
        cells = []
        for ratio in results["ratios"]:
            mode = f"fuse:{selector}:{ratio}"
            cells.append(f"{chain[mode]:.0%} ({recovered(chain, mode):.0%} of gap; direct {direct[mode]:.0%})")
        lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(paths, out: Path, name: str) -> int:
    """One table and one plot of the selectors of several runs (rows name run and check layer)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["| selector (check layer) | run | " + " | ".join(f"{r:.0%}" for r in runs[0]["ratios"]) + " |",
             "| --- | --- | " + " | ".join("---" for _ in runs[0]["ratios"]) + " |"]
    curves = []
    for path, run in zip(paths, runs):
        chain = run["scores"]["chain"]
        layers = run.get("check_layers") or {s: run.get("check_layer") for s in run["selectors"]}
        where = f"{Path(path).name}, {run['device']}, n={run['samples']}, prefill {chain['full_prefill']:.0%}, " \
                f"reuse {chain['full_reuse']:.0%}"
        for selector in run["selectors"]:
            cells = [f"{chain[f'fuse:{selector}:{r}']:.0%} ({recovered(chain, f'fuse:{selector}:{r}'):.0%})"
                     for r in run["ratios"]]
            label = f"{selector} ({layers[selector]})" if selector != "chunk_head" else selector
            if label in {c[0] for c in curves}:  # e.g. chunk_head, which has no check layer: once
                continue
            lines.append(f"| {label} | {where} | " + " | ".join(cells) + " |")
            curves.append((label, run["ratios"], [recovered(chain, f"fuse:{selector}:{r}") for r in run["ratios"]]))
    table_text = "\n".join(lines)
    print(table_text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"runs": list(paths), "table": table_text}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, ratios, gap in curves:
        ax.plot([100 * r for r in ratios], [100 * g for g in gap], marker="o", label=label)
    ax.axhline(100, color="black", linestyle="--", label="full prefill")
    ax.axhline(0, color="gray", linestyle=":", label="full reuse")
    ax.axhline(90, color="tab:red", linewidth=0.6, label="target at 15%")
    ax.set_xlabel("tokens recomputed (% of chunk tokens)")
    ax.set_ylabel("reuse→prefill gap recovered (%)")
    ax.set_title("KV fusion selectors, reference model's cross-chunk task", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chain = results["scores"]["chain"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ratios = [100 * r for r in results["ratios"]]
    for selector in results["selectors"]:
        ax.plot(ratios, [100 * chain[f"fuse:{selector}:{r}"] for r in results["ratios"]], marker="o", label=selector)
    ax.axhline(100 * chain["full_prefill"], color="black", linestyle="--", label="full prefill")
    ax.axhline(100 * chain["full_reuse"], color="gray", linestyle=":", label="full reuse")
    ax.set_xlabel("tokens recomputed (% of chunk tokens)")
    ax.set_ylabel("cross-chunk chain accuracy (%)")
    ax.set_title(f"KV fusion on {results.get('model', 'reference')} (n={results['samples']} per point)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
