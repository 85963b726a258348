"""One rounding for a fractional topn: the config, the kcache pass's graph arithmetic and the
ONNX body agree over a grid of fractions and contexts (they once rounded half to even vs up)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kvcompile.core.config import CacheConfig, topn_for_context, topn_ratio
from kvcompile.ops import onnx_domain
from kvcompile.passes.kcache import topn_node

FRACTIONS = (0.05, 0.1, 0.125, 0.25, 0.3, 1 / 3, 0.5, 0.55, 0.75, 0.999, 1.0)
CONTEXTS = (1, 2, 3, 5, 6, 10, 14, 17, 100, 333, 1001, 4096)


def pass_topn(fraction: float, context: int) -> int:
    """What the graph the kcache pass emits computes for this context."""
    graph = torch.fx.Graph()
    bias = graph.placeholder("attn_bias")
    graph.output(topn_node(graph, bias, fraction))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    return int(module(torch.zeros(1, 1, 1, context)))


def onnx_topn(fraction: float, context: int, past: int = 1) -> int:
    """How many positions the kcache ONNX body keeps: count the non-zero output weights."""
    ratio = topn_ratio(fraction)
    names = ["query", "key", "value", "key_cache", "value_host", "attn_bias"]
    node = helper.make_node("kcache_attention", names, ["out"], domain=onnx_domain.DOMAIN, scale=1.0, topn=0,
                            topn_numerator=ratio.numerator, topn_denominator=ratio.denominator,
                            select_layer=0, renormalize=0)
    graph = helper.make_graph(
        [node], "topn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=onnx_domain.function_protos(["kcache_attention"]),
                              opset_imports=[helper.make_opsetid("", onnx_domain.STANDARD_OPSET),
                                             helper.make_opsetid(onnx_domain.DOMAIN, onnx_domain.DOMAIN_VERSION)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # One query, one KV head, head_dim = context: position s's value is the unit vector e_s, so
    # the output's non-zero entries are exactly the kept positions.
    width = context
    eye = np.eye(width, dtype=np.float32)
    feeds = {
        "query": np.zeros((1, 1, 1, width), np.float32),
        "key": np.zeros((1, 1, 1, width), np.float32),
        "value": eye[None, None, context - 1:context],
        "key_cache": np.zeros((1, 1, context - 1, width), np.float32),
        "value_host": eye[: context - 1][None, :, None],
        "attn_bias": np.zeros((1, 1, 1, context), np.float32),
    }
    out = session.run(None, feeds)[0]
    return int((out != 0).sum())


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_config_and_pass_round_alike(fraction):
    config = CacheConfig(kind="kcache", topn=fraction)
    for context in CONTEXTS:
        expected = topn_for_context(fraction, context)
        assert config.topn_for(context) == expected
        assert pass_topn(fraction, context) == expected, (fraction, context)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_onnx_body_rounds_like_the_config(fraction):
    for context in (c for c in CONTEXTS if 2 <= c <= 333):
        assert onnx_topn(fraction, context) == min(context, topn_for_context(fraction, context)), (fraction, context)


def test_half_rounds_up_not_to_even():
    # 0.25 of 10 is 2.5: round-half-to-even said 2, the graph said 3; every place says 3 now
    assert CacheConfig(kind="kcache", topn=0.25).topn_for(10) == 3
    assert pass_topn(0.25, 10) == 3
    assert onnx_topn(0.25, 10) == 3
