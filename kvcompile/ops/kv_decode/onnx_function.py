"""kv_decode as an ONNX function of standard ops: node inputs, attributes and body.

Inputs as the torch op (definition.py): data uint8 [B], chunk_offsets int64 [N], bank_cdf int32
[R, W+1], halves int64 [2L], table_base int64 [2L], scale_steps float [256]. Attributes: layers,
kv_heads, head_dim, tokens, group, log_scales and onnx_dtype (the output's TensorProto type).

The body decodes every stream of every chunk at once: byte fields are gathered and assembled
with integer arithmetic (ONNX has no bitcast, so float32 scales are rebuilt from sign, exponent
and mantissa in double, which is exact); a Loop over the tokens·group steps runs the rANS update
vectorised over the N·2·L·C/G streams (Gather of each stream's table row, a count of CDF
entries ≤ slot for the symbol, GatherElements for its start and frequency, Where for the
renormalisation) and scatters each step's symbols; dequantisation is the CPU decoder's float32
arithmetic. The body trusts the bytes (indices are clamped so they stay inside `data`, nothing
more): the torch op's CPU and CUDA paths are the ones that validate.
"""
from __future__ import annotations

from onnxscript import DOUBLE, FLOAT, INT32, INT64, UINT8
from onnxscript import opset18 as op
from onnxscript import script

from kvcompile.ops.onnx_domain import kvcompile_opset
from kvcompile.ops.registry import NodeAttribute, OnnxDefinition

ONNX_DTYPES = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16 for KVC_DTYPE_F32 / F16 / BF16


@script(kvcompile_opset, default_opset=op)
def _float32_at(raw: INT64, at: INT64, last: INT64) -> FLOAT:
    """The little-endian float32 at byte offsets `at` (any shape), rebuilt exactly in double."""
    at = op.Min(at, op.Sub(last, op.Constant(value_int=3)))
    bits = op.Add(op.Add(op.Gather(raw, at), op.Mul(op.Gather(raw, op.Add(at, op.Constant(value_int=1))),
                                                   op.Constant(value_int=256))),
                  op.Add(op.Mul(op.Gather(raw, op.Add(at, op.Constant(value_int=2))), op.Constant(value_int=65536)),
                         op.Mul(op.Gather(raw, op.Add(at, op.Constant(value_int=3))), op.Constant(value_int=16777216))))
    negative = op.GreaterOrEqual(bits, op.Constant(value_int=2147483648))
    exponent = op.Mod(op.Div(bits, op.Constant(value_int=8388608)), op.Constant(value_int=256))
    mantissa = op.Mod(bits, op.Constant(value_int=8388608))
    normal = op.Greater(exponent, op.Constant(value_int=0))
    significand = op.Where(normal, op.Add(mantissa, op.Constant(value_int=8388608)), mantissa)
    power = op.Where(normal, op.Sub(exponent, op.Constant(value_int=150)), op.Constant(value_int=-149))
    magnitude = op.Mul(op.Cast(significand, to=11), op.Pow(op.Cast(op.Constant(value_float=2.0), to=11), op.Cast(power, to=11)))
    value = op.Where(negative, op.Neg(magnitude), magnitude)
    return op.Cast(value, to=1)


