"""The facts of one layer's attention: read off the graph, cross-checked against the config.

`find_attention` calls these to fill a LayerRecord. The graph is the primary source (what the
traced model really computes); the config says what the model means. When both state a fact
(a layer's window, whether it rotates its keys) and they disagree, that is an error naming the
layer — kvcompile never guesses which one is right.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from kvcompile.core.records import Positions, PositionKind, Window, WindowKind
from kvcompile.frontend.attention_capture import UnsupportedAttentionError

aten = torch.ops.aten


class AttentionPatternError(UnsupportedAttentionError):
    """A layer whose graph and config disagree, or whose attention kvcompile cannot represent exactly."""



def shape_of(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


PROJECTIONS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default)
SEARCH_LIMIT = 40  # nodes visited between the key and its projection


def rotation_layout(node: torch.fx.Node) -> Optional[str]:
    """The rotation `node` computes, if it is one: "half-split" (x·cos + cat(-x2, x1)·sin),
    "interleaved" (x·cos + stack(-x_odd, x_even)·sin, or complex multiplication), else None."""
    if node.target == aten.view_as_real.default:
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.target == aten.mul.Tensor:
            return "interleaved"  # adjacent (even, odd) pairs as complex numbers (Llama 4)
        return None
    if node.target == aten.cat.default and len(node.args[0]) == 2 and two_product_sums(node.args[0]):
        return "half-split"  # cat(x1·cos - x2·sin, x2·cos + x1·sin) (GPT-OSS writes it this way)
    if node.target != aten.add.Tensor:
        return None
    products = [a for a in node.args if isinstance(a, torch.fx.Node) and a.target == aten.mul.Tensor]
    if len(products) != 2:
        return None
    for product in products:
        for operand in product.args:
            if not isinstance(operand, torch.fx.Node):
                continue
            if operand.target == aten.cat.default and any(
                isinstance(a, torch.fx.Node) and a.target == aten.neg.default for a in operand.args[0]
            ):
                return "half-split"
            if operand.target in (aten.flatten.using_ints, aten.view.default, aten.reshape.default) and any(
                isinstance(a, torch.fx.Node) and a.target == aten.stack.default for a in operand.args
            ):
                return "interleaved"
    return "unrecognised rotation"


def two_product_sums(halves) -> bool:
    """Both halves are a difference / sum of two products (a rotation written out per half)."""
    targets = [h.target if isinstance(h, torch.fx.Node) else None for h in halves]
    if sorted(map(str, targets)) != sorted(map(str, (aten.sub.Tensor, aten.add.Tensor))):
        return False
    return all(sum(isinstance(a, torch.fx.Node) and a.target == aten.mul.Tensor for a in h.args) == 2 for h in halves)


def rope_layout(key: torch.fx.Node) -> tuple:
    """(layout, rotary dims) of the rotary embedding applied to `key`, or (None, None) for none.

    Searches the key's producers back to its projection (through casts, reshapes, norms applied
    after the rotation, partial-rotary concatenation) for a rotation. The graph keeps computing
    the rotation; this names it for the layer's record (fusion re-rotates keys from it).
    """
    frontier, seen = [key], set()
    while frontier and len(seen) < SEARCH_LIMIT:
        node = frontier.pop(0)
        if not isinstance(node, torch.fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in PROJECTIONS:
            continue
        layout = rotation_layout(node)
        if layout is not None:
            shape = shape_of(node)
            if node.target == aten.view_as_real.default and shape:
                return layout, int(shape[-1]) * int(shape[-2])
            return layout, int(shape[-1]) if shape else None
        for arg in node.args:
            for item in (arg if isinstance(arg, (list, tuple)) else [arg]):
                if isinstance(item, torch.fx.Node) and not is_constant_like(item):
                    frontier.append(item)
    return None, None


def is_constant_like(node: torch.fx.Node) -> bool:
    return node.op in ("get_attr", "placeholder")


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
        return Positions(PositionKind.NONE)
    params = rope_parameters(config, layer) if config is not None else None
    theta = (params or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return Positions(PositionKind.ROPE, layout=layout, rotary_dims=rotary_dims or head_dim, head_dim=head_dim,
                     theta=float(theta) if theta is not None else None, scaling=params)


LAYER_TYPE_WINDOWS = {"full_attention": WindowKind.NONE, "sliding_attention": WindowKind.SLIDING,
                      "chunked_attention": WindowKind.CHUNKED}


def config_window(config, layer: int) -> Optional[Window]:
    """The layer's window as the config states it; None when the config does not say."""
    if config is None:
        return None
    kind = layer_type(config, layer)
    if kind is not None:
        if kind not in LAYER_TYPE_WINDOWS:
            raise AttentionPatternError(f"layer {layer}: layer type {kind!r} is not attention kvcompile can cache")
        window = LAYER_TYPE_WINDOWS[kind]
        if window is WindowKind.SLIDING:
            return Window(window, int(config.sliding_window))
        if window is WindowKind.CHUNKED:
            return Window(window, int(config.attention_chunk_size))
        return Window()
    size = getattr(config, "sliding_window", None)
    if size is None or not getattr(config, "use_sliding_window", True):
        return Window()
    return Window(WindowKind.SLIDING, int(size))


def checked_window(graph_window: Optional[Window], config, layer: int, where: str) -> Window:
    """The graph's window when the graph states one (captured attention), checked against the
    config's; else the config's (SDPA matching sees no window)."""
    stated = config_window(config, layer)
    if graph_window is None:
        return stated or Window()
    if stated is not None and stated != graph_window:
        raise AttentionPatternError(f"{where}: the traced attention's window ({graph_window.describe()}) disagrees with "
                              f"the model config's ({stated.describe()})")
    return graph_window


def config_says_rope(config, layer: int) -> Optional[bool]:
    """Whether the config says this layer rotates q/k (`no_rope_layers`: 1 = RoPE, 0 = NoPE)."""
    flags = getattr(config, "no_rope_layers", None) if config is not None else None
    if isinstance(flags, (list, tuple)) and layer < len(flags):
        return bool(flags[layer])
    return None


def checked_positions(key: torch.fx.Node, config, layer: int, head_dim: int, where: str) -> Positions:
    positions = positions_of(key, config, layer, head_dim)
    says_rope = config_says_rope(config, layer)
    if says_rope is not None and says_rope != (positions.kind is PositionKind.ROPE):
        raise AttentionPatternError(f"{where}: the config says {'RoPE' if says_rope else 'NoPE'} but the traced keys are "
                              f"{'rotated' if positions.kind is PositionKind.ROPE else 'not rotated'}")
    if positions.kind is PositionKind.NONE and getattr(config, "attn_temperature_tuning", False):
        raise AttentionPatternError(f"{where}: query temperature tuning from cache positions (attn_temperature_tuning) "
                              "is not supported")
    return positions
