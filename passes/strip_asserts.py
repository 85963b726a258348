"""strip_asserts: drop torch.export's tensor-metadata assertions.

Matches: `aten._assert_tensor_metadata` nodes, which pin the device and dtype seen at trace time.
Produces: the same graph without them, so a graph traced on CPU runs on CUDA (and in bf16)
unchanged. Shape guards (`_assert_scalar`) are kept: they protect real invariants.
"""
from __future__ import annotations

import torch

from kvcompile.passes.context import PassContext
from kvcompile.passes.manager import compiler_pass


@compiler_pass()
def strip_asserts(graph_module: torch.fx.GraphModule, context: PassContext) -> list:
    """Remove trace-time device/dtype assertions so the graph is portable."""
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(node)
            removed += 1
    return [{"removed": removed}]

