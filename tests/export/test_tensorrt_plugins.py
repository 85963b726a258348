"""The TensorRT plugins agree with the op registry (names, namespace, version, inputs, fields);
the Python plugins' plain logic and their refusal without TensorRT; the C++ library builds and
its life-cycle harness passes (when TensorRT headers and CMake are here; on a GPU also enqueue,
compared with the torch ops)."""
import ast
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from kvcompile.core.config import topn_for_context
from kvcompile.ops import onnx_domain
from kvcompile.plugins.tensorrt import FIELD_TYPES, HERE, build_library, plugin_specs
from kvcompile.plugins.tensorrt import python_plugins
from kvcompile.plugins.tensorrt.python_plugins import (TensorRTUnavailable, check_kcache_fields, kept_positions,
                                                       kv_decode_output_shape, output_like_input,
                                                       register_python_plugins)

SPECS = {spec.name: spec for spec in plugin_specs()}


def cpp_plugin(name):
    """(kName, kInputs, [(field, type)]) read from the plugin's C++ header and source."""
    header = (HERE / f"{name}_plugin.h").read_text()
    source = (HERE / f"{name}_plugin.cpp").read_text()
    k_name = re.search(r'kName = "([^"]+)"', header).group(1)
    k_inputs = int(re.search(r"kInputs = (\d+)", header).group(1))
    specs_body = source[source.index("::field_specs()"):]
    specs_body = specs_body[:specs_body.index("return specs;")]
    fields = re.findall(r'\{"(\w+)", PluginFieldType::(k\w+), \d+\}', specs_body)
    return k_name, k_inputs, fields


def test_plugins_are_registry_ops_with_kernels():
    from kvcompile.ops import registry

    assert set(SPECS) == {"kcache_attention", "rerotate_keys", "kv_decode"}
    assert all(registry.get(name).kernel_symbols for name in SPECS)
    for spec in SPECS.values():
        assert (spec.namespace, spec.version) == (onnx_domain.DOMAIN, str(onnx_domain.DOMAIN_VERSION))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cpp_plugin_matches_the_registry(name):
    spec = SPECS[name]
    k_name, k_inputs, fields = cpp_plugin(name)
    assert k_name == spec.name and k_inputs == len(spec.inputs)
    assert fields == [(field, FIELD_TYPES[kind]) for field, kind in spec.fields]
    library = (HERE / "plugin_library.cpp").read_text()
    assert re.search(rf"Creator<kvcompile::tensorrt::\w+Plugin> {name}_creator", library)
    assert f"&{name}_creator" in library  # listed by getCreators


def test_cpp_namespace_and_version_are_the_onnx_domain():
    common = (HERE / "plugin_common.h").read_text()
    assert f'kPluginNamespace = "{onnx_domain.DOMAIN}"' in common
    assert f'kPluginVersion = "{onnx_domain.DOMAIN_VERSION}"' in common


def registrations():
    """{(decorator, op): [argument names]} of the trtp.register / trtp.impl functions."""
    tree = ast.parse((HERE / "python_plugins.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute) \
                        and decorator.func.attr in ("register", "impl"):
                    found[(decorator.func.attr, decorator.args[0].value)] = [a.arg for a in node.args.args]
    return found


@pytest.mark.parametrize("name", sorted(SPECS))
def test_python_plugin_matches_the_registry(name):
    spec, found = SPECS[name], registrations()
    attributes = [field for field, _ in spec.fields]
    assert found[("register", f"kvcompile::{name}")] == [*spec.inputs, *attributes]
    assert found[("impl", f"kvcompile::{name}")] == [*spec.inputs, *attributes, "outputs", "stream"]


def test_python_plugins_without_tensorrt_are_skipped_with_one_line(monkeypatch):
    monkeypatch.setattr(python_plugins, "BINDINGS", ("kvcompile_no_such_tensorrt",))
    with pytest.raises(TensorRTUnavailable, match="not installed") as error:
        register_python_plugins()
    assert "\n" not in str(error.value) and error.value.exit_code == 4


def test_bindings_without_the_plugin_api_are_named(monkeypatch):
    fake = type(sys)("kvcompile_fake_tensorrt_rtx")
    fake.__version__ = "1.7"
    monkeypatch.setitem(sys.modules, "kvcompile_fake_tensorrt_rtx", fake)
    monkeypatch.setattr(python_plugins, "BINDINGS", ("kvcompile_fake_tensorrt_rtx",))
    with pytest.raises(TensorRTUnavailable, match=r"kvcompile_fake_tensorrt_rtx 1.7 has no Python plugin API"):
        register_python_plugins()


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])
def test_kept_positions_is_the_config_rounding(fraction):
    ratio = Fraction(fraction).limit_denominator(1 << 16)
    for context in (1, 2, 7, 100, 2047):
        expected = min(topn_for_context(fraction, context), context)
        assert kept_positions(context, 0, ratio.numerator, ratio.denominator) == expected
    assert kept_positions(10, 64, 0, 0) == 10 and kept_positions(100, 64, 0, 0) == 64


