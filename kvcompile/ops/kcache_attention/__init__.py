"""kvcompile::kcache_attention — attention whose past values live in host memory (KCache)."""
from kvcompile.ops.kcache_attention import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry.of_folder(__name__, "K on the device, V in host memory: top-N positions, only their V rows fetched",
                          kernels=True)
