"""insert_kv_cache: stateless attention → cached attention with explicit cache inputs/outputs.

Matches: the attention sites found by `find_attention` (captured attention or SDPA).
Produces: for each layer, `kvcompile::cached_attention(q, k, v, past_key.i, past_value.i, bias,
scale, softcap, sinks)` in its place; new graph inputs: one bias per distinct window of the
layers (`attn_bias`, `attn_bias.sliding_N`, ...) and `past_key.i`/`past_value.i`; new graph
outputs `new_key.i`/`new_value.i` (this call's K/V, for the cache manager to append).
The model's own mask construction and `repeat_kv` expansion become dead and are removed, since
the runtime supplies each window's mask (causal + padding + window) for the whole cached context.
A layer's sink logits are parameters: they become constants of its op (one float per head).

Before (Gemma 2):  captured_attention(q, k, v, None, s, softcap=50, window=4096, chunk=0, causal, 0)
After:             cached_attention(q, k, v, past_k, past_v, attn_bias.sliding_4096, s, 50.0, None)
Before (Llama):    sdpa(q_rot, repeat_kv(k_rot), repeat_kv(v), causal_mask, scale=s)
After:             cached_attention(q_rot, k_rot, v, past_k, past_v, attn_bias, s, 0.0, None)
"""
from __future__ import annotations

import torch
import torch.fx

import kvcompile.ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from kvcompile.core.layout import GraphSpec, bias_name
from kvcompile.ops import registry
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
    biases = {}
    for site in sites:  # one bias input per distinct window, in the order GraphSpec lists them
        window = site.record.window
        if window not in biases:
            biases[window] = add_placeholder(graph, bias_name(window).replace(".", "_"))
    cached_attention = registry.get("cached_attention").torch_op
    new_outputs = []
    rows = []
    for site in sites:
        past_key = add_placeholder(graph, f"past_key_{site.layer}")
        past_value = add_placeholder(graph, f"past_value_{site.layer}")
        record = site.record
        with graph.inserting_before(site.sdpa):
            cached = graph.call_function(
                cached_attention,
                (site.query, site.key, site.value, past_key, past_value, biases[record.window], record.scale,
                 record.softcap or 0.0, sink_values(graph_module, site)),
            )
        cached.meta.update({k: v for k, v in site.sdpa.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        site.sdpa.replace_all_uses_with(cached)
        graph.erase_node(site.sdpa)
        site.sdpa = cached
        new_outputs += [site.key, site.value]
        rows.append({
            "layer": site.layer,
            "replaced": "captured_attention" if site.gqa == "captured" else "scaled_dot_product_attention",
            "with": "kvcompile::cached_attention",
            "mask input": bias_name(record.window),
            "inputs added": f"past_key.{site.layer}, past_value.{site.layer}",
        })
    output = next(n for n in graph.nodes if n.op == "output")
    (logits,) = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (tuple([logits, *new_outputs]),)
    graph.eliminate_dead_code()
    context.spec = spec_from_sites(sites, context)
    return rows


def sink_values(graph_module: torch.fx.GraphModule, site):
    """The layer's sink logits as a list of floats (they are parameters), or None."""
    node = site.sinks
    if node is None:
        return None
    if node.op != "get_attr":
        raise RuntimeError(f"layer {site.layer}: sinks are computed in the graph, not a parameter; not supported")
    value = graph_module
    for part in node.target.split("."):
        value = getattr(value, part)
    return [float(x) for x in value.detach().float().flatten()]


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
