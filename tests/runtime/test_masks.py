"""The runtime's attention bias: causal, left padding, sliding window, no fully -inf rows."""
from __future__ import annotations

import torch

from kvcompile.runtime.masks import attention_bias


def visible(bias):
    return bias[:, 0] == 0


def test_causal_with_padding_and_past():
    past_valid = torch.tensor([[False, True, True]])
    past_positions = torch.tensor([[0, 0, 1]])
    new_valid = torch.tensor([[True, True]])
    new_positions = torch.tensor([[2, 3]])
    bias = attention_bias(past_valid, past_positions, new_valid, new_positions, torch.float32)
    assert bias.shape == (1, 1, 2, 5)
    assert visible(bias)[0].tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert torch.isfinite(bias).all()


def test_padding_query_rows_stay_finite():
    new_valid = torch.tensor([[False, True]])
    bias = attention_bias(torch.zeros(1, 0, dtype=torch.bool), torch.zeros(1, 0, dtype=torch.long),
                          new_valid, torch.tensor([[0, 0]]), torch.bfloat16)
    assert visible(bias)[0, 0].tolist() == [False, False]  # hidden everywhere, but finite
    probs = torch.softmax(torch.zeros(2) + bias[0, 0, 0].float(), dim=-1)
    assert torch.isfinite(probs).all()


def test_sliding_window_hides_old_positions():
    positions = torch.arange(6)[None]
    bias = attention_bias(torch.ones(1, 4, dtype=torch.bool), positions[:, :4], torch.ones(1, 2, dtype=torch.bool),
                          positions[:, 4:], torch.float32, sliding_window=3)
    assert visible(bias)[0].tolist() == [[False, False, True, True, True, False], [False, False, False, True, True, True]]
