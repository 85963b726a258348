"""Turn a training checkpoint into the shipped model folder (bf16, HF layout).

    python -m kvcompile.reference.export_weights --ckpt .ckpt/run2 [--out kvcompile/reference/weights]
    python -m kvcompile.reference.export_weights --ckpt .ckpt/long1 --size long   # -> weights_long/

Writes config.json, generation_config.json, model.safetensors (sharded: `reference` in one
file of 15.5 MB, `reference-long` in shards of <= 15 MB) and the byte vocabulary's standard
tokenizer files (tokenizer.json, tokenizer_config.json, written by make_tokenizer.py), and
refuses a result over the size's limit (25 MB; 64 MB for the long model).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

import torch

from kvcompile.reference import LONG_WEIGHTS_DIR, WEIGHTS_DIR
from kvcompile.reference.architecture import reference_config
from kvcompile.reference.checkpoint import EXPORTED_STATE, load_checkpoint
from kvcompile.reference.make_tokenizer import write as write_tokenizer

MAX_TOTAL_BYTES = 25_000_000
MAX_SHARD = "16MB"  # one file of ~15.5 MB; a larger model would be split
# The long model: bf16 weights <= 64 MB in shards <= 15 MB (the limits).
LIMITS = {"long": (64_000_000, "15MB"), "long-tiny": (64_000_000, "15MB")}


def default_out(size: str) -> str:
    return LONG_WEIGHTS_DIR if size.startswith("long") else WEIGHTS_DIR


def export(ckpt: str, out: str | None = None, size: str = "base") -> int:
    from transformers import LlamaForCausalLM
    out = out or default_out(size)
    max_total, max_shard = LIMITS.get(size, (MAX_TOTAL_BYTES, MAX_SHARD))
    model = LlamaForCausalLM._from_config(reference_config(size), attn_implementation="sdpa")
    state, _ = load_checkpoint(ckpt, model)
    model = model.to(torch.bfloat16)
    if os.path.isdir(out):
        stale = set(glob.glob(os.path.join(out, "*.safetensors*")) + glob.glob(os.path.join(out, "*.json")))
        for old in sorted(stale):
            os.remove(old)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard, safe_serialization=True)
    write_tokenizer(out)
    # what a later job resumes from when the fp32 checkpoint cannot travel (checkpoint.EXPORTED_STATE)
    with open(os.path.join(out, EXPORTED_STATE), "w") as f:
        json.dump({key: state[key] for key in ("step", "tokens", "seconds") if key in state}, f, indent=1)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*")))
    if total > max_total:
        shutil.rmtree(out)
        raise SystemExit(f"exported folder is {total} bytes, over {max_total}")
    print(f"exported step {state['step']} to {out}: {total} bytes")
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", default=None, help="default: weights/ (base) or weights_long/ (long)")
    p.add_argument("--size", default="base")
    args = p.parse_args(argv)
    export(args.ckpt, args.out, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
