"""cached_attention as an ONNX function: node inputs, attributes and body.

Node attributes: scale (float), softcap (float, 0 = none), sinks (floats: one logit per query
head, or [NO_SINK]). value_cache is [B, Hkv, P, D] on the device.
"""
from __future__ import annotations

from typing import Sequence

from onnxscript import opset18 as op
from onnxscript import script

from kvcompile.ops.onnx_domain import ATTENTION_ATTRIBUTES, TBias, TFloat, attention_attributes, attention_probs, kvcompile_opset
from kvcompile.ops.registry import NodeAttribute, OnnxDefinition


@script(kvcompile_opset, default_opset=op)
def cached_attention(query: TFloat, key: TFloat, value: TFloat, key_cache: TFloat, value_cache: TFloat,
                     attn_bias: TBias, scale: float, softcap: float = 0.0, sinks: Sequence[float] = (float("-inf"),)) -> TFloat:
    keys = op.Concat(key_cache, key, axis=2)  # [B, Hkv, S, D]
    values = op.Concat(value_cache, value, axis=2)
    probs = attention_probs(query, keys, attn_bias, scale=scale, softcap=softcap, sinks=sinks)  # [B, Hkv, G, T, S]
    grouped = op.MatMul(probs, op.Unsqueeze(values, op.Constant(value_ints=[2])))  # [B, Hkv, G, T, D]
    return op.Reshape(grouped, op.Shape(query))


def node_attributes(scale: float, softcap: float = 0.0, sinks=None, context=None) -> dict:
    return {"scale": scale, **attention_attributes(softcap, sinks)}


DEFINITION = OnnxDefinition(
    inputs=("query", "key", "value", "key_cache", "value_cache", "attn_bias"),
    attributes=(NodeAttribute("scale", "float", "softmax scale"), *ATTENTION_ATTRIBUTES),
    node_attributes=node_attributes,
    body=cached_attention,
    helpers=(attention_probs,),
)
