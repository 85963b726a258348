"""find_attention: locate every attention in a traced model and describe it.

Matches: each `kvcompile::captured_attention` node (models that call transformers' attention
interface: the node's arguments are the layer's scale, window, soft-cap and sinks), or else each
`aten.scaled_dot_product_attention` node, walked back over HF's `repeat_kv` expansion
(unsqueeze → expand → reshape) to the per-KV-head tensors. From the key it walks to the RoPE
application (`x·cos + rotate(x)·sin`, half-split or interleaved, full or partial).
Produces: no graph change; `context.attention_sites`, one AttentionSite per layer in layer order,
each with its LayerRecord (kvcompile/core/records.py), every fact cross-checked against the model
config (passes/layer_facts.py). What cannot be represented exactly is refused by layer and feature.

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

from kvcompile.core.records import LayerRecord, Window, WindowKind
from kvcompile.ops import registry
from kvcompile.passes.context import PassContext
from kvcompile.passes.layer_facts import AttentionPatternError, checked_positions, checked_window, shape_of
from kvcompile.passes.manager import compiler_pass

aten = torch.ops.aten
SDPA_TARGETS = (aten.scaled_dot_product_attention.default,)
EXPAND_TARGETS = (aten.expand.default,)
RESHAPE_TARGETS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


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
    gqa: str  # how K/V reached attention: "captured" (per KV head) | "none" | "repeat_kv" | "enable_gqa"
    sinks: Optional[torch.fx.Node] = None  # the layer's sink logits [Hq] (a parameter), if any

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
        return {**row, "captured as": self.gqa if self.gqa == "captured" else f"sdpa ({self.gqa})"}


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
    """Locate each layer's attention (captured node or SDPA) and describe it in a LayerRecord."""
    captured_op = registry.get("captured_attention").torch_op
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    captured = [n for n in nodes if n.target is captured_op]
    sdpa_nodes = [n for n in nodes if n.target in SDPA_TARGETS]
    if captured and sdpa_nodes:
        raise AttentionPatternError(f"{module_of(sdpa_nodes[0])[0] or sdpa_nodes[0].name}: some layers use SDPA "
                                    "outside transformers' attention interface; mixed attention is not supported")
    if not captured and not sdpa_nodes:
        modules = attention_modules(graph_module)
        where = ", ".join(f"layer {layer_index(p)} ({p}, {c})" for p, c in list(modules.items())[:3])
        raise AttentionPatternError(
            (f"{where}: " if where else "")
            + "attention is computed by the model's own code (not through transformers' attention interface, and "
            "no 'scaled_dot_product_attention' pattern)"
            + (", with ALiBi position biases" if uses_alibi(context.model_config) else "")
            + " — not supported; a model with an SDPA implementation can be loaded with attn_implementation='sdpa'")
    describe = describe_captured if captured else describe_sdpa
    sites = [describe(node, ordinal, context) for ordinal, node in enumerate(captured or sdpa_nodes)]
    sites.sort(key=lambda s: s.layer)
    check_layers(sites)
    context.attention_sites = sites
    return [s.describe() for s in sites]


def uses_alibi(config) -> bool:
    return bool(getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False))


def check_layers(sites: List[AttentionSite]) -> None:
    """One attention per layer, one cache shape for all layers, no layer reading another's K/V."""
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise AttentionPatternError(f"several attention calls share a layer index: {layers} "
                                    "(e.g. differential attention) — not supported")
    if layers != list(range(len(layers))):
        raise AttentionPatternError(f"attention layers are {layers}, not 0..{len(layers) - 1} "
                                    "(layers without attention) — not supported")
    first = sites[0]
    for site in sites[1:]:
        if (site.kv_heads, site.head_dim) != (first.kv_heads, first.head_dim):
            raise AttentionPatternError(
                f"layer {site.layer}: {site.kv_heads} KV heads of dim {site.head_dim}, layer 0 has {first.kv_heads} "
                f"of dim {first.head_dim} (per-layer cache shapes) — not supported")
    seen = {}
    for site in sites:
        if site.key in seen:
            raise AttentionPatternError(f"layer {site.layer}: reuses layer {seen[site.key]}'s keys "
                                        "(cross-layer KV sharing) — not supported")
        seen[site.key] = site.layer


