"""kvcompile::kcache_attention — attention whose past values live in host memory (KCache)."""
import torch

from kvcompile.ops.kcache_attention import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.kcache_attention.kernels import SYMBOLS
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry(
    name="kcache_attention",
    torch_op=torch.ops.kvcompile.kcache_attention.default,
    onnx="kvcompile.ops.kcache_attention.onnx_function",
    kernel_symbols=SYMBOLS,
    summary="K on the device, V in host memory: top-N positions, only their V rows fetched",
)
