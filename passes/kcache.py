"""kcache: cached attention → K-only caching with top-N value retrieval from host memory.

Matches: the `kvcompile::cached_attention` nodes that `insert_kv_cache` produced, from layer
`full_layers` on (earlier layers keep V on the device, by choice of the CacheConfig).
Produces: `kvcompile::kcache_attention(q, k, v, past_key, past_value_host, attn_bias, scale,
topn, select, renormalize, softcap, sinks)`, and marks those layers' records LayerKind.KCACHE, so the cache
manager keeps their V in (pinned) host memory, token-major [B, P, Hkv, D].

A fractional topn becomes graph arithmetic on the context length (attn_bias's last axis), so
one graph keeps the same fraction at every context length.

Before: cached_attention(q, k, v, past_k, past_v, bias, s, softcap, sinks)
After:  kcache_attention(q, k, v, past_k, past_v_host, bias, s, topn, "head", False, softcap, sinks)
"""
from __future__ import annotations

import operator

import torch
import torch.fx

import kvcompile.ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from kvcompile.core.config import topn_ratio
from kvcompile.core.modes import LayerKind
from kvcompile.ops import registry
from kvcompile.passes.context import PassContext
from kvcompile.passes.manager import compiler_pass


def topn_node(graph: torch.fx.Graph, attn_bias: torch.fx.Node, topn):
    """An int, or for a fraction f: kvcompile.core.config.topn_for_context as graph arithmetic
    on the context length (attn_bias's last axis): max(1, (context·num + den // 2) // den)."""
    if not isinstance(topn, float):
        return int(topn)
    ratio = topn_ratio(topn)
    context = graph.call_function(torch.ops.aten.sym_size.int, (attn_bias, 3))
    scaled = graph.call_function(operator.mul, (context, ratio.numerator))
    rounded = graph.call_function(operator.floordiv, (graph.call_function(operator.add, (scaled, ratio.denominator // 2)), ratio.denominator))
    return graph.call_function(torch.sym_max, (rounded, 1))


@compiler_pass(requires=("attention_sites", "spec"))
def kcache(graph_module: torch.fx.GraphModule, context: PassContext) -> list:
    """Rewrite cached attention to kcache_attention (V in host memory) beyond `full_layers`."""
    config = context.cache_config.kcache
    spec = context.spec
    graph = graph_module.graph
    cached_attention = registry.get("cached_attention").torch_op
    rows = []
    for index, site in enumerate(context.attention_sites):
        node = site.sdpa  # insert_kv_cache left the cached_attention node here
        if node.target is not cached_attention:
            rows.append({"layer": site.layer, "attention": str(node.target), "V lives on": "device (not matched)",
                         "topn": "-", "select": "-"})
            continue
        if site.layer < config.full_layers:
            rows.append({"layer": site.layer, "attention": "cached_attention", "V lives on": "device (full_layers)",
                         "topn": "-", "select": "-"})
            continue
        query, key, value, past_key, past_value, attn_bias, scale, softcap, sinks = node.args
        with graph.inserting_before(node):
            topn = topn_node(graph, attn_bias, config.topn)
            replacement = graph.call_function(
                registry.get("kcache_attention").torch_op,
                (query, key, value, past_key, past_value, attn_bias, scale, topn, config.select.value,
                 config.renormalize, softcap, sinks),
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        site.sdpa = replacement
        site.record = site.record.cached_as(LayerKind.KCACHE)
        spec.layers[index] = site.record
        rows.append({"layer": site.layer, "attention": "kcache_attention", "V lives on": "host [B, P, Hkv, D]",
                     "topn": str(config.topn), "select": config.select.value})
    return rows
