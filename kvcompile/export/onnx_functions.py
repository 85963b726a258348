"""kvcompile's custom ops as ONNX functions in domain `kvcompile`.

Each op is exported as ONE node `kvcompile::<op name>` whose model-local function body,
written here with standard ONNX ops, defines what it computes. Stock ONNX Runtime inlines
the body and runs it; TensorRT's parser maps a node of that name to a registered plugin when
one exists and otherwise inlines the same body. So the body is the contract a plugin must
match, and the tests check it against the torch ops numerically.

Node attributes (all plain numbers, so bodies need no string tensors, which TensorRT lacks):
  cached_attention : scale (float)
  kcache_attention : scale (float), topn (int), topn_numerator / topn_denominator (ints; a
                     fractional topn of the context when the denominator is > 0),
                     select_layer (int: 0 = one top-N per KV head, 1 = one top-N shared by
                     all heads of the layer, torch's select="layer"), renormalize (int 0/1)

Shapes (D = head dim, G = Hq // Hkv query heads per KV head, S = P + T):
  query [B, Hq, T, D]; key, value [B, Hkv, T, D]; key_cache [B, Hkv, P, D];
  value_cache [B, Hkv, P, D] (cached_attention) or value_host [B, P, Hkv, D] (kcache_attention,
  token-major: one host row per position); attn_bias [B, 1, T, S] additive; out [B, Hq, T, D].
Bodies group query heads as [B, Hkv, G, T, D] so GQA needs no repeat of K/V.
"""
from __future__ import annotations

from typing import TypeVar, Union

import onnx
from onnxscript import BFLOAT16, FLOAT, FLOAT16
from onnxscript import opset18 as op
from onnxscript import script
from onnxscript.values import Op, Opset

DOMAIN = "kvcompile"
DOMAIN_VERSION = 1
STANDARD_OPSET = 18  # must equal the ai.onnx opset of the graphs these functions live in
kvcompile_opset = Opset(DOMAIN, DOMAIN_VERSION)

# Type annotations are what torch.onnx reads to know each function's inputs and outputs.
TFloat = TypeVar("TFloat", bound=Union[FLOAT, FLOAT16, BFLOAT16])
TBias = TypeVar("TBias", bound=Union[FLOAT, FLOAT16, BFLOAT16])


@script(kvcompile_opset, default_opset=op)
def attention_probs(query: TFloat, keys: TFloat, attn_bias: TBias, scale: float) -> TFloat:
    """softmax(q·keysᵀ·scale + bias), with query heads grouped per KV head.

    query [B, Hq, T, D], keys [B, Hkv, S, D], attn_bias [B, 1, T, S] -> [B, Hkv, G, T, S]
    """
    grouped_shape = op.Concat(op.Shape(keys, start=0, end=2), op.Constant(value_ints=[-1]),
                              op.Shape(query, start=2, end=4), axis=0)
    grouped_query = op.Reshape(query, grouped_shape)  # [B, Hkv, G, T, D]
    keys_t = op.Unsqueeze(op.Transpose(keys, perm=[0, 1, 3, 2]), op.Constant(value_ints=[2]))  # [B, Hkv, 1, D, S]
    scale_value = op.CastLike(op.Constant(value_float=scale), query)
    scores = op.Mul(op.MatMul(grouped_query, keys_t), scale_value)  # [B, Hkv, G, T, S]
    bias = op.Unsqueeze(op.CastLike(attn_bias, query), op.Constant(value_ints=[1]))  # [B, 1, 1, T, S]
    return op.Softmax(op.Add(scores, bias), axis=-1)


@script(kvcompile_opset, default_opset=op)
def cached_attention(query: TFloat, key: TFloat, value: TFloat, key_cache: TFloat, value_cache: TFloat,
                     attn_bias: TBias, scale: float) -> TFloat:
    keys = op.Concat(key_cache, key, axis=2)  # [B, Hkv, S, D]
    values = op.Concat(value_cache, value, axis=2)
    probs = attention_probs(query, keys, attn_bias, scale=scale)  # [B, Hkv, G, T, S]
    grouped = op.MatMul(probs, op.Unsqueeze(values, op.Constant(value_ints=[2])))  # [B, Hkv, G, T, D]
    return op.Reshape(grouped, op.Shape(query))


