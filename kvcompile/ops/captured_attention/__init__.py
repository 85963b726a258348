"""kvcompile::captured_attention — a layer's attention captured at trace time (never exported)."""
import torch

from kvcompile.ops.captured_attention import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry(
    name="captured_attention",
    torch_op=torch.ops.kvcompile.captured_attention.default,
    onnx=None,  # insert_kv_cache replaces every such node before any target sees the graph
    summary="trace-time capture of one layer's attention with its facts (replaced by the passes)",
)
