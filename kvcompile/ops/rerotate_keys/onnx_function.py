"""rerotate_keys as an ONNX function: node inputs, attribute and body.

Inputs: keys [B, Hkv, T, D] (float / float16 / bfloat16), delta [B, T] int64, inv_freq [R/2]
float. Attribute: interleaved (int, 0 = half-split pairs, 1 = adjacent pairs).

Like the torch op, the body forms the angle delta · inv_freq and takes its cos / sin in DOUBLE
(a float32 product is off by up to half an ulp of the angle: 0.004 rad at position 128K), then
rotates the pairs in float32. ONNX Runtime runs this as it is; TensorRT has no float64, so a
TensorRT engine needs a plugin for this node (the kernel library's kvc_rerotate_keys).
Both layouts are one gather of each pair's two dims and one gather back, with index vectors
chosen by `interleaved` (Where on indices, no If node).
"""
from __future__ import annotations

from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op
from onnxscript import script

from kvcompile.ops.onnx_domain import TFloat, kvcompile_opset
from kvcompile.ops.registry import NodeAttribute, OnnxDefinition


@script(kvcompile_opset, default_opset=op)
def rerotate_keys(keys: TFloat, delta: INT64, inv_freq: FLOAT, interleaved: int = 0) -> TFloat:
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    two = op.Constant(value_int=2)
    last = op.Constant(value_ints=[-1])  # the angle's new axis
    half = op.Shape(inv_freq)  # [1]: R/2
    rotary = op.Mul(half, two)  # [1]: R
    is_interleaved = op.Cast(op.Constant(value_int=interleaved), to=9)  # BOOL

    # angle [B, T, R/2] in double -> cos, sin [B, 1, T, R/2] in float
    angle = op.Mul(op.Unsqueeze(op.Cast(delta, to=11), last), op.Cast(inv_freq, to=11))
    cos = op.Unsqueeze(op.Cast(op.Cos(angle), to=1), op.Constant(value_ints=[1]))
    sin = op.Unsqueeze(op.Cast(op.Sin(angle), to=1), op.Constant(value_ints=[1]))

    # each pair's dims: (i, i + R/2) half-split, (2i, 2i + 1) interleaved
    i = op.Range(zero, op.Squeeze(half), one)
    first = op.Where(is_interleaved, op.Mul(i, two), i)
    second = op.Where(is_interleaved, op.Add(op.Mul(i, two), one), op.Add(i, half))
    # output dim j takes element back[j] of cat(r1, r2): j (half-split), (j % 2)·R/2 + j / 2 (interleaved)
    j = op.Range(zero, op.Squeeze(rotary), one)
    back = op.Where(is_interleaved, op.Add(op.Mul(op.Mod(j, two), half), op.Div(j, two)), j)

    # Gathers rather than Slices with computed ends: shape inference keeps B, H and T through them.
    x1 = op.Cast(op.Gather(keys, first, axis=-1), to=1)  # [B, H, T, R/2] float
    x2 = op.Cast(op.Gather(keys, second, axis=-1), to=1)
    r1 = op.Sub(op.Mul(x1, cos), op.Mul(x2, sin))
    r2 = op.Add(op.Mul(x2, cos), op.Mul(x1, sin))
    rotated = op.Gather(op.Concat(r1, r2, axis=-1), back, axis=-1)
    rest = op.Gather(keys, op.Range(op.Squeeze(rotary), op.Squeeze(op.Shape(keys, start=3)), one), axis=-1)
    return op.Concat(op.CastLike(rotated, keys), rest, axis=-1)


def node_attributes(interleaved: bool, context=None) -> dict:
    return {"interleaved": int(bool(interleaved))}


DEFINITION = OnnxDefinition(
    inputs=("keys", "delta", "inv_freq"),
    attributes=(NodeAttribute("interleaved", "int", "0 = half-split pairs (x[i], x[i + R/2]), "
                                                    "1 = adjacent pairs (x[2i], x[2i + 1])"),),
    node_attributes=node_attributes,
    body=rerotate_keys,
    output="output",
    # typed apart from keys (float32 while keys may be float16); delta is int64, which
    # onnx_domain.node_op's float-only type constraints cannot state yet
    bias_inputs=("inv_freq",),
)
