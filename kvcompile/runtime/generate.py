"""The generation loop every backend shares: prefill, then greedy decode steps over a cache manager.

A backend is anything with `spec` (GraphSpec) and
    step(input_ids, position_ids, biases, past_keys, past_values) -> (logits, new_keys, new_values)
(the torch GraphModule and the ONNX Runtime session both qualify), so the cache semantics —
left padding, positions, masks, host-resident V — are written once, here and in cache.py.
`biases` is one additive mask per distinct window of the layers (masks.step_biases).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kvcompile.runtime.cache import KVCacheManager
from kvcompile.runtime.inputs import check_generation
from kvcompile.runtime.masks import step_biases
from kvcompile.runtime.microbatch import greedy_decode_in_microbatches, split_sizes
from kvcompile.runtime.sampling import Sampling, next_tokens
from kvcompile.errors import ContextLengthError, InputValidationError  # noqa: F401  (raised here)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded prompt -> position ids (as HF generate: padding gets position 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)




def run_step(backend, cache: KVCacheManager, input_ids, new_valid, new_positions) -> torch.Tensor:
    """One forward over `input_ids` [B, T] appended after the cache; returns logits [B, T, V]."""
    limit = backend.spec.max_context
    if cache.length + input_ids.shape[1] > limit:
        raise ContextLengthError(
            f"{cache.length} cached + {input_ids.shape[1]} new tokens exceed the model's context of {limit} positions"
        )
    past_keys, past_values = cache.past_all()
    biases = step_biases(backend.spec, cache.valid, cache.positions, new_valid, new_positions, cache.dtype)
    logits, new_keys, new_values = backend.step(input_ids, new_positions, biases, past_keys, past_values)
    cache.append(new_keys, new_values, new_valid, new_positions)
    return logits


def prefill(backend, cache: KVCacheManager, input_ids, attention_mask=None) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device)
    if cache.length == 0:
        positions = positions_from_mask(attention_mask)
    else:  # a continuation: positions carry on from what each sequence has cached
        positions = next_positions(cache)[:, None] + attention_mask.long().cumsum(-1) - 1
        positions = positions.clamp(min=0)
    return run_step(backend, cache, input_ids, attention_mask.bool(), positions)


def next_positions(cache: KVCacheManager) -> torch.Tensor:
    """[B] position id of each sequence's next token (= its count of real tokens)."""
    return cache.valid.long().sum(dim=1)


def decode_step(backend, cache: KVCacheManager, next_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence ([B] or [B, 1]); returns logits [B, 1, V]."""
    next_ids = next_ids.reshape(cache.batch, 1)
    positions = next_positions(cache)[:, None].to(next_ids.device)
    valid = torch.ones_like(next_ids, dtype=torch.bool)
    return run_step(backend, cache, next_ids, valid, positions)


def special_ids(config, eos_token_id=None, pad_token_id=None) -> tuple:
    """(eos, pad) from the arguments, else from the model config (a HF config or its dict)."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    if eos_token_id is None and config is not None:
        eos_token_id = get("eos_token_id")
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0]
    if pad_token_id is None and config is not None:
        pad_token_id = get("pad_token_id")
    return eos_token_id, pad_token_id


@torch.no_grad()
def generate(
    backend,
    make_cache,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    sampling: Optional[Sampling] = None,
    on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
    cuda_graph: bool = False,
    microbatches: int = 1,
) -> torch.Tensor:
    """Greedy decoding, or sampling (`sampling`). Returns prompt + new tokens [B, L + n] like HF
    generate: sequences that hit EOS are filled with `pad_token_id` (EOS when none) and the loop
    stops when all did. `on_tokens([B] ids)` is called as each step's tokens are chosen (streaming).
    cuda_graph: decode steps replay one CUDA graph of the whole step (runtime/cuda_graph.py).
    microbatches > 1 (greedy only): after one prefill, the batch decodes as that many
    micro-batches, each with its own cache rows, step and CUDA stream, so that one's host-memory
    value fetch overlaps another's HBM work (runtime/microbatch.py); the tokens are the same.
    Inputs are checked first, and a prompt that cannot fit max_new_tokens is refused up front."""
    spec = backend.spec
    check_generation(input_ids, attention_mask, spec.vocab_size, spec.max_context, max_new_tokens)
    batch, prompt_length = input_ids.shape
    parts = len(split_sizes(batch, microbatches))
    if parts > 1 and sampling is not None and sampling.do_sample:
        raise InputValidationError("microbatches > 1 decodes greedily: sampling would draw differently "
                                   "from the whole batch's draws; use do_sample=False or microbatches=1")
    cache = make_cache(batch, prompt_length + max_new_tokens)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    generator = sampling.generator(input_ids.device) if sampling is not None else None
    generated = []
    decoder = None
    logits = prefill(backend, cache, input_ids, attention_mask) if max_new_tokens else None
    if parts > 1 and max_new_tokens > 1:
        first_ids = next_tokens(logits[:, -1], None).to(input_ids.device)
        new_tokens = greedy_decode_in_microbatches(backend, cache, first_ids, parts, max_new_tokens,
                                                   eos_token_id, pad, on_tokens, capture=cuda_graph)
        return torch.cat([input_ids, new_tokens], dim=1)
    for step in range(max_new_tokens):
        next_ids = next_tokens(logits[:, -1], sampling, generator).to(input_ids.device)
        if pad is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
        generated.append(next_ids)
        if on_tokens is not None:
            on_tokens(next_ids)
        if eos_token_id is not None:
            finished |= next_ids == eos_token_id
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            if cuda_graph and decoder is None:  # captured once the prompt is in the cache
                from kvcompile.runtime.cuda_graph import CudaGraphDecoder

                decoder = CudaGraphDecoder(backend, cache)
            logits = decoder.step(next_ids) if decoder is not None else decode_step(backend, cache, next_ids)
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1) if generated else input_ids
