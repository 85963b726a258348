"""restore_from_codec: the restore graph, a compressed context decoded straight into the cache layout.

Matches: nothing in the traced model — it reads the GraphSpec (layers, KV heads, head_dim, dtype,
each layer's value layout) and a codec level.
Produces: a GraphModule (data [B] uint8, chunk_offsets [N] int64) -> (past_key.0, past_value.0, ...,
past_value.L-1): one `kvcompile::kv_decode` of N chunks of `chunk_tokens` tokens each, split into
the cache's per-layer tensors — key [1, Hkv, N·t, D]; value the same, or [1, N·t, Hkv, D] for a layer
whose V lives on the host (kcache). The level's tables are buffers of the graph, so an exported
graph needs only the chunks' bytes. Exported to ONNX, the node carries the op's function body
(standard ops), so any ONNX Runtime runs it; the CUDA kernel runs it under torch.

Before: a bitstream's chunks (kvcompile.codec) and a compiled model's GraphSpec
After:  restore(data, chunk_offsets) -> the past_key.i / past_value.i a decode step reads
A context whose last chunk is short is restored by running the graph on the whole chunks and the
codec on the rest (kvcompile/codec/restore.py).
"""
from __future__ import annotations

import torch
import torch.fx

from kvcompile.core.layout import GraphSpec


class RestoreModule(torch.nn.Module):
    def __init__(self, spec: GraphSpec, level: int, chunk_tokens: int):
        super().__init__()
        from kvcompile.codec import default_group
        from kvcompile.codec.bitstream import DTYPES
        from kvcompile.codec.quantise import LEVELS
        from kvcompile.ops.kv_decode.definition import level_tables

        for name, table in zip(("bank_cdf", "halves", "table_base", "scale_steps"),
                               level_tables(level, spec.num_layers)):
            self.register_buffer(name, table)
        self.spec = spec
        self.attributes = (spec.num_layers, spec.kv_heads, spec.head_dim, chunk_tokens,
                           default_group(spec.kv_heads * spec.head_dim, chunk_tokens),
                           int(LEVELS[level].log_scales), DTYPES.index(spec.dtype))

    def forward(self, data: torch.Tensor, chunk_offsets: torch.Tensor):
        kv = torch.ops.kvcompile.kv_decode(data, chunk_offsets, self.bank_cdf, self.halves, self.table_base,
                                           self.scale_steps, *self.attributes)  # [2, L, Hkv, T, D]
        outputs = []
        for layer in range(self.spec.num_layers):
            key, value = kv[0, layer].unsqueeze(0), kv[1, layer].unsqueeze(0)  # [1, Hkv, T, D]
            if self.spec.layers[layer].host_values:
                value = value.transpose(1, 2)  # [1, T, Hkv, D]: the host layout (runtime/cache.py)
            outputs += [key, value.contiguous()]
        return tuple(outputs)


def restore_graph(spec: GraphSpec, level: int, chunk_tokens: int) -> torch.fx.GraphModule:
    """The restore graph of `spec` at codec `level` (see the module docstring)."""
    import kvcompile.ops  # noqa: F401  (registers kvcompile::kv_decode)

    module = RestoreModule(spec, level, chunk_tokens)
    graph = torch.fx.symbolic_trace(module)
    graph.attributes, graph.spec = module.attributes, spec
    return graph


def output_names(spec: GraphSpec) -> list:
    names = []
    for layer in range(spec.num_layers):
        names += [f"past_key.{layer}", f"past_value.{layer}"]
    return names
