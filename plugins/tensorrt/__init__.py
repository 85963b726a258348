"""kvcompile.plugins.tensorrt: the TensorRT plugins of kvcompile's ops.

One plugin per op in PLUGIN_OPS, each a registered op with kernels (kvcompile/ops/<op>/kernels.py):
its name is the op's, its namespace the ONNX domain (`kvcompile`), its version the domain's version, and its
fields are the op's ONNX node attributes. `plugin_specs()` derives all of that from the op
registry; the C++ plugins (this folder's *.cpp) and the Python plugins (`python_plugins.py`)
are checked against it (tests/export/test_tensorrt_plugins.py).

`build_library(out_dir, tensorrt_root)` compiles the C++ plugin library with CMake (headers
from TensorRT_ROOT, see CMakeLists.txt); `source_files()` lists what an artifact ships so the
library can be built on the deployment machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
LIBRARY_NAME = "libkvcompile_trt_plugins.so"
# What the ONNX parser passes each attribute kind as (onnx-tensorrt's plugin field loader).
FIELD_TYPES = {"float": "kFLOAT32", "int": "kINT32", "floats": "kFLOAT32"}


@dataclass(frozen=True)
class PluginSpec:
    """A plugin as TensorRT's registry and ONNX parser see it."""

    name: str  # the op's name = the node's op_type = the creator's plugin name
    namespace: str  # the node's domain and its plugin_namespace attribute
    version: str  # the node's plugin_version attribute
    inputs: Tuple[str, ...]
    fields: Tuple[Tuple[str, str], ...]  # (attribute name, kind: float | int | floats), in node order


# The ops with a TensorRT plugin (a <op>_plugin.h/.cpp here and a registration in
# python_plugins.py). Each must be a registered op with kernels; everything else about the
# plugin comes from its registry entry.
PLUGIN_OPS = ("kcache_attention", "rerotate_keys", "kv_decode")


def plugin_specs() -> List[PluginSpec]:
    """Every plugin kvcompile provides, as the op registry defines it."""
    import kvcompile.ops  # noqa: F401  (registers the ops)
    from kvcompile.ops import onnx_domain, registry

    specs = []
    for name in PLUGIN_OPS:
        entry = registry.get(name)
        if entry is None or not entry.kernel_symbols:
            raise LookupError(f"TensorRT plugin {name} has no registered op with kernels")
        definition = entry.onnx_definition()
        specs.append(PluginSpec(name=entry.name, namespace=onnx_domain.DOMAIN, version=str(onnx_domain.DOMAIN_VERSION),
                                inputs=tuple(definition.inputs),
                                fields=tuple((a.name, a.kind) for a in definition.attributes)))
    return specs


def plugin_names() -> List[str]:
    return [spec.name for spec in plugin_specs()]


def source_files() -> List[Tuple[Path, str]]:
    """(file, path inside an artifact's plugins/ folder) for everything the library builds from."""
    files = [(path, f"tensorrt/{path.relative_to(HERE).as_posix()}")
             for pattern in ("*.cpp", "*.h", "*.cu", "CMakeLists.txt", "harness/*", "examples/*")
             for path in sorted(HERE.glob(pattern)) if path.is_file()]
    files += [(path, f"csrc/{path.name}") for pattern in ("*.cu", "*.h") for path in sorted(CSRC.glob(pattern))]
    return files


class PluginBuildError(RuntimeError):
    """CMake or the compiler is missing or failed; the message carries the tail of the output."""


def cmake_command(source_dir: Path, build_dir: Path, tensorrt_root: Path, cuda_archs: str = "80;90") -> List[str]:
    return ["cmake", "-S", str(source_dir), "-B", str(build_dir), f"-DTensorRT_ROOT={tensorrt_root}",
            f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}", "-DCMAKE_BUILD_TYPE=Release"]


def build_library(out_dir, tensorrt_root, source_dir: Optional[Path] = None, cuda_archs: str = "80;90") -> Path:
    """Configure and build the plugin library (and the harness) under out_dir; returns the library."""
    if shutil.which("cmake") is None:
        raise PluginBuildError("cmake not found: install CMake ≥ 3.18 to build the TensorRT plugin library")
    source_dir = Path(source_dir or HERE)
    build_dir = Path(out_dir)
    env = dict(os.environ)
    if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").is_file():
        env["PATH"] = f"/usr/local/cuda/bin{os.pathsep}{env.get('PATH', '')}"
    for command in (cmake_command(source_dir, build_dir, Path(tensorrt_root), cuda_archs),
                    ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise PluginBuildError(f"{' '.join(command)} failed ({result.returncode}):\n{tail}")
    return build_dir / LIBRARY_NAME
