"""Example inputs and dynamic axes for re-exporting a compiled (flat-signature) graph.

Both are read off the I/O layout (GraphSpec.inputs()), so they cannot disagree with it.
"""
from __future__ import annotations

import torch
from torch.export import Dim

from kvcompile.core.layout import BATCH, CONTEXT, INDEX_DTYPE, PAST, TOKENS, GraphSpec

# Sizes ≥ 2 and pairwise different so no dynamic axis specialises or aliases another.
EXAMPLE_BATCH, EXAMPLE_TOKENS, EXAMPLE_PAST = 2, 3, 5


def example_inputs(spec: GraphSpec, device="cpu", batch=EXAMPLE_BATCH, tokens=EXAMPLE_TOKENS, past=EXAMPLE_PAST):
    dtype = getattr(torch, spec.dtype)
    sizes = {BATCH: batch, TOKENS: tokens, PAST: past, CONTEXT: past + tokens}
    inputs = []
    for slot in spec.inputs():
        shape = [sizes.get(axis, axis) for axis in slot.axes]
        if slot.name == "input_ids":
            inputs.append(torch.randint(0, spec.vocab_size, shape, device=device))
        elif slot.name == "position_ids":
            inputs.append((torch.arange(tokens, device=device) + past).expand(batch, -1).contiguous())
        elif slot.dtype == INDEX_DTYPE:
            inputs.append(torch.zeros(shape, dtype=torch.int64, device=device))
        elif slot.name.startswith("attn_bias"):
            inputs.append(torch.zeros(shape, dtype=dtype, device=device))
        else:
            inputs.append(torch.randn(shape, dtype=dtype, device=device))
    return tuple(inputs)


def dynamic_shapes(spec: GraphSpec) -> list:
    """Batch, new tokens, cached tokens and context (= cached + new) are all dynamic."""
    dims = {
        BATCH: Dim("batch", min=1, max=1024),
        TOKENS: Dim("tokens", min=1, max=spec.max_context),
        PAST: Dim("past", min=0, max=spec.max_context),
        CONTEXT: Dim("context", min=1, max=2 * spec.max_context),
    }
    return [{i: dims[axis] for i, axis in enumerate(slot.axes) if axis in dims} for slot in spec.inputs()]
