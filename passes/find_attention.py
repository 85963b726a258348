"""find_attention: locate every attention in a traced model and describe it.

Matches: each `aten.scaled_dot_product_attention` node. Walks back from its key/value inputs over
HF's `repeat_kv` expansion (unsqueeze → expand → reshape) to the per-KV-head tensors, and from the
key to its RoPE application (`x·cos + rotate(x)·sin`, half-split or interleaved, full or partial).
Produces: no graph change; `context.attention_sites`, one AttentionSite per layer in layer order,
each with its LayerRecord (kvcompile/core/records.py): heads, scale, window, positions.

It needs nothing model-specific: whatever computes q/k/v (fused projections, biases, qk-norm,
learned positions) stays upstream and untouched; the cache stores exactly what SDPA consumed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.fx

from kvcompile.core.records import LayerRecord, Positions, PositionKind, Window, WindowKind
from kvcompile.passes.context import PassContext
from kvcompile.passes.manager import compiler_pass

aten = torch.ops.aten
SDPA_TARGETS = (aten.scaled_dot_product_attention.default,)
EXPAND_TARGETS = (aten.expand.default,)
RESHAPE_TARGETS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


class AttentionPatternError(RuntimeError):
    """The model's attention does not have a shape kvcompile can rewrite."""


@dataclass
class AttentionSite:
    """Where one layer's attention sits in the graph, and its record (the facts about it)."""

    record: LayerRecord
    module_type: str
    sdpa: torch.fx.Node  # the attention node; later passes point it at their replacement
    query: torch.fx.Node
    key: torch.fx.Node  # per-KV-head key, before any GQA expansion: [B, Hkv, T, D]
    value: torch.fx.Node  # [B, Hkv, T, D]
    mask: Optional[torch.fx.Node]
    gqa: str  # how the model expanded K/V for GQA: "none" | "repeat_kv" | "enable_gqa"

    # the record's facts, read through
    layer = property(lambda self: self.record.layer)
    module_path = property(lambda self: self.record.module)
    scale = property(lambda self: self.record.scale)
    query_heads = property(lambda self: self.record.query_heads)
    kv_heads = property(lambda self: self.record.kv_heads)
    head_dim = property(lambda self: self.record.head_dim)
    rope = property(lambda self: self.record.positions.describe())

    def describe(self) -> dict:
        row = self.record.describe()
        row.pop("kind"), row.pop("V lives on")
        return {**row, "gqa": self.gqa, "model mask": "is_causal" if self.mask is None else "4D tensor"}


