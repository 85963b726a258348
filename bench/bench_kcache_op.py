"""KCache decode op vs torch SDPA over a full K+V cache, each as a ratio to its floor.

One decode step of one layer, B=8 (--batch), 32 query / 8 KV heads, d=128, bf16, contexts 8K
and 32K.
  kcache: torch.ops.kvcompile.kcache_attention with K on the GPU and V in pinned host memory,
          a few topn, both selection modes.
  peers:  F.scaled_dot_product_attention over K and V both on the GPU (GQA, no copy), default
          dispatch and each fused backend forced (flash, efficient, cuDNN); and kvcompile's own
          full-cache decode (torch.ops.kvcompile.cached_attention, T = 1: the past through the
          backend decode_backends measured fastest, the new token merged by log-sum-exp).
Floors (measured on the running GPU by bench/floors.py, or read from --floors):
  kcache = K bytes / HBM rate + fetched V bytes / measured zero-copy gather rate for that row size
  SDPA   = (K + V bytes) / HBM rate
Each configuration is timed eagerly (what a Python caller sees, launch overhead included) and
replayed from a CUDA graph (device time). Writes kcache_op.json and kcache_op.png to --out.

    python bench/bench_kcache_op.py --out DIR            # GPU only
    python bench/bench_kcache_op.py --plot DIR/kcache_op.json   # redraw the plot only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from floors import add_floors_argument, floors_for, hbm_bytes_per_s, link_rate  # noqa: E402  (bench/ is the script's folder)

B, HQ, HKV, D = 8, 32, 8, 128
DTYPE = torch.bfloat16
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def kcache_floor_s(context: int, topn: int, select: str, elem: int = 2) -> float:
    k_bytes = B * HKV * context * D * elem
    kept = min(topn, context)
    row_bytes = D * elem if select == "head" else HKV * D * elem
    rows = B * HKV * kept if select == "head" else B * kept
    return k_bytes / hbm_bytes_per_s() + rows * row_bytes / link_rate(row_bytes)


def sdpa_floor_s(context: int, elem: int = 2) -> float:
    return 2 * B * HKV * context * D * elem / hbm_bytes_per_s()


def time_calls(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Mean ms per call over `iters` back-to-back calls after `warmup` calls (CUDA events on
    CUDA, wall clock elsewhere). Shared with the end-to-end benchmark."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    start_s = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start_s) * 1e3 / iters


def time_eager(fn, iters: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean ms per call across `iters` back-to-back calls."""
    cuda = torch.device("cuda")
    return statistics.median(time_calls(fn, cuda, 3 if i == 0 else 0, iters) for i in range(repeats))


def host_us_per_call(fn, iters: int = 50) -> float:
    """CPU µs one call takes to enqueue its work (no synchronisation inside the timed loop)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / iters


def time_graph(fn, iters: int, repeats: int = 5):
    """Same, replaying `iters` calls captured in one CUDA graph; None if capture fails."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - report, don't abort the benchmark
        print(f"  graph capture failed: {error}")
        return None
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    del graph
    return statistics.median(samples)


def kernel_breakdown(fn, iters: int = 20) -> dict:
    """Mean device µs per call of each kernel the call launches (torch profiler, CUPTI)."""
    from kernel_timeline import recorded_kernels

    return per_kernel_us(recorded_kernels(fn, iters), iters)


def per_kernel_us(kernels: list[dict], calls: int) -> dict:
    """Mean device µs per call of each kernel name (first 90 characters), longest first."""
    total = {}
    for k in kernels:
        total[k["name"][:90]] = total.get(k["name"][:90], 0.0) + k["end"] - k["start"]
    return dict(sorted(((name, round(us / calls, 2)) for name, us in total.items()), key=lambda kv: -kv[1]))


SCORE_VARIANTS = [dict(KVC_SCORE_LOADS=str(loads), KVC_SCORE_TILE=str(tile))
                  for loads in (8, 16) for tile in (1024, 2048, 4096)]


