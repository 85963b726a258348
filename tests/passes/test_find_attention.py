"""find_attention: layers, heads, GQA expansion, RoPE variants, and a clear error without SDPA."""
from __future__ import annotations

import pytest
import torch

from kvcompile.frontend.tiny_models import tiny_model
from kvcompile.passes.find_attention import AttentionPatternError, find_attention
from kvcompile.core.config import CacheConfig
from kvcompile.core.pipeline import pass_context
from kvcompile.frontend.trace import trace_model
from kvcompile.passes.context import PassContext


def sites_of(arch: str, capture: bool = False):
    """The SDPA path by default (capture=False): the repeat_kv walk is what these tests check."""
    model = tiny_model(arch)
    context = pass_context(model, CacheConfig())
    graph_module = trace_model(model, capture=capture).module()
    rows = find_attention(graph_module, context)
    return context.attention_sites, rows


@pytest.mark.parametrize(
    "arch, gqa, rope, heads",
    [
        ("llama", "repeat_kv", "half-split", (4, 2)),
        ("phi3", "repeat_kv", "half-split, partial 8/16", (4, 2)),
        ("gpt2", "none", "none", (4, 4)),
        ("cohere", "repeat_kv", "interleaved", (4, 2)),
        ("gpt_neox", "none", "half-split, partial 4/16", (4, 4)),
        ("llama3", "repeat_kv", "half-split", (4, 1)),
    ],
)
def test_describes_each_layer(arch, gqa, rope, heads):
    sites, rows = sites_of(arch)
    assert [s.layer for s in sites] == [0, 1]
    for site in sites:
        assert (site.query_heads, site.kv_heads) == heads
        assert site.head_dim == 16
        assert site.gqa == gqa
        assert site.rope == rope
        assert site.scale == pytest.approx(0.25)  # 1/sqrt(16); granite's multiplier is tested below
        # the key the cache stores is the per-KV-head tensor, before any GQA expansion
        assert tuple(site.key.meta["val"].shape)[1] == heads[1]
    assert rows[0]["module"].endswith({"gpt2": "h.0.attn", "gpt_neox": "layers.0.attention"}.get(arch, "0.self_attn"))


def test_attention_multiplier_becomes_the_scale():
    sites, _ = sites_of("granite")
    assert all(site.scale == pytest.approx(0.3) for site in sites)


def test_eager_attention_names_layer_and_missing_pattern():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = "eager"
    graph_module = trace_model(model, capture=False).module()
    with pytest.raises(AttentionPatternError) as error:
        find_attention(graph_module, pass_context(model, CacheConfig()))
    message = str(error.value)
    assert "layer 0" in message and "self_attn" in message
    assert "scaled_dot_product_attention" in message and "attn_implementation='sdpa'" in message


def test_dropout_in_attention_is_refused():
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    node = graph.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, q, q, None, 0.1))
    graph.output(node)
    with pytest.raises(AttentionPatternError, match="dropout"):
        find_attention(torch.fx.GraphModule(torch.nn.Module(), graph),
                       PassContext(model_config=None, dtype=torch.float32, max_context=16, cache_config=CacheConfig()))
