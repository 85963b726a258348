"""One enum per concept, used from the command line down to the C ABI.

Each is a `str` enum so it reads and writes as its plain name in configs, manifests and the
CLI ("head", "kcache"), compares equal to that name, and carries its integer code where a
kernel or an ONNX attribute needs one (`.code`).
"""
from __future__ import annotations

from enum import Enum


class NamedMode(str, Enum):
    """A str enum whose members parse from their names with one clear error."""

    @classmethod
    def parse(cls, value, what: str) -> "NamedMode":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown {what} {value!r}; expected one of {names}") from None

    @classmethod
    def names(cls) -> tuple:
        return tuple(m.value for m in cls)

    def __str__(self) -> str:  # f-strings and argparse show the plain name
        return self.value


class CacheKind(NamedMode):
    """The cache scheme a CompiledModel runs with (CacheConfig.kind)."""

    FULL = "full"  # K and V on the compute device: the exact baseline
    KCACHE = "kcache"  # K on the device, V in host memory, top-N value retrieval


class LayerKind(NamedMode):
    """Which attention op a layer runs after the passes, which decides where its V lives."""

    FULL = "full"  # kvcompile::cached_attention, V on the device
    KCACHE = "kcache"  # kvcompile::kcache_attention, V in host memory (token-major)


class ValueHome(NamedMode):
    """Where a layer's cached values live."""

    DEVICE = "device"
    HOST = "host"


class SelectMode(NamedMode):
    """KCache top-N selection granularity. `.code` is the C ABI's and the ONNX attribute's value."""

    HEAD = "head"  # one selection per KV head (faithful to the paper)
    LAYER = "layer"  # one selection shared by a layer's heads: wide host rows

    @property
    def code(self) -> int:
        return 0 if self is SelectMode.HEAD else 1


class FusedPrefillMode(NamedMode):
    """How a prompt made of precomputed chunks is prefilled (the cross-chunk task, fusion)."""

    FULL_PREFILL = "full_prefill"  # recompute everything: the exact reference
    FULL_REUSE = "full_reuse"  # reuse every chunk's own cache, recompute nothing
