"""The kvcompile-domain ONNX function bodies compute exactly what the torch ops compute."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import kvcompile.ops  # noqa: F401
from kvcompile.ops import onnx_domain as onnx_functions
from kvcompile.ops import registry

INPUTS = {
    "cached_attention": ["query", "key", "value", "key_cache", "value_cache", "attn_bias"],
    "kcache_attention": ["query", "key", "value", "key_cache", "value_host", "attn_bias"],
}


def single_node_model(op_name: str, elem_type=TensorProto.FLOAT, **attributes) -> onnx.ModelProto:
    """One kvcompile node, its function bodies attached, all axes dynamic."""
    names = INPUTS[op_name]
    node = helper.make_node(op_name, names, ["out"], domain=onnx_functions.DOMAIN, **attributes)
    graph = helper.make_graph(
        [node], op_name,
        [helper.make_tensor_value_info(n, elem_type, [f"{n}_{i}" for i in range(4)]) for n in names],
        [helper.make_tensor_value_info("out", elem_type, ["out_0", "out_1", "out_2", "out_3"])])
    model = helper.make_model(
        graph, functions=onnx_functions.function_protos([op_name]),
        opset_imports=[helper.make_opsetid("", onnx_functions.STANDARD_OPSET),
                       helper.make_opsetid(onnx_functions.DOMAIN, onnx_functions.DOMAIN_VERSION)])
    model.ir_version = 10
    return model


def run(model: onnx.ModelProto, tensors: dict) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in tensors.items()})[0])


def attention_inputs(batch=2, query_heads=4, kv_heads=2, tokens=3, past=7, dim=8, padded=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    context = past + tokens
    visible = torch.ones(tokens, context, dtype=torch.bool).tril(diagonal=past).expand(batch, -1, -1).clone()
    if padded:  # the second sequence is left-padded by two positions
        visible[1, :, :2] = False
    bias = torch.zeros(batch, 1, tokens, context).masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
    return dict(query=randn(batch, query_heads, tokens, dim), key=randn(batch, kv_heads, tokens, dim),
                value=randn(batch, kv_heads, tokens, dim), key_cache=randn(batch, kv_heads, past, dim),
                value_cache=randn(batch, kv_heads, past, dim), attn_bias=bias)


@pytest.mark.parametrize("query_heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("tokens, past", [(1, 9), (4, 6), (5, 0)])
def test_cached_attention_body_matches_torch_op(query_heads, kv_heads, tokens, past):
    inputs = attention_inputs(query_heads=query_heads, kv_heads=kv_heads, tokens=tokens, past=past)
    expected = torch.ops.kvcompile.cached_attention(*inputs.values(), 0.35)
    got = run(single_node_model("cached_attention", scale=0.35), inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("select", ["head", "layer"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("query_heads, kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize(
    "tokens, past, topn",
    [(1, 12, 4),     # decode, topn < context: the selection matters
     (1, 12, 13),    # decode, topn == context: exact attention
     (1, 12, 100),   # decode, topn > context
     (3, 9, 5),      # chunked prefill over a past, selection across T rows
     (5, 0, 2)],     # prefill: plain attention whatever topn is
)
def test_kcache_attention_body_matches_torch_op(select, renormalize, query_heads, kv_heads, tokens, past, topn):
    inputs = attention_inputs(query_heads=query_heads, kv_heads=kv_heads, tokens=tokens, past=past,
                              seed=tokens * 100 + past + topn)
    value_host = inputs.pop("value_cache").transpose(1, 2).contiguous()  # [B, P, Hkv, D]
    args = (inputs["query"], inputs["key"], inputs["value"], inputs["key_cache"], value_host, inputs["attn_bias"])
    expected = torch.ops.kvcompile.kcache_attention(*args, 0.35, topn, select, renormalize)
    model = single_node_model("kcache_attention", scale=0.35, topn=topn, topn_numerator=0, topn_denominator=0,
                              select_layer=int(select == "layer"), renormalize=int(renormalize))
    got = run(model, dict(zip(INPUTS["kcache_attention"], args)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("numerator, denominator", [(3, 10), (1, 4), (1, 3), (1, 100)])
@pytest.mark.parametrize("tokens, past", [(1, 11), (1, 26), (3, 17)])
def test_kcache_fractional_topn_matches_torch_op(numerator, denominator, tokens, past):
    """A fraction of the context, rounded half up and at least 1, as passes/kcache.py computes it."""
    inputs = attention_inputs(tokens=tokens, past=past, seed=past)
    value_host = inputs.pop("value_cache").transpose(1, 2).contiguous()
    args = (inputs["query"], inputs["key"], inputs["value"], inputs["key_cache"], value_host, inputs["attn_bias"])
    context = past + tokens
    topn = max(1, (context * numerator + denominator // 2) // denominator)
    expected = torch.ops.kvcompile.kcache_attention(*args, 0.35, topn, "head", False)
    model = single_node_model("kcache_attention", scale=0.35, topn=0, topn_numerator=numerator,
                              topn_denominator=denominator, select_layer=0, renormalize=0)
    torch.testing.assert_close(run(model, dict(zip(INPUTS["kcache_attention"], args))), expected, atol=1e-5, rtol=1e-5)


def test_kcache_body_in_float16_selects_like_the_torch_op():
    """The op is defined in float32 math; the body upcasts too, so fp16 graphs keep the same top-N."""
    inputs = {k: v.half() for k, v in attention_inputs(tokens=1, past=40, seed=5).items()}
    inputs["attn_bias"] = inputs["attn_bias"].clamp(min=torch.finfo(torch.float16).min)
    value_host = inputs.pop("value_cache").transpose(1, 2).contiguous()
    args = (inputs["query"], inputs["key"], inputs["value"], inputs["key_cache"], value_host, inputs["attn_bias"])
    expected = torch.ops.kvcompile.kcache_attention(*args, 0.35, 6, "head", False)
    model = single_node_model("kcache_attention", TensorProto.FLOAT16, scale=0.35, topn=6, topn_numerator=0,
                              topn_denominator=0, select_layer=0, renormalize=0)
    got = run(model, dict(zip(INPUTS["kcache_attention"], args)))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_kcache_topn_at_context_equals_full_attention():
    inputs = attention_inputs(tokens=1, past=10)
    value_host = inputs["value_cache"].transpose(1, 2).contiguous()
    full = run(single_node_model("cached_attention", scale=0.3), inputs)
    kcache_inputs = dict(inputs, value_cache=value_host)
    kcache_inputs["value_host"] = kcache_inputs.pop("value_cache")
    model = single_node_model("kcache_attention", scale=0.3, topn=11, topn_numerator=0, topn_denominator=0,
                              select_layer=0, renormalize=0)
    torch.testing.assert_close(run(model, kcache_inputs), full, atol=1e-5, rtol=1e-5)


def test_kcache_small_topn_differs_from_full_attention():
    """Guards against a body that ignores topn (it would pass every exactness test)."""
    inputs = attention_inputs(tokens=1, past=30, padded=False)
    value_host = inputs["value_cache"].transpose(1, 2).contiguous()
    full = run(single_node_model("cached_attention", scale=0.3), inputs)
    kcache_inputs = {**{k: v for k, v in inputs.items() if k != "value_cache"}, "value_host": value_host}
    kcache_inputs = {name: kcache_inputs[name] for name in INPUTS["kcache_attention"]}
    model = single_node_model("kcache_attention", scale=0.3, topn=2, topn_numerator=0, topn_denominator=0,
                              select_layer=0, renormalize=0)
    assert (run(model, kcache_inputs) - full).abs().max() > 1e-2


@pytest.mark.parametrize("op_name", sorted(INPUTS))  # the attention ops; others test their own bodies
def test_function_bodies_pass_checker_and_shape_inference(op_name):
    attributes = {"scale": 0.5}
    if op_name == "kcache_attention":
        attributes.update(topn=4, topn_numerator=0, topn_denominator=0, select_layer=1, renormalize=0)
    model = single_node_model(op_name, **attributes)
    onnx.checker.check_model(model, full_check=True)
    # inference must derive the output shape [B, Hq, T, D] from the query through the bodies
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    out = inferred.graph.output[0].type.tensor_type
    assert out.elem_type == TensorProto.FLOAT
    assert [d.dim_param for d in out.shape.dim] == [f"query_{i}" for i in range(4)]
    # only standard ONNX ops inside the bodies (no nested custom-domain op without a body)
    local = {f.name for f in model.functions}
    for function in model.functions:
        for node in function.node:
            assert node.domain in ("", "ai.onnx") or node.op_type in local, node.op_type
