"""kvcompile::kv_decode — KV codec chunks (kvcompile.codec, docs/CODEC.md) decoded into a cache.

`definition.level_tables(level, layers)` gives a codec level's table inputs;
`definition.decode_chunks(header, chunks, device)` runs the op on a bitstream's chunks.
"""
from kvcompile.ops.kv_decode import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry.of_folder(__name__, "KV codec chunks (rANS + dequantisation) decoded into a [2, L, Hkv, T, D] "
                          "cache; CUDA: many chunks per launch", kernels=True)
