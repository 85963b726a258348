"""GraphSpec: the flat input/output contract of a compiled graph, shared by every runtime.

inputs : input_ids [B, T] int64, position_ids [B, T] int64, attn_bias [B, 1, T, P+T] (additive),
         then per layer i: past_key.{i} [B, Hkv, P, D] and past_value.{i}
         ([B, Hkv, P, D] for "full" layers, [B, P, Hkv, D] host-resident for "kcache" layers)
outputs: logits [B, T, V], then per layer i: new_key.{i}, new_value.{i} [B, Hkv, T, D]
         (only this call's tokens: the runtime's cache manager appends them to storage it owns)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

FIXED_INPUTS = ("input_ids", "position_ids", "attn_bias")


@dataclass
class GraphSpec:
    num_layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    layer_kinds: List[str] = field(default_factory=list)  # "full" | "kcache" per layer
    sliding_window: Optional[int] = None
    max_context: int = 2048

    @property
    def input_names(self) -> List[str]:
        names = list(FIXED_INPUTS)
        for i in range(self.num_layers):
            names += [f"past_key.{i}", f"past_value.{i}"]
        return names

    @property
    def output_names(self) -> List[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"new_key.{i}", f"new_value.{i}"]
        return names

    def value_layout(self, layer: int) -> str:
        """Axis order of past_value.{layer}: host-resident V is token-major."""
        return "B,P,Hkv,D" if self.layer_kinds[layer] == "kcache" else "B,Hkv,P,D"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(**data)
