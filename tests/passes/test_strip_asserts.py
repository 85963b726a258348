"""strip_asserts: trace-time device/dtype pins are removed so a graph can move between devices."""
from __future__ import annotations

import torch

import kvcompile
from tiny_models import compiled_tiny
from kvcompile.frontend.tiny_models import tiny_model


def test_no_tensor_metadata_assertions_remain():
    _, compiled = compiled_tiny("qwen3")
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    removed = next(p for p in compiled.report.passes if p.name == "strip_asserts").rows[0]["removed"]
    assert removed > 0


def test_bf16_model_compiles_and_tracks_hf():
    model = tiny_model("llama", dtype=torch.bfloat16)
    compiled = kvcompile.compile(model)
    assert compiled.spec.dtype == "bfloat16"
    input_ids = torch.randint(0, 256, (2, 6))
    logits, _ = compiled.prefill(input_ids)
    with torch.no_grad():
        expected = model(input_ids).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected.float()).abs().max().item() <= 2e-2
