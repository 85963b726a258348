"""kcache_attention as an ONNX function: node inputs, attributes and body.

value_host is [B, P, Hkv, D], token-major (one host row per position).
"""
from __future__ import annotations

from typing import Sequence

from onnxscript import opset18 as op
from onnxscript import script

from kvcompile.core.modes import SelectMode
from kvcompile.ops.onnx_domain import ATTENTION_ATTRIBUTES, TBias, TFloat, attention_attributes, attention_probs, kvcompile_opset
from kvcompile.ops.registry import NodeAttribute, OnnxDefinition


@script(kvcompile_opset, default_opset=op)
def kcache_attention(query: TFloat, key: TFloat, value: TFloat, key_cache: TFloat, value_host: TFloat,
                     attn_bias: TBias, scale: float, topn: int, topn_numerator: int,
                     topn_denominator: int, select_layer: int, renormalize: int, softcap: float = 0.0,
                     sinks: Sequence[float] = (float("-inf"),)) -> TFloat:
    # The op is defined in float32 math (definition.py): with fp16 inputs the top-N choice
    # would otherwise differ from torch's. A no-op for float32 graphs.
    query_f = op.Cast(query, to=1)  # FLOAT
    keys = op.Cast(op.Concat(key_cache, key, axis=2), to=1)  # [B, Hkv, S, D]
    probs = attention_probs(query_f, keys, op.Cast(attn_bias, to=1), scale=scale, softcap=softcap,
                            sinks=sinks)  # [B, Hkv, G, T, S]

    # Which positions each KV head (or the whole layer) keeps: the top-N by probability
    # mass summed over its query heads and this call's query rows.
    head_score = op.ReduceSum(probs, op.Constant(value_ints=[2, 3]), keepdims=0)  # [B, Hkv, S]
    layer_score = op.Expand(op.ReduceSum(head_score, op.Constant(value_ints=[1]), keepdims=1),
                            op.Shape(head_score))
    shared = op.Cast(op.Constant(value_int=select_layer), to=9)  # BOOL
    score = op.Where(shared, layer_score, head_score)

    past_len = op.Shape(key_cache, start=2, end=3)  # [1]
    context_len = op.Shape(keys, start=2, end=3)
    # Prefill (no past) is plain attention: V is still on the device, nothing to retrieve.
    # topn is absolute, or (topn_denominator > 0) the fraction numerator/denominator of the
    # context rounded half up, at least 1: kvcompile.core.config.topn_for_context.
    one = op.Constant(value_ints=[1])
    absolute = op.Reshape(op.Constant(value_int=topn), one)
    numerator = op.Reshape(op.Constant(value_int=topn_numerator), one)
    denominator = op.Reshape(op.Constant(value_int=topn_denominator), one)
    safe_denominator = op.Max(denominator, one)  # Where evaluates both branches: no division by 0
    half = op.Div(safe_denominator, op.Constant(value_ints=[2]))
    fractional = op.Max(op.Div(op.Add(op.Mul(context_len, numerator), half), safe_denominator), one)
    wanted = op.Where(op.Greater(denominator, op.Constant(value_ints=[0])), fractional, absolute)
    top_n = op.Min(wanted, context_len)
    count = op.Where(op.Equal(past_len, op.Constant(value_ints=[0])), context_len, top_n)
    # (the unused scores get a name of their own: TensorRT-RTX's builder refused the inlined bodies
    # of 8 layers, each with a tensor named "_", as duplicate tensor names)
    top_scores, chosen = op.TopK(score, count, axis=-1)  # [B, Hkv, N]

    # V rows of past positions come from host memory (token-major), new ones from `value`.
    values = op.Cast(op.Concat(op.Transpose(value_host, perm=[0, 2, 1, 3]), value, axis=2), to=1)  # [B, Hkv, S, D]
    row_index = op.Expand(op.Unsqueeze(chosen, op.Constant(value_ints=[3])),
                          op.Concat(op.Shape(chosen), op.Shape(values, start=3, end=4), axis=0))
    chosen_values = op.GatherElements(values, row_index, axis=2)  # [B, Hkv, N, D]

    prob_index = op.Unsqueeze(chosen, op.Constant(value_ints=[2, 3]))  # [B, Hkv, 1, 1, N]
    prob_index = op.Expand(prob_index, op.Concat(op.Shape(probs, start=0, end=4),
                                                 op.Shape(chosen, start=2, end=3), axis=0))
    chosen_probs = op.GatherElements(probs, prob_index, axis=4)  # [B, Hkv, G, T, N]
    mass = op.ReduceSum(chosen_probs, op.Constant(value_ints=[-1]), keepdims=1)
    renorm = op.Cast(op.Constant(value_int=renormalize), to=9)
    chosen_probs = op.Where(renorm, op.Div(chosen_probs, mass), chosen_probs)

    grouped = op.MatMul(chosen_probs, op.Unsqueeze(chosen_values, op.Constant(value_ints=[2])))  # [B, Hkv, G, T, D]
    return op.CastLike(op.Reshape(grouped, op.Shape(query)), query)


class TopnError(RuntimeError):
    """A computed topn the cache config does not explain."""


def node_attributes(scale: float, topn, select: str, renormalize: bool, softcap: float = 0.0, sinks=None,
                    context=None) -> dict:
    """An absolute topn arrives as an int; a fractional one arrives as a value the kcache pass
    computed from the context length, which an ONNX attribute cannot hold, so the node carries
    the fraction itself (from the export context) and its body redoes that arithmetic."""
    fraction = getattr(context, "topn_fraction", None)
    if isinstance(topn, int):
        topn_attrs = dict(topn=topn, topn_numerator=0, topn_denominator=0)
    elif fraction is not None:
        topn_attrs = dict(topn=0, topn_numerator=fraction.numerator, topn_denominator=fraction.denominator)
    else:
        raise TopnError("kcache_attention has a computed topn but the cache config has no fractional topn")
    return dict(scale=scale, **topn_attrs, select_layer=SelectMode(select).code,
                renormalize=int(bool(renormalize)), **attention_attributes(softcap, sinks))


DEFINITION = OnnxDefinition(
    inputs=("query", "key", "value", "key_cache", "value_host", "attn_bias"),
    attributes=(
        NodeAttribute("scale", "float", "softmax scale"),
        NodeAttribute("topn", "int", "positions kept (used when topn_denominator is 0)"),
        NodeAttribute("topn_numerator", "int", "with topn_denominator > 0, keep max(1, round-half-up("
                                               "context * numerator / denominator)) positions"),
        NodeAttribute("topn_denominator", "int", "0 = topn is absolute"),
        NodeAttribute("select_layer", "int", "SelectMode code: 0 = top-N per KV head, 1 = one top-N "
                                             "shared by the layer"),
        NodeAttribute("renormalize", "int", "1 = divide by the kept probability mass"),
        *ATTENTION_ATTRIBUTES,
    ),
    node_attributes=node_attributes,
    body=kcache_attention,
    helpers=(attention_probs,),
)
