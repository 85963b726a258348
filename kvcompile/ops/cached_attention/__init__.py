"""kvcompile::cached_attention — exact attention of new tokens over (past cache ++ new K/V)."""
import torch

from kvcompile.ops.cached_attention import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry(
    name="cached_attention",
    torch_op=torch.ops.kvcompile.cached_attention.default,
    onnx="kvcompile.ops.cached_attention.onnx_function",
    summary="exact attention over the cached and new K/V (the full cache)",
)
