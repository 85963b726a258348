"""kvcompile::kcache_attention — attention whose past values live in host memory (KCache).

The `kcache` pass replaces `cached_attention` with this op. Keys stay on the compute device;
past values stay in host memory. Each call scores the new queries against every key, keeps
the top-N positions by softmax probability and reads only those N value rows from the host.

Shapes:
  query       [B, Hq,  T, D]   compute device
  key, value  [B, Hkv, T, D]   this call's tokens, compute device
  key_cache   [B, Hkv, P, D]   past keys, compute device (may be a strided view)
  value_host  [B, P, Hkv, D]   past values in host memory, token-major: one token's values of
                               all KV heads are one row of Hkv*D elements, so a "layer"
                               selection fetches one wide row per position (the host link moves
                               wide rows far faster than narrow ones). Strides of B and P are
                               honoured (a view of a [B, P_max, Hkv, D] buffer is fine).
  attn_bias   [B, 1, T, P + T] additive float mask (0 visible, large negative hidden)
  returns     [B, Hq,  T, D]   compute device, query's dtype

Semantics (this file's torch code is the definition; the CUDA kernels must match it):
  probs = softmax(capped(q·[key_cache; key]ᵀ·scale) + bias) over all P+T positions, where
  capped is softcap · tanh(x / softcap) when softcap > 0, and a layer's sink logits (if any)
  join the softmax's denominator (kvcompile/ops/attention_math.py).
  P == 0 (prefill): plain attention over the new tokens, no selection. Rows whose every
  position is hidden (padded queries) are unspecified, as in cached_attention.
  P > 0: a score per position — select="head": per (b, KV head) the sum of probs over the
  group's query heads and the T rows; select="layer": per b the sum over all heads and rows.
  The top min(topn, P+T) positions are kept; out = Σ_kept probs·V, divided by Σ_kept probs
  when renormalize. With topn ≥ P+T this is exact attention (equals cached_attention).
GQA: query head h reads KV head h // (Hq // Hkv).

CUDA: every call over a cache (P > 0) runs the plugins library kernels (scores on tensor
cores for 16-bit dtypes, soft-capping, softmax statistics with sinks, radix top-N select,
zero-copy gather of the chosen rows from pinned host memory): decode steps (T == 1) and
prefill chunks (T > 1) of up to kernels.MAX_ROWS_PER_SELECTION query rows per selection.
Prefill (P == 0) is SDPA; larger chunks and unpinned host values run the torch code below on
the GPU, which gathers only the chosen host rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from typing import List, Optional

from kvcompile.core.modes import SelectMode
from kvcompile.ops import attention_math
from kvcompile.ops.cached_attention.definition import expand_kv_heads

SELECT_MODES = SelectMode.names()


def check_kcache_args(query, key, value, key_cache, value_host, attn_bias, topn, select) -> None:
    """Raise ValueError with a message naming the argument when the call breaks the contract."""
    if isinstance(topn, bool) or not isinstance(topn, int) or topn <= 0:
        raise ValueError(f"kcache_attention: topn must be an int ≥ 1, got {topn!r}")
    if select not in SELECT_MODES:
        raise ValueError(f"kcache_attention: select must be one of {SELECT_MODES}, got {select!r}")
    named = dict(query=query, key=key, value=value, key_cache=key_cache,
                 value_host=value_host, attn_bias=attn_bias)
    for name, t in named.items():
        if t.dim() != 4:
            raise ValueError(f"kcache_attention: {name} must be 4-D, got shape {tuple(t.shape)}")
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    P = key_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"kcache_attention: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    expected = {
        "key": (B, Hkv, T, D),
        "value": (B, Hkv, T, D),
        "key_cache": (B, Hkv, P, D),
        "value_host": (B, P, Hkv, D),
        "attn_bias": (B, 1, T, P + T),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"kcache_attention: {name} must have shape {shape} "
                             f"(from query {tuple(query.shape)}, key {tuple(key.shape)}, "
                             f"key_cache {tuple(key_cache.shape)}), got {tuple(named[name].shape)}")
    for name in ("key", "value", "key_cache", "value_host"):
        if named[name].dtype != query.dtype:
            raise ValueError(f"kcache_attention: {name} dtype {named[name].dtype} differs from "
                             f"query dtype {query.dtype}")
    if not attn_bias.is_floating_point():
        raise ValueError(f"kcache_attention: attn_bias must be a float tensor, got {attn_bias.dtype}")
    for name in ("key", "value", "key_cache", "attn_bias"):
        if named[name].device != query.device:
            raise ValueError(f"kcache_attention: {name} is on {named[name].device} but query is on "
                             f"{query.device}; only value_host lives elsewhere")


def gather_selected_values(value_host: Tensor, value: Tensor, positions: Tensor) -> Tensor:
    """Values of the chosen positions: < P from host rows, ≥ P from this call's `value`.

    positions: [B, Hkv, N] int64 on the compute device. Only the N chosen rows are read from
    host memory (indexing happens where value_host lives), then copied to the device.
    Returns [B, Hkv, N, D] float32 on value's device.
    """
    B, Hkv, N = positions.shape
    P = value_host.shape[1]
    D = value.shape[-1]
    from_host = positions < P
    host_positions = positions.clamp(min=0, max=max(P - 1, 0)).to(value_host.device)
    b_ix = torch.arange(B, device=value_host.device).view(B, 1, 1)
    h_ix = torch.arange(Hkv, device=value_host.device).view(1, Hkv, 1)
    past = value_host[b_ix, host_positions, h_ix]  # [B, Hkv, N, D], only N rows read
    past = past.to(device=value.device, dtype=torch.float32)
    new_positions = (positions - P).clamp(min=0).unsqueeze(-1).expand(B, Hkv, N, D)
    new = value.float().gather(2, new_positions)  # [B, Hkv, N, D]
    return torch.where(from_host.unsqueeze(-1), past, new)


def kcache_attention_reference(query, key, value, key_cache, value_host, attn_bias,
                               scale: float, topn: int, select: str, renormalize: bool,
                               softcap: float = 0.0, sinks: Optional[List[float]] = None) -> Tensor:
    """The op's definition in plain torch (float32 math); runs on any device."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    P = key_cache.shape[2]
    S = P + T
    groups = Hq // Hkv
    if P == 0 and (softcap > 0 or sinks is not None):
        return attention_math.attention(query, key, value, attn_bias, scale, softcap, sinks)
    if P == 0:
        # Prefill: plain attention. The bias is clamped so a fully hidden row never becomes
        # -inf in fp16 (which would turn into NaN); SDPA keeps prefill memory-efficient on GPU.
        bias = attn_bias.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        return F.scaled_dot_product_attention(
            query, expand_kv_heads(key, Hq), expand_kv_heads(value, Hq),
            attn_mask=bias, scale=scale).contiguous()

    keys = torch.cat([key_cache, key], dim=2)  # [B, Hkv, S, D]
    scores = attention_math.grouped_scores(query, keys, scale, softcap)  # [B, Hkv, G, T, S]
    scores = scores + attn_bias.float().reshape(B, 1, 1, T, S)
    probs = attention_math.softmax_with_sinks(scores, attention_math.sink_logits(sinks, Hq, Hkv, query.device))

    if select == SelectMode.HEAD:
        position_score = probs.sum(dim=(2, 3))  # [B, Hkv, S]
    else:
        position_score = probs.sum(dim=(1, 2, 3)).unsqueeze(1).expand(B, Hkv, S)
    keep = min(topn, S)
    positions = position_score.topk(keep, dim=-1).indices  # [B, Hkv, N]

    chosen_values = gather_selected_values(value_host, value, positions)  # [B, Hkv, N, D]
    chosen_probs = probs.gather(-1, positions.view(B, Hkv, 1, 1, keep).expand(B, Hkv, groups, T, keep))
    out = torch.einsum("bhgtn,bhnd->bhgtd", chosen_probs, chosen_values)
    if renormalize:
        out = out / chosen_probs.sum(dim=-1, keepdim=True)
    return out.reshape(B, Hq, T, D).to(query.dtype)