def score_sweep(case: dict, context: int, iters: int = 20) -> dict:
    """Device µs of the tensor-core score kernel for each SCORE_VARIANTS setting (the library
    reads them from the environment per call); sets the fastest for the rest of the process."""
    op = torch.ops.kvcompile.kcache_attention
    fn = lambda: op(*case.values(), D ** -0.5, 64, "head", False)  # noqa: E731
    timings = {}
    for variant in SCORE_VARIANTS:
        os.environ.update(variant)
        kernels = kernel_breakdown(fn, iters)
        score_us = sum(us for name, us in kernels.items() if "score" in name and "selection" not in name)
        key = f"loads={variant['KVC_SCORE_LOADS']} tile={variant['KVC_SCORE_TILE']}"
        timings[key] = dict(score_us=score_us, tbps=round(B * HKV * context * D * 2 / (score_us * 1e-6) / 1e12, 3))
        print(f"  score variant {key}: {score_us:.1f} µs ({timings[key]['tbps']} TB/s)", flush=True)
    best = min(SCORE_VARIANTS, key=lambda v: timings[f"loads={v['KVC_SCORE_LOADS']} tile={v['KVC_SCORE_TILE']}"]["score_us"])
    os.environ.update(best)
    return dict(context=context, timings=timings, chosen=best)


TOPN_CLUSTERS = ("1", "2", "4", "8", "")  # "": the library's own rule


def topn_cluster_sweep(fn, iters: int = 20) -> dict:
    """Device µs of the top-N select for each $KVC_TOPN_CLUSTER (CTAs per selection row on
    sm_90; read by the library per call)."""
    timings = {}
    for cluster in TOPN_CLUSTERS:
        set_kernel_env("KVC_TOPN_CLUSTER", cluster)
        kernels = kernel_breakdown(fn, iters)
        timings[cluster or "rule"] = sum(us for name, us in kernels.items() if "topn_select" in name)
    set_kernel_env("KVC_TOPN_CLUSTER", None)
    return timings


def kernel_env() -> dict:
    """The kernel library's tuning variables ($KVC_*) set when a benchmark starts, for its JSON."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("KVC_")}


def set_kernel_env(name: str, value) -> None:
    """Sets one of the kernel library's $KVC_* variables (it reads them per call); a falsy value
    (0, "", None) unsets it, leaving the choice to the library's own rule."""
    if value:
        os.environ[name] = str(value)
    else:
        os.environ.pop(name, None)


def set_gather_ctas(ctas: int) -> None:
    """The fetch's grid cap ($KVC_GATHER_CTAS); 0 leaves it to the library."""
    set_kernel_env("KVC_GATHER_CTAS", ctas)


def set_pipeline_parts(parts: int) -> None:
    """The op's batch slices ($KVC_PIPELINE_PARTS); 0 leaves them to the library's rule."""
    set_kernel_env("KVC_PIPELINE_PARTS", parts)


def run_header() -> dict:
    """What every GPU benchmark's JSON starts with: device, date, command, $KVC_* set."""
    return dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command=" ".join(sys.argv), kernel_env=kernel_env())


def sweep_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a GPU sweep script (its docstring as help, --out)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    return parser


def run_sweep(parser: argparse.ArgumentParser, json_name: str, run) -> dict:
    """main() of a GPU sweep script: parse, refuse without CUDA, result = run(args), written to
    --out/json_name; returns the result."""
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog} needs a CUDA GPU")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / json_name).write_text(json.dumps(result, indent=2, default=str))
    return result


def cases(pairs, full_cache: bool = False):
    """(batch, context, inputs) for each (batch, context) in `pairs`, in order, with the
    module's batch B set to it; one case alive at a time (freed before the next is built).
    full_cache: (batch, context, inputs, k_full, v_full), the SDPA peer's whole K and V too."""
    global B
    for batch, context in pairs:
        B = batch
        case, k_full, v_full = make_case(context)
        yield (batch, context, case, k_full, v_full) if full_cache else (batch, context, case)
        del case, k_full, v_full
        torch.cuda.empty_cache()


