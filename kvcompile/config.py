"""CacheConfig: which KV-cache scheme a compiled model runs with, and its knobs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Union

CACHE_KINDS = ("full", "kcache")
SELECT_MODES = ("head", "layer")


class ConfigError(ValueError):
    """A CacheConfig value that kvcompile cannot honour."""


@dataclass(frozen=True)
class CacheConfig:
    """What cache the FX passes build.

    kind:        "full"   - K and V on the compute device (the exact baseline).
                 "kcache" - K on the device, V in host memory, top-N value retrieval.
    topn:        kcache only. An int ≥ 1 keeps that many positions; a float in (0, 1] keeps
                 that fraction of the current context (at least one position).
    select:      kcache only. "head": one top-N selection per KV head (faithful to the paper);
                 "layer": one selection shared by all heads of a layer, so each fetched host
                 row is kv_heads × head_dim long (wider rows move faster over the host link).
    full_layers: kcache only. The first `full_layers` layers keep V on the device.
    renormalize: kcache only. Renormalise the softmax over the N chosen positions.
    """

    kind: Literal["full", "kcache"] = "full"
    # 512 / "head" / no renormalisation: the smallest setting of the quality sweep on the
    # reference model within 1% bits/byte and ≥ 99% of exact retrieval at 2K (docs/KCACHE.md).
    topn: Union[int, float] = 512
    select: Literal["head", "layer"] = "head"
    full_layers: int = 0
    renormalize: bool = False

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise ConfigError(f"unknown cache kind {self.kind!r}; expected one of {CACHE_KINDS}")
        if self.select not in SELECT_MODES:
            raise ConfigError(f"unknown selection mode {self.select!r}; expected one of {SELECT_MODES}")
        if isinstance(self.topn, bool) or not isinstance(self.topn, (int, float)):
            raise ConfigError(f"topn must be an int or a float fraction, got {self.topn!r}")
        if isinstance(self.topn, float):
            if not 0.0 < self.topn <= 1.0:
                raise ConfigError(f"a fractional topn must lie in (0, 1], got {self.topn}")
        elif self.topn <= 0:
            raise ConfigError(f"topn must be ≥ 1, got {self.topn}")
        if self.full_layers < 0:
            raise ConfigError(f"full_layers must be ≥ 0, got {self.full_layers}")

    def topn_for(self, context_length: int) -> int:
        """The number of positions kept for a context of `context_length` tokens."""
        if isinstance(self.topn, float):
            return max(1, int(round(self.topn * context_length)))
        return int(self.topn)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CacheConfig":
        return cls(**data)
