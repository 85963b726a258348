"""Decode throughput: ONNX Runtime (CPU) backend vs the torch CPU runtime, same graphs, same loop.

Run:
    python bench/bench_onnxruntime.py --out onnxruntime_bench.json
Both backends run the same greedy loop and cache managers (kvcompile.runtime.generate); only
`step` differs. Timed: decode steps only (after prefill and a warm-up), fp32, the same number
of intra-op threads for both (default 1: on a shared 2-core machine, spinning OpenMP workers of
a 2-thread run collapse under other processes' load and measure the neighbours, not us).
Rounds alternate the backends; the best round of each is reported (least disturbed), with all
samples kept in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

import kvcompile
from kvcompile.core.pipeline import compile as compile_model
from kvcompile.export.onnx_target import export_onnx
from kvcompile.runtime import generate as gen
from kvcompile.runtime.onnxruntime import load_onnx_artifact


def reference_model():
    from kvcompile.frontend.loading import LoadError, load_model

    try:
        return load_model("reference"), "reference (trained weights)"
    except (LoadError, FileNotFoundError, OSError):
        from transformers import AutoModelForCausalLM

        from kvcompile.reference.architecture import reference_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(reference_config("base"), attn_implementation="sdpa")
        return model.eval(), "reference shape (random weights)"


@torch.no_grad()
def decode_tokens_per_second(backend, batch, prompt_length, steps, warmup=8):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (batch, prompt_length), generator=generator)
    cache = backend.new_cache(batch, prompt_length + steps + warmup)
    logits = gen.prefill(backend, cache, input_ids)
    next_ids = logits[:, -1].argmax(-1)
    for _ in range(warmup):
        next_ids = gen.decode_step(backend, cache, next_ids)[:, -1].argmax(-1)
    started = time.perf_counter()
    for _ in range(steps):
        next_ids = gen.decode_step(backend, cache, next_ids)[:, -1].argmax(-1)
    elapsed = time.perf_counter() - started
    return batch * steps / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="onnxruntime_bench.json")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--topn", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    threads = args.threads
    torch.set_num_threads(threads)
    model, model_name = reference_model()
    rows = []
    for kind in ("full", "kcache"):
        compiled = compile_model(model, kvcompile.CacheConfig(kind=kind, topn=args.topn))
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            artifact = export_onnx(compiled, Path(folder) / kind)
            export_seconds = time.perf_counter() - started
            backend = load_onnx_artifact(artifact, intra_op_threads=threads)
            for batch in (int(b) for b in args.batches.split(",")):
                # Rounds alternate the backends so a burst of load from other processes on a
                # shared machine hits both.
                samples = {"torch": [], "ort": []}
                for _ in range(args.rounds):
                    samples["torch"].append(decode_tokens_per_second(compiled, batch, args.prompt, args.steps))
                    samples["ort"].append(decode_tokens_per_second(backend, batch, args.prompt, args.steps))
                torch_tps, ort_tps = (max(samples[k]) for k in ("torch", "ort"))
                row = dict(kind=kind, batch=batch, prompt=args.prompt, steps=args.steps,
                           torch_tokens_per_s=round(torch_tps, 1), ort_tokens_per_s=round(ort_tps, 1),
                           ort_over_torch=round(ort_tps / torch_tps, 2), export_seconds=round(export_seconds, 1),
                           samples={k: [round(v, 1) for v in vs] for k, vs in samples.items()})
                rows.append(row)
                print(json.dumps(row))
    result = dict(model=model_name, dtype="float32", threads=threads, topn=args.topn,
                  load_average=os.getloadavg(), cpus=os.cpu_count(),
                  machine=platform.processor() or platform.machine(), torch=torch.__version__,
                  onnxruntime=ort.__version__, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its plot")


def plot(rows, path: Path) -> None:
    """Grouped bars: decode tokens/s of torch and ORT for each (cache, batch, prompt) row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['kind']}\nB={r['batch']} L={r['prompt']}" for r in rows]
    x = range(len(rows))
    fig, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    axis.bar([i - 0.2 for i in x], [r["torch_tokens_per_s"] for r in rows], 0.4, label="torch runtime (CPU)")
    axis.bar([i + 0.2 for i in x], [r["ort_tokens_per_s"] for r in rows], 0.4, label="ONNX Runtime (CPU)")
    axis.set_xticks(list(x), labels)
    axis.set_ylabel("decode tokens/s")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
