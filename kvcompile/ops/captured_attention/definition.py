"""kvcompile::captured_attention — one layer's attention as transformers called it, captured whole.

kvcompile's attention function (kvcompile/frontend/attention_capture.py) is what a model loaded
with attn_implementation="kvcompile" calls in each layer; it calls this op, so torch.export keeps
ONE node per layer whose constant arguments are the layer's facts. `find_attention` reads them
into the layer's record and `insert_kv_cache` replaces the node; it never reaches a target.

Shapes:
  query  [B, Hq, T, D]   after RoPE / qk-norm, as the model computed it
  key    [B, Hkv, S, D]  keys per KV head (transformers expands GQA later); S = T when traced
  value  [B, Hkv, S, D]
  sinks  [Hq] or None    learned per-head sink logits
  returns [B, Hq, T, D]
Facts: scale; softcap (0 = none); window (0 = none: a key is visible when q_pos - k_pos < window);
chunk (0 = none: visible when q_pos // chunk == k_pos // chunk); causal; layer (module.layer_idx).
Positions are indices: key s at s, query t at S - T + t (the traced function has no cache and
no padding, so S = T there).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops import attention_math


def visible(tokens: int, keys: int, window: int, chunk: int, causal: bool, device) -> Tensor:
    """[T, S] bool: query t (at position S - T + t) may attend key s (masking_utils' rules, no padding)."""
    q = torch.arange(keys - tokens, keys, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    seen = torch.ones(tokens, keys, dtype=torch.bool, device=device)
    if causal:
        seen &= k <= q
    if window > 0:
        seen &= (q - k) < window
    if chunk > 0:
        seen &= torch.div(q, chunk, rounding_mode="floor") == torch.div(k, chunk, rounding_mode="floor")
    return seen


@torch.library.custom_op("kvcompile::captured_attention", mutates_args=())
def captured_attention(query: Tensor, key: Tensor, value: Tensor, sinks: Optional[Tensor], scale: float,
                       softcap: float, window: int, chunk: int, causal: bool, layer: int) -> Tensor:
    tokens, keys = query.shape[2], key.shape[2]
    bias = torch.zeros(tokens, keys, device=query.device)
    bias.masked_fill_(~visible(tokens, keys, window, chunk, causal, query.device), torch.finfo(torch.float32).min)
    return attention_math.attention(query, key, value, bias[None, None], scale, softcap, sinks)


@captured_attention.register_fake
def _(query, key, value, sinks, scale, softcap, window, chunk, causal, layer):
    return query.new_empty(*query.shape[:-1], value.shape[-1])
