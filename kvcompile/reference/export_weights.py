"""Turn a training checkpoint into the shipped model folder (bf16, HF layout).

    python -m kvcompile.reference.export_weights --ckpt .ckpt/run2 [--out kvcompile/reference/weights]

Writes config.json, generation_config.json, model.safetensors (sharded above 16 MB) and the
byte vocabulary's standard tokenizer files (tokenizer.json, tokenizer_config.json, written by
make_tokenizer.py), and refuses a result over 25 MB.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import torch

from kvcompile.reference import WEIGHTS_DIR
from kvcompile.reference.architecture import reference_config
from kvcompile.reference.checkpoint import load_checkpoint
from kvcompile.reference.make_tokenizer import write as write_tokenizer

MAX_TOTAL_BYTES = 25_000_000
MAX_SHARD = "16MB"  # one file of ~15.5 MB; a larger model would be split


def export(ckpt: str, out: str = WEIGHTS_DIR, size: str = "base") -> int:
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM._from_config(reference_config(size), attn_implementation="sdpa")
    state, _ = load_checkpoint(ckpt, model)
    model = model.to(torch.bfloat16)
    if os.path.isdir(out):
        stale = set(glob.glob(os.path.join(out, "*.safetensors*")) + glob.glob(os.path.join(out, "*.json")))
        for old in sorted(stale):
            os.remove(old)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=MAX_SHARD, safe_serialization=True)
    write_tokenizer(out)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*")))
    if total > MAX_TOTAL_BYTES:
        shutil.rmtree(out)
        raise SystemExit(f"exported folder is {total} bytes, over {MAX_TOTAL_BYTES}")
    print(f"exported step {state['step']} to {out}: {total} bytes")
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", default=WEIGHTS_DIR)
    p.add_argument("--size", default="base")
    args = p.parse_args(argv)
    export(args.ckpt, args.out, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
