"""ONNX export of a toy flat-signature decoder: artifact contents, checker, ORT parity, refusal."""
import json
from types import SimpleNamespace

import onnx
import onnxruntime as ort
import pytest
import torch

from kvcompile.core.config import CacheConfig
from kvcompile.export.manifest import MANIFEST_NAME, ArtifactError, load_manifest
from kvcompile.export.onnx_target import DECODE_FILE, PREFILL_FILE, WEIGHTS_FILE, export_onnx
from kvcompile.runtime import generate as gen
from kvcompile.runtime.compiled import CompiledModel
from kvcompile.runtime.onnxruntime import load_onnx_artifact

from onnx_toy_model import ToyDecoder

LAYER_KINDS = ["full", "kcache", "kcache"]
TOPN = 4  # well below the contexts generated here, so selection really happens


def toy(select="head", renormalize=False):
    return ToyDecoder(LAYER_KINDS, topn=TOPN, select=select, renormalize=renormalize).eval()


def torch_runtime(module):
    cache = CacheConfig(kind="kcache", topn=TOPN, select=module.select, renormalize=module.renormalize)
    return CompiledModel(module, module.spec, cache, report=None)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    module = toy()
    out = tmp_path_factory.mktemp("onnx") / "toy"
    compiled = SimpleNamespace(graph_module=module, spec=module.spec)
    export_onnx(compiled, out, model_config={"eos_token_id": None}, cache_config=torch_runtime(module).cache_config.to_dict())
    return out, module


def prompt():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 97, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    return input_ids, attention_mask


def test_manifest_describes_the_artifact(artifact):
    out, module = artifact
    manifest = load_manifest(out, target="onnx")
    assert set(manifest["files"]) == {PREFILL_FILE, DECODE_FILE}  # small weights: embedded
    assert manifest["graphs"]["decode"]["tokens"] == 1
    assert [i["name"] for i in manifest["inputs"]] == module.spec.input_names
    assert [o["name"] for o in manifest["outputs"]] == module.spec.output_names
    layouts = [(layer["kind"], layer["value"], layer["value_memory"]) for layer in manifest["cache_layout"]]
    assert layouts == [("full", "B,Hkv,P,D", "device"), ("kcache", "B,P,Hkv,D", "host"), ("kcache", "B,P,Hkv,D", "host")]
    assert manifest["opsets"] == {"ai.onnx": 18, "kvcompile": 1}
    assert manifest["kvcompile_nodes"] == ["cached_attention", "kcache_attention"]
    assert manifest["cache_config"]["kcache"]["topn"] == TOPN


@pytest.mark.parametrize("graph_file, tokens_axis", [(PREFILL_FILE, "tokens"), (DECODE_FILE, 1)])
def test_graphs_pass_checker_and_keep_kvcompile_nodes(artifact, graph_file, tokens_axis):
    out, _ = artifact
    onnx.checker.check_model(str(out / graph_file), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / graph_file)), strict_mode=True)
    custom = [n.op_type for n in model.graph.node if n.domain == "kvcompile"]
    assert custom == ["cached_attention", "kcache_attention", "kcache_attention"]  # not inlined away
    assert {f.name for f in model.functions} >= {"cached_attention", "kcache_attention"}
    def axes(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]
    inputs = {v.name: axes(v) for v in model.graph.input}
    assert inputs["input_ids"] == ["batch", tokens_axis]
    assert inputs["past_key.1"] == ["batch", 2, "past", 8]
    assert inputs["past_value.1"] == ["batch", "past", 2, 8]  # host values are token-major
    assert inputs["attn_bias"] == ["batch", 1, tokens_axis, "context"]
    assert axes(model.graph.output[0]) == ["batch", tokens_axis, 97]