@script(kvcompile_opset, default_opset=op)
def kv_decode(data: UINT8, chunk_offsets: INT64, bank_cdf: INT32, halves: INT64, table_base: INT64,
              scale_steps: FLOAT, layers: int, kv_heads: int, head_dim: int, tokens: int, group: int,
              log_scales: int, onnx_dtype: int):
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    two = op.Constant(value_int=2)
    four = op.Constant(value_int=4)
    word_base = op.Constant(value_int=65536)
    axis1 = op.Constant(value_ints=[1])
    L = op.Constant(value_int=layers)
    H = op.Constant(value_int=kv_heads)
    D = op.Constant(value_int=head_dim)
    T = op.Constant(value_int=tokens)
    G = op.Constant(value_int=group)
    C = op.Mul(H, D)
    S = op.Div(C, G)
    M = op.Mul(op.Mul(two, L), S)  # streams per chunk

    # chunk layout (kvcompile/codec/chunk.py, Layout.of)
    log_bytes = op.Add(op.Mul(op.Constant(value_int=8), L),
                       op.Mul(op.Div(op.Add(op.Mul(op.Mul(two, L), T), op.Constant(value_int=3)), four), four))
    f32_bytes = op.Mul(op.Mul(op.Constant(value_int=8), L), T)
    is_log = op.Equal(op.Constant(value_int=log_scales), one)
    centres_at = op.Where(is_log, log_bytes, f32_bytes)
    shapes_at = op.Add(centres_at, op.Mul(op.Mul(two, L), C))
    ends_at = op.Add(shapes_at, op.Mul(op.Mul(two, L), C))
    words_at = op.Add(ends_at, op.Mul(four, M))

    raw = op.Cast(data, to=7)  # INT64
    last = op.Sub(op.Size(data), one)
    cdf = op.Cast(bank_cdf, to=7)
    width = op.Shape(cdf, start=1, end=2)  # [1]: W + 1

    chunks = op.Size(chunk_offsets)
    p = op.Range(zero, op.Mul(chunks, M), one)  # every stream of every chunk
    n = op.Div(p, M)
    m = op.Mod(p, M)
    base = op.Gather(chunk_offsets, n)
    sl = op.Div(m, S)  # side · L + layer
    sg = op.Mod(m, S)

    # stream word ranges: ends are u32 at ends_at + 4·m
    end_at = op.Add(op.Add(base, ends_at), op.Mul(four, m))
    end = op.Add(op.Add(op.Gather(raw, end_at), op.Mul(op.Gather(raw, op.Add(end_at, one)), op.Constant(value_int=256))),
                 op.Add(op.Mul(op.Gather(raw, op.Add(end_at, two)), word_base),
                        op.Mul(op.Gather(raw, op.Add(end_at, op.Constant(value_int=3))), op.Constant(value_int=16777216))))
    prev_at = op.Sub(end_at, four)
    prev_at = op.Max(prev_at, zero)
    prev = op.Add(op.Add(op.Gather(raw, prev_at), op.Mul(op.Gather(raw, op.Add(prev_at, one)), op.Constant(value_int=256))),
                  op.Add(op.Mul(op.Gather(raw, op.Add(prev_at, two)), word_base),
                         op.Mul(op.Gather(raw, op.Add(prev_at, op.Constant(value_int=3))), op.Constant(value_int=16777216))))
    begin = op.Where(op.Greater(m, zero), prev, zero)
    half = op.Gather(halves, sl)
    alphabet = op.Add(op.Mul(two, half), one)

    # each stream's G channels: centre and table row, [P, G]
    g = op.Range(zero, G, one)
    at = op.Add(op.Unsqueeze(op.Add(op.Mul(sl, C), op.Mul(sg, G)), axis1), g)
    chunk_base = op.Unsqueeze(base, axis1)
    centre = op.Gather(raw, op.Add(op.Add(chunk_base, centres_at), at))
    row = op.Add(op.Unsqueeze(op.Gather(table_base, sl), axis1), op.Gather(raw, op.Add(op.Add(chunk_base, shapes_at), at)))

    first_word = op.Add(base, words_at)  # byte offset of each stream's chunk's word 0
    w0 = op.Add(first_word, op.Mul(two, begin))
    byte = op.Constant(value_int=256)
    high = op.Add(op.Gather(raw, w0), op.Mul(op.Gather(raw, op.Add(w0, one)), byte))
    low_word = op.Add(op.Gather(raw, op.Add(w0, two)), op.Mul(op.Gather(raw, op.Add(w0, op.Constant(value_int=3))), byte))
    state = op.Add(op.Mul(high, word_base), low_word)
    cursor = op.Add(begin, two)
    steps = op.Mul(T, G)
    one_d = op.Constant(value_ints=[1])
    symbols = op.Expand(zero, op.Concat(op.Reshape(steps, op.Constant(value_ints=[1])), op.Shape(p), axis=0))
    for k in range(steps):
        gk = op.Mod(k, G)
        table_row = op.Gather(row, gk, axis=1)  # [P]
        rows = op.Gather(cdf, table_row)  # [P, W+1]
        slot = op.Mod(state, word_base)
        upper = op.Slice(rows, one_d, width, one_d)
        symbol = op.ReduceSum(op.Cast(op.LessOrEqual(upper, op.Unsqueeze(slot, axis1)), to=7), axis1, keepdims=0)
        start = op.Squeeze(op.GatherElements(rows, op.Unsqueeze(symbol, axis1), axis=1), axis1)
        stop = op.Squeeze(op.GatherElements(rows, op.Unsqueeze(op.Add(symbol, one), axis1), axis=1), axis1)
        state = op.Sub(op.Add(op.Mul(op.Sub(stop, start), op.Div(state, word_base)), slot), start)
        low = op.Less(state, word_base)
        at_word = op.Min(op.Add(first_word, op.Mul(two, cursor)), op.Sub(last, one))
        word = op.Add(op.Mul(op.Gather(raw, op.Add(at_word, one)), byte), op.Gather(raw, at_word))
        state = op.Where(low, op.Add(op.Mul(state, word_base), word), state)
        cursor = op.Add(cursor, op.Cast(low, to=7))
        q = op.Mod(op.Add(symbol, op.Gather(centre, gk, axis=1)), alphabet)
        symbols = op.ScatterND(symbols, op.Reshape(k, op.Constant(value_ints=[1, 1])), op.Unsqueeze(q, op.Constant(value_ints=[0])))

    # [T·G, N·2·L·S] -> [T, G, N, 2, L, S] -> [2, L, S, G, N, T] -> [2, L, H, D, N·T] -> [2, L, H, N·T, D]
    dims = op.Concat(op.Reshape(T, one_d), op.Reshape(G, one_d), op.Reshape(chunks, one_d), op.Constant(value_ints=[2]),
                     op.Reshape(L, one_d), op.Reshape(S, one_d), axis=0)
    grouped = op.Transpose(op.Reshape(symbols, dims), perm=[3, 4, 5, 1, 2, 0])
    flat = op.Concat(op.Constant(value_ints=[2]), op.Reshape(L, one_d), op.Reshape(H, one_d), op.Reshape(D, one_d),
                     op.Reshape(op.Mul(chunks, T), one_d), axis=0)
    q_all = op.Transpose(op.Reshape(grouped, flat), perm=[0, 1, 2, 4, 3])

    # scales [N, 2L, T]: log-coded max · steps[code], or float32 per token
    t = op.Range(zero, T, one)
    sides = op.Range(zero, op.Mul(two, L), one)
    cell = op.Add(op.Unsqueeze(op.Mul(sides, T), axis1), t)  # [2L, T]
    n_base = op.Unsqueeze(chunk_offsets, op.Constant(value_ints=[1, 2]))  # [N, 1, 1]
    code_at = op.Min(op.Add(n_base, op.Add(op.Mul(op.Constant(value_int=8), L), cell)), last)
    steps_of = op.Gather(scale_steps, op.Gather(raw, code_at))  # [N, 2L, T]
    top = _float32_at(raw, op.Add(op.Unsqueeze(chunk_offsets, axis1), op.Mul(four, sides)), last)  # [N, 2L]
    log_scale = op.Mul(op.Unsqueeze(top, op.Constant(value_ints=[2])), steps_of)
    token_scale = _float32_at(raw, op.Add(n_base, op.Mul(four, cell)), last)
    scale = op.Where(is_log, log_scale, token_scale)  # [N, 2L, T]
    # -> [2, L, 1, N·T, 1]
    scale = op.Reshape(op.Transpose(scale, perm=[1, 0, 2]),
                       op.Concat(op.Constant(value_ints=[2]), op.Reshape(L, one_d), op.Constant(value_ints=[1]),
                                 op.Reshape(op.Mul(chunks, T), one_d), op.Constant(value_ints=[1]), axis=0))
    half5 = op.Cast(op.Reshape(halves, op.Concat(op.Constant(value_ints=[2]), op.Reshape(L, one_d),
                                                 op.Constant(value_ints=[1, 1, 1]), axis=0)), to=1)
    values = op.Mul(op.Div(op.Sub(op.Cast(q_all, to=1), half5), half5), scale)
    return op.Cast(values, to=onnx_dtype)


