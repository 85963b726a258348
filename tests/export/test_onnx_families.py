"""ONNX export and ONNX Runtime parity for a hybrid-window family (sliding + full layers, two mask
inputs), a soft-capped one and one with attention sinks: the softcap / sinks node attributes and
the per-window bias inputs reach the function bodies."""
from __future__ import annotations

import onnx
import pytest

import kvcompile
from family_checks import build
from kvcompile.export.onnx_target import PREFILL_FILE, export_onnx
from kvcompile.runtime.onnxruntime import load_onnx_artifact
from test_onnx_models import check_parity


@pytest.mark.slow
@pytest.mark.parametrize("family, kind, feature", [
    ("qwen2", "full", "windows"),
    ("gemma2", "full", "softcap"),
    ("granite_swa", "kcache", "sinks"),  # gpt_oss also has sinks, but its MoE op has no ONNX form
])
def test_family_onnx_parity(family, kind, feature, tmp_path):
    try:
        model = build(family)
    except LookupError as error:
        pytest.skip(str(error))
    cache = kvcompile.CacheConfig(kind=kind, topn=8) if kind == "kcache" else kvcompile.CacheConfig()
    compiled = kvcompile.compile(model, cache)
    backend = load_onnx_artifact(export_onnx(compiled, tmp_path / family))
    graph = onnx.load(str(tmp_path / family / PREFILL_FILE), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                  for n in graph.graph.node if n.domain == "kvcompile"]
    if feature == "windows":
        assert "attn_bias" in inputs and "attn_bias.sliding_8" in inputs
    if feature == "softcap":
        assert all(a["softcap"] == pytest.approx(model.config.attn_logit_softcapping) for a in attributes)
    if feature == "sinks":
        assert all(len(a["sinks"]) == model.config.num_attention_heads for a in attributes)
    check_parity(compiled, backend)
