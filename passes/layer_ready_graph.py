"""layer_ready_graph: the compiled graph waiting for each layer's cache right before reading it.

Matches: each `past_key_i` / `past_value_i` placeholder and its first reader in graph order (the
layer's attention).
Produces: a new GraphModule over the same weights (shared, not copied), same inputs and outputs,
where that reader and every later one read `kvcompile.fusion.loading.wait_for_layer(i, past)`
instead: an identity that makes the stream wait for layer i's load event, if one is pending.

KV fusion loads chunk caches layer by layer on a side stream (kvcompile/fusion/loading.py);
with this graph, layer 0 computes while later layers are still being copied and re-rotated,
instead of the whole graph waiting for the last layer (CacheBlend's pipelining).

Before: past_key_3 ──────────────────────────────► cached_attention_3
After:  past_key_3 ─► wait_for_layer(3, past_key_3) ─► cached_attention_3
"""
from __future__ import annotations

import re

import torch
import torch.fx

from kvcompile.fusion.loading import wait_for_layer
from kvcompile.passes.graph_copy import copy_graph

PAST_INPUT = re.compile(r"past_(?:key|value)_(\d+)$")


def layer_ready_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """-> the graph with a wait before each layer's first cache read (see the module docstring)."""
    graph = copy_graph(graph_module)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        match = PAST_INPUT.match(node.name)
        if not match or not node.users:
            continue
        first_reader = min(node.users, key=order.__getitem__)
        with graph.inserting_before(first_reader):
            ready = graph.call_function(wait_for_layer, (int(match.group(1)), node))
        ready.meta = dict(node.meta)
        node.replace_all_uses_with(ready, delete_user_cb=lambda user: user is not ready)
    graph.lint()
    return torch.fx.GraphModule(graph_module, graph)
