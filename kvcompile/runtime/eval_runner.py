"""CompiledRunner: the quality tasks' runner protocol (kvcompile.eval.runner) over a compiled model.

KCache changes only attention over *cached* positions (P > 0); a single prefill is exact. To
measure what top-N retrieval costs, `decode_tail=k` feeds the last k tokens of every prompt as
decode steps, one token at a time, so those tokens (the question, or the scored half of a
perplexity window) attend through the compressed cache, as they would in a multi-turn chat.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvcompile.core.modes import FusedPrefillMode

from kvcompile.runtime import generate as gen


class CompiledRunner:
    def __init__(self, compiled, decode_tail: int = 0, backend=None):
        self.compiled = compiled
        self.backend = backend or compiled  # anything with spec + step (torch or ONNX Runtime)
        self.decode_tail = decode_tail

    def new_cache(self, batch: int, capacity: int):
        return self.compiled.new_cache(batch, capacity)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Prefill all but the last `decode_tail` tokens, decode the rest; logits [B, T, V]."""
        tail = min(self.decode_tail, ids.shape[1] - 1)
        head = ids[:, : ids.shape[1] - tail]
        outputs = [gen.prefill(self.backend, cache, head)]
        for position in range(ids.shape[1] - tail, ids.shape[1]):
            outputs.append(gen.decode_step(self.backend, cache, ids[:, position]))
        return torch.cat(outputs, dim=1)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.compiled.device)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        return self.feed(input_ids, cache).float()

    @torch.no_grad()
    def generate_after(self, ids: torch.Tensor, cache, max_new_tokens: int, first_logits=None) -> list:
        logits = self.feed(ids, cache) if first_logits is None else first_logits
        tokens = []
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(dim=-1)
            tokens.append(next_ids)
            if step + 1 < max_new_tokens:
                logits = gen.decode_step(self.backend, cache, next_ids)
        return torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(ids.shape[0])]

    def greedy(self, prompts, max_new_tokens: int) -> list:
        """Prompts of equal length run as one batch (no padding can change a result)."""
        results: list = [None] * len(prompts)
        by_length: dict = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        for length, members in by_length.items():
            ids = torch.tensor([list(prompts[i]) for i in members], device=self.compiled.device)
            cache = self.new_cache(len(members), length + max_new_tokens)
            for row, tokens in enumerate(self.generate_after(ids, cache, max_new_tokens)):
                results[members[row]] = tokens
        return results

    @torch.no_grad()
    def greedy_fused(self, chunks, question, max_new_tokens: int, mode: str) -> list:
        device = self.compiled.device
        mode = FusedPrefillMode.parse(mode, "fused-prefill mode")
        if mode is FusedPrefillMode.FULL_PREFILL:
            joined = [t for chunk in chunks for t in chunk] + list(question)
            return self.greedy([joined], max_new_tokens)[0]
        total = sum(len(c) for c in chunks) + len(question) + max_new_tokens
        cache = self.new_cache(1, total)
        for chunk in chunks:
            prefill_isolated(self.backend, cache, torch.tensor([list(chunk)], device=device))
        question_ids = torch.tensor([list(question)], device=device)
        return self.generate_after(question_ids, cache, max_new_tokens)[0]


def prefill_isolated(backend, cache, ids: torch.Tensor, first_position: Optional[int] = None) -> torch.Tensor:
    """Prefill `ids` after the cache at its true positions but attending only to itself: full
    reuse, the KV a chunk gets when precomputed alone and re-rotated into place (the same, but for
    models whose layers see absolute positions otherwise: chunked attention, position-scaled queries)."""
    batch, tokens = ids.shape
    start = gen.next_positions(cache) if first_position is None else torch.full((batch,), first_position)
    positions = start[:, None].to(ids.device) + torch.arange(tokens, device=ids.device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    hidden_past = torch.zeros_like(cache.valid)  # the chunk sees none of the cached positions
    from kvcompile.runtime.masks import step_biases

    biases = step_biases(backend.spec, hidden_past, cache.positions, valid, positions, cache.dtype)
    past_keys, past_values = cache.past_all()
    logits, new_keys, new_values = backend.step(ids, positions, biases, past_keys, past_values)
    cache.append(new_keys, new_values, valid, positions)
    return logits
