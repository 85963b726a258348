"""The CUDA-graph decode step's static-shape form (whole-capacity past, unfilled positions
masked, writes by index) equals the plain decode step; run eagerly here, captured on the GPU
(tests/test_gpu_runtime.py)."""
from __future__ import annotations

import pytest
import torch

from kvcompile.errors import ContextLengthError
from tiny_models import compiled_tiny, padded_batch


@pytest.mark.parametrize("kind, topn", [("full", None), ("kcache", 10**6), ("kcache", 4)])
def test_static_shape_step_equals_the_decode_step(kind, topn):
    torch.set_num_threads(1)
    _, compiled = compiled_tiny("llama", kind, topn) if kind == "kcache" else compiled_tiny("llama")
    input_ids, attention_mask = padded_batch(seed=8)
    steps, capacity = 5, input_ids.shape[1] + 5 + 4
    logits, plain = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    _, static = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    decoder = compiled.cuda_graph_decoder(static, capture=False)
    next_ids = logits[:, -1].argmax(-1)
    for _ in range(steps):
        want = compiled.decode_step(next_ids, plain)[:, -1]
        got = decoder.step(next_ids)[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        next_ids = want.argmax(-1)
    length = plain.length
    assert static.length == length
    assert torch.equal(static.valid, plain.valid) and torch.equal(static.positions, plain.positions)
    for layer in range(len(plain.keys)):
        torch.testing.assert_close(static.past(layer)[0], plain.past(layer)[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(static.past(layer)[1], plain.past(layer)[1], atol=1e-6, rtol=1e-6)


def test_a_full_cache_is_refused_and_capture_needs_cuda():
    _, compiled = compiled_tiny("llama")
    input_ids, _ = padded_batch(seed=2)
    _, cache = compiled.prefill(input_ids, cache=compiled.new_cache(3, input_ids.shape[1]))
    with pytest.raises(ContextLengthError, match="full"):
        compiled.cuda_graph_decoder(cache, capture=False)
    cache.reserve(cache.capacity + 4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            compiled.cuda_graph_decoder(cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_generate_with_cuda_graph_needs_cuda():
    _, compiled = compiled_tiny("llama")
    input_ids, attention_mask = padded_batch(seed=3)
    with pytest.raises(ValueError, match="CUDA device"):
        compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, cuda_graph=True)
