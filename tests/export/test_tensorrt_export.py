"""--target tensorrt on the CPU (no TensorRT here): graphs, plugin naming, the partial artifact,
the exact build commands, ONNX Runtime parity through the local functions, one-line refusals."""
import json
import os
from types import SimpleNamespace

import onnx
import pytest
import torch

from kvcompile.core.config import CacheConfig
from kvcompile.export.manifest import load_manifest
from kvcompile.export.tensorrt_target import (BUILD_SCRIPT, LAYOUT_FILE, EngineProfile, export_tensorrt,
                                              input_shapes, profile_for)
from kvcompile.runtime import generate as gen
from kvcompile.runtime.compiled import CompiledModel
from kvcompile.runtime.onnxruntime import OnnxRuntimeBackend

from onnx_toy_model import ToyDecoder

TOPN = 4


def toy():
    return ToyDecoder(["full", "kcache", "kcache"], topn=TOPN, select="head", renormalize=False).eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    module = toy()
    out = tmp_path_factory.mktemp("trt") / "toy"
    cache = CacheConfig(kind="kcache", topn=TOPN)
    old = os.environ.pop("TensorRT_ROOT", None)  # the library is not built in this test
    try:
        export_tensorrt(SimpleNamespace(graph_module=module, spec=module.spec), out,
                        model_config={"eos_token_id": None}, cache_config=cache.to_dict(),
                        profile=EngineProfile(max_batch=2, max_context=64, opt_context=16))
    finally:
        if old is not None:
            os.environ["TensorRT_ROOT"] = old
    return out, module, cache


def plugin_attributes(graph_file):
    model = onnx.load(str(graph_file))
    return {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute
                        if a.name.startswith("plugin_")}
            for n in model.graph.node if n.domain == "kvcompile"}


def test_decode_graph_names_the_plugins_and_prefill_does_not(artifact):
    out, _, _ = artifact
    decode = plugin_attributes(out / "decode.onnx")
    assert decode["kcache_attention"] == {"plugin_namespace": b"kvcompile", "plugin_version": b"1"}
    assert decode["cached_attention"] == {}  # no kernels, no plugin: always its local function
    assert all(attrs == {} for attrs in plugin_attributes(out / "prefill.onnx").values())
    model = onnx.load(str(out / "decode.onnx"))
    assert {f.name for f in model.functions} >= {"kcache_attention", "cached_attention"}  # bodies stay
    onnx.checker.check_model(str(out / "decode.onnx"), full_check=True)


def test_partial_artifact_says_how_to_build_the_engines(artifact):
    out, module, _ = artifact
    manifest = load_manifest(out, target="tensorrt")
    section = manifest["tensorrt"]
    assert section["engines_built"] is False and section["builder"] is None
    assert "no TensorRT builder" in section["note"] and BUILD_SCRIPT in section["note"]
    assert section["plugins"]["named_in_decode"] == ["kcache_attention"]
    assert section["plugins"]["library"] is None and "TensorRT_ROOT" in section["plugins"]["library_note"]
    files = set(manifest["files"])
    assert {"prefill.onnx", "decode.onnx", BUILD_SCRIPT, LAYOUT_FILE, "plugins/tensorrt/CMakeLists.txt",
            "plugins/tensorrt/kcache_attention_plugin.cpp", "plugins/csrc/kvcompile_kernels.h"} <= files
    assert not any(name.startswith("engines/") for name in files)
    script = (out / BUILD_SCRIPT).read_text()
    assert os.access(out / BUILD_SCRIPT, os.X_OK)
    assert section["commands"]["prefill"] in script and section["commands"]["decode"] in script
    decode = section["commands"]["decode"]
    assert "--dynamicPlugins=plugins/libkvcompile_trt_plugins.so" in decode
    assert "--setPluginsToSerialize=plugins/libkvcompile_trt_plugins.so" in decode and "${PLUGIN_OVERRIDE}" in decode
    assert "--enablePluginOverride" in script  # set only when the trtexec knows it
    assert "--dynamicPlugins" not in section["commands"]["prefill"]
    # the decode profile: one token over 1..63 cached positions, batch 1..2
    assert "--minShapes=input_ids:1x1,position_ids:1x1,attn_bias:1x1x1x2," in decode
    assert "past_value.1:2x63x2x8" in decode and "--maxShapes=input_ids:2x1," in decode
    assert "past_key.0:1x2x0x8" in section["commands"]["prefill"]  # a fresh prompt has no past


def test_io_layout_lists_every_tensor_with_its_memory(artifact):
    out, module, _ = artifact
    lines = [line.split() for line in (out / LAYOUT_FILE).read_text().splitlines() if not line.startswith("#")]
    assert [line[1] for line in lines] == module.spec.input_names + module.spec.output_names
    assert ["input", "past_value.1", "float32", "host", "batch,past,2,8"] in lines
    assert ["input", "past_key.1", "float32", "device", "batch,2,past,8"] in lines