def heads_and_dims(query, key, value, where: str) -> tuple:
    q_shape, k_shape, v_shape = shape_of(query), shape_of(key), shape_of(value)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        raise AttentionPatternError(
            f"{where}: pattern 'query/key as [batch, heads, tokens, head_dim]' not found (got {q_shape} / {k_shape})")
    if v_shape != k_shape:
        raise AttentionPatternError(f"{where}: key {k_shape} and value {v_shape} differ in shape; not supported")
    query_heads, head_dim, kv_heads = int(q_shape[1]), int(q_shape[3]), int(k_shape[1])
    if query_heads % kv_heads:
        raise AttentionPatternError(f"{where}: {query_heads} query heads do not group over {kv_heads} KV heads")
    return query_heads, kv_heads, head_dim


def describe_captured(node: torch.fx.Node, ordinal: int, context: PassContext) -> AttentionSite:
    """A kvcompile::captured_attention node: its arguments are the layer's facts."""
    query, key, value, sinks, scale, softcap, window, chunk, causal, layer = node.args
    path, cls_name = module_of(node)
    layer = ordinal if layer < 0 else layer
    where = f"layer {layer} ({path or node.name})"
    if not causal:
        raise AttentionPatternError(f"{where}: bidirectional (non-causal) attention cannot be cached — not supported")
    query_heads, kv_heads, head_dim = heads_and_dims(query, key, value, where)
    traced_window = (Window(WindowKind.CHUNKED, chunk) if chunk > 0 else
                     Window(WindowKind.SLIDING, window) if window > 0 else Window())
    config = context.model_config
    record = LayerRecord(layer=layer, module=path, query_heads=query_heads, kv_heads=kv_heads, head_dim=head_dim,
                         scale=float(scale), window=checked_window(traced_window, config, layer, where),
                         softcap=float(softcap) if softcap > 0 else None, sinks=sinks is not None,
                         positions=checked_positions(key, config, layer, head_dim, where))
    return AttentionSite(record=record, module_type=cls_name, sdpa=node, query=query, key=key, value=value,
                         mask=None, gqa="captured", sinks=sinks)


def describe_sdpa(node: torch.fx.Node, ordinal: int, context: PassContext) -> AttentionSite:
    """An aten SDPA node: walk back over repeat_kv; the window comes from the config."""
    path, cls_name = module_of(node)
    layer = layer_index(path)
    layer = ordinal if layer is None else layer
    where = f"layer {layer} ({path or node.name})"
    query, key, value = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0):
        raise AttentionPatternError(f"{where}: attention has dropout; call model.eval() before compiling")
    if uses_alibi(context.model_config):
        raise AttentionPatternError(f"{where}: ALiBi position biases in the attention mask — not supported")
    mask_value = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
    if isinstance(mask_value, torch.Tensor) and mask_value.is_floating_point():
        raise AttentionPatternError(f"{where}: the model adds a float bias to the attention scores "
                                    "(not a plain causal/padding mask) — not supported")
    enable_gqa = bool(node.kwargs.get("enable_gqa", False))
    gqa = "enable_gqa" if enable_gqa else "none"
    if not enable_gqa:
        key, key_rep = strip_repeat_kv(key)
        value, value_rep = strip_repeat_kv(value)
        if key_rep != value_rep:
            raise AttentionPatternError(f"{where}: key and value are expanded differently for GQA")
        gqa = "repeat_kv" if key_rep > 1 else "none"
    query_heads, kv_heads, head_dim = heads_and_dims(query, key, value, where)
    scale = node.kwargs.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    config = context.model_config
    record = LayerRecord(layer=layer, module=path, query_heads=query_heads, kv_heads=kv_heads, head_dim=head_dim,
                         scale=scale, window=checked_window(None, config, layer, where),
                         positions=checked_positions(key, config, layer, head_dim, where))
    return AttentionSite(record=record, module_type=cls_name, sdpa=node, query=query, key=key, value=value,
                         mask=mask, gqa=gqa)
