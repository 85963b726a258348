"""CompiledRunner answers exactly as the HF runner does, including full reuse of chunk caches."""
from __future__ import annotations

import torch

from tiny_models import compiled_tiny
from kvcompile.eval.runner import HFRunner
from kvcompile.runtime.eval_runner import CompiledRunner

CHUNKS = [list(range(10, 20)), list(range(30, 38)), list(range(50, 61))]
QUESTION = [5, 6, 7]


def test_fused_modes_match_hf():
    model, compiled = compiled_tiny("llama")
    hf, ours = HFRunner(model), CompiledRunner(compiled)
    for mode in ("full_prefill", "full_reuse"):
        assert ours.greedy_fused(CHUNKS, QUESTION, 8, mode) == hf.greedy_fused(CHUNKS, QUESTION, 8, mode)
    # Full reuse must differ from full prefill where it should: the first chunk's cache is the
    # same either way, later chunks' deeper-layer keys are not (they never saw earlier chunks).
    cache_a, cache_b = compiled.new_cache(1, 64), compiled.new_cache(1, 64)
    from kvcompile.runtime.eval_runner import prefill_isolated
    from kvcompile.runtime.generate import prefill

    joined = torch.tensor([[t for c in CHUNKS for t in c]])
    prefill(compiled, cache_a, joined)
    for chunk in CHUNKS:
        prefill_isolated(compiled, cache_b, torch.tensor([chunk]))
    first = len(CHUNKS[0])
    assert torch.allclose(cache_a.keys[0][:, :, :first], cache_b.keys[0][:, :, :first], atol=1e-5)
    assert not torch.allclose(cache_a.keys[1][:, :, first:], cache_b.keys[1][:, :, first:], atol=1e-3)


def test_greedy_and_decode_tail_logits_match_hf():
    model, compiled = compiled_tiny("qwen2")
    hf = HFRunner(model)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    assert CompiledRunner(compiled).greedy(prompts, 6) == hf.greedy(prompts, 6)
    ids = torch.randint(0, 256, (2, 12))
    for tail in (0, 5):
        got = CompiledRunner(compiled, decode_tail=tail).logits(ids)
        assert (got - hf.logits(ids)).abs().max().item() <= 1e-4
