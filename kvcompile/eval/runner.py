"""The runner protocol every quality task scores through, and HFRunner (plain transformers).

A runner wraps one way of executing the model (HF eager, kvcompile's compiled torch module,
ONNX Runtime ...). Tasks only see token ids, so the same task scores all of them:

    runner.logits(input_ids: LongTensor[B, T]) -> FloatTensor[B, T, V]
    runner.greedy(prompts: list[list[int]], max_new_tokens) -> list[list[int]]   (new tokens only)
    runner.greedy_fused(chunks: list[list[int]], question: list[int], max_new_tokens, mode)
        -> list[int]
        mode "full_prefill": one causal prefill of chunks + question (the exact answer);
        mode "full_reuse":   each chunk prefilled alone at its final positions, the caches
                             concatenated with no recompute, then the question attends over all.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
from transformers import DynamicCache

from kvcompile.core.modes import FusedPrefillMode

FUSED_MODES = FusedPrefillMode.names()


class Runner(Protocol):
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]: ...

    def greedy_fused(self, chunks: Sequence[Sequence[int]], question: Sequence[int],
                     max_new_tokens: int, mode: str) -> list[int]: ...


class HFRunner:
    """Runs a transformers causal LM (e.g. LlamaForCausalLM) with DynamicCache."""

    def __init__(self, model, device: str | torch.device | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    def _ids(self, rows) -> torch.Tensor:
        return torch.as_tensor(rows, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float()

    @torch.no_grad()
    def greedy(self, prompts, max_new_tokens: int) -> list[list[int]]:
        # Prompts of equal length run as one batch, so no padding can change a result.
        results: list[list[int] | None] = [None] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length, members in by_length.items():
            ids = self._ids([list(prompts[i]) for i in members])  # [B, T]
            new = self._decode(ids, DynamicCache(), start=0, max_new_tokens=max_new_tokens)
            for row, i in enumerate(members):
                results[i] = new[row]
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def greedy_fused(self, chunks, question, max_new_tokens: int, mode: str) -> list[int]:
        mode = FusedPrefillMode.parse(mode, "fused-prefill mode")
        if mode is FusedPrefillMode.FULL_PREFILL:
            joined = [t for chunk in chunks for t in chunk] + list(question)
            return self.greedy([joined], max_new_tokens)[0]
        cache, length = self.reused_cache(chunks)
        return self._decode(self._ids([list(question)]), cache, start=length,
                            max_new_tokens=max_new_tokens)[0]

    @torch.no_grad()
    def question_logits(self, chunks, question, mode: str) -> torch.Tensor:
        """Logits [Tq, V] at the question's positions under `mode` (for KL-style comparisons)."""
        length = sum(len(c) for c in chunks)
        mode = FusedPrefillMode.parse(mode, "fused-prefill mode")
        if mode is FusedPrefillMode.FULL_PREFILL:
            joined = [t for chunk in chunks for t in chunk] + list(question)
            return self.logits(self._ids([joined]))[0, length:]
        cache, _ = self.reused_cache(chunks)
        positions = torch.arange(length, length + len(question), device=self.device)
        out = self.model(input_ids=self._ids([list(question)]), position_ids=positions[None],
                         cache_position=positions, past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    @torch.no_grad()
    def reused_cache(self, chunks) -> tuple[DynamicCache, int]:
        """Each chunk prefilled alone at its final positions; caches concatenated per layer."""
        per_chunk: list[DynamicCache] = []
        offset = 0
        for chunk in chunks:
            ids = self._ids([list(chunk)])  # [1, Tc]
            positions = torch.arange(offset, offset + ids.shape[1], device=self.device)[None]
            cache = DynamicCache()
            # cache_position indexes the (empty) cache, position_ids drive RoPE.
            self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(ids.shape[1], device=self.device))
            per_chunk.append(cache)
            offset += ids.shape[1]
        fused = DynamicCache()
        for layer in range(len(per_chunk[0].layers)):
            # keys/values: [1, Hkv, Tc, D] each, concatenated along T
            keys = torch.cat([c.layers[layer].keys for c in per_chunk], dim=2)
            values = torch.cat([c.layers[layer].values for c in per_chunk], dim=2)
            fused.update(keys, values, layer)
        return fused, offset

    def _decode(self, ids: torch.Tensor, cache: DynamicCache, start: int,
                max_new_tokens: int) -> list[list[int]]:
        """Feed ids [B, T] at positions start.., then greedy-decode max_new_tokens."""
        batch = ids.shape[0]
        new_tokens: list[torch.Tensor] = []
        position = start
        step_ids = ids
        for _ in range(max_new_tokens):
            length = step_ids.shape[1]
            positions = torch.arange(position, position + length, device=self.device)
            out = self.model(input_ids=step_ids, position_ids=positions[None].expand(batch, -1),
                             cache_position=positions, past_key_values=cache, use_cache=True)
            next_token = out.logits[:, -1].argmax(dim=-1)  # [B]
            new_tokens.append(next_token)
            position += length
            step_ids = next_token[:, None]
        if not new_tokens:
            return [[] for _ in range(batch)]
        return torch.stack(new_tokens, dim=1).tolist()
