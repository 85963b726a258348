"""kvcompile::rerotate_keys — cached RoPE keys moved to other positions (KV fusion / CacheBlend).

`reposition.py` is what the runtime calls: a layer's inverse frequencies from its record and the
model config, and the re-rotation of its cached keys (NoPE layers unchanged).
"""
from kvcompile.ops.rerotate_keys import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry.of_folder(__name__, "RoPE keys re-rotated from position p to p + delta (reuse of a chunk's cache at "
                          "an offset)", kernels=True)
