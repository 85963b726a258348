"""The additive attention bias every compiled graph takes: causal, padding and sliding window.

The model's own mask code is removed by `insert_kv_cache`; this is its replacement, computed once
per step for all layers. Hidden positions get the dtype's most negative value rather than -inf,
so a query row with nothing visible (a left-padding position) yields a finite uniform softmax
instead of NaN that would poison the cached K/V it produces.
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_bias(
    past_valid: torch.Tensor,  # [B, P] bool: which cached positions hold real tokens
    past_positions: torch.Tensor,  # [B, P] int64: their position ids
    new_valid: torch.Tensor,  # [B, T] bool
    new_positions: torch.Tensor,  # [B, T] int64
    dtype: torch.dtype,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    """-> [B, 1, T, P+T] bias: 0 where query t may attend key s, dtype-min elsewhere."""
    tokens = new_valid.shape[1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=new_valid.device).tril()
    visible_past = past_valid[:, None, :].expand(-1, tokens, -1)  # [B, T, P]
    visible_new = new_valid[:, None, :] & causal[None]  # [B, T, T]
    visible = torch.cat([visible_past, visible_new], dim=2)
    if sliding_window is not None:
        key_positions = torch.cat([past_positions, new_positions], dim=1)  # [B, P+T]
        distance = new_positions[:, :, None] - key_positions[:, None, :]
        visible &= distance < sliding_window
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[:, None]
