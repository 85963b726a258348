"""last_logits_graph: the compiled graph computing the logits of each sequence's last token only.

Matches: the language-model head — the `aten.linear` the logits output comes from, through any
elementwise tail after it (a final soft-cap, a cast).
Produces: a new GraphModule over the same weights (shared, not copied), same inputs, whose
logits are [B, 1, V]: the head's input is sliced to the last position first. The K/V outputs
are unchanged.

Why: a prefill needs only the last token's logits to pick the first new token; the full
[B, T, V] product costs 2·T·hidden·vocab FLOPs (8B shape, 3136 tokens: 3.3 TFLOP, ~5 ms on an
H200) and T·vocab of memory. transformers' generate asks for the same (`logits_to_keep=1`).
"""
from __future__ import annotations

import sys

import torch
import torch.fx

from kvcompile.errors import UnsupportedAttentionError
from kvcompile.passes.graph_copy import copy_graph

# ops that may sit between the head's matmul and the logits output (they act per position)
ELEMENTWISE_TAIL = {torch.ops.aten.tanh.default, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor,
                    torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.alias.default,
                    torch.ops.aten.clone.default}


def language_model_head(graph: torch.fx.Graph) -> torch.fx.Node:
    """The aten.linear node whose output becomes the logits (the first output)."""
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0][0]
    for _ in range(16):
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            return node
        if node.op != "call_function" or node.target not in ELEMENTWISE_TAIL:
            break
        node = next(a for a in node.args if isinstance(a, torch.fx.Node))
    raise UnsupportedAttentionError("cannot find the language-model head (an aten.linear before the logits) "
                                    "to compute the last token's logits only")


def last_logits_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """-> the graph whose logits are the last position's (see the module docstring)."""
    graph = copy_graph(graph_module)
    head = language_model_head(graph)
    hidden = head.args[0]  # [B, T, hidden]
    with graph.inserting_before(head):
        last = graph.call_function(torch.ops.aten.slice.Tensor, (hidden, 1, -1, sys.maxsize))
    head.args = (last,) + tuple(head.args[1:])
    graph.lint()
    return torch.fx.GraphModule(graph_module, graph)
