"""Is the cross-chunk chain learnable from training_chain_doc? A short CPU run on a short layout.

    python bench/cpu_chain_learnability.py --minutes 8 --json /tmp/chain_cpu.json

With --init, the run starts from a trained model folder (the shipped reference-long: what the
resume job starts from). Without it, a small model with the long model's attention layout (long-tiny's width, head_dim 64 and GQA
3:1, with --layers layers: two cannot hold the chain's three steps: tag a value with its name,
copy it into the `T = S` line, read it back at the question) is trained from scratch on
`chain` documents only (corpus.SequenceMixer, sequences of --seq-len tokens, so the documents
are 2-5 chunks of 48-~100 tokens), answer tokens weighted as in the GPU job. Before and after,
it is scored like the evaluation (cross_chunk.score_cross_chunk: greedy answers on held-out
evaluation-split prompts) at short layouts, under full prefill and full reuse.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def build_model(layers: int, seed: int, init: str | None = None, shape: dict | None = None):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from kvcompile.reference.architecture import reference_config
    if init:  # e.g. the shipped reference-long: the resume job's starting point
        return AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32, attn_implementation="sdpa")
    config = reference_config("long-tiny")
    config.num_hidden_layers = layers
    for key, value in (shape or {}).items():  # a narrower model: more steps per CPU minute
        setattr(config, key, value)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def score(model, layouts, count: int) -> dict:
    from kvcompile.eval import HFRunner
    from kvcompile.eval.cross_chunk import score_cross_chunk
    runner = HFRunner(model)
    out = {}
    for n_chunks, chunk_tokens in layouts:
        r = score_cross_chunk(runner, count, seed=0, n_chunks=n_chunks, chunk_tokens=chunk_tokens)
        out[f"{n_chunks}x{chunk_tokens}"] = {"chain": r["chain"], "direct": r["direct"]}
    model.train()
    return out


def main(argv=None) -> int:
    from kvcompile.reference import corpus
    from kvcompile.reference.corpus import SequenceMixer
    from kvcompile.reference.train import _weighted
    from kvcompile.eval.splits import seeded_rng

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="training wall time")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shape", default=None,
                   help="config overrides, e.g. hidden_size=64,intermediate_size=256,num_attention_heads=4,"
                        "num_key_value_heads=2,head_dim=16")
    p.add_argument("--init", default=None, help="start from this model folder instead of a random model")
    p.add_argument("--mix", default="0,0,0,0,1", help="SequenceMixer shares (default: chain documents only)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--answer-weight", type=float, default=3.0)
    p.add_argument("--count", type=int, default=100, help="evaluation prompts per layout and kind")
    p.add_argument("--layouts", default="2x64,3x64", help="CHUNKSxTOKENS,... scored before and after")
    p.add_argument("--eval-every-s", type=float, default=120.0, help="a 2x64 full-prefill curve point (n=40)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layouts = [tuple(map(int, item.split("x"))) for item in args.layouts.split(",")]
    shape = {k: int(v) for k, v in (item.split("=") for item in args.shape.split(","))} if args.shape else None
    model = build_model(args.layers, args.seed, args.init, shape)
    report = {"args": vars(args), "params": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    began = time.time()
    report["before"] = score(model, layouts, args.count)
    print("before", json.dumps(report["before"]), f"({time.time() - began:.0f} s)", flush=True)

    text = np.frombuffer(corpus.text_bytes("train", 2_000_000), dtype=np.uint8)
    mixer = SequenceMixer(text, args.seq_len, tuple(float(x) for x in args.mix.split(",")))
    rng = seeded_rng("train", args.seed, 11)  # the training split's stream
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve, step, loss_sum = [], 0, 0.0
    train_began = last_eval = time.time()
    deadline = train_began + args.minutes * 60
    model.train()
    while time.time() < deadline:
        ids = torch.from_numpy(np.stack([mixer.sequence(rng)[0] for _ in range(args.batch)]))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        logits = model(input_ids=ids, use_cache=False).logits
        token_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="none").view(ids.shape[0], -1)
        loss = _weighted(token_loss, ids, args.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_sum += float(loss.detach())
        if time.time() - last_eval >= args.eval_every_s:
            point = score(model, [layouts[0]], 40)[f"{layouts[0][0]}x{layouts[0][1]}"]["chain"]
            curve.append({"step": step, "seconds": round(time.time() - train_began), "weighted_loss":
                          round(loss_sum / max(1, step - (curve[-1]["step"] if curve else 0)), 4),
                          "chain_prefill": point["full_prefill"], "chain_reuse": point["full_reuse"]})
            print(json.dumps(curve[-1]), flush=True)
            loss_sum, last_eval = 0.0, time.time()
    report.update(steps=step, tokens=step * args.batch * args.seq_len,
                  train_seconds=round(time.time() - train_began, 1), curve=curve)
    report["after"] = score(model, layouts, args.count)
    print("after", json.dumps(report["after"]), f"({report['train_seconds']} s of training, {step} steps)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