def test_profile_shapes_follow_the_spec_axes():
    module = toy()
    shapes = input_shapes(module.spec, "decode", EngineProfile(max_batch=3, max_context=100, opt_context=10))
    assert shapes["attn_bias"] == ((1, 1, 1, 2), (1, 1, 1, 11), (3, 1, 1, 100))
    assert shapes["past_key.0"] == ((1, 2, 1, 8), (1, 2, 10, 8), (3, 2, 99, 8))
    assert profile_for(module.spec, max_context=10 ** 9).max_context == module.spec.max_context


def test_graphs_run_on_onnxruntime_through_local_functions(artifact):
    """Parity: the plugin-named decode graph still runs under ONNX Runtime, equal to torch."""
    out, module, cache = artifact
    backend = OnnxRuntimeBackend(out, load_manifest(out, target="tensorrt"))
    reference = CompiledModel(module, module.spec, cache, report=None)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 97, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    torch_cache, ort_cache = reference.new_cache(2, 64), backend.new_cache(2, 64)
    expected = gen.prefill(reference, torch_cache, input_ids, attention_mask)
    got = gen.prefill(backend, ort_cache, input_ids, attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    next_ids = expected[:, -1].argmax(-1)
    for _ in range(6):  # past TOPN positions: the kcache selection is active in decode.onnx
        expected = gen.decode_step(reference, torch_cache, next_ids)
        got = gen.decode_step(backend, ort_cache, next_ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        next_ids = expected[:, -1].argmax(-1)


def test_tensorrt_backend_without_tensorrt_is_one_clear_error(artifact, monkeypatch):
    from kvcompile.plugins.tensorrt import python_plugins
    from kvcompile.runtime.tensorrt import load_tensorrt_artifact

    monkeypatch.setattr(python_plugins, "BINDINGS", ("kvcompile_no_such_tensorrt",))
    with pytest.raises(python_plugins.TensorRTUnavailable, match="TensorRT is not installed here") as error:
        load_tensorrt_artifact(artifact[0])
    assert "--backend onnxruntime" in str(error.value) and "\n" not in str(error.value)
    assert error.value.exit_code == 4


def test_manifest_is_checksummed_like_every_artifact(artifact):
    out, _, _ = artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "tensorrt" and "plugins/tensorrt/plugin_library.cpp" in manifest["files"]
    assert manifest["graphs"]["decode"]["tokens"] == 1


class FakeTensorRT:
    """Records what build_engine asks of a TensorRT module (the real one is not installable here)."""

    def __init__(self, plugin_layers: bool):
        fake = self
        self.calls = {"libraries": [], "shapes": {}, "parsed": None, "flags": [], "serialize": None}
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        self.NetworkDefinitionCreationFlag = type("Flags", (), {"STRONGLY_TYPED": 1})
        self.OnnxParserFlag = type("ParserFlags", (), {"ENABLE_PLUGIN_OVERRIDE": 3})
        self.INetworkDefinition = type("Network", (), {"add_plugin_v3": None} if plugin_layers else {})

        class Config:
            plugins_to_serialize = []

            def add_optimization_profile(self, profile):
                pass

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.calls["shapes"][name] = (low, opt, high)

        class Registry:
            def load_library(self, path):
                fake.calls["libraries"].append(path)

        class Builder:
            def __init__(self, logger):
                pass

            def get_plugin_registry(self):
                return Registry()

            def create_network(self, flags):
                return fake.INetworkDefinition()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls["serialize"] = getattr(config, "plugins_to_serialize", None)
                return b"plan bytes"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def set_flag(self, flag):
                fake.calls["flags"].append(flag)

            def parse(self, model_bytes, path):
                fake.calls["parsed"] = onnx.ModelProto.FromString(model_bytes)
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.mark.parametrize("plugin_layers", [False, True])
def test_engine_build_takes_plugins_only_where_the_builder_has_plugin_layers(artifact, tmp_path, plugin_layers):
    from kvcompile.export.tensorrt_engines import build_engine

    out, module, _ = artifact
    fake = FakeTensorRT(plugin_layers)
    shapes = input_shapes(module.spec, "decode", EngineProfile(max_batch=2, max_context=64))
    library = tmp_path / "libkvcompile_trt_plugins.so"
    result = build_engine(fake, out / "decode.onnx", shapes, tmp_path / "decode.plan", library, "decode")
    assert result.built and (tmp_path / "decode.plan").read_bytes() == b"plan bytes"
    assert fake.calls["shapes"] == shapes  # one profile covering every input
    named = [n for n in fake.calls["parsed"].graph.node if any(a.name == "plugin_namespace" for a in n.attribute)]
    if plugin_layers:
        assert result.kvcompile_nodes == "plugins" and fake.calls["libraries"] == [str(library)]
        assert fake.calls["serialize"] == [str(library)] and fake.calls["flags"] == [3]
        assert [n.op_type for n in named] == ["kcache_attention", "kcache_attention"]
    else:  # TensorRT-RTX: no plugin layers, so the nodes go through their local functions
        assert result.kvcompile_nodes == "local functions" and fake.calls["libraries"] == []
        assert named == [] and {f.name for f in fake.calls["parsed"].functions} >= {"kcache_attention"}
