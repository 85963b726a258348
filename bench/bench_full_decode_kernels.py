"""The full cache's decode attention (kvcompile.cached_attention: a fused kernel over the past,
then the new token merged in) beside torch SDPA over the whole cache: graph µs per call and
device µs per kernel (torch profiler), for each past-attention backend forced and the one
chosen by measurement. 32/8 heads, d=128, bf16, --batches x --contexts. Says where the full
cache's time over SDPA goes (bias preparation, the merge, launches). Writes
full_decode_kernels.json to --out.

    python bench/bench_full_decode_kernels.py --out DIR            # GPU only
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kcache_op  # noqa: E402
from bench_kcache_op import cases, kernel_breakdown, run_header, run_sweep, sweep_parser, time_graph  # noqa: E402


def peers(case: dict, k_full, v_full) -> dict:
    """name -> a call returning [B, Hq, 1, D]: SDPA over the cache with the new token, and
    kvcompile's full-cache decode (past + merge), chosen or with each backend forced."""
    import kvcompile.ops  # noqa: F401  (registers the op)
    from kvcompile.ops.cached_attention import decode_backends

    q, scale = case["query"], bench_kcache_op.D ** -0.5
    bias = case["attn_bias"].to(bench_kcache_op.DTYPE)
    past_k, past_v, new_k, new_v = k_full[:, :, :-1], v_full[:, :, :-1], k_full[:, :, -1:], v_full[:, :, -1:]

    def full(backend=None):
        if backend:
            os.environ["KVCOMPILE_DECODE_BACKEND"] = backend
        try:
            with decode_backends.static_past_length():  # one shape repeated, as in the CUDA-graph decoder
                return torch.ops.kvcompile.cached_attention(q, new_k, new_v, past_k, past_v, bias, scale)
        finally:
            os.environ.pop("KVCOMPILE_DECODE_BACKEND", None)

    calls = dict(
        sdpa=lambda: F.scaled_dot_product_attention(q, k_full, v_full, scale=scale, enable_gqa=True),
        sdpa_masked=lambda: F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=bias, scale=scale,
                                                           enable_gqa=True),
        kvc_full=full)
    for backend in decode_backends.CANDIDATES:
        calls[f"kvc_full_{backend}"] = lambda backend=backend: full(backend)
    return calls


def run(batches, contexts, iters: int) -> dict:
    from kvcompile.ops.cached_attention import decode_backends

    result = dict(run_header(), rows=[])
    for batch, context, case, k_full, v_full in cases([(b, c) for b in batches for c in contexts], full_cache=True):
        row = dict(batch=batch, context=context)
        for name, fn in peers(case, k_full, v_full).items():
            try:
                row[name] = dict(graph_us=round(time_graph(fn, iters) * 1e3, 2), kernels_us=kernel_breakdown(fn, iters))
            except RuntimeError as error:  # a forced backend that refuses the shape
                row[name] = f"not run: {str(error).splitlines()[0][:200]}"
            print(batch, context, name, row[name] if isinstance(row[name], str) else row[name]["graph_us"], flush=True)
        row["chosen"] = decode_backends.chosen()
        result["rows"].append(row)
    return result


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 15])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--iters", type=int, default=20)
    run_sweep(parser, "full_decode_kernels.json", lambda args: run(args.batches, args.contexts, args.iters))


if __name__ == "__main__":
    main()
