"""The graph I/O layout: the one flat input/output contract every target and runtime reads.

inputs : input_ids [B, T] int64, position_ids [B, T] int64, then one additive bias
         [B, 1, T, P+T] per distinct window among the layers ("attn_bias" for full attention,
         "attn_bias.sliding_N" / "attn_bias.chunked_N" for windowed layers),
         then per layer i: past_key.{i} [B, Hkv, P, D] and past_value.{i}
         ([B, Hkv, P, D] on the device, or [B, P, Hkv, D] token-major in host memory for
         layers whose record says V lives on the host)
outputs: logits [B, T, V], then per layer i: new_key.{i}, new_value.{i} [B, Hkv, T, D]
         (only this call's tokens: the runtime's cache manager appends them to storage it owns)

`GraphSpec.inputs()` / `.outputs()` list these as TensorSlots with named axes. The runtime,
the ONNX axes, the example inputs for re-export, `inspect` and the manifest all derive from
them, so the layout is written down once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from kvcompile.core.records import LayerRecord, Window, WindowKind

# Dynamic axes by name. context = past + tokens.
BATCH, TOKENS, PAST, CONTEXT = "batch", "tokens", "past", "context"
INDEX_DTYPE = "int64"
ACTIVATION = "activation"  # the graph's dtype (GraphSpec.dtype)

Axis = Union[str, int]


def bias_name(window: Window) -> str:
    """The graph input carrying the additive mask of layers with this window."""
    return "attn_bias" if window.kind is WindowKind.NONE else f"attn_bias.{window.kind.value}_{window.size}"


@dataclass(frozen=True)
class TensorSlot:
    """One graph input or output: its name, axes (names are dynamic, ints fixed), and where it lives."""

    name: str
    axes: Tuple[Axis, ...]
    dtype: str = ACTIVATION
    memory: str = "device"
    role: str = ""

    def shape_text(self) -> str:
        short = {BATCH: "B", TOKENS: "T", PAST: "P", CONTEXT: "P+T"}
        return "[" + ", ".join(short.get(a, str(a)) for a in self.axes) + "]"


@dataclass
class GraphSpec:
    """What a compiled graph computes and how to feed it: model shape + one record per layer."""

    num_layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    layers: List[LayerRecord] = field(default_factory=list)
    max_context: int = 2048

    # the I/O contract --------------------------------------------------------------------
    def key_axes(self) -> Tuple[Axis, ...]:
        return (BATCH, self.kv_heads, PAST, self.head_dim)

    def value_axes(self, layer: int) -> Tuple[Axis, ...]:
        """Axes of past_value.{layer}: host-resident V is token-major, one row per position."""
        if self.layers[layer].host_values:
            return (BATCH, PAST, self.kv_heads, self.head_dim)
        return self.key_axes()

    def value_layout(self, layer: int) -> str:
        """Axis order of past_value.{layer} in letters (value_axes, named)."""
        return "B,P,Hkv,D" if self.layers[layer].host_values else "B,Hkv,P,D"

    def check(self) -> None:
        if len(self.layers) != self.num_layers:
            raise ValueError(f"graph spec describes {self.num_layers} layers but holds {len(self.layers)} layer records")

    def inputs(self) -> List[TensorSlot]:
        self.check()
        slots = [
            TensorSlot("input_ids", (BATCH, TOKENS), INDEX_DTYPE, role="new token ids"),
            TensorSlot("position_ids", (BATCH, TOKENS), INDEX_DTYPE, role="their position ids"),
        ]
        for window in self.bias_windows():
            slots.append(TensorSlot(bias_name(window), (BATCH, 1, TOKENS, CONTEXT),
                                    role=f"additive mask (causal + padding, window {window.describe()}), "
                                         "built by the runtime"))
        for record in self.layers:
            i = record.layer
            slots.append(TensorSlot(f"past_key.{i}", self.key_axes(), role="cached keys"))
            slots.append(TensorSlot(f"past_value.{i}", self.value_axes(i),
                                    memory=record.value_home.value, role="cached values"))
        return slots

    def outputs(self) -> List[TensorSlot]:
        slots = [TensorSlot("logits", (BATCH, TOKENS, self.vocab_size), role="next-token logits")]
        step_axes = (BATCH, self.kv_heads, TOKENS, self.head_dim)
        for record in self.layers:
            i = record.layer
            slots.append(TensorSlot(f"new_key.{i}", step_axes, role="this call's keys, appended by the runtime"))
            slots.append(TensorSlot(f"new_value.{i}", step_axes, role="this call's values, appended by the runtime"))
        return slots

    @property
    def input_names(self) -> List[str]:
        return [slot.name for slot in self.inputs()]

    @property
    def output_names(self) -> List[str]:
        return [slot.name for slot in self.outputs()]

    # facts read from the records ---------------------------------------------------------
    def bias_windows(self) -> List[Window]:
        """The distinct windows of the layers, in order of first appearance: one bias input each."""
        return list(dict.fromkeys(record.window for record in self.layers))

    @property
    def layer_kinds(self) -> list:
        return [record.kind for record in self.layers]

    @property
    def sliding_window(self) -> Optional[int]:
        """The sliding window shared by every windowed layer (None when no layer slides)."""
        sizes = {r.window.size for r in self.layers if r.window.kind is WindowKind.SLIDING}
        return sizes.pop() if len(sizes) == 1 else None

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "query_heads": self.query_heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab_size": self.vocab_size, "dtype": self.dtype,
                "max_context": self.max_context, "layers": [r.to_dict() for r in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        data = dict(data)
        data["layers"] = [LayerRecord.from_dict(r) for r in data.get("layers", [])]
        return cls(**data)
