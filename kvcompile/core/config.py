"""CacheConfig: which KV-cache scheme a compiled model runs with, one options group per technique."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Union

from kvcompile.core.modes import CacheKind, SelectMode
from kvcompile.errors import ConfigError  # noqa: F401  (raised here)

SELECT_MODES = SelectMode.names()




def topn_for_context(topn: Union[int, float], context_length: int) -> int:
    """Positions kept for a context: an int as is; a fraction f -> max(1, round-half-up(f · context)).

    The one rounding every place uses: the kcache pass emits this arithmetic into the graph
    (passes/kcache.py), the ONNX body repeats it (ops/kcache_attention/onnx_function.py), and
    a test holds all three equal over a grid of fractions and contexts.
    """
    if not isinstance(topn, float):
        return int(topn)
    ratio = topn_ratio(topn)
    return max(1, (context_length * ratio.numerator + ratio.denominator // 2) // ratio.denominator)


def topn_ratio(topn: float):
    """The exact fraction a float topn stands for (graph, ONNX attribute and config share it)."""
    from fractions import Fraction

    return Fraction(topn).limit_denominator(10_000)


@dataclass(frozen=True)
class KCacheOptions:
    """K-only caching (KCache): K on the device, V in host memory, top-N value retrieval.

    topn:        an int ≥ 1 keeps that many positions; a float in (0, 1] keeps that fraction
                 of the current context (at least one position).
    select:      SelectMode.HEAD: one top-N selection per KV head (faithful to the paper);
                 SelectMode.LAYER: one selection shared by all heads of a layer, so each fetched
                 host row is kv_heads × head_dim long (wide rows move faster over the host link).
    full_layers: the first `full_layers` layers keep V on the device.
    renormalize: renormalise the softmax over the N chosen positions.
    """

    # 512 / head / no renormalisation: the smallest setting of the quality sweep on the
    # reference model within 1% bits/byte and ≥ 99% of exact retrieval at 2K (docs/KCACHE.md).
    topn: Union[int, float] = 512
    select: SelectMode = SelectMode.HEAD
    full_layers: int = 0
    renormalize: bool = False

    def __post_init__(self):
        try:
            object.__setattr__(self, "select", SelectMode.parse(self.select, "selection mode"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if isinstance(self.topn, bool) or not isinstance(self.topn, (int, float)):
            raise ConfigError(f"topn must be an int or a float fraction, got {self.topn!r}")
        if isinstance(self.topn, float):
            if not 0.0 < self.topn <= 1.0:
                raise ConfigError(f"a fractional topn must lie in (0, 1], got {self.topn}")
        elif self.topn <= 0:
            raise ConfigError(f"topn must be ≥ 1, got {self.topn}")
        if isinstance(self.full_layers, bool) or not isinstance(self.full_layers, int) or self.full_layers < 0:
            raise ConfigError(f"full_layers must be an int ≥ 0, got {self.full_layers!r}")

    def topn_for(self, context_length: int) -> int:
        """The number of positions kept for a context of `context_length` tokens."""
        return topn_for_context(self.topn, context_length)

    def to_dict(self) -> dict:
        return {"topn": self.topn, "select": self.select.value, "full_layers": self.full_layers,
                "renormalize": self.renormalize}


KCACHE_FIELDS = tuple(f.name for f in fields(KCacheOptions))


@dataclass(frozen=True, init=False)
class CacheConfig:
    """What cache the FX passes build: `kind`, and one options group per technique.

        CacheConfig(kind="kcache", kcache=KCacheOptions(topn=128, select="layer"))
        CacheConfig(kind="kcache", topn=128, select="layer")     # shortcut for the same

    kind: CacheKind.FULL - K and V on the compute device (the exact baseline);
          CacheKind.KCACHE - K on the device, V in host memory (options: `kcache`).
    """

    kind: CacheKind = CacheKind.FULL
    kcache: KCacheOptions = field(default_factory=KCacheOptions)

    def __init__(self, kind: Union[str, CacheKind] = CacheKind.FULL, kcache: KCacheOptions = None, **shortcut):
        try:
            kind = CacheKind.parse(kind, "cache kind")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        unknown = set(shortcut) - set(KCACHE_FIELDS)
        if unknown:
            raise ConfigError(f"unknown CacheConfig option(s) {sorted(unknown)}; "
                              f"kcache options are {', '.join(KCACHE_FIELDS)}")
        if kcache is not None and shortcut:
            raise ConfigError("give kcache options either as kcache=KCacheOptions(...) or as keywords, not both")
        if kcache is None:
            kcache = KCacheOptions(**shortcut)
        elif not isinstance(kcache, KCacheOptions):
            raise ConfigError(f"kcache must be a KCacheOptions, got {type(kcache).__name__}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "kcache", kcache)

    # The kcache group's fields read through, so `config.topn` keeps working.
    @property
    def topn(self):
        return self.kcache.topn

    @property
    def select(self) -> SelectMode:
        return self.kcache.select

    @property
    def full_layers(self) -> int:
        return self.kcache.full_layers

    @property
    def renormalize(self) -> bool:
        return self.kcache.renormalize

    def topn_for(self, context_length: int) -> int:
        return self.kcache.topn_for(context_length)

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "kcache": self.kcache.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "CacheConfig":
        data = dict(data)
        kcache = data.pop("kcache", None)
        if kcache is not None:
            return cls(kind=data.pop("kind", CacheKind.FULL), kcache=KCacheOptions(**kcache), **data)
        return cls(**data)  # the flat form older manifests and the shortcut use
