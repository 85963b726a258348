"""kvcompile::rerotate_keys — cached RoPE keys moved to other positions (KV fusion / CacheBlend).

`reposition.py` is what the runtime calls: a layer's inverse frequencies from its record and the
model config, and the re-rotation of its cached keys (NoPE layers unchanged).
"""
import torch

from kvcompile.ops.rerotate_keys import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.rerotate_keys.kernels import SYMBOLS
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry(
    name="rerotate_keys",
    torch_op=torch.ops.kvcompile.rerotate_keys.default,
    onnx="kvcompile.ops.rerotate_keys.onnx_function",
    kernel_symbols=SYMBOLS,
    summary="RoPE keys re-rotated from position p to p + delta (reuse of a chunk's cache at an offset)",
)
