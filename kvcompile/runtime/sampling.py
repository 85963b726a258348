"""Choosing the next token: greedy, or sampling with transformers' semantics.

Sampling applies, in transformers' `generate` order, temperature (logits / t), top-k (keep the k
largest logits) and top-p (keep the smallest set of tokens whose probability reaches p, at
least one), then draws from the softmax with `torch.multinomial`. With the same seed and the
same logits it draws what transformers draws. Defaults are transformers' GenerationConfig's
(temperature 1, top-k 50, top-p 1); top_k 0 or None turns top-k off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvcompile.errors import InputValidationError


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise InputValidationError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0):
            raise InputValidationError(f"top_k must be an int ≥ 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputValidationError(f"top_p must lie in (0, 1], got {self.top_p}")

    def generator(self, device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[B, V] float logits with temperature, top-k and top-p applied (filtered ones at -inf)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        k = min(int(sampling.top_k), scores.shape[-1])
        threshold = torch.topk(scores, k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - sampling.top_p)
        remove_sorted[..., -1:] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, sampling: Optional[Sampling], generator=None) -> torch.Tensor:
    """[B, V] last-position logits -> [B] token ids."""
    if sampling is None or not sampling.do_sample:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, sampling).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
