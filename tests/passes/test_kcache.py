"""kcache pass: exact with topn ≥ context, V kept in host layout, options honoured, bad config refused."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from tiny_models import CORE_ARCHS, compiled_tiny, padded_batch
from kvcompile.core.config import ConfigError
from kvcompile.frontend.tiny_models import tiny_model


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("select", ["head", "layer"])
def test_topn_at_least_context_is_exact(arch, select):
    _, full = compiled_tiny(arch)
    _, kcache = compiled_tiny(arch, "kcache", 10**6, select)
    input_ids, attention_mask = padded_batch(seed=5)
    full_logits, full_cache = full.prefill(input_ids, attention_mask)
    kc_logits, kc_cache = kcache.prefill(input_ids, attention_mask)
    assert (full_logits - kc_logits).abs().max().item() <= 1e-4
    next_ids = full_logits[:, -1].argmax(-1)
    for _ in range(3):
        a = full.decode_step(next_ids, full_cache)
        b = kcache.decode_step(next_ids, kc_cache)
        assert (a - b).abs().max().item() <= 1e-4
        next_ids = a[:, -1].argmax(-1)
    expected = full.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    got = kcache.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    assert torch.equal(expected, got)


def test_fractional_topn_of_one_is_exact():
    model = tiny_model("qwen2")
    full = kvcompile.compile(model)
    kcache = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=1.0))
    input_ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(full.generate(input_ids, max_new_tokens=12), kcache.generate(input_ids, max_new_tokens=12))


def test_small_topn_changes_output_but_stays_finite():
    _, full = compiled_tiny("llama")
    _, kcache = compiled_tiny("llama", "kcache", 2, "head")
    input_ids = torch.randint(0, 256, (2, 20))
    logits_full, cache_full = full.prefill(input_ids)
    _, cache_kc = kcache.prefill(input_ids)
    next_ids = logits_full[:, -1].argmax(-1)
    a = full.decode_step(next_ids, cache_full)
    b = kcache.decode_step(next_ids, cache_kc)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() > 1e-4  # 2 of 21 positions cannot be exact


def test_values_live_in_host_layout_and_full_layers_keep_device_values():
    model = tiny_model("llama")
    compiled = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=8, full_layers=1))
    assert compiled.spec.layer_kinds == ["full", "kcache"]
    _, cache = compiled.prefill(torch.randint(0, 256, (2, 6)))
    key0, value0 = cache.past(0)
    key1, value1 = cache.past(1)
    spec = compiled.spec
    assert value0.shape == (2, spec.kv_heads, 6, spec.head_dim)  # device layout
    assert value1.shape == (2, 6, spec.kv_heads, spec.head_dim)  # host, token-major
    # the host copy holds the very values the graph produced
    logits, keys, values = compiled.step(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), 6),
                                         torch.zeros(2, 1, 1, 7), *cache.past_all())
    assert keys[1].shape == (2, spec.kv_heads, 1, spec.head_dim)
    report = next(p for p in compiled.report.passes if p.name == "kcache")
    assert [row["attention"] for row in report.rows] == ["cached_attention", "kcache_attention"]
    kc_bytes, full_bytes = cache.device_bytes(), cache.length * 2 * 2 * 2 * spec.kv_heads * spec.head_dim * 4
    assert kc_bytes == full_bytes * 3 // 4  # one of two layers moved V off the device


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"topn": 0}, "topn must be ≥ 1"),
        ({"topn": -3}, "topn must be ≥ 1"),
        ({"topn": 1.5}, "fractional topn"),
        ({"select": "token"}, "unknown selection mode"),
        ({"full_layers": -1}, "full_layers"),
        ({"kind": "paged"}, "unknown cache kind"),
    ],
)
def test_bad_configuration_is_a_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        kvcompile.CacheConfig(kind=fields.pop("kind", "kcache"), **fields)


def test_pinned_allocation_failure_is_a_clear_error(monkeypatch):
    from kvcompile.runtime import cache as cache_module

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(cache_module.torch, "zeros", refuse)
    with pytest.raises(cache_module.HostMemoryError, match="host memory for the V cache"):
        cache_module.allocate_host_values((2, 1024, 8, 128), torch.float16, pin=True)
