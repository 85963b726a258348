"""The attention arithmetic the ops share, in plain torch (float32), as their definitions use it.

  scores = q·kᵀ · scale                      query heads grouped onto their KV head (no repeat)
  scores = softcap · tanh(scores / softcap)  when softcap > 0 (Gemma 2's logit soft-capping)
  scores = scores + bias                     additive mask: 0 visible, very negative hidden
  probs  = softmax([scores, sink])[:-1]      when the layer has sinks: a learned per-head logit
                                             joins the denominator and takes no value (GPT-OSS)
GQA: query head h reads KV head h // (Hq // Hkv), as HF's repeat_kv does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

NO_SOFTCAP = 0.0


def grouped_scores(query: Tensor, keys: Tensor, scale: float, softcap: float = NO_SOFTCAP) -> Tensor:
    """query [B, Hq, T, D], keys [B, Hkv, S, D] -> float32 scores [B, Hkv, G, T, S]."""
    B, Hq, T, D = query.shape
    Hkv = keys.shape[1]
    q = query.float().reshape(B, Hkv, Hq // Hkv, T, D)
    scores = torch.einsum("bhgtd,bhsd->bhgts", q, keys.float()) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def sink_logits(sinks, query_heads: int, kv_heads: int, device) -> Optional[Tensor]:
    """Per-head sink logits as [1, Hkv, G, 1, 1] float32, or None."""
    if sinks is None:
        return None
    sinks = torch.as_tensor(sinks, dtype=torch.float32, device=device)
    return sinks.reshape(1, kv_heads, query_heads // kv_heads, 1, 1)


def softmax_with_sinks(scores: Tensor, sinks: Optional[Tensor]) -> Tensor:
    """softmax over the last axis of [B, Hkv, G, T, S], with a sink column when given."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def attention(query: Tensor, keys: Tensor, values: Tensor, bias: Optional[Tensor], scale: float,
              softcap: float = NO_SOFTCAP, sinks: Optional[Sequence[float]] = None) -> Tensor:
    """The full definition: [B, Hq, T, D] out, in query's dtype. bias broadcasts to [B, 1, T, S]."""
    B, Hq, T, _ = query.shape
    Hkv = keys.shape[1]
    scores = grouped_scores(query, keys, scale, softcap)
    if bias is not None:
        scores = scores + bias.float().unsqueeze(1)  # [B or 1, 1, 1, T, S]
    probs = softmax_with_sinks(scores, sink_logits(sinks, Hq, Hkv, query.device))
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, values.float())
    return out.reshape(B, Hq, T, values.shape[-1]).to(query.dtype)
