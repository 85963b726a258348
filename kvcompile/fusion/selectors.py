"""Which chunk tokens fusion recomputes: four strategies, one interface.

Each selector ranks the chunk tokens (all chunks concatenated, in prompt order) and the fused
prefill recomputes the top `count`:
  DEVIATION       CacheBlend: the tokens whose K/V at the check layer, recomputed with attention
                  across chunks, differ most from the reused K/V (the "HKVD" tokens).
  CHUNK_HEAD      EPIC: the first tokens of every chunk after the first (where a chunk that was
                  computed alone differs most: its first tokens saw no context at all).
  QUERY_ATTENTION A³: the tokens the question attends to most at the check layer.
  GRADUAL_DEVIATION CacheBlend's gradual filtering: DEVIATION at layer 1 keeps twice the budget;
                  those candidates alone run to the check layer (2/3 of the depth by default)
                  over the fused cache, and the deviation there keeps the budget.
  QUERY_SPANS     the question alone runs over the *reused* cache up to a deep probe layer (cheap:
                  only its own tokens are computed); the chunk tokens it attends to most are seeds,
                  and each seed brings the span around it, mostly the tokens after it. Why spans:
                  measured on the reference model, what a line carries across chunks is stored a
                  few tokens after it (recomputing the line alone recovers nothing, the line and
                  the next 2 tokens recover 90%); why the reused cache: the question finds the
                  right line by its own local content, which reuse keeps intact (docs/FUSION.md).
"""
from __future__ import annotations

from typing import List

import torch

from kvcompile.core.modes import NamedMode


class TokenSelector(NamedMode):
    DEVIATION = "deviation"
    CHUNK_HEAD = "chunk_head"
    QUERY_ATTENTION = "query_attention"
    QUERY_SPANS = "query_spans"
    GRADUAL_DEVIATION = "gradual_deviation"

    @property
    def needs_check_layer(self) -> bool:
        """Whether it runs the check pass over every token (the others need no graph, or only
        the question's tokens: QUERY_SPANS)."""
        return self in (TokenSelector.DEVIATION, TokenSelector.QUERY_ATTENTION, TokenSelector.GRADUAL_DEVIATION)

    def default_check_layer(self, num_layers: int) -> int:
        """CacheBlend's check layer 1; the question's probe reads a layer at 2/3 of the depth
        (the reference model's question finds its line at layers 5-7 of 8, not before)."""
        deep = (TokenSelector.QUERY_SPANS, TokenSelector.GRADUAL_DEVIATION)
        layer = (2 * num_layers) // 3 if self in deep else 1
        return min(layer, num_layers - 1)


DEFAULT_SELECTOR = TokenSelector.QUERY_SPANS
SPAN_BEFORE, SPAN_AFTER = 2, 8  # tokens around each seed (measured: 2 and 8 beat 0-1 and 3-4 after)


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


def question_attention_peaks(query, keys, scale: float, chunk_tokens: int) -> torch.Tensor:
    """[N] the largest attention probability any head of any question token gives each chunk token.

    query [1, Hq, Tq, D] (the question's queries at the probe layer), keys [1, Hkv, N + Tq, D]
    (the reused cache's N keys, then the question's own, which it sees causally). The maximum, not
    the sum: one head that looks a name up says more than many heads resting on separators.
    Soft-capping, sinks and windows are left out: this ranks tokens, it is not the layer's output.
    """
    _, Hq, Tq, D = query.shape
    Hkv, total = keys.shape[1], keys.shape[2]
    question = query.float().reshape(1, Hkv, Hq // Hkv, Tq, D)
    scores = torch.einsum("bhgtd,bhsd->bhgts", question, keys.float()) * scale
    visible = torch.ones(Tq, total, dtype=torch.bool, device=query.device).tril(total - Tq)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)[..., :chunk_tokens]
    return probs.amax(dim=(0, 1, 2, 3))


def span_tokens(score: torch.Tensor, count: int, exclude_first: int = 0, before: int = SPAN_BEFORE,
                after: int = SPAN_AFTER) -> torch.Tensor:
    """Sorted rows of the spans [seed - before, seed + after] around the best-scored seeds, taken
    in score order until `count` rows are chosen (the first chunk's rows are exact: never).

    Greedy in words: seeds in descending score; each adds its span's rows not yet chosen, in
    row order, until the budget is spent. The same rows in tensor ops, on the score's device
    (no host sync, so the recompute is enqueued while the probe still runs): a row is added by
    the best-ranked seed whose span covers it, so the greedy's order is (that seed's rank, row)
    and the choice is the `count` smallest such keys. Every row past the first chunk is its own
    seed, so exactly min(count, rows past it) are chosen."""
    total = score.shape[0]
    budget = min(count, total - exclude_first)
    device = score.device
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    order = score[exclude_first:].argsort(descending=True, stable=True)
    never = total  # a rank no seed has
    rank = torch.full((total + after + before,), never, dtype=torch.long, device=device)
    # rank of the seed at row s, stored at s + after: row r's window [r - after, r + before] of
    # seeds is then rank[r : r + after + before + 1]
    rank[exclude_first + after + order] = torch.arange(order.numel(), device=device)
    first_cover = rank.unfold(0, after + before + 1, 1).amin(dim=1)
    rows = torch.arange(total, device=device)
    key = first_cover * total + rows
    key[:exclude_first] = never * total + total  # never chosen
    return key.topk(budget, largest=False).indices.sort().values


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
