"""Exactness of a compiled model against transformers itself, for one family (tests and docs).

`check_family(name)` builds the family's tiny model (seeded random weights, fp32, CPU), compiles
it and either returns the refusal kvcompile gave (one line naming the layer and the feature) or
checks, with prompt + generation longer than every window in the model:
  - prefill and every decode step's logits within 1e-4 of transformers' own forward over the
    same tokens (no cache: the plainest reference), batch 1 and a left-padded batch of 3;
  - 32 greedy tokens identical: each generated token is the argmax of transformers' logits at
    the position before it (teacher-forced on our sequence, which by induction is its greedy
    sequence); each padded row is checked against transformers on that row unpadded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import kvcompile
from kvcompile.frontend.attention_capture import UnsupportedAttentionError
from kvcompile.frontend.loading import with_attention_implementation
from kvcompile.frontend.trace import TraceError
from model_families import family_config

TOLERANCE = 1e-4
PROMPT, NEW_TOKENS = 24, 32
PADDED_LENGTHS = (24, 19, 13)
REFUSALS = (UnsupportedAttentionError, TraceError)


@dataclass
class Outcome:
    family: str
    refused: Optional[str] = None  # the one-line message, when kvcompile refused the model
    max_logit_diff: float = 0.0
    windows: str = ""
    features: str = ""


def build(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = family_config(name)

    def make(implementation):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return with_attention_implementation(make).eval()


@torch.no_grad()
def run_greedy(compiled, input_ids, attention_mask=None):
    """Our prefill + NEW_TOKENS decode steps -> (ids [B, L + n], logits of every step [B, L + n - 1, V])."""
    input_ids = input_ids.to(compiled.device)
    attention_mask = attention_mask.to(compiled.device) if attention_mask is not None else None
    logits, cache = compiled.prefill(input_ids, attention_mask)
    steps, ids = [logits], [input_ids]
    for step in range(NEW_TOKENS):
        next_ids = steps[-1][:, -1].argmax(-1)
        ids.append(next_ids[:, None])
        if step + 1 < NEW_TOKENS:
            steps.append(compiled.decode_step(next_ids, cache))
    return torch.cat(ids, dim=1), torch.cat(steps, dim=1)


@torch.no_grad()
def compare_row(model, ids_row, logits_row) -> float:
    """Our tokens and logits for one unpadded sequence against transformers' forward over it."""
    expected = model(ids_row[None], use_cache=False).logits[0]  # [L + n, V]
    expected = expected[: logits_row.shape[0]]
    diff = (expected - logits_row).abs().max().item()
    generated = ids_row[-NEW_TOKENS:]
    greedy = expected[-NEW_TOKENS:].argmax(-1)
    assert torch.equal(generated, greedy), f"greedy tokens differ: {generated.tolist()} vs {greedy.tolist()}"
    return diff


def check_compiled(model, compiled, seed: int = 0) -> float:
    """Batch 1 and a left-padded batch of 3; returns the largest logit difference seen."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 256)
    prompt = torch.randint(3, vocab, (1, PROMPT), generator=generator)
    ids, logits = run_greedy(compiled, prompt)
    worst = compare_row(model, ids[0], logits[0])
    width = max(PADDED_LENGTHS)
    padded = torch.zeros(len(PADDED_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, length in enumerate(PADDED_LENGTHS):
        padded[row, width - length:] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
    ids, logits = run_greedy(compiled, padded, mask)
    for row, length in enumerate(PADDED_LENGTHS):
        start = width - length
        worst = max(worst, compare_row(model, ids[row, start:], logits[row, start:]))
    return worst


def fusion_limit_errors(compiled, docs, query, chunks, capacity: int) -> tuple:
    """On CUDA: (|fused with recompute_ratio 1 - full prefill|, |fused with ratio 0 - each doc
    prefilled alone then the query|), the two limits KV fusion must reach."""
    from kvcompile.runtime import generate as gen
    from kvcompile.runtime.eval_runner import prefill_isolated

    full = torch.cat(docs + [query])[None].cuda()
    expected, _ = compiled.prefill(full)
    fused = compiled.fusion.prefill(compiled.new_cache(1, capacity), chunks, query, recompute_ratio=1.0)
    to_prefill = (fused - expected[:, -query.shape[0]:]).abs().max().item()
    cache, offset = compiled.new_cache(1, capacity), 0
    for doc in docs:
        prefill_isolated(compiled, cache, doc[None].cuda(), first_position=offset)
        offset += doc.shape[0]
    reused = gen.prefill(compiled, cache, query[None].cuda())
    fused = compiled.fusion.prefill(compiled.new_cache(1, capacity), chunks, query, recompute_ratio=0.0)
    return to_prefill, (fused - reused).abs().max().item()


def describe(spec) -> tuple:
    windows = ", ".join(dict.fromkeys(r.window.describe() for r in spec.layers))
    features = set()
    for record in spec.layers:
        if record.softcap:
            features.add("soft-cap")
        if record.sinks:
            features.add("sinks")
        if record.positions.kind.value == "none":
            features.add("NoPE/absolute")
        elif record.positions.rotary_dims and record.positions.rotary_dims != record.head_dim:
            features.add("partial RoPE")
    return windows, ", ".join(sorted(features))


def check_family(name: str, cache: Optional[kvcompile.CacheConfig] = None) -> Outcome:
    model = build(name)
    try:
        compiled = kvcompile.compile(model, cache or kvcompile.CacheConfig())
    except REFUSALS as error:
        return Outcome(name, refused=str(error).strip().splitlines()[0])
    windows, features = describe(compiled.spec)
    return Outcome(name, max_logit_diff=check_compiled(model, compiled), windows=windows, features=features)
