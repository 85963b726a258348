"""Time to first token with KV fusion vs full prefill (ours and transformers') vs full reuse, in one run.

An 8B-shaped Llama (hidden 4096, 32 layers, 32/8 heads, bf16, random weights: timing only),
6 chunks × 512 tokens + a 64-token query. Chunk caches wait in pinned host memory; every fused
time includes moving them to the GPU (layer by layer, overlapped: kvcompile/fusion/loading.py)
and re-rotating their keys, and ends with the first token's logits. Rows (ms, best of --repeats):
  hf_prefill             transformers (SDPA) forward over all tokens, logits_to_keep=1
  kvc_prefill            kvcompile's prefill as generate runs it (causal kernel, last logits)
  kvc_prefill_all_logits the public CompiledModel.prefill, which returns every position's logits
  kvc_reuse              chunk caches placed, only the query computed (recompute_ratio 0)
  kvc_fuse_15            fusion, 15% recomputed, the default selector (query_spans); its probe and
                         recompute replayed from CUDA graphs (fusion/graph_replay.py: best of
                         --repeats, so after the first sight of the shape captured them)
  kvc_fuse_15_eager      the same without CUDA graphs: every op launched from Python (what a
                         shape seen for the first time costs)
  kvc_fuse_15_deviation  fusion, 15% recomputed, CacheBlend's KV deviation at check layer 1
  kvc_fuse_15_spans_checkN  the default selector with its probe at layer N = half the depth
  kvc_fuse_5             fusion, 5% recomputed, the default selector
  kvc_place              the chunk caches' loading and re-rotation alone
  kvc_fuse_15_codecL     kvc_fuse_15 from KV-codec bitstreams at level L in host memory: the
                         bitstreams go to the GPU and are decoded there, then fused (the six
                         chunks share one chunk's bitstream: the encoder runs on the CPU and
                         decode time does not depend on the values)
Floors measured in the same run: the host→device copy of the chunks' raw KV, and a standalone
forward of the tokens fusion recomputes (15% of the chunks + the query; the faster of ours and
transformers'); fusion's floor is the larger. Every row is also given as a ratio to that floor.
The eager forward is launched op by op from Python, which on a slow host takes longer than its
GPU work (H200 machine, 2026-11-29: 48 ms for ~20 ms of kernels), so the forward is also timed
replayed from a CUDA graph (HF's, static input; `graph_forward`), and when that capture works the
floor uses it: the GPU's time, not the host's.

    python bench/bench_fusion_ttft.py --out results/ [--layers 32] [--repeats 5] [--codec-levels 2]
    python bench/bench_fusion_ttft.py --device cpu --tiny --out /tmp/x   # a smoke run of the code paths
Writes fusion_ttft.json and fusion_ttft.png into --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch

import kvcompile

TINY = dict(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vocab=512, chunks=3, chunk_tokens=48,
            query_tokens=8, repeats=2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of `fn` in ms, the device drained before and after each call."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = dict(out=".", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                    chunks=6, chunk_tokens=512, query_tokens=64, ratio=0.15, repeats=5, device="cuda",
                    codec_levels="2")
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke run, e.g. on the CPU)")
    parser.add_argument("--trace", action="store_true", help="with --profile: also write each profiled call's "
                        "timeline (fusion_trace_ROW.json.gz, Chrome trace format)")
    parser.add_argument("--profile", default="", help="comma-separated rows to profile once each (torch.profiler): "
                        "writes fusion_profile.txt (host vs device time, top ops) into --out")
    args = parser.parse_args()
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    return args


def build_model(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def main() -> int:
    args = arguments()
    device = torch.device(args.device)
    model = build_model(args, device)
    started = time.perf_counter()
    compiled = kvcompile.compile(model)
    compile_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(1)
    vocab = min(args.vocab, 32000)
    docs = [torch.randint(0, vocab, (args.chunk_tokens,), generator=generator) for _ in range(args.chunks)]
    query = torch.randint(0, vocab, (args.query_tokens,), generator=generator).to(device)
    full = torch.cat(docs + [query.cpu()])[None].to(device)
    total = full.shape[1]
    chunks = []
    for doc in docs:  # the chunk caches wait in (pinned) host memory
        chunks.append(compiled.precompute_chunk(doc).pin())  # one pinned buffer per chunk
    kv_bytes = sum(t.numel() * t.element_size() for c in chunks for t in c.keys + c.values)
    fusion = compiled.fusion
    rows, notes = {}, {}

    profiled = [name for name in args.profile.split(",") if name]
    profiles = []

    def run(name, fn):
        rows[name] = timed(fn, device, args.repeats)
        print(f"{name:28s} {rows[name]:9.2f} ms", flush=True)
        if name in profiled:
            before = fusion.replays.replayed
            trace = Path(args.out) / f"fusion_trace_{name}.json" if args.trace else None
            profiles.append(profile_row(name, fn, device, trace) +
                            f"\n(CUDA-graph replays during the profiled call: {fusion.replays.replayed - before})")

    def fused(ratio, selector=None, source=chunks, check_layer=None):
        selector = selector or kvcompile.fusion.selectors.DEFAULT_SELECTOR
        return lambda: fusion.prefill(compiled.new_cache(1, total), source() if callable(source) else source, query,
                                      ratio, selector, check_layer, last_logits_only=True)

    percent = round(args.ratio * 100)
    with torch.no_grad():
        run("hf_prefill", lambda: model(full, use_cache=False, logits_to_keep=1))
        with compiled.last_logits_only():
            run("kvc_prefill", lambda: compiled.prefill(full))
        run("kvc_prefill_all_logits", lambda: compiled.prefill(full))
        run("kvc_reuse", fused(0.0))
        run(f"kvc_fuse_{percent}", fused(args.ratio))
        fusion.replays.enabled = False
        run(f"kvc_fuse_{percent}_eager", fused(args.ratio))
        fusion.replays.enabled = True
        run(f"kvc_fuse_{percent}_deviation", fused(args.ratio, "deviation", check_layer=1))
        # the default selector probing half-way down instead of at 2/3 of the depth (waits for
        # less of the transfer), and at 5% (where the reference model's quality sweep has it at
        # 90% of the gap already)
        half = args.layers // 2
        run(f"kvc_fuse_{percent}_spans_check{half}", fused(args.ratio, check_layer=half))
        run("kvc_fuse_5", fused(0.05))

        def place():
            fusion.place(compiled.new_cache(1, total), chunks).finish()
        run("kvc_place", place)
        codec_rows(args, compiled, chunks, device, fused, run, notes, percent)
        # floors: the chunks' KV over the host link, and the forward the recompute amounts to
        staging = [torch.empty_like(t, device=device) for c in chunks for t in c.keys + c.values]
        sources = [t for c in chunks for t in c.keys + c.values]
        copy_ms = timed(lambda: [d.copy_(s, non_blocking=True) for d, s in zip(staging, sources)], device,
                        args.repeats)
        recompute_tokens = int(round(args.ratio * args.chunks * args.chunk_tokens)) + args.query_tokens
        part = full[:, :recompute_tokens]
        hf_forward_ms = timed(lambda: model(part, use_cache=False, logits_to_keep=1), device, args.repeats)
        with compiled.last_logits_only():
            our_forward_ms = timed(lambda: compiled.prefill(part), device, args.repeats)
        graph_forward_ms = graph_forward(model, part, device, args.repeats)
    forward_ms = min(hf_forward_ms, our_forward_ms, graph_forward_ms or float("inf"))
    floor = max(copy_ms, forward_ms)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")},
        "chunks": args.chunks, "chunk_tokens": args.chunk_tokens, "query_tokens": args.query_tokens,
        "ratio": args.ratio, "repeats": args.repeats, "compile_s": round(compile_s, 1), "chunk_kv_bytes": kv_bytes,
        "ms": {k: round(v, 2) for k, v in rows.items()},
        "floors_ms": {"host_to_device_copy": round(copy_ms, 2),
                      f"hf_forward_{recompute_tokens}_tokens": round(hf_forward_ms, 2),
                      f"kvc_forward_{recompute_tokens}_tokens": round(our_forward_ms, 2),
                      f"hf_forward_{recompute_tokens}_tokens_cuda_graph":
                          round(graph_forward_ms, 2) if graph_forward_ms else None,
                      "fusion_floor": round(floor, 2)},
        "speedup_vs_hf_prefill": {k: round(rows["hf_prefill"] / v, 2) for k, v in rows.items()},
        "ratio_to_floor": {k: round(v / floor, 2) for k, v in rows.items()},
        "notes": notes, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_ttft.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "fusion_ttft.png")
    if profiles:
        (out / "fusion_profile.txt").write_text("\n\n".join(profiles) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def graph_forward(model, ids, device: torch.device, repeats: int):
    """ms of transformers' forward over `ids` replayed from a CUDA graph (None on the CPU or when
    the capture fails): the forward's GPU time without the host's launches."""
    if device.type != "cuda":
        return None
    from kvcompile.runtime.cuda_graph import capture_graph

    try:
        graph, _ = capture_graph(lambda: model(ids, use_cache=False, logits_to_keep=1), device)
        return timed(graph.replay, device, repeats)
    except RuntimeError as error:
        print(f"graph forward not measured: {str(error).splitlines()[0] if str(error) else error}", flush=True)
        return None


def codec_rows(args, compiled, chunks, device, fused, run, notes, percent) -> None:
    """kvc_fuse_<ratio>_codec<L>: fusion from bitstreams in host memory, decoded on the device."""
    for level in [int(x) for x in args.codec_levels.split(",") if x.strip()]:
        name = f"kvc_fuse_{percent}_codec{level}"
        try:
            started = time.perf_counter()
            blob = chunks[0].encode(level)
            notes[f"codec{level}_encode_s"] = round(time.perf_counter() - started, 1)
            notes[f"codec{level}_bytes_per_chunk"] = len(blob)
            notes[f"codec{level}_raw_bytes_per_chunk"] = sum(t.numel() * t.element_size()
                                                            for t in chunks[0].keys + chunks[0].values)

            def decoded():  # the codec reads the bitstream from host memory and decodes it on the device
                return [chunk.with_decoded(blob, device) for chunk in chunks]
            run(name, fused(args.ratio, source=decoded))
        except Exception as error:  # noqa: BLE001  (a row that cannot run is reported, the others stand)
            notes[name] = f"not measured: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{name}: {notes[name]}", flush=True)


def profile_row(name: str, fn, device: torch.device, trace: Optional[Path] = None) -> str:
    """One call of a row under torch.profiler: its wall time beside the time the device was busy
    (kernels + copies) and the host ops dispatched, then the top ops by host and by device time —
    says whether a row waits on the GPU or on the Python that launches its work."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    if trace is not None:  # the timeline, gzipped: which stream waits for what (bench/trace_gaps.py reads it)
        import gzip

        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            packed.write(raw.read())
        trace.unlink()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA")
    host_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    lines = [f"== {name}: wall {wall_ms:.2f} ms (under the profiler), device busy {device_us / 1e3:.2f} ms, "
             f"{launches} kernels/copies, {host_ops} aten ops on the host"]
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        lines.append(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["ms"])
    values = [result["ms"][n] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(names[::-1], values[::-1], color="tab:blue")
    for bar, name in zip(bars, names[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {result['ms'][name]:.1f} ms ({result['ratio_to_floor'][name]:.2f}× floor)", va="center", fontsize=7)
    ax.axvline(result["floors_ms"]["fusion_floor"], color="black", linestyle="--", label="fusion floor")
    ax.set_xlabel("time to first token (ms)")
    shape = result["shape"]
    ax.set_title(f"KV fusion TTFT, {result['device']}, {shape['layers']} layers, {result['chunks']}×"
                 f"{result['chunk_tokens']} + {result['query_tokens']} tokens", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
