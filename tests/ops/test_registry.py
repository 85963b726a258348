"""The op registry: a new op is a definition + one registry entry; no exporter file changes."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from onnxscript import opset18 as op
from onnxscript import script

from kvcompile.core.modes import LayerKind
from kvcompile.export.onnx_target import export_onnx
from kvcompile.ops import registry
from kvcompile.ops.onnx_domain import TFloat, kvcompile_opset
from kvcompile.ops.registry import NodeAttribute, OnnxDefinition, OpEntry
from kvcompile.runtime import generate as gen
from kvcompile.runtime.compiled import CompiledModel
from kvcompile.core.config import CacheConfig
from kvcompile.runtime.onnxruntime import load_onnx_artifact

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))
from onnx_toy_model import ToyDecoder  # noqa: E402


# A toy op, defined entirely here: torch semantics, fake kernel, ONNX body, registry entry.
@torch.library.custom_op("kvtest::scale_values", mutates_args=())
def scale_values(value: torch.Tensor, factor: float) -> torch.Tensor:
    return value * factor


@scale_values.register_fake
def _(value, factor):
    return torch.empty_like(value)


@script(kvcompile_opset, default_opset=op)
def scale_values_body(value: TFloat, factor: float) -> TFloat:
    return op.Mul(value, op.CastLike(op.Constant(value_float=factor), value))


def toy_entry() -> OpEntry:
    definition = OnnxDefinition(
        inputs=("value",),
        attributes=(NodeAttribute("factor", "float", "multiplies every value"),),
        node_attributes=lambda factor, context=None: {"factor": factor},
        body=scale_values_body,
        output="output",
    )
    return OpEntry(name="scale_values", torch_op=torch.ops.kvtest.scale_values.default,
                   onnx=lambda: definition, summary="test op: V times a constant")


@pytest.fixture
def registered_toy_op():
    registry.register(toy_entry())
    yield
    registry.unregister("scale_values")


def test_builtin_ops_are_registered_with_onnx_definitions():
    names = {entry.name for entry in registry.registered()}
    assert {"cached_attention", "kcache_attention"} <= names
    for entry in registry.registered():
        assert registry.by_torch_op(entry.torch_op) is entry
        if not entry.exportable:
            continue  # a trace-time op (captured_attention): the passes replace it
        definition = entry.onnx_definition()
        assert definition.inputs and definition.body is not None


def test_a_toy_op_exports_and_runs_in_onnx_runtime(registered_toy_op, tmp_path):
    module = ToyDecoder([LayerKind.FULL, LayerKind.FULL],
                        value_transform=lambda v: torch.ops.kvtest.scale_values(v, 0.5)).eval()
    compiled = SimpleNamespace(graph_module=module, spec=module.spec)
    out = export_onnx(compiled, tmp_path / "toy-op", model_config={"eos_token_id": None},
                      cache_config=CacheConfig().to_dict())
    backend = load_onnx_artifact(out)
    assert backend.manifest["kvcompile_nodes"] == ["cached_attention", "scale_values"]
    assert backend.manifest["kvcompile_domain"]["node_attributes"]["scale_values"] == {
        "factor": "float: multiplies every value"}
    runtime = CompiledModel(module, module.spec, CacheConfig(), report=None)
    input_ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    torch_cache, ort_cache = runtime.new_cache(2, 16), backend.new_cache(2, 16)
    with torch.no_grad():
        expected = gen.prefill(runtime, torch_cache, input_ids)
        got = gen.prefill(backend, ort_cache, input_ids)
        assert (expected - got).abs().max().item() < 1e-4
        next_ids = expected[:, -1].argmax(-1)
        expected = gen.decode_step(runtime, torch_cache, next_ids)
        got = gen.decode_step(backend, ort_cache, next_ids)
    assert (expected - got).abs().max().item() < 1e-4
    # the op really acts: without it the same weights give other logits
    plain = ToyDecoder([LayerKind.FULL, LayerKind.FULL]).eval()
    plain_runtime = CompiledModel(plain, plain.spec, CacheConfig(), report=None)
    with torch.no_grad():
        unscaled = gen.prefill(plain_runtime, plain_runtime.new_cache(2, 16), input_ids)
        scaled = gen.prefill(runtime, runtime.new_cache(2, 16), input_ids)
    assert (unscaled - scaled).abs().max().item() > 1e-3