@script(kvcompile_opset, default_opset=op)
def kcache_attention(query: TFloat, key: TFloat, value: TFloat, key_cache: TFloat, value_host: TFloat,
                     attn_bias: TBias, scale: float, topn: int, topn_numerator: int,
                     topn_denominator: int, select_layer: int, renormalize: int) -> TFloat:
    # The op is defined in float32 math (kvcompile/ops/kcache_attention.py): with fp16 inputs
    # the top-N choice would otherwise differ from torch's. A no-op for float32 graphs.
    query_f = op.Cast(query, to=1)  # FLOAT
    keys = op.Cast(op.Concat(key_cache, key, axis=2), to=1)  # [B, Hkv, S, D]
    probs = attention_probs(query_f, keys, op.Cast(attn_bias, to=1), scale=scale)  # [B, Hkv, G, T, S]

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
    # context rounded half up, at least 1: the same integer arithmetic the kcache pass emits.
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
    _, chosen = op.TopK(score, count, axis=-1)  # [B, Hkv, N]

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


# The exporter inlines every function it knows about when it converts opset versions, so
# the graph is built with bare kvcompile nodes (these schemas exist only to let onnxscript
# record such a node, they are never registered with onnx) and `function_protos` attaches
# the bodies afterwards.
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_AttrType = onnx.defs.OpSchema.AttrType


def _node_schema(name: str, inputs: list[str], attributes: dict) -> onnx.defs.OpSchema:
    def formal(param):
        return onnx.defs.OpSchema.FormalParameter(param, "TBias" if param == "attn_bias" else "T")

    return onnx.defs.OpSchema(
        name, DOMAIN, DOMAIN_VERSION,
        inputs=[formal(param) for param in inputs],
        outputs=[formal("output")],
        type_constraints=[("T", _FLOAT_TYPES, "activations"), ("TBias", _FLOAT_TYPES, "additive bias")],
        attributes=[onnx.defs.OpSchema.Attribute(attr, kind, "", required=True) for attr, kind in attributes.items()],
    )


# What a plugin of the same name reads (also recorded in each artifact's manifest).
NODE_ATTRIBUTES = {
    "cached_attention": {"scale": "float: softmax scale"},
    "kcache_attention": {"scale": "float: softmax scale",
                         "topn": "int: positions kept (used when topn_denominator is 0)",
                         "topn_numerator": "int: with topn_denominator > 0, keep max(1, round-half-up("
                                           "context * numerator / denominator)) positions",
                         "topn_denominator": "int: 0 = topn is absolute",
                         "select_layer": "int: 0 = top-N per KV head, 1 = one top-N shared by the layer",
                         "renormalize": "int: 1 = divide by the kept probability mass"},
}
_ATTRIBUTE_TYPES = {"scale": _AttrType.FLOAT, "topn": _AttrType.INT, "topn_numerator": _AttrType.INT,
                    "topn_denominator": _AttrType.INT, "select_layer": _AttrType.INT,
                    "renormalize": _AttrType.INT}
cached_attention_node = Op(kvcompile_opset, "cached_attention", _node_schema(
    "cached_attention", ["query", "key", "value", "key_cache", "value_cache", "attn_bias"],
    {name: _ATTRIBUTE_TYPES[name] for name in NODE_ATTRIBUTES["cached_attention"]}))
kcache_attention_node = Op(kvcompile_opset, "kcache_attention", _node_schema(
    "kcache_attention", ["query", "key", "value", "key_cache", "value_host", "attn_bias"],
    {name: _ATTRIBUTE_TYPES[name] for name in NODE_ATTRIBUTES["kcache_attention"]}))


# Functions a graph must carry for each top-level kvcompile node (helpers included).
FUNCTIONS = {
    "cached_attention": (cached_attention, attention_probs),
    "kcache_attention": (kcache_attention, attention_probs),
}


def function_protos(op_names) -> list:
    """The FunctionProtos needed by nodes of the given kvcompile op names, deduplicated."""
    seen, protos = set(), []
    for name in op_names:
        for function in FUNCTIONS[name]:
            if function.name not in seen:
                seen.add(function.name)
                protos.append(function.to_function_proto())
    return protos
