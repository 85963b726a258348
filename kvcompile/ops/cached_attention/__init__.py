"""kvcompile::cached_attention — exact attention of new tokens over (past cache ++ new K/V)."""
from kvcompile.ops.cached_attention import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry.of_folder(__name__, "exact attention over the cached and new K/V (the full cache)",
                          kernels=True)