def shape_of(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def module_of(node: torch.fx.Node) -> tuple:
    """(path, class name) of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path.removeprefix("model.").removeprefix("L['self'].model."), cls_name.rsplit(".", 1)[-1]


def layer_index(path: str) -> Optional[int]:
    match = re.search(r"\.(\d+)(\.|$)", path)
    return int(match.group(1)) if match else None


def strip_repeat_kv(node: torch.fx.Node) -> tuple:
    """reshape(expand(unsqueeze(x, 2), [B, Hkv, rep, T, D]), [B, Hkv*rep, T, D]) -> (x, rep)."""
    if node.op != "call_function" or node.target not in RESHAPE_TARGETS:
        return node, 1
    expanded = node.args[0]
    while isinstance(expanded, torch.fx.Node) and expanded.target in (aten.clone.default, aten.contiguous.default):
        expanded = expanded.args[0]
    if not isinstance(expanded, torch.fx.Node) or expanded.target not in EXPAND_TARGETS:
        return node, 1
    unsqueezed = expanded.args[0]
    if unsqueezed.target != aten.unsqueeze.default or unsqueezed.args[1] != 2:
        return node, 1
    source = unsqueezed.args[0]
    source_shape, out_shape = shape_of(source), shape_of(node)
    if source_shape is None or out_shape is None or len(source_shape) != 4:
        return node, 1
    return source, out_shape[1] // source_shape[1]


CAST_TARGETS = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default)


def skip_casts(node):
    """Step over dtype casts and copies (e.g. Cohere and OLMo-2 rotate in fp32, then cast back)."""
    while isinstance(node, torch.fx.Node) and node.target in CAST_TARGETS:
        node = node.args[0]
    return node


def rope_layout(key: torch.fx.Node) -> tuple:
    """(layout, rotary dims) of the rotary embedding applied to `key`, or (None, None) for none.

    layout is "half-split" or "interleaved" (or "unrecognised rotation"); the graph keeps
    computing the rotation, this only names it for the record.
    """
    rotary_dims = None
    node = skip_casts(key)
    if node.target == aten.cat.default and len(node.args[0]) == 2:
        rotated, _passthrough = node.args[0]
        rot_shape = shape_of(rotated)
        rotary_dims = int(rot_shape[-1]) if rot_shape else None
        node = skip_casts(rotated)
    if node.target != aten.add.Tensor:
        return None, None
    products = [a for a in node.args if isinstance(a, torch.fx.Node) and a.target == aten.mul.Tensor]
    if len(products) != 2:
        return None, None
    for product in products:
        for operand in product.args:
            if not isinstance(operand, torch.fx.Node):
                continue
            if operand.target == aten.cat.default and any(
                isinstance(a, torch.fx.Node) and a.target == aten.neg.default for a in operand.args[0]
            ):
                return "half-split", rotary_dims
            if operand.target in (aten.flatten.using_ints, aten.view.default, aten.reshape.default) and any(
                isinstance(a, torch.fx.Node) and a.target == aten.stack.default for a in operand.args
            ):
                return "interleaved", rotary_dims
    return "unrecognised rotation", rotary_dims


def layer_type(config, layer: int) -> Optional[str]:
    types = getattr(config, "layer_types", None)
    return types[layer] if types and layer < len(types) else None


def rope_parameters(config, layer: int) -> Optional[dict]:
    """The RoPE parameters of a layer (transformers 5 keys them by layer type where they differ)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return None
    kind = layer_type(config, layer)
    if kind in params and isinstance(params[kind], dict):
        params = params[kind]
    return {k: v for k, v in params.items() if not isinstance(v, dict)}


def positions_of(key: torch.fx.Node, config, layer: int, head_dim: int) -> Positions:
    layout, rotary_dims = rope_layout(key)
    if layout is None:
        learned = any(hasattr(config, name) for name in ("n_positions",)) if config is not None else False
        return Positions(PositionKind.NONE, learned_absolute=learned)
    params = rope_parameters(config, layer) if config is not None else None
    theta = (params or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return Positions(PositionKind.ROPE, layout=layout, rotary_dims=rotary_dims or head_dim, head_dim=head_dim,
                     theta=float(theta) if theta is not None else None, scaling=params)


def window_of(config, layer: int) -> Window:
    """The layer's window, as the model's config states it."""
    if config is None:
        return Window()
    size = getattr(config, "sliding_window", None)
    if size is None or not getattr(config, "use_sliding_window", True):
        return Window()
    return Window(WindowKind.SLIDING, int(size))


def attention_modules(graph_module: torch.fx.GraphModule) -> dict:
    """Module paths that look like attention blocks (for a useful error when SDPA is absent)."""
    found = {}
    for node in graph_module.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            cls_name = (cls if isinstance(cls, str) else getattr(cls, "__name__", "")).rsplit(".", 1)[-1]
            if "Attention" in cls_name:
                clean = path.removeprefix("model.").removeprefix("L['self'].model.")
                found.setdefault(clean, cls_name)
    return found


@compiler_pass(produces=("attention_sites",))
def find_attention(graph_module: torch.fx.GraphModule, context: PassContext) -> list:
    """Locate each SDPA node with its layer, q/k/v producers, GQA expansion, RoPE, mask and scale."""
    sites: List[AttentionSite] = []
    sdpa_nodes = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    if not sdpa_nodes:
        modules = attention_modules(graph_module)
        where = ", ".join(f"layer {layer_index(p)} ({p}, {c})" for p, c in list(modules.items())[:3])
        raise AttentionPatternError(
            (f"{where}: " if where else "")
            + "pattern 'scaled_dot_product_attention' not found — this attention is computed another way "
            "(eager matmul/softmax or a fused kernel); load the model with attn_implementation='sdpa'"
        )
    for ordinal, node in enumerate(sdpa_nodes):
        path, cls_name = module_of(node)
        layer = layer_index(path)
        layer = ordinal if layer is None else layer
        where = f"layer {layer} ({path or node.name})"
        query, key, value = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0):
            raise AttentionPatternError(f"{where}: attention has dropout; call model.eval() before compiling")
        enable_gqa = bool(node.kwargs.get("enable_gqa", False))
        gqa = "enable_gqa" if enable_gqa else "none"
        if not enable_gqa:
            key, key_rep = strip_repeat_kv(key)
            value, value_rep = strip_repeat_kv(value)
            if key_rep != value_rep:
                raise AttentionPatternError(f"{where}: key and value are expanded differently for GQA")
            gqa = "repeat_kv" if key_rep > 1 else "none"
        q_shape, k_shape, v_shape = shape_of(query), shape_of(key), shape_of(value)
        if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
            raise AttentionPatternError(
                f"{where}: pattern 'query/key as [batch, heads, tokens, head_dim]' not found (got {q_shape} / {k_shape})"
            )
        if v_shape != k_shape:
            raise AttentionPatternError(f"{where}: key {k_shape} and value {v_shape} differ in shape; not supported")
        query_heads, head_dim = int(q_shape[1]), int(q_shape[3])
        kv_heads = int(k_shape[1])
        if query_heads % kv_heads:
            raise AttentionPatternError(f"{where}: {query_heads} query heads do not group over {kv_heads} KV heads")
        scale = node.kwargs.get("scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        config = context.model_config
        record = LayerRecord(layer=layer, module=path, query_heads=query_heads, kv_heads=kv_heads,
                             head_dim=head_dim, scale=scale, window=window_of(config, layer),
                             positions=positions_of(key, config, layer, head_dim))
        sites.append(AttentionSite(record=record, module_type=cls_name, sdpa=node, query=query, key=key,
                                   value=value, mask=mask, gqa=gqa))
    sites.sort(key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise AttentionPatternError(f"several attention calls share a layer index: {layers}")
    context.attention_sites = sites
    return [s.describe() for s in sites]