def make_case(context: int, seed: int = 0):
    """Inputs of one decode step: P = context - 1 cached tokens plus the new one."""
    P = context - 1
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    query = torch.randn(B, HQ, 1, D, device=dev, dtype=DTYPE, generator=g)
    key = torch.randn(B, HKV, 1, D, device=dev, dtype=DTYPE, generator=g)
    value = torch.randn(B, HKV, 1, D, device=dev, dtype=DTYPE, generator=g)
    key_cache = torch.randn(B, HKV, P, D, device=dev, dtype=DTYPE, generator=g)
    value_past = torch.randn(B, P, HKV, D, device=dev, dtype=DTYPE, generator=g)
    value_host = torch.empty(B, P, HKV, D, dtype=DTYPE, pin_memory=True)
    value_host.copy_(value_past)
    bias = torch.zeros(B, 1, 1, context, device=dev, dtype=torch.float32)
    # Full cache for the SDPA peer: K and V both on the GPU, [B, Hkv, S, D].
    k_full = torch.cat([key_cache, key], dim=2)
    v_full = torch.cat([value_past.transpose(1, 2), value], dim=2).contiguous()
    del value_past
    return dict(query=query, key=key, value=value, key_cache=key_cache, value_host=value_host,
                attn_bias=bias), k_full, v_full


