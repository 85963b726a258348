"""kvcompile's torch.library custom ops.

Importing this package registers every op under the `kvcompile` namespace
(`torch.ops.kvcompile.<name>`). Each op has a CPU reference written in plain torch, a fake
(meta) kernel so torch.export can trace through it, and, where one exists, a CUDA kernel
from `kvcompile.plugins`.
"""
from kvcompile.ops import cached_attention  # noqa: F401  (registers the op)

try:  # the KCache op lands with its own module; keep the package importable without it
    from kvcompile.ops import kcache_attention  # noqa: F401
except ImportError:  # pragma: no cover
    pass
