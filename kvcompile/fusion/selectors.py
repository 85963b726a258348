"""Which chunk tokens fusion recomputes: three strategies, one interface.

Each selector ranks the chunk tokens (all chunks concatenated, in prompt order) and the fused
prefill recomputes the top `count`:
  DEVIATION       CacheBlend: the tokens whose K/V at the check layer, recomputed with attention
                  across chunks, differ most from the reused K/V (the "HKVD" tokens).
  CHUNK_HEAD      EPIC: the first tokens of every chunk after the first (where a chunk that was
                  computed alone differs most: its first tokens saw no context at all).
  QUERY_ATTENTION A³: the tokens the question attends to most at the check layer.
"""
from __future__ import annotations

from typing import List

import torch

from kvcompile.core.modes import NamedMode


class TokenSelector(NamedMode):
    DEVIATION = "deviation"
    CHUNK_HEAD = "chunk_head"
    QUERY_ATTENTION = "query_attention"

    @property
    def needs_check_layer(self) -> bool:
        return self is not TokenSelector.CHUNK_HEAD


def kv_deviation(new_key, new_value, old_key, old_value) -> torch.Tensor:
    """[N] squared distance per token between recomputed and reused K/V ([1, Hkv, N, D] each)."""
    return ((new_key.float() - old_key.float()) ** 2).sum(dim=(0, 1, 3)) + \
        ((new_value.float() - old_value.float()) ** 2).sum(dim=(0, 1, 3))


def query_attention(query, keys, scale: float, chunk_tokens: int) -> torch.Tensor:
    """[N] attention mass the question's tokens give each chunk token, summed over heads.

    query [1, Hq, T, D] (the check layer's queries of all N + Tq tokens), keys [1, Hkv, N + Tq, D].
    """
    _, Hq, T, D = query.shape
    Hkv = keys.shape[1]
    question = query[:, :, chunk_tokens:].float().reshape(1, Hkv, Hq // Hkv, T - chunk_tokens, D)
    scores = torch.einsum("bhgtd,bhsd->bhgts", question, keys[:, :, :chunk_tokens].float()) * scale
    return scores.softmax(dim=-1).sum(dim=(0, 1, 2, 3))


def chunk_heads(lengths: List[int], count: int) -> torch.Tensor:
    """Row indices of the first tokens of chunks 2.. (the first chunk's cache is already exact),
    as evenly as the budget allows."""
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length
    later = list(zip(starts[1:], lengths[1:]))
    if not later or count <= 0:
        return torch.zeros(0, dtype=torch.long)
    chosen: list = []
    per_chunk = -(-count // len(later))
    for start, length in later:
        chosen.extend(range(start, start + min(per_chunk, length)))
    return torch.tensor(sorted(chosen[:count]), dtype=torch.long)


def top_tokens(score: torch.Tensor, count: int, exclude_first: int = 0) -> torch.Tensor:
    """Sorted indices of the `count` highest scores (the first chunk's rows are exact: skipped)."""
    score = score.clone()
    score[:exclude_first] = float("-inf")
    count = min(count, int(torch.isfinite(score).sum()))
    return score.topk(count).indices.sort().values if count > 0 else torch.zeros(0, dtype=torch.long)
