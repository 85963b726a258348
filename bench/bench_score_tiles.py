"""Keys per CTA of the KCache score pass ($KVC_SCORE_TILE) against the library's own choice
(choose_score_tile: the tile whose grid wastes least of its last wave of CTA slots), device µs
of the score kernel (torch profiler, CUPTI) per batch and context.

The pass is memory-bound and its CTAs all take about as long, so a grid of 2.6 waves runs its
last 0.6 wave part-full; a tile that makes the grid ~2 or ~3 whole waves reads K faster.
Shapes: 32/8 heads, d=128, bf16, --batches x --contexts, one op call ("head", N=128, one
slice). Writes score_tiles.json to --out.

    python bench/bench_score_tiles.py --out DIR                  # GPU only
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kcache_op  # noqa: E402
from bench_kcache_op import cases, kernel_breakdown, run_header, run_sweep, set_kernel_env, sweep_parser  # noqa: E402

TILES = ("1024", "1536", "2048", "2560", "2816", "3072", "4096")  # timed beside the library's rule


def score_us(kernels: dict) -> float:
    return sum(us for name, us in kernels.items() if "score_mma_kernel" in name)


def run(batches, contexts, iters: int, tiles) -> dict:
    import kvcompile.ops  # noqa: F401  (registers the op)

    op = torch.ops.kvcompile.kcache_attention
    scale = bench_kcache_op.D ** -0.5
    result = dict(run_header(), rows=[])
    set_kernel_env("KVC_PIPELINE_PARTS", 1)
    for batch, context, case in cases([(b, c) for b in batches for c in contexts]):
        k_bytes = batch * bench_kcache_op.HKV * context * bench_kcache_op.D * 2
        row = dict(batch=batch, context=context)
        for tile in ("", *tiles):
            set_kernel_env("KVC_SCORE_TILE", tile)
            us = score_us(kernel_breakdown(lambda: op(*case.values(), scale, 128, "head", False), iters))
            row[f"us_{tile or 'rule'}"] = round(us, 2)
            row[f"tbps_{tile or 'rule'}"] = round(k_bytes / (us * 1e-6) / 1e12, 3) if us else None
        set_kernel_env("KVC_SCORE_TILE", None)
        fixed = {t: row[f"us_{t}"] for t in tiles}
        row["fastest_tile"] = min(fixed, key=fixed.get)
        if "2048" in fixed:
            row["rule_vs_2048"] = round(row["us_rule"] / row["us_2048"], 3)
        row["rule_vs_fastest"] = round(row["us_rule"] / fixed[row["fastest_tile"]], 3)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    set_kernel_env("KVC_PIPELINE_PARTS", None)
    return result


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 15, 30])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiles", nargs="+", default=list(TILES), help="fixed tiles timed beside the rule")
    run_sweep(parser, "score_tiles.json", lambda args: run(args.batches, args.contexts, args.iters, args.tiles))


if __name__ == "__main__":
    main()
