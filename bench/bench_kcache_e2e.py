"""KCache end to end: decode throughput of a 1B-shaped Llama at a fixed GPU budget for the KV cache.

Runtimes, each at the largest batch whose GPU-resident cache of `--context` tokens fits `--budget-gib`:
  kvc_full          kvcompile, CacheConfig(kind="full"): K and V on the GPU
  kvc_kcache_layer  kvcompile, CacheConfig(kind="kcache", select="layer", topn=256): K on the GPU,
                    V in pinned host memory, one top-N selection shared by a layer's heads
  kvc_kcache_head   the same with select="head" (one selection per KV head, narrow host rows)
  <kvc row>_mb2     the same batch and cache decoded as 2 micro-batches whose CUDA-graph steps
                    replay concurrently on their own streams (kvcompile/runtime/microbatch.py), so
                    one's V fetch over the host link overlaps the other's HBM work; the row also
                    times the same graphs one after the other (serial_step_ms). kvc_full_mb2 is
                    the control: no host fetch to hide, so it should gain little
  <kcache row>_pK   one batch, the kcache op of every layer pipelined over K batch slices
                    ($KVC_PIPELINE_PARTS): a slice's V fetch on a side stream while the next
                    slice's scores read K; _p1 forces one slice, rows without the suffix take
                    the kernel library's own rule; _mbM_pK combines both (M micro-batches, each
                    op in K slices)
  hf_dynamic        HF model forward with a DynamicCache, one token per step (what generate runs)
  hf_offloaded      the same with the offloaded cache (transformers 5: DynamicCache(offloading=True);
                    older: OffloadedCache). Its GPU footprint is ~2 layers, so the budget allows a
                    huge batch; the batch is set by host memory instead (--offload-batches), and
                    since every step moves the whole cache over the host link its tokens/s barely
                    depends on the batch.
The caches hold synthetic K/V (random normal) for `--context` positions instead of a real prefill:
decode cost depends on the cache's shape, not its contents (top-N selection reads every score
whatever they are), and a 16K prefill of ~100 sequences would take far longer than the decode.
Each runtime: `--warmup` decode steps, then `--steps` timed steps (CUDA events);
tokens/s = batch × steps / time. The attention share of a step is timed separately: the attention
op of one layer on the same cache, × layers; it is compared with its floor, the rates measured on the running GPU (bench/floors.py):
  full / HF:  (K + V bytes) / HBM bandwidth
  kcache:     K bytes / HBM bandwidth + fetched V bytes / host-link rate for the row size
  offloaded:  (K + V bytes) / pinned host→device bandwidth

    python bench/bench_kcache_e2e.py --out DIR            # H100: 16 layers, 16K context, 24 GiB
    python bench/bench_kcache_e2e.py --tiny --out DIR     # CPU check: 2 layers, small heads, 256 ctx
    python bench/bench_kcache_e2e.py --plot DIR/kcache_e2e.json   # redraw the PNG only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kcache_op import kernel_env, set_pipeline_parts  # noqa: E402
from floors import add_floors_argument, floors_for  # noqa: E402
from kcache_e2e_runtimes import (  # noqa: E402
    GIB, Shape, attention_floor_ms, base_runtime, build_model, cache_classes,
    free_memory, microbatches_of, pipeline_parts_of,
    gpu_kv_bytes_per_token, host_kv_bytes_per_token, llama_config, run_hf, run_kvcompile,
    run_kvcompile_microbatched)


# driver ----------------------------------------------------------------------------------------
def largest_batch(name: str, shape: Shape, args) -> tuple[int, str]:
    """Largest batch whose GPU-resident cache of `context` tokens fits the budget, and why."""
    per_sequence = gpu_kv_bytes_per_token(name, shape) * args.context
    batch = int(args.budget_gib * GIB // per_sequence)
    if args.max_batch and batch > args.max_batch:
        return args.max_batch, f"--max-batch (budget allows {batch})"
    return batch, f"{args.budget_gib} GiB GPU KV budget"


def finish_row(row: dict, name: str, shape: Shape, batch: int, limit: str, args) -> dict:
    base = base_runtime(name)
    kcache = base.startswith("kvc_kcache")
    row.update(name=name, label=f"{name} B={batch}", batch=batch, batch_limited_by=limit,
               topn=args.topn if kcache else None, select=base.rsplit("_", 1)[1] if kcache else None,
               gpu_kv_bytes_per_token=gpu_kv_bytes_per_token(name, shape),
               host_kv_bytes_per_token=host_kv_bytes_per_token(name, shape))
    row["tokens_per_s"] = batch / (row["step_ms"] / 1e3)  # = batch × steps / time of the steps
    row["attention_floor_ms"] = attention_floor_ms(name, shape, batch, args.context, args.topn)
    if row.get("attention_ms") is not None:
        row["rest_ms"] = row["step_ms"] - row["attention_ms"]
        row["attention_ratio_to_floor"] = row["attention_ms"] / row["attention_floor_ms"]
    print(f"  {row['label']}: step {row['step_ms']:.2f} ms  {row['tokens_per_s']:.0f} tok/s  attention "
          f"{row.get('attention_ms', float('nan')):.2f} ms (floor {row['attention_floor_ms']:.2f})  "
          f"peak GPU {row['peak_gpu_gib'] or 0:.1f} GiB", flush=True)
    return row


def summarize(rows: list) -> dict:
    """Ratios of each kcache runtime to the full-cache runtimes, and of each micro-batched
    runtime to its single-batch one (the last row of a name wins)."""
    by_name = {r["name"]: r for r in rows}
    summary = {}
    for name in (n for n in RUNTIMES if n.startswith("kvc_kcache")):
        for peer in ("kvc_full", "hf_dynamic"):
            if name in by_name and peer in by_name:
                summary[f"{name}/{peer} tokens_per_s"] = by_name[name]["tokens_per_s"] / by_name[peer]["tokens_per_s"]
                summary[f"{name}/{peer} gpu_kv_bytes_per_token"] = (
                    by_name[name]["gpu_kv_bytes_per_token"] / by_name[peer]["gpu_kv_bytes_per_token"])
    if "kvc_full" in by_name and "hf_dynamic" in by_name:
        summary["kvc_full/hf_dynamic tokens_per_s"] = by_name["kvc_full"]["tokens_per_s"] / by_name["hf_dynamic"]["tokens_per_s"]
    for name in (n for n in by_name if base_runtime(n) != n):  # micro-batched or pipelined rows
        if base_runtime(name) in by_name:
            summary[f"{name}/{base_runtime(name)} tokens_per_s"] = (
                by_name[name]["tokens_per_s"] / by_name[base_runtime(name)]["tokens_per_s"])
        if microbatches_of(name) > 1:
            summary[f"{name} serial/overlapped step_ms"] = by_name[name]["overlap_speedup"]
    return summary


RUNTIMES = ("kvc_full", "kvc_full_mb2", "kvc_kcache_layer", "kvc_kcache_layer_mb2", "kvc_kcache_layer_mb3",
            "kvc_kcache_layer_mb2_p1", "kvc_kcache_layer_mb2_p4", "kvc_kcache_layer_mb3_p1",
            "kvc_kcache_layer_p1", "kvc_kcache_layer_p2", "kvc_kcache_layer_p4", "kvc_kcache_layer_p8", "kvc_kcache_layer_p16",
            "kvc_kcache_head", "kvc_kcache_head_mb2", "kvc_kcache_head_p1", "kvc_kcache_head_p4", "kvc_kcache_head_p8",
            "hf_dynamic", "hf_offloaded")
# runtimes that share one filled cache (same layout and batch), run in this order
CACHE_GROUPS = (tuple(n for n in RUNTIMES if n.startswith("kvc_full")),
                tuple(n for n in RUNTIMES if n.startswith("kvc_kcache")))


def run(args) -> dict:
    import kvcompile

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_config(args.model, args.context)
    model = build_model(config, device, dtype)
    shape = Shape(config, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
        model=dict(shape=args.model, layers=shape.layers, hidden=config.hidden_size, query_heads=shape.query_heads,
                   kv_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, dtype=str(dtype), weight_gib=weight_bytes / GIB),
        context=args.context, budget_gib=args.budget_gib, topn=args.topn, warmup=args.warmup, steps=args.steps,
        floors=floors_for(args) if device.type == "cuda" else None,
        transformers_caches=cache_classes(), kernels_library=kernels_library(device), kernel_env=kernel_env(), rows=[], errors={},
    )
    print(f"device {result['device']}, model {result['model']}", flush=True)

    def record(name, batch, limit, measure):
        print(f"== {name} (batch {batch}, {limit})", flush=True)
        try:
            result["rows"].append(finish_row(measure(), name, shape, batch, limit, args))
        except Exception as error:  # noqa: BLE001 - one failing runtime must not lose the others
            traceback.print_exc()
            result["errors"][f"{name} B={batch}"] = f"{type(error).__name__}: {error}"[:2000]
        result["summary"] = summarize(result["rows"])
        write_json(result, args.out)
        free_memory(device)

    wanted = args.only or RUNTIMES
    for group in CACHE_GROUPS:
        names = [name for name in group if name in wanted]
        shared = {}  # the cache the first runtime of the group fills serves the others (same layout)
        for name in names:
            base, parts = base_runtime(name), microbatches_of(name)
            batch, limit = largest_batch(base, shape, args)
            cache_config = (kvcompile.CacheConfig(kind="full") if base == "kvc_full" else
                            kvcompile.CacheConfig(kind="kcache", topn=args.topn, select=base.rsplit("_", 1)[1]))

            def measure(cache_config=cache_config, batch=batch, parts=parts, rows=len(names),
                        pipeline=pipeline_parts_of(name)):
                set_pipeline_parts(pipeline)  # without a _pK suffix (0), the library's own rule decides
                if parts > 1:
                    row, shared["cache"] = run_kvcompile_microbatched(
                        model, cache_config, batch, parts, args, device, shared.get("cache"), rows)
                else:
                    row, shared["cache"] = run_kvcompile(model, cache_config, batch, args, device,
                                                         shared.get("cache"), rows)
                row["pipeline_parts"] = pipeline or "library rule"
                return row

            record(name, batch, limit, measure)
        shared.clear()
    if "hf_dynamic" in wanted:
        batch, limit = largest_batch("hf_dynamic", shape, args)
        record("hf_dynamic", batch, limit, lambda: run_hf("hf_dynamic", model, batch, args, device))
    if "hf_offloaded" in wanted and device.type != "cuda":
        result["errors"]["hf_offloaded"] = "skipped: HF offloading needs CUDA streams"
    elif "hf_offloaded" in wanted:
        budget_batch, _ = largest_batch("hf_offloaded", shape, args)
        limit = f"host memory and time (the GPU budget alone allows {budget_batch}); link-bound at any batch"
        for batch in args.offload_batches:
            record("hf_offloaded", batch, limit, lambda batch=batch: run_hf("hf_offloaded", model, batch, args, device))
    return result


def kernels_library(device):
    """Which kernel library the kcache op loads (a pinned prebuilt one, or the source-hash cache)."""
    if device.type != "cuda":
        return None
    from kvcompile.plugins import build

    return os.environ.get("KVCOMPILE_KERNELS_LIB") or str(build.library_path(build=False))


def write_json(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kcache_e2e.json").write_text(json.dumps(result, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    # runtimes that failed still get a slot, so a missing bar reads as "not measured", not as 0
    failed = [name for name, message in result.get("errors", {}).items() if not message.startswith("skipped")]
    colors = {"kvc_full": "tab:gray", "kvc_kcache_layer": "tab:orange", "kvc_kcache_head": "tab:blue",
              "hf_dynamic": "tab:green", "hf_offloaded": "tab:purple"}
    colors.update({name: colors[base_runtime(name)] for name in RUNTIMES if name not in colors})
    hatches = ["//" if microbatches_of(r["name"]) > 1 else "" for r in rows]  # micro-batched: hatched
    labels = [r["label"] for r in rows] + [f"{name}\n(failed)" for name in failed]
    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars = left.bar(x, [r["tokens_per_s"] for r in rows], color=[colors[r["name"]] for r in rows])
    for i, r in enumerate(rows):
        left.text(i, r["tokens_per_s"], f"{r['tokens_per_s']:.0f}", ha="center", va="bottom", fontsize=8)
    for i in range(len(rows), len(labels)):
        left.text(i, 0, "not measured", ha="center", va="bottom", fontsize=8, rotation=90)
    left.set_ylabel("decode tokens/s")
    left.set_title(f"decode throughput, {result['context']} context, {result['budget_gib']} GiB GPU KV budget")
    bars += right.bar(x, [r["gpu_kv_bytes_per_token"] / 1024 for r in rows], color=[colors[r["name"]] for r in rows])
    for bar, hatch in zip(bars, hatches + hatches):
        bar.set_hatch(hatch)
    right.set_ylabel("GPU KV cache KiB per token")
    right.set_title("GPU-resident KV bytes per token")
    left.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    left.set_xlim(-0.6, len(labels) - 0.4)
    right.set_xticks(list(x), labels[: len(rows)], rotation=30, ha="right", fontsize=8)
    m = result["model"]
    fig.suptitle(f"KCache end to end — {result['device']}, Llama {m['layers']}L {m['query_heads']}q/{m['kv_heads']}kv "
                 f"heads d={m['head_dim']}, {m['dtype']}, topn={result['topn']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--tiny", action="store_true", help="2 layers, small heads, 256 context (CPU check)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    parser.add_argument("--model", choices=("1b", "8b"), default="1b",
                        help="model shape: 1b (default; KV dominates a step) or 8b (the paper's regime: "
                             "weights dominate, 32K context, 60 GiB KV budget by default)")
    parser.add_argument("--context", type=int, help="cached positions (default 16384, 8b 32768; --tiny 256)")
    parser.add_argument("--budget-gib", type=float, help="GPU KV-cache budget (default 24, 8b 60; --tiny 0.002)")
    parser.add_argument("--topn", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--offload-batches", type=int, nargs="+", help="batches for hf_offloaded (default 8 16)")
    parser.add_argument("--offload-warmup", type=int, default=2)
    parser.add_argument("--offload-steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=0, help="cap every batch (0: none)")
    parser.add_argument("--no-split", dest="split", action="store_false", help="skip the attention-op timing")
    parser.add_argument("--only", nargs="+", choices=RUNTIMES)
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="time kvcompile's decode steps eagerly only (default: eager, then replayed "
                             "from one CUDA graph per step; tokens/s from the graph)")
    parser.add_argument("--mb-priorities", type=int, nargs="+",
                        help="CUDA stream priority of each micro-batch in the _mb rows (lower first; "
                             "default all equal), e.g. -1 0")
    parser.add_argument("--profile", action="store_true",
                        help="also record the kernels of 2 CUDA-graph steps of each kvcompile row (bench/kernel_timeline.py: "
                             "device time by stage, the host link's busy share of the step) into its 'timeline'")
    add_floors_argument(parser)
    parser.add_argument("--plot", type=Path, help="redraw the PNG from an existing JSON and exit")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    defaults = {"tiny": (256, 0.002), "1b": (16384, 24.0), "8b": (32768, 60.0)}[args.model]
    args.context = args.context or defaults[0]
    args.budget_gib = args.budget_gib or defaults[1]
    args.offload_batches = args.offload_batches or ([2] if args.tiny else [8, 16])
    if args.tiny:
        args.topn = min(args.topn, 32)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    result = run(args)
    try:
        plot(result, args.out / "kcache_e2e.png")
    except ImportError as error:
        print(f"no plot ({error}); redraw with --plot")
    print(json.dumps(result["summary"], indent=1))
    if result["errors"]:
        print("errors:", json.dumps(result["errors"], indent=1))
        if any(not message.startswith("skipped") for message in result["errors"].values()):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
