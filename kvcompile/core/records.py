"""Per-layer attention records: every fact about one layer's attention, stated, never guessed.

`find_attention` builds one LayerRecord per attention site from the traced graph; the later
passes fill in how the layer is cached (`kind`, `value_home`). The runtime's mask builder,
the cache managers, the ONNX exporter, `inspect` and the manifest all read these records,
and nothing else compares layer kinds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from kvcompile.core.modes import LayerKind, NamedMode, ValueHome


class WindowKind(NamedMode):
    """Which keys a query may see besides causality."""

    NONE = "none"  # every earlier position
    SLIDING = "sliding"  # the last `size` positions (query included)
    CHUNKED = "chunked"  # positions in the same block of `size` (Llama 4's chunked attention)


@dataclass(frozen=True)
class Window:
    kind: WindowKind = WindowKind.NONE
    size: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "kind", WindowKind.parse(self.kind, "window kind"))

    def describe(self) -> str:
        return "none" if self.kind is WindowKind.NONE else f"{self.kind.value} {self.size}"


class PositionKind(NamedMode):
    ROPE = "rope"  # rotary embedding applied to q and k inside the layer
    NONE = "none"  # no positional signal inside this layer (NoPE layer, or learned absolute)


@dataclass(frozen=True)
class Positions:
    """The layer's positional scheme as data (fusion re-rotates K from these facts)."""

    kind: PositionKind = PositionKind.NONE
    layout: Optional[str] = None  # RoPE only: "half-split" | "interleaved"
    rotary_dims: Optional[int] = None  # RoPE only: leading dims of head_dim that rotate
    head_dim: Optional[int] = None
    theta: Optional[float] = None
    scaling: Optional[dict] = None  # rope_type and its parameters, from the model config

    def __post_init__(self):
        object.__setattr__(self, "kind", PositionKind.parse(self.kind, "position kind"))

    def describe(self) -> str:
        """e.g. "half-split", "interleaved, partial 8/16", "none"."""
        if self.kind is PositionKind.NONE:
            return "none"
        text = self.layout or "rope"
        if self.rotary_dims and self.head_dim and self.rotary_dims != self.head_dim:
            text += f", partial {self.rotary_dims}/{self.head_dim}"
        return text

    def describe_scaling(self) -> str:
        if self.kind is PositionKind.NONE:
            return "-"
        rope_type = (self.scaling or {}).get("rope_type", "default")
        theta = f"θ={self.theta:g}" if self.theta else ""
        return ", ".join(t for t in (theta, rope_type if rope_type != "default" else "") if t) or "-"


@dataclass(frozen=True)
class LayerRecord:
    """One attention layer: its shape, its visibility rule, and how it is cached."""

    layer: int
    module: str
    query_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: Window = field(default_factory=Window)
    causal: bool = True
    softcap: Optional[float] = None  # scores become softcap · tanh(scores / softcap)
    sinks: bool = False  # a learned per-head logit joins the softmax's denominator
    positions: Positions = field(default_factory=Positions)
    kind: LayerKind = LayerKind.FULL
    value_home: ValueHome = ValueHome.DEVICE

    def __post_init__(self):
        object.__setattr__(self, "kind", LayerKind.parse(self.kind, "layer kind"))
        object.__setattr__(self, "value_home", ValueHome.parse(self.value_home, "value home"))
        if isinstance(self.window, dict):
            object.__setattr__(self, "window", Window(**self.window))
        if isinstance(self.positions, dict):
            object.__setattr__(self, "positions", Positions(**self.positions))

    @property
    def host_values(self) -> bool:
        return self.value_home is ValueHome.HOST

    def cached_as(self, kind: LayerKind) -> "LayerRecord":
        """This record with the cache scheme `kind` (which decides where V lives)."""
        home = ValueHome.HOST if kind is LayerKind.KCACHE else ValueHome.DEVICE
        return replace(self, kind=kind, value_home=home)

    def describe(self) -> dict:
        """One row of `kvcompile inspect`'s table."""
        return {
            "layer": self.layer,
            "module": self.module,
            "heads q/kv": f"{self.query_heads}/{self.kv_heads}",
            "head_dim": self.head_dim,
            "window": self.window.describe(),
            "positions": self.positions.describe(),
            "rope params": self.positions.describe_scaling(),
            "softcap": self.softcap if self.softcap is not None else "-",
            "sinks": "yes" if self.sinks else "-",
            "scale": round(self.scale, 6),
            "kind": self.kind.value,
            "V lives on": self.value_home.value,
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(kind=self.kind.value, value_home=self.value_home.value)
        data["window"]["kind"] = self.window.kind.value
        data["positions"]["kind"] = self.positions.kind.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerRecord":
        return cls(**data)
