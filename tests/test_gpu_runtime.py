"""The compiled runtime on CUDA: exact vs HF (fp32), kcache vs full cache (bf16), host V pinned."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from tiny_models import CORE_ARCHS, padded_batch
from kvcompile.models import tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_fp32_cuda_generate_matches_hf(arch):
    model = tiny_model(arch).cuda()
    compiled = kvcompile.compile(model)
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=6))
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                              pad_token_id=0)
    got = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("select", ["head", "layer"])
def test_bf16_kcache_with_full_topn_matches_full_cache(arch, select):
    model = tiny_model(arch, dtype=torch.bfloat16).cuda()
    full = kvcompile.compile(model)
    kcache = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=10**6, select=select))
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=7))
    logits_full, cache_full = full.prefill(input_ids, attention_mask)
    logits_kc, cache_kc = kcache.prefill(input_ids, attention_mask)
    assert cache_kc.values[-1].is_pinned() and cache_kc.values[-1].device.type == "cpu"
    next_ids = logits_full[:, -1].argmax(-1)
    for _ in range(4):
        a = full.decode_step(next_ids, cache_full).float()
        b = kcache.decode_step(next_ids, cache_kc).float()
        assert (a - b).abs().max().item() <= 2e-2
        next_ids = a[:, -1].argmax(-1)
    expected = full.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    got = kcache.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    assert torch.equal(got, expected)


def test_cpu_trace_moves_to_cuda():
    model = tiny_model("llama")
    compiled = kvcompile.compile(model)
    input_ids = torch.randint(0, 256, (2, 8))
    expected = compiled.generate(input_ids, max_new_tokens=8)
    compiled.to("cuda")
    assert torch.equal(compiled.generate(input_ids.cuda(), max_new_tokens=8).cpu(), expected)
