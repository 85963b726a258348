"""Why the KCache fetch slows beside other work: one KCache op call (one slice, so its fetch
reads the host link alone in the op) timed while another stream keeps the GPU busy in one
of three ways, the fetch kernel's device time recorded by the torch profiler (CUPTI), with
the fetch's grid uncapped and capped (--gather-ctas):

  alone     nothing beside it
  ce_copy   device-to-device copies (cudaMemcpyAsync: copy engines, HBM traffic, no SMs)
  sm_copy   an elementwise kernel streaming HBM (SMs and HBM)
  gemm      a large bf16 matrix product (SMs busy, little HBM traffic)
and the op pipelined in 2 slices: the first slice's fetch beside the second's score pass,
the second's alone.

If `ce_copy` slows the fetch, HBM/crossbar contention is the cause; if only the SM-resident
kinds do, it is the SMs' memory pipeline (load slots, L1 misses in flight) the two kernels
share. Writes fetch_contention.json to --out.

    python bench/bench_fetch_contention.py --out DIR --batch 30 --topn 512   # GPU only
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kcache_op  # noqa: E402
from bench_kcache_op import run_header, run_sweep, set_kernel_env, sweep_parser  # noqa: E402
from kernel_timeline import recorded_kernels, summarize  # noqa: E402

KINDS = ("alone", "ce_copy", "sm_copy", "gemm")
BUSY_MS = 6.0  # how long the side stream's work lasts: several op calls fit inside


def side_work(kind: str, device):
    """A callable that enqueues ~BUSY_MS of `kind` work on the current stream (sized by a
    timing run), or None for 'alone'."""
    if kind == "alone":
        return None
    if kind in ("ce_copy", "sm_copy"):
        src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)  # 512 MiB
        dst = torch.empty_like(src)
        if kind == "ce_copy":
            once = lambda: dst.copy_(src)  # noqa: E731  (same device, contiguous: cudaMemcpyAsync)
        else:
            a, b = src.view(torch.bfloat16), dst.view(torch.bfloat16)
            once = lambda: torch.add(a, 1, out=b)  # noqa: E731
    elif kind == "gemm":
        x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        y = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        once = lambda: torch.mm(x, y)  # noqa: E731
    else:
        raise ValueError(kind)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    per_ms = (time.perf_counter() - start) * 1e3 / 3
    repeats = max(1, round(BUSY_MS / per_ms))

    def enqueue():
        for _ in range(repeats):
            once()
    return enqueue


def run(batch: int, context: int, topn: int, select: str, calls: int, caps) -> dict:
    import kvcompile.ops  # noqa: F401  (registers the op)

    bench_kcache_op.B = batch
    device = torch.device("cuda")
    case, _, _ = bench_kcache_op.make_case(context)
    op = torch.ops.kvcompile.kcache_attention
    scale = bench_kcache_op.D ** -0.5
    side = torch.cuda.Stream(device)
    result = dict(run_header(), batch=batch, context=context, topn=topn, select=select, runs={})
    for cap in caps:
        set_kernel_env("KVC_GATHER_CTAS", cap)
        set_kernel_env("KVC_PIPELINE_PARTS", 1)
        for kind in KINDS:
            enqueue = side_work(kind, device)

            def call(enqueue=enqueue):
                if enqueue is not None:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        enqueue()
                for _ in range(calls):
                    op(*case.values(), scale, topn, select, False)
                torch.cuda.current_stream().wait_stream(side)

            kernels = recorded_kernels(call, calls=2)
            fetch = [k["end"] - k["start"] for k in kernels if k["stage"] == "fetch"]
            row = dict(fetch_kernels=len(fetch), fetch_us_median=statistics.median(fetch) if fetch else None)
            result["runs"][f"cap={cap or 'none'}/{kind}"] = row
            print(f"cap {cap or 'none':>4} {kind:8s} fetch {row['fetch_us_median']} µs (n={len(fetch)})", flush=True)
        # the pipelined op: a slice's fetch beside the next slice's score pass, the last alone
        set_kernel_env("KVC_PIPELINE_PARTS", 2)
        timeline = summarize(recorded_kernels(lambda: op(*case.values(), scale, topn, select, False), calls=4), 4)
        piped = {k: timeline.get(k) for k in ("fetch_mean_us_beside_scores", "fetch_mean_us_alone", "span_us_per_call")}
        result["runs"][f"cap={cap or 'library'}/pipelined_2"] = piped
        print(f"cap {cap or 'library'} pipelined: {piped}", flush=True)
    set_kernel_env("KVC_GATHER_CTAS", None)
    set_kernel_env("KVC_PIPELINE_PARTS", None)
    return result


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--topn", type=int, default=512)
    parser.add_argument("--select", choices=("head", "layer"), default="layer")
    parser.add_argument("--calls", type=int, default=4, help="op calls enqueued beside each burst of side work")
    parser.add_argument("--gather-ctas", type=int, nargs="+", default=[0, 64],
                        help="fetch grid caps to run ($KVC_GATHER_CTAS; 0: none for one slice, the library's when pipelined)")
    result = run_sweep(parser, "fetch_contention.json", lambda args: run(
        args.batch, args.context, args.topn, args.select, args.calls, args.gather_ctas))
    print(json.dumps(result["runs"], indent=1))


if __name__ == "__main__":
    main()