def test_prefill_and_decode_logits_match_torch(artifact):
    out, module = artifact
    backend, reference = load_onnx_artifact(out), torch_runtime(module)
    input_ids, attention_mask = prompt()
    torch_cache, ort_cache = reference.new_cache(2, 64), backend.new_cache(2, 64)
    expected = gen.prefill(reference, torch_cache, input_ids, attention_mask)
    got = gen.prefill(backend, ort_cache, input_ids, attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    next_ids = expected[:, -1].argmax(-1)
    for _ in range(6):  # context grows past TOPN: top-N selection is active
        expected = gen.decode_step(reference, torch_cache, next_ids)
        got = gen.decode_step(backend, ort_cache, next_ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        next_ids = expected[:, -1].argmax(-1)


def test_greedy_tokens_match_torch(artifact):
    out, module = artifact
    input_ids, attention_mask = prompt()
    expected = torch_runtime(module).generate(input_ids, attention_mask, max_new_tokens=32)
    got = load_onnx_artifact(out).generate(input_ids, attention_mask, max_new_tokens=32)
    assert got.shape == (2, 7 + 32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("select, renormalize", [("layer", True), ("head", True), ("layer", False)])
def test_external_weights_and_selection_variants(tmp_path, select, renormalize):
    module = toy(select=select, renormalize=renormalize)
    out = export_onnx(SimpleNamespace(graph_module=module, spec=module.spec), tmp_path / "art",
                      external_data_threshold=0)
    manifest = load_manifest(out)
    assert manifest["weights_file"] == WEIGHTS_FILE and WEIGHTS_FILE in manifest["files"]
    for graph_file in (PREFILL_FILE, DECODE_FILE):  # both graphs share the one weight file
        graph = onnx.load(str(out / graph_file), load_external_data=False)
        locations = {entry.value for tensor in graph.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        assert locations == {WEIGHTS_FILE}
        kcache_nodes = [n for n in graph.graph.node if n.op_type == "kcache_attention"]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in kcache_nodes[0].attribute}
        assert attributes == {"scale": pytest.approx(8 ** -0.5), "topn": TOPN, "topn_numerator": 0,
                              "topn_denominator": 0, "select_layer": int(select == "layer"),
                              "renormalize": int(renormalize), "softcap": 0.0, "sinks": [float("-inf")]}
    input_ids, attention_mask = prompt()
    expected = torch_runtime(module).generate(input_ids, attention_mask, max_new_tokens=12)
    assert torch.equal(load_onnx_artifact(out).generate(input_ids, attention_mask, max_new_tokens=12), expected)


@pytest.fixture
def copy_of(artifact, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(artifact[0], target)
    return target


@pytest.fixture
def no_sessions(monkeypatch):
    """Fail the test if a session is created: refusal must come before any session."""
    def refuse(*args, **kwargs):
        raise AssertionError("an ONNX Runtime session was created for a bad artifact")
    monkeypatch.setattr(ort, "InferenceSession", refuse)


def test_tampered_graph_is_refused_before_any_session(copy_of, no_sessions):
    data = bytearray((copy_of / DECODE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy_of / DECODE_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="decode.onnx does not match its sha256"):
        load_onnx_artifact(copy_of)


def test_missing_graph_is_refused_before_any_session(copy_of, no_sessions):
    (copy_of / PREFILL_FILE).unlink()
    with pytest.raises(ArtifactError, match="prefill.onnx is missing"):
        load_onnx_artifact(copy_of)


def test_manifest_from_another_version_is_refused(copy_of, no_sessions):
    manifest = json.loads((copy_of / MANIFEST_NAME).read_text())
    manifest["kvcompile_version"] = "0.0.1"
    (copy_of / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="exported by kvcompile '0.0.1'"):
        load_onnx_artifact(copy_of)


def test_failed_export_keeps_previous_artifact(copy_of):
    before = (copy_of / MANIFEST_NAME).read_text()
    broken = ToyDecoder(["full"]).eval()
    broken.spec.num_layers = 3  # the contract promises more inputs than forward takes
    with pytest.raises(Exception):
        export_onnx(SimpleNamespace(graph_module=broken, spec=broken.spec), copy_of)
    assert (copy_of / MANIFEST_NAME).read_text() == before
    assert sorted(p.name for p in copy_of.parent.iterdir()) == ["copy"]


def test_single_token_prompt_and_chunked_prefill_match_torch(artifact):
    """T = 1 with P = 0 runs the decode graph on an empty cache; a second prompt chunk runs the
    prefill graph with P > 0 (T > 1 over a past)."""
    out, module = artifact
    backend, reference = load_onnx_artifact(out), torch_runtime(module)
    input_ids, attention_mask = prompt()
    torch_cache, ort_cache = reference.new_cache(2, 32), backend.new_cache(2, 32)
    first = input_ids[:, :1], torch.ones_like(input_ids[:, :1])
    torch.testing.assert_close(gen.prefill(backend, ort_cache, *first), gen.prefill(reference, torch_cache, *first),
                               atol=1e-4, rtol=0)
    rest = input_ids[:, 1:], torch.ones_like(input_ids[:, 1:])
    torch.testing.assert_close(gen.prefill(backend, ort_cache, *rest), gen.prefill(reference, torch_cache, *rest),
                               atol=1e-4, rtol=0)
