"""check_layer_graph: the compiled graph cut after one layer, for fusion's check pass.

Matches: the compiled (cached) graph's outputs `new_key.i`/`new_value.i` and the query of the
attention of layer `check_layer` (the `check_layer`-th kvcompile attention op in graph order).
Produces: a new GraphModule over the same weights (shared, not copied) with the same inputs,
returning (new_key.0, new_value.0, ..., new_key.L, new_value.L, query.L). Everything that only
later layers and the logits need is dead code and removed, so running it costs L + 1 layers.

KV fusion (kvcompile/fusion) runs it over every chunk token with full cross-chunk attention to
measure how far each token's reused K/V is from its recomputed K/V (CacheBlend's check layer),
or how much the question attends to each token.

Before: (input_ids, position_ids, biases..., past...) -> (logits, new_key.0, new_value.0, ..., new_value.N-1)
After:  (the same inputs)                            -> (new_key.0, new_value.0, ..., new_value.L, query.L)
"""
from __future__ import annotations

import torch
import torch.fx

from kvcompile.errors import ConfigError
from kvcompile.ops import registry


def attention_nodes(graph: torch.fx.Graph) -> list:
    exportable = {entry.torch_op for entry in registry.registered() if entry.exportable}
    return [n for n in graph.nodes if n.op == "call_function" and n.target in exportable]


def check_layer_graph(graph_module: torch.fx.GraphModule, check_layer: int) -> torch.fx.GraphModule:
    """-> the graph cut after layer `check_layer` (see the module docstring)."""
    attentions = attention_nodes(graph_module.graph)
    if not 0 <= check_layer < len(attentions):
        raise ConfigError(f"check layer {check_layer} does not exist: the model has {len(attentions)} layers")
    graph = torch.fx.Graph()
    mapping: dict = {}
    graph.graph_copy(graph_module.graph, mapping)
    old_output = next(n for n in graph_module.graph.nodes if n.op == "output")
    outputs = list(old_output.args[0])[1: 1 + 2 * (check_layer + 1)]  # new K/V of layers 0..L
    query = attentions[check_layer].args[0]
    new_outputs = tuple(mapping[node] for node in outputs) + (mapping[query],)
    graph.output(new_outputs)  # graph_copy copies everything but the output node
    # A flat signature (positional inputs, a plain tuple out): a program loaded from an artifact
    # carries pytree specs for the full graph's outputs, which the cut graph no longer has.
    graph._codegen = torch.fx.graph.CodeGen()
    cut = torch.fx.GraphModule(graph_module, graph)  # attributes are shared with graph_module
    cut.graph.eliminate_dead_code()
    cut.graph.lint()
    cut.recompile()
    return cut
