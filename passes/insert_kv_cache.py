"""insert_kv_cache: stateless attention → cached attention with explicit cache inputs/outputs.

Matches: the attention sites found by `find_attention`.
Produces: for each layer, `kvcompile::cached_attention(q, k, v, past_key.i, past_value.i,
attn_bias, scale)` in place of SDPA; new graph inputs `attn_bias` and `past_key.i`/`past_value.i`;
new graph outputs `new_key.i`/`new_value.i` (this call's K/V, for the cache manager to append).
The model's own mask construction and `repeat_kv` expansion become dead and are removed, since
the runtime supplies the mask (causal + padding + window) for the whole cached context.

Before (Llama, HF transformers 5):   sdpa(q_rot, repeat_kv(k_rot), repeat_kv(v), causal_mask, scale=s)
After:                               cached_attention(q_rot, k_rot, v, past_k, past_v, attn_bias, s)
"""
from __future__ import annotations

import torch
import torch.fx

import kvcompile.ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from kvcompile.core.layout import GraphSpec
from kvcompile.passes.context import PassContext
from kvcompile.passes.manager import compiler_pass


def add_placeholder(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    """Append a graph input after the existing ones (placeholders must stay first)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        return graph.placeholder(name)


def flatten_codegen(graph_module: torch.fx.GraphModule) -> None:
    """torch.export's unlifted module unpacks a pytree of 2 inputs; ours has a flat signature."""
    graph_module.graph._codegen = torch.fx.graph.CodeGen()
    graph_module._forward_pre_hooks.clear()  # the input-constraint check knows only the 2 traced inputs


@compiler_pass(requires=("attention_sites",), produces=("spec",))
def insert_kv_cache(graph_module: torch.fx.GraphModule, context: PassContext) -> list:
    """Replace each SDPA with kvcompile::cached_attention over explicit past K/V inputs."""
    graph = graph_module.graph
    sites = context.attention_sites
    flatten_codegen(graph_module)
    attn_bias = add_placeholder(graph, "attn_bias")
    new_outputs = []
    rows = []
    for site in sites:
        past_key = add_placeholder(graph, f"past_key_{site.layer}")
        past_value = add_placeholder(graph, f"past_value_{site.layer}")
        with graph.inserting_before(site.sdpa):
            cached = graph.call_function(
                torch.ops.kvcompile.cached_attention.default,
                (site.query, site.key, site.value, past_key, past_value, attn_bias, site.scale),
            )
        cached.meta.update({k: v for k, v in site.sdpa.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        site.sdpa.replace_all_uses_with(cached)
        graph.erase_node(site.sdpa)
        site.sdpa = cached
        new_outputs += [site.key, site.value]
        rows.append({
            "layer": site.layer,
            "replaced": "scaled_dot_product_attention",
            "with": "kvcompile::cached_attention",
            "inputs added": f"past_key.{site.layer}, past_value.{site.layer}",
        })
    output = next(n for n in graph.nodes if n.op == "output")
    (logits,) = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (tuple([logits, *new_outputs]),)
    graph.eliminate_dead_code()
    context.spec = spec_from_sites(sites, context)
    return rows


def spec_from_sites(sites, context: PassContext) -> GraphSpec:
    config = context.model_config
    first = sites[0]
    return GraphSpec(
        num_layers=len(sites),
        query_heads=first.query_heads,
        kv_heads=first.kv_heads,
        head_dim=first.head_dim,
        vocab_size=int(config.vocab_size),
        dtype=str(context.dtype).removeprefix("torch."),
        layers=[site.record for site in sites],
        max_context=int(context.max_context),
    )
