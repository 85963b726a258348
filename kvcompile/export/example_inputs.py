"""Example inputs and dynamic axes for re-exporting a compiled (flat-signature) graph."""
from __future__ import annotations

import torch
from torch.export import Dim

from kvcompile.spec import GraphSpec

# Sizes ≥ 2 and pairwise different so no dynamic axis specialises or aliases another.
EXAMPLE_BATCH, EXAMPLE_TOKENS, EXAMPLE_PAST = 2, 3, 5


def example_inputs(spec: GraphSpec, device="cpu", batch=EXAMPLE_BATCH, tokens=EXAMPLE_TOKENS, past=EXAMPLE_PAST):
    dtype = getattr(torch, spec.dtype)
    inputs = [
        torch.randint(0, spec.vocab_size, (batch, tokens), device=device),
        (torch.arange(tokens, device=device) + past).expand(batch, -1).contiguous(),
        torch.zeros(batch, 1, tokens, past + tokens, dtype=dtype, device=device),
    ]
    for layer in range(spec.num_layers):
        key = torch.randn(batch, spec.kv_heads, past, spec.head_dim, dtype=dtype, device=device)
        value = key.transpose(1, 2).contiguous() if spec.layer_kinds[layer] == "kcache" else key.clone()
        inputs += [key, value]
    return tuple(inputs)


def dynamic_shapes(spec: GraphSpec) -> list:
    """Batch, new tokens, cached tokens and context (= cached + new) are all dynamic."""
    batch = Dim("batch", min=1, max=1024)
    tokens = Dim("tokens", min=1, max=spec.max_context)
    past = Dim("past", min=0, max=spec.max_context)
    context = Dim("context", min=1, max=2 * spec.max_context)
    shapes = [{0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: batch, 2: tokens, 3: context}]
    for layer in range(spec.num_layers):
        value_axes = {0: batch, 1: past} if spec.layer_kinds[layer] == "kcache" else {0: batch, 2: past}
        shapes += [{0: batch, 2: past}, value_axes]
    return shapes
