"""The fetch's work item: how many bytes of kept V rows one gather CTA loads at a time
($KVC_GATHER_BYTES), timed on the KCache op (CUDA-graph replay, device ms per call).

A bigger item keeps more host loads in flight per CTA (the fetch is bound by the link's
latency x loads in flight), which matters when its grid is capped so that a concurrent score
pass keeps its SMs (pipelined slices, micro-batches); it also means fewer partial sums for the
finalize kernel to add. A smaller one spreads a small fetch over more CTAs. Shapes:
  B=8, 32/8 heads, d=128, bf16, 8K and 32K, N = 64 / 128 / 512, both selection modes
  (the op benchmark's), one call each;
  --batch-large (default 30, the 8B end to end's batch) at 32K, N=512 "layer", in 1 / 2 / 4
  pipelined slices (the fetch capped as the library caps it).
Writes gather_items.json to --out.

    python bench/bench_gather_items.py --out DIR --bytes 8192 16384 32768   # GPU only
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kcache_op  # noqa: E402
from bench_kcache_op import cases, run_header, run_sweep, set_kernel_env, sweep_parser, time_graph  # noqa: E402


def time_op(case: dict, topn: int, select: str, iters: int) -> float | None:
    op = torch.ops.kvcompile.kcache_attention
    scale = bench_kcache_op.D ** -0.5
    return time_graph(lambda: op(*case.values(), scale, topn, select, False), iters)


def run(item_bytes, batch_large: int, iters: int) -> dict:
    import kvcompile.ops  # noqa: F401  (registers the op)

    result = dict(run_header(), bytes=list(item_bytes), rows=[])
    shapes = [(bench_kcache_op.B, context, select, topn, 0)
              for context in (8192, 32768) for select in ("head", "layer") for topn in (64, 128, 512)]
    shapes += [(batch_large, 32768, "layer", 512, parts) for parts in (1, 2, 4)]
    for batch, context, case in cases(sorted({s[:2] for s in shapes})):
        for _, _, select, topn, parts in (s for s in shapes if s[:2] == (batch, context)):
            set_kernel_env("KVC_PIPELINE_PARTS", parts)
            row = dict(batch=batch, context=context, select=select, topn=topn, parts=parts or "library rule")
            for size in item_bytes:
                set_kernel_env("KVC_GATHER_BYTES", size)
                row[f"ms_{size}"] = time_op(case, topn, select, iters)
            set_kernel_env("KVC_GATHER_BYTES", None)
            times = {size: row[f"ms_{size}"] for size in item_bytes if row[f"ms_{size}"]}
            row["fastest_bytes"] = min(times, key=times.get) if times else None
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    set_kernel_env("KVC_PIPELINE_PARTS", None)
    return result


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--bytes", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batch-large", type=int, default=30)
    parser.add_argument("--iters", type=int, default=10)
    run_sweep(parser, "gather_items.json", lambda args: run(args.bytes, args.batch_large, args.iters))


if __name__ == "__main__":
    main()
