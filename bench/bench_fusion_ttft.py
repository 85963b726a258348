"""Time to first token with KV fusion vs full prefill vs full reuse, on the GPU, in one run.

An 8B-shaped Llama (hidden 4096, 32 layers, 32/8 heads, bf16, random weights: timing only),
6 chunks × 512 tokens + a 64-token query. Chunk caches wait in pinned host memory; every fused
time includes moving them to the GPU and re-rotating their keys. Rows:
  hf_prefill       transformers (SDPA) forward over all 3136 tokens
  kvc_prefill      kvcompile's full prefill of the same tokens
  kvc_reuse        chunk caches placed, only the query computed (recompute_ratio 0)
  kvc_fuse_15      fusion, 15% of the chunk tokens recomputed (KV-deviation selector)
Floors measured in the same run: the host→device copy of the chunks' KV, and a forward of
534 tokens (15% of the chunks + the query); fusion's floor is the larger of the two.

    python bench/bench_fusion_ttft.py --out results/ [--layers 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvcompile


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = dict(out=".", layers=32, chunks=6, chunk_tokens=512, query_tokens=64, ratio=0.15, repeats=5)
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    started = time.perf_counter()
    compiled = kvcompile.compile(model)
    compile_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 32000, (args.chunk_tokens,), generator=generator) for _ in range(args.chunks)]
    query = torch.randint(0, 32000, (args.query_tokens,), generator=generator)
    full = torch.cat(docs + [query])[None].cuda()
    chunks = [compiled.precompute_chunk(d) for d in docs]
    for chunk in chunks:  # the chunk caches wait in pinned host memory
        chunk.keys = [k.cpu().pin_memory() for k in chunk.keys]
        chunk.values = [v.cpu().pin_memory() for v in chunk.values]
    kv_bytes = sum(t.numel() * t.element_size() for c in chunks for t in c.keys + c.values)
    total = full.shape[1]
    rows = {}
    with torch.no_grad():
        rows["hf_prefill"] = timed(lambda: model(full, use_cache=False, logits_to_keep=1), args.repeats)
        rows["kvc_prefill"] = timed(lambda: compiled.prefill(full), args.repeats)

        def fused(ratio):
            return lambda: compiled.fusion.prefill(compiled.new_cache(1, total), chunks, query, ratio)
        rows["kvc_reuse"] = timed(fused(0.0), args.repeats)
        rows[f"kvc_fuse_{round(args.ratio * 100)}"] = timed(fused(args.ratio), args.repeats)
        # floors: the chunks' KV over the host link, and the forward the recompute amounts to
        staging = [torch.empty_like(t, device="cuda") for c in chunks for t in c.keys + c.values]
        sources = [t for c in chunks for t in c.keys + c.values]
        copy_ms = timed(lambda: [d.copy_(s, non_blocking=True) for d, s in zip(staging, sources)], args.repeats)
        recompute_tokens = int(round(args.ratio * args.chunks * args.chunk_tokens)) + args.query_tokens
        forward_ms = timed(lambda: compiled.prefill(full[:, :recompute_tokens]), args.repeats)
    floor = max(copy_ms, forward_ms)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
        "chunks": args.chunks, "chunk_tokens": args.chunk_tokens, "query_tokens": args.query_tokens,
        "ratio": args.ratio, "compile_s": round(compile_s, 1), "chunk_kv_bytes": kv_bytes,
        "ms": {k: round(v, 2) for k, v in rows.items()},
        "floors_ms": {"host_to_device_copy": round(copy_ms, 2), f"forward_{recompute_tokens}_tokens": round(forward_ms, 2),
                      "fusion_floor": round(floor, 2)},
        "speedup_vs_hf_prefill": {k: round(rows["hf_prefill"] / v, 2) for k, v in rows.items()},
        "ratio_to_floor": {k: round(v / floor, 2) for k, v in rows.items() if k.startswith("kvc_fuse") or k == "kvc_reuse"},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_ttft.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
