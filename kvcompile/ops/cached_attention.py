"""kvcompile::cached_attention — attention of new tokens over (past cache ++ new K/V).

The `insert_kv_cache` pass replaces each model's SDPA with this op. It is functional: it
does not write the cache. The graph returns the new K/V as outputs and the runtime's cache
manager appends them to storage it owns, so the same graph serves prefill (P = 0) and
decode (T = 1) without copying the past.

Shapes:
  query       [B, Hq,  T, D]
  key, value  [B, Hkv, T, D]   this call's tokens (after RoPE / qk-norm: exactly what SDPA saw)
  key_cache   [B, Hkv, P, D]   past tokens, P may be 0
  value_cache [B, Hkv, P, D]
  attn_bias   [B, 1, T, P + T] additive (0 = visible, dtype-min = hidden); causal + padding
  returns     [B, Hq,  T, D]
GQA: query head h reads KV head h // (Hq // Hkv), as HF's repeat_kv does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def expand_kv_heads(x: Tensor, query_heads: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D], each KV head repeated for its group of query heads."""
    groups = query_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@torch.library.custom_op("kvcompile::cached_attention", mutates_args=())
def cached_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    attn_bias: Tensor,
    scale: float,
) -> Tensor:
    keys = torch.cat([key_cache, key], dim=2)  # [B, Hkv, P+T, D]
    values = torch.cat([value_cache, value], dim=2)
    # enable_gqa lets SDPA read each KV head for its query group instead of materialising
    # Hq/Hkv copies of the whole cache every step.
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=attn_bias.to(query.dtype), scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    ).contiguous()


@cached_attention.register_fake
def _(query, key, value, key_cache, value_cache, attn_bias, scale):
    return torch.empty_like(query)