@torch.library.custom_op("kvcompile::kcache_attention", mutates_args=())
def kcache_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_cache: Tensor,
    value_host: Tensor,
    attn_bias: Tensor,
    scale: float,
    topn: int,
    select: str,
    renormalize: bool,
    softcap: float = 0.0,
    sinks: Optional[List[float]] = None,
) -> Tensor:
    check_kcache_args(query, key, value, key_cache, value_host, attn_bias, topn, select)
    return kcache_attention_reference(query, key, value, key_cache, value_host, attn_bias,
                                      scale, topn, select, renormalize, softcap, sinks)


@kcache_attention.register_kernel("cuda")
def _kcache_attention_cuda(query, key, value, key_cache, value_host, attn_bias,
                           scale, topn, select, renormalize, softcap=0.0, sinks=None):
    # Any CUDA tensor among the args lands here (value_host usually is a pinned CPU tensor).
    check_kcache_args(query, key, value, key_cache, value_host, attn_bias, topn, select)
    from kvcompile.ops.kcache_attention import kernels

    if kernels.can_use_kernels(query, key, value, key_cache, value_host, attn_bias, select):
        return kernels.decode(query, key, value, key_cache, value_host, attn_bias,
                              scale, topn, select, renormalize, softcap, sinks)
    return kcache_attention_reference(query, key, value, key_cache, value_host, attn_bias,
                                      scale, topn, select, renormalize, softcap, sinks)


@kcache_attention.register_fake
def _(query, key, value, key_cache, value_host, attn_bias, scale, topn, select, renormalize, softcap=0.0, sinks=None):
    # Shapes may be symbolic here, so only the argument checks that need no shape guards run.
    if isinstance(topn, bool) or topn <= 0:
        raise ValueError(f"kcache_attention: topn must be an int ≥ 1, got {topn!r}")
    if select not in SELECT_MODES:
        raise ValueError(f"kcache_attention: select must be one of {SELECT_MODES}, got {select!r}")
    return query.new_empty(query.shape)
