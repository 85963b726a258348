"""The additive attention biases every compiled graph takes: causal, padding, and each layer's window.

The model's own mask code is removed by `insert_kv_cache`; this is its replacement, computed once
per step for each distinct window among the layers' records (a hybrid model with sliding and
full layers gets two biases, one graph input each; GraphSpec.bias_windows() lists them). Hidden positions get the dtype's most negative value rather than -inf,
so a query row with nothing visible (a left-padding position) yields a finite uniform softmax
instead of NaN that would poison the cached K/V it produces.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from kvcompile.core.records import Window, WindowKind


def attention_bias(
    past_valid: torch.Tensor,  # [B, P] bool: which cached positions hold real tokens
    past_positions: torch.Tensor,  # [B, P] int64: their position ids
    new_valid: torch.Tensor,  # [B, T] bool
    new_positions: torch.Tensor,  # [B, T] int64
    dtype: torch.dtype,
    sliding_window: Optional[int] = None,
    window: Optional[Window] = None,
) -> torch.Tensor:
    """-> [B, 1, T, P+T] bias: 0 where query t may attend key s, dtype-min elsewhere.

    Windows count positions (position ids), so they hold across left padding and cache growth:
    sliding N: q_pos - k_pos < N; chunked N: q_pos // N == k_pos // N (Llama 4's chunks)."""
    if window is None and sliding_window is not None:
        window = Window(WindowKind.SLIDING, sliding_window)
    tokens = new_valid.shape[1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=new_valid.device).tril()
    # A cached position is visible when it holds a real token at or before the query's position
    # (always the case in plain decoding; fusion recomputes tokens in the middle of a cache).
    visible_past = past_valid[:, None, :] & (past_positions[:, None, :] <= new_positions[:, :, None])  # [B, T, P]
    visible_new = new_valid[:, None, :] & causal[None]  # [B, T, T]
    visible = torch.cat([visible_past, visible_new], dim=2)
    if window is not None and window.kind is not WindowKind.NONE:
        key_positions = torch.cat([past_positions, new_positions], dim=1)[:, None, :]  # [B, 1, P+T]
        query_positions = new_positions[:, :, None]  # [B, T, 1]
        if window.kind is WindowKind.SLIDING:
            visible &= (query_positions - key_positions) < window.size
        else:
            visible &= torch.div(query_positions, window.size, rounding_mode="floor") == \
                torch.div(key_positions, window.size, rounding_mode="floor")
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[:, None]


def step_biases(spec, past_valid, past_positions, new_valid, new_positions, dtype) -> List[torch.Tensor]:
    """One bias per distinct window of the spec's layers, in the graph's input order."""
    return [attention_bias(past_valid, past_positions, new_valid, new_positions, dtype, window=window)
            for window in spec.bias_windows()]