def node_attributes(layers, kv_heads, head_dim, tokens, group, log_scales, dtype, channel_tables=None, version=2,
                    context=None) -> dict:
    if version != 2:  # the restore graph feeds format-2 chunks (kvcompile.codec.chunk.to_format2)
        raise ValueError("kv_decode's ONNX body reads format-2 chunks; transcode format 3 with chunk.to_format2")
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "tokens": tokens, "group": group,
            "log_scales": log_scales, "onnx_dtype": ONNX_DTYPES[dtype]}


DEFINITION = OnnxDefinition(
    inputs=("data", "chunk_offsets", "bank_cdf", "halves", "table_base", "scale_steps"),
    attributes=(NodeAttribute("layers", "int", "layers L"), NodeAttribute("kv_heads", "int", "KV heads"),
                NodeAttribute("head_dim", "int", "head dim"), NodeAttribute("tokens", "int", "tokens per chunk"),
                NodeAttribute("group", "int", "channels per rANS stream"),
                NodeAttribute("log_scales", "int", "1: 8-bit log scales (lossy levels), 0: float32 per token"),
                NodeAttribute("onnx_dtype", "int", "output TensorProto type (1 float, 10 float16, 16 bfloat16)")),
    node_attributes=node_attributes,
    body=kv_decode,
    helpers=(_float32_at,),
    output="output",
    bias_inputs=("data", "chunk_offsets", "bank_cdf", "halves", "table_base", "scale_steps"),
)