def run(out_dir: Path, contexts, topns, iters: int, floors: dict, sweep: bool = False,
        pipeline_parts=(1,), breakdown_topn: int = 128, gather_caps=(0,)) -> dict:
    import kvcompile.ops  # noqa: F401  (registers the op)
    from kvcompile.ops.kcache_attention import kernels as kcache_decode

    op = torch.ops.kvcompile.kcache_attention
    scale = D ** -0.5
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kvcompile.ops.cached_attention import decode_backends

    rows, breakdowns, checks, skipped, topn_clusters, pipelined = [], {}, {}, {}, {}, {}
    header = run_header()  # at the start: the run changes $KVC_* as it goes
    sweep_result = None
    if sweep:  # on the largest context first, so every row below runs the chosen variant
        print(f"score-kernel sweep at context {max(contexts)}", flush=True)
        case, k_full, v_full = make_case(max(contexts))
        sweep_result = score_sweep(case, max(contexts))
        del case, k_full, v_full
        torch.cuda.empty_cache()
    for context in contexts:
        print(f"context {context}: building inputs", flush=True)
        case, k_full, v_full = make_case(context)
        assert kcache_decode.can_use_kernels(*case.values()), "the bench must exercise the kernels"
        q = case["query"]
        sdpa_bias = case["attn_bias"].to(DTYPE)

        # exactness of this very configuration: topn ≥ context equals full attention
        exact = op(*case.values(), scale, context, "head", False)
        want = F.scaled_dot_product_attention(q, k_full, v_full, scale=scale, enable_gqa=True)
        checks[context] = float((exact.float() - want.float()).abs().max())
        print(f"  kcache(topn=context) vs SDPA max |diff| = {checks[context]:.3g}", flush=True)

        k_bytes = k_full.numel() * k_full.element_size()
        peers = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k_full, v_full, scale=scale, enable_gqa=True),
            "sdpa_masked": lambda: F.scaled_dot_product_attention(
                q, k_full, v_full, attn_mask=sdpa_bias, scale=scale, enable_gqa=True),
        }
        for backend in SDPA_BACKENDS:
            def forced(backend=backend):
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    return F.scaled_dot_product_attention(q, k_full, v_full, scale=scale, enable_gqa=True)
            peers[f"sdpa_{backend.split('_')[0].lower()}"] = forced
        # kvcompile's full cache: past K/V [B, Hkv, P, D] (views of the same buffers) + the new token
        past_k, past_v = k_full[:, :, :-1], v_full[:, :, :-1]
        new_k, new_v = k_full[:, :, -1:], v_full[:, :, -1:]
        def kvc_full():  # one shape repeated, as in the CUDA-graph decoder: cuDNN is a candidate
            with decode_backends.static_past_length():
                return torch.ops.kvcompile.cached_attention(q, new_k, new_v, past_k, past_v, sdpa_bias, scale)
        peers["kvc_full"] = kvc_full
        full_check = float((peers["kvc_full"]().float() - want.float()).abs().max())
        print(f"  kvc_full vs SDPA max |diff| = {full_check:.3g}", flush=True)
        checks[f"{context}/kvc_full"] = full_check
        for name, fn in peers.items():
            try:
                eager, graph = time_eager(fn, iters), time_graph(fn, iters)
            except RuntimeError as error:  # a forced backend that refuses the shape
                print(f"  {name}: not run ({str(error).splitlines()[0][:160]})", flush=True)
                skipped[f"{context}/{name}"] = str(error).splitlines()[0][:300]
                continue
            floor_ms = sdpa_floor_s(context) * 1e3
            rows.append(dict(context=context, kind=name, select=None, topn=None, eager_ms=eager,
                             graph_ms=graph, floor_ms=floor_ms, hbm_bytes=2 * k_bytes,
                             host_us=host_us_per_call(fn)))
            print(f"  {name:12s} eager {eager:.4f} ms  graph {graph and round(graph, 4)} ms  "
                  f"floor {floor_ms:.4f} ms", flush=True)

        for select in ("head", "layer"):
            set_pipeline_parts(1)
            one_call = op(*case.values(), scale, 128, select, False)
            for parts, gather_ctas in [(parts, ctas) for parts in pipeline_parts
                                       for ctas in (gather_caps if parts != 1 else (0,))]:
                # batch slices pipelined inside the op (1: none, 0: its default); the fetch's grid cap
                set_pipeline_parts(parts)
                set_gather_ctas(gather_ctas)
                if parts != 1:  # the same computation per sequence: bit-identical output
                    same = torch.equal(op(*case.values(), scale, 128, select, False), one_call)
                    checks[f"{context}/{select}/parts={parts} equals one call"] = same
                    assert same, f"pipelined parts={parts} differs from one call"
                for topn in topns:
                    fn = lambda select=select, topn=topn: op(*case.values(), scale, topn, select, False)  # noqa: E731
                    eager, graph = time_eager(fn, iters), time_graph(fn, iters)
                    floor_ms = kcache_floor_s(context, topn, select) * 1e3
                    rows.append(dict(context=context, kind="kcache", select=select, topn=topn, parts=parts,
                                     gather_ctas=gather_ctas or "library", eager_ms=eager, graph_ms=graph, floor_ms=floor_ms,
                                     hbm_bytes=k_bytes, host_us=host_us_per_call(fn),
                                     plan=kcache_decode.describe(*case.values(), topn, select)))
                    print(f"  kcache {select:5s} N={topn:5d} parts={parts} gather CTAs {gather_ctas or 'lib'} eager {eager:.4f} ms  graph "
                          f"{graph and round(graph, 4)} ms  floor {floor_ms:.4f} ms", flush=True)
            set_gather_ctas(0)
            fn = lambda select=select: op(*case.values(), scale, breakdown_topn, select, False)  # noqa: E731
            key = f"{context}/{select}/{breakdown_topn}"
            for parts in pipeline_parts:  # each kernel's device time once slices overlap (it may stretch)
                if parts != 1:
                    set_pipeline_parts(parts)
                    pipelined[f"{key}/parts={parts}"] = kernel_breakdown(fn)
            set_pipeline_parts(1)  # the breakdown times each kernel of one call
            breakdowns[key] = kernel_breakdown(fn)
            topn_clusters[key] = cluster_us = topn_cluster_sweep(fn)
            print(f"  top-N select µs by CTAs per row: {cluster_us}", flush=True)
        del case, k_full, v_full
        torch.cuda.empty_cache()

    for row in rows:
        row["best_ms"] = row["graph_ms"] if row["graph_ms"] is not None else row["eager_ms"]
        row["ratio_to_floor"] = row["best_ms"] / row["floor_ms"]
    for row in rows:
        peer = min(r["best_ms"] for r in rows if r["context"] == row["context"] and r["kind"].startswith("sdpa"))
        row["vs_sdpa"] = row["best_ms"] / peer  # against the fastest SDPA variant measured
    # Host-link rate the gather kernel reached: fetched V bytes / its device time (N = 128).
    link = {}
    for key, kernels in breakdowns.items():
        context, select, topn = key.split("/")
        gather_us = sum(us for name, us in kernels.items() if "gather_kernel" in name)
        row_bytes = D * 2 if select == "head" else HKV * D * 2
        rows_fetched = B * HKV * int(topn) if select == "head" else B * int(topn)
        if gather_us:
            gbps = rows_fetched * row_bytes / (gather_us * 1e-6) / 1e9
            link[key] = dict(row_bytes=row_bytes, gather_us=gather_us, gbps=round(gbps, 1),
                             floor_gbps=round(link_rate(row_bytes) / 1e9, 1))
        score_us = sum(us for name, us in kernels.items() if "score" in name and "selection" not in name)
        if score_us:
            k_read = B * HKV * int(context) * D * 2
            link[key]["score_us"] = score_us
            link[key]["score_tbps"] = round(k_read / (score_us * 1e-6) / 1e12, 2)
            link[key]["score_vs_hbm"] = round(k_read / (score_us * 1e-6) / hbm_bytes_per_s(), 3)
    result = dict(
        **header, torch=torch.__version__,
        shape=dict(batch=B, query_heads=HQ, kv_heads=HKV, head_dim=D, dtype=str(DTYPE)),
        floors=floors, full_decode_backends=decode_backends.chosen(), skipped=skipped,
        score_sweep=sweep_result,
        exactness_max_abs_diff=checks, rows=rows, kernel_breakdown_us=breakdowns,
        topn_select_us_by_cluster=topn_clusters, pipelined_kernel_breakdown_us=pipelined,
        gather_link_rate=link,
        note="best_ms = graph replay when capture worked, else eager; vs_sdpa is against the "
             "fastest SDPA variant of the same context; host_us = CPU time to enqueue one call",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kcache_op.json").write_text(json.dumps(result, indent=2))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(contexts), figsize=(7 * len(contexts), 4.5), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        rows = [r for r in result["rows"] if r["context"] == context]
        labels = [r["kind"] if r["kind"] != "kcache" else
                  f"{r['select']} N={r['topn']}" + (f" p{r['parts'] or 'auto'}" if r.get("parts", 1) != 1 else "")
                  for r in rows]
        x = range(len(rows))
        ax.bar(x, [r["best_ms"] for r in rows], color=["tab:gray" if r["kind"] != "kcache" else
                                                        "tab:blue" if r["select"] == "head" else "tab:orange"
                                                        for r in rows], label="measured")
        ax.scatter(x, [r["floor_ms"] for r in rows], color="black", marker="_", s=400, label="floor")
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"context {context}, B={B}, {HQ}q/{HKV}kv heads, d={D}, bf16")
        ax.legend()
    fig.suptitle(f"kcache_attention vs SDPA — {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--topn", type=int, nargs="+", default=[64, 128, 256, 1024])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batch", type=int, default=B, help="sequences per step (the 8B end to end runs 30)")
    parser.add_argument("--breakdown-topn", type=int, default=128,
                        help="topn of the per-kernel breakdown (one call, and each --parts)")
    parser.add_argument("--gather-ctas", type=int, nargs="+", default=[0],
                        help="grid caps of the fetch timed for each pipelined --parts ($KVC_GATHER_CTAS; "
                             "0: the library's)")
    parser.add_argument("--plot", type=Path, help="redraw the PNG from an existing JSON and exit")
    parser.add_argument("--score-sweep", action="store_true",
                        help="time the score kernel's tuning variants first and run the rest with the fastest")
    parser.add_argument("--parts", type=int, nargs="+", default=[0],
                        help="batch slices the kcache op pipelines (its $KVC_PIPELINE_PARTS; 0: the library's "
                             "own rule), each timed")
    add_floors_argument(parser)
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_kcache_op needs a CUDA GPU")
    globals()["B"] = args.batch  # the module's shape constant, read by every helper
    result = run(args.out, args.contexts, args.topn, args.iters, floors_for(args), args.score_sweep,
                 args.parts, args.breakdown_topn, args.gather_ctas)
    if result["score_sweep"]:  # for the next benchmark of the same GPU call (bench/gpu_kcache.sh)
        chosen = result["score_sweep"]["chosen"]
        (args.out / "score_variant.env").write_text("".join(f"export {k}={v}\n" for k, v in chosen.items()))
    try:
        plot(result, args.out / "kcache_op.png")
    except ImportError as error:
        print(f"no plot ({error}); redraw with --plot")
    print(json.dumps(result["kernel_breakdown_us"], indent=1))
    print(json.dumps(result["gather_link_rate"], indent=1))


if __name__ == "__main__":
    main()
