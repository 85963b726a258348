"""graph_copy: not a pass, the copy the graph-rewriting passes start from.

A pass that returns a rewritten GraphModule (causal_prefill_graph, last_logits_graph,
layer_ready_graph) rewrites a copy of the graph, so the module it was given keeps working unchanged.
"""
from __future__ import annotations

import torch
import torch.fx


def copy_graph(graph_module: torch.fx.GraphModule) -> torch.fx.Graph:
    """A new graph with graph_module's nodes and output and its calling convention (codegen)."""
    graph = torch.fx.Graph()
    output = graph.graph_copy(graph_module.graph, {})
    graph.output(output)
    graph._codegen = graph_module.graph._codegen
    return graph