def test_kv_decode_constants_are_the_codec_and_onnx_ones():
    from kvcompile.codec import tables
    from kvcompile.ops.kv_decode.onnx_function import ONNX_DTYPES

    header = (HERE / "kv_decode_plugin.h").read_text()
    assert int(re.search(r"kBankShapes = (\d+)", header).group(1)) == tables.SHAPES
    assert python_plugins.ONNX_DTYPE_CODES == {onnx: code for code, onnx in enumerate(ONNX_DTYPES)}
    source = (HERE / "kv_decode_plugin.cpp").read_text()
    assert [int(x) for x in re.findall(r"case (\d+): return DataType::k", source)] == list(ONNX_DTYPES)


def test_shape_and_field_rules():
    assert output_like_input([(2, 8, 1, 64), (2, 2, 1, 64)]) == (2, 8, 1, 64)
    assert kv_decode_output_shape(3, layers=4, kv_heads=2, head_dim=8, tokens=32) == (2, 4, 2, 96, 8)
    assert check_kcache_fields(0.125, 64, 0, 0, 0, 1, 0.0) is None
    assert check_kcache_fields(0.125, 0, 0, 0, 0, 1, 0.0) == "topn must be >= 1 when topn_denominator is 0"
    assert check_kcache_fields(0.125, 0, 1, 4, 2, 1, 0.0) == "select_layer must be 0 or 1"
    assert check_kcache_fields(0.125, 8, 0, 0, 0, 1, float("inf")) == "softcap must be finite and >= 0"


def tensorrt_headers():
    for root in (os.environ.get("TensorRT_ROOT"), os.environ.get("KVCOMPILE_TRT_HEADERS")):
        if root and (Path(root) / "include" / "NvInferRuntime.h").is_file():
            return Path(root)
    return None


needs_build_tools = pytest.mark.skipif(
    tensorrt_headers() is None or shutil.which("cmake") is None
    or not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").is_file()),
    reason="needs TensorRT headers ($TensorRT_ROOT: a checkout of github.com/NVIDIA/TensorRT), CMake and nvcc")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("trt_build")
    library = build_library(build_dir, tensorrt_headers(), cuda_archs=os.environ.get("KVCOMPILE_CUDA_ARCHS", "90"))
    return build_dir, library


@pytest.mark.slow
@needs_build_tools
def test_library_builds_with_warnings_as_errors_and_exports_the_entry_points(built):
    _, library = built
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert exported == {"getCreators", "setLoggerFinder"}


@pytest.mark.slow
@needs_build_tools
def test_harness_life_cycle(built, tmp_path):
    """Every step but enqueue on any machine; on a GPU enqueue too, compared with the torch ops."""
    build_dir, _ = built
    dump, kv_inputs = tmp_path / "dump", tmp_path / "kv_inputs"
    dump.mkdir()
    script = HERE / "harness" / "check_against_torch.py"
    subprocess.run([sys.executable, str(script), str(kv_inputs), "--write-kv-inputs"], check=True)
    run = subprocess.run([str(build_dir / "kvcompile_plugin_harness"), str(dump), str(kv_inputs)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 check(s) failed" in run.stdout
    assert "== kv_decode_codec_bitstream" in run.stdout
    if "GPU: yes" in run.stdout:
        result = subprocess.run([sys.executable, str(script), str(dump)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("EQUAL ") == 7  # 4 kcache, 2 rerotate, the bitstream
