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
              + the layer's window
  softcap     0 = none, else scores become softcap · tanh(scores / softcap) before the bias
  sinks       None, or one logit per query head that joins the softmax's denominator
  returns     [B, Hq,  T, D]
GQA: query head h reads KV head h // (Hq // Hkv), as HF's repeat_kv does.
The arithmetic is kvcompile/ops/attention_math.py's; the kernels below are faster ways to it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from kvcompile.ops import attention_math
from kvcompile.ops.cached_attention import decode_backends, split_keys


def expand_kv_heads(x: Tensor, query_heads: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D], each KV head repeated for its group of query heads."""
    groups = query_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def past_then_new(past: Tensor, new: Tensor, rows: Optional[int] = None) -> Tensor:
    """[B, H, rows, D] (rows = P + T by default): the past rows, then the new ones, as two plain
    copies into one buffer, then zeros up to `rows` (zeros, not garbage: a NaN in a hidden key
    would still poison its scores' row; split_keys.py pads to whole parts).
    The past is a strided view of the cache (its capacity between heads); torch.cat's batched
    kernel for such inputs was most of the 3 ms of cats in the 8B fused prefill's profile
    (docs/fusion_profile.txt); bench/bench_fused_attention.py times both ways."""
    P, T = past.shape[2], new.shape[2]
    rows = P + T if rows is None else rows
    if P == 0 and rows == T:
        return new
    out = new.new_empty(new.shape[0], new.shape[1], rows, new.shape[3])
    out[:, :, :P].copy_(past)
    out[:, :, P:P + T].copy_(new)
    if rows > P + T:
        out[:, :, P + T:].zero_()
    return out


def split_step(query: Tensor, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
               attn_bias: Tensor, scale: float, parts: int, or_none: bool = False):
    """The op's split path on one multi-token step: past ++ new padded to whole parts, then the
    keys in `parts` merged by log-sum-exp (split_keys.py). or_none: None where the kernel
    refuses the call (split_key_attention_or_none). The op, its tests and
    bench/bench_fused_attention.py all run this one function."""
    rows = split_keys.padded_rows(key_cache.shape[2] + key.shape[2], parts)
    attend = split_keys.split_key_attention_or_none if or_none else split_keys.split_key_attention
    return attend(query, past_then_new(key_cache, key, rows), past_then_new(value_cache, value, rows),
                  attn_bias, scale, parts)


def _attention_with_lse(query: Tensor, keys: Tensor, values: Tensor, bias, scale: float):
    """Attention of [B, H, M, D] queries over the given keys, and its log-sum-exp [B, H, M].

    SDPA's public API does not return the log-sum-exp, so this calls the same ATen kernels it
    dispatches to: memory-efficient attention on CUDA (takes an additive bias, reads strided
    K/V), the flash kernel on CPU.
    """
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, keys, values, bias, True, 0.0, False, scale=scale)[:2]
        return out, lse[..., : query.shape[2]]  # the kernel pads the query axis to 32
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, keys, values, 0.0, False, attn_mask=bias, scale=scale)


def decode_attention(query: Tensor, key: Tensor, value: Tensor, key_cache: Tensor,
                     value_cache: Tensor, attn_bias: Tensor, scale: float,
                     sinks: Optional[List[float]] = None) -> Tensor:
    """One new token per sequence (T = 1) over past ++ new, without concatenating the cache.

    `torch.cat` of past and new would copy every cached key and value each step (what HF's
    DynamicCache does): three times the bytes the attention itself reads. Instead the past is
    attended on its own and the new token folded in through the log-sum-exp. The query heads
    of one KV group become the query rows of that KV head, so no kernel needs GQA support and
    no KV head is repeated. Few ops on purpose: at decode this runs once per layer per step
    and each op costs host time (profiled on H100: ~1 ms per call with 30 ops).
    Sinks need no other kernel: a sink logit z only enlarges the denominator, so the output is
    the sink-free one times exp(lse) / (exp(lse) + exp(z)) = sigmoid(lse - z).
    """
    B, Hq, _, D = query.shape
    Hkv, P = key.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    rows = query.reshape(B, Hkv, G, D)
    # The efficient kernel wants the bias's batch stride 16-element aligned (the slice of
    # [B, 1, 1, P + 1] has stride P + 1), so the past's bias goes into a padded buffer. Hidden
    # positions are raised to a quarter of the dtype's lowest value: the kernel's exp then stays
    # finite even when a whole past is hidden, whose log-sum-exp comes out far below the new
    # token's and so gets weight 0 (with dtype-min it returned an arbitrary one).
    bias_past = attn_bias.new_empty(B, 1, 1, -(-P // 16) * 16, dtype=query.dtype)[..., :P]
    low = torch.finfo(query.dtype).min / 4
    if attn_bias.dtype == query.dtype:  # one kernel (clamp, then copy_, was two: ~3 µs each on the H200)
        torch.clamp(attn_bias[:, :, :, :P], min=low, out=bias_past)
    else:  # clamp's out= does not cast
        bias_past.copy_(attn_bias[:, :, :, :P]).clamp_(min=low)
    if query.is_cuda:  # the fastest fused kernel that agrees with the efficient one (decode_backends)
        bias_rows = bias_past.expand(B, Hkv, G, P)
        backend = decode_backends.choose(rows, key_cache, value_cache, bias_rows, scale)
        out_past, lse_past = decode_backends.attend_past(backend, rows, key_cache, value_cache, bias_rows, scale)
        from kvcompile.ops.cached_attention import kernels

        if kernels.can_merge(query):  # the new token merged in one launch
            sink = _sink_logits(sinks, query.device) if sinks is not None else None
            return kernels.merge(query, key, value, out_past, lse_past, attn_bias[:, 0, 0, P], scale, sink)
    else:
        out_past, lse_past = _attention_with_lse(rows, key_cache, value_cache, bias_past.expand(B, Hkv, G, P), scale)
    # Over the one new key the output is that key's value and the log-sum-exp is its logit.
    _, logit_new = _attention_with_lse(rows, key, value, None, scale)
    logit_new = logit_new + attn_bias[:, :, 0, P:]
    lse = torch.logaddexp(lse_past, logit_new)
    weight_past = torch.exp(lse_past - lse).unsqueeze(-1)
    weight_new = torch.exp(logit_new - lse).unsqueeze(-1)
    out = torch.addcmul(out_past.float() * weight_past, value.float(), weight_new)
    if sinks is not None:
        sink = _sink_logits(sinks, query.device).reshape(1, Hkv, G)
        out = out * torch.sigmoid(lse.float() - sink).unsqueeze(-1)
    return out.to(query.dtype).reshape(B, Hq, 1, D)


_sink_cache: dict = {}


def _sink_logits(sinks, device) -> Tensor:
    """The sink logits as an fp32 tensor on `device`, uploaded once (a host->device copy per
    call would also break CUDA-graph capture)."""
    key = (tuple(sinks), str(device))
    if key not in _sink_cache:
        _sink_cache[key] = torch.tensor(sinks, dtype=torch.float32, device=device)
    return _sink_cache[key]


@torch.library.custom_op("kvcompile::cached_attention", mutates_args=())
def cached_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    attn_bias: Tensor,
    scale: float,
    softcap: float = 0.0,
    sinks: Optional[List[float]] = None,
) -> Tensor:
    if softcap > 0:  # no fused kernel applies a tanh to the scores: the definition itself
        keys, values = torch.cat([key_cache, key], dim=2), torch.cat([value_cache, value], dim=2)
        return attention_math.attention(query, keys, values, attn_bias, scale, softcap, sinks)
    if query.shape[2] == 1 and key_cache.shape[2] > 0:
        return decode_attention(query, key, value, key_cache, value_cache, attn_bias, scale, sinks)
    total = key_cache.shape[2] + key.shape[2]
    parts = split_keys.parts_for_call(query, total) if sinks is None and key_cache.shape[2] > 0 else 1
    if parts > 1:  # few queries over a long past: the keys in parts, more thread blocks (split_keys.py)
        out = split_step(query, key, value, key_cache, value_cache, attn_bias, scale, parts, or_none=True)
        if out is not None:
            return out
        # refused (once per kind of call: later ones are not split): attend unsplit below
    keys, values = past_then_new(key_cache, key), past_then_new(value_cache, value)  # [B, Hkv, P+T, D]
    if sinks is not None:
        return attention_math.attention(query, keys, values, attn_bias, scale, softcap, sinks)
    # enable_gqa lets SDPA read each KV head for its query group instead of materialising
    # Hq/Hkv copies of the whole cache every step.
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=attn_bias.to(query.dtype), scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    ).contiguous()


@cached_attention.register_fake
def _(query, key, value, key_cache, value_cache, attn_bias, scale, softcap=0.0, sinks=None):
    return torch.empty_like(query)
