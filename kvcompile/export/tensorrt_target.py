"""TensorRT target: ONNX graphs whose kvcompile nodes resolve to the plugins, the plugin library
(sources, and the built library when one is at hand), and engine plans when a builder is here.

    DIR/prefill.onnx        kvcompile nodes as plain local-function calls: TensorRT inlines them
                            (the kcache plugin serves decode steps only)
    DIR/decode.onnx         tokens fixed to 1; nodes of ops with a plugin also carry
                            plugin_namespace="kvcompile", plugin_version="1", so TensorRT ≥ 10.7
                            maps them to the registered plugin (their local functions stay attached:
                            ONNX Runtime still runs the graph, and so does a plugin-less builder)
    DIR/plugins/            tensorrt/ (plugin sources, CMakeLists.txt, harness, C++ example) and
                            csrc/ (the kernel library), [libkvcompile_trt_plugins.so]
    DIR/engines/*.plan      when a TensorRT builder was importable at export
    DIR/io_layout.txt       one line per graph tensor (for C++ runtimes, see plugins/tensorrt/examples)
    DIR/build_engines.sh    the exact trtexec commands that build the engines on the deployment machine
    DIR/manifest.json       the shared fields, the ONNX fields, and "tensorrt": profile, commands, engines

Without a builder everything but the plans is written, and the manifest (and the CLI) say so.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from kvcompile.core.layout import GraphSpec
from kvcompile.export.manifest import check_writable_parent, compiled_fields, write_artifact
from kvcompile.export.onnx_target import (DECODE_FILE, EXTERNAL_DATA_THRESHOLD, PREFILL_FILE, WEIGHTS_FILE,
                                          _PROTOBUF_SAFE_BYTES, _save, check_graph, finish_graph, onnx_fields,
                                          trace_to_onnx)
from kvcompile.export.tensorrt_engines import Shapes, build_engine, find_builder
from kvcompile.frontend.text_tokenizer import copy_tokenizer_files

ENGINE_DIR, PLUGIN_DIR = "engines", "plugins"
LAYOUT_FILE, BUILD_SCRIPT = "io_layout.txt", "build_engines.sh"
PLAN_FILES = {"prefill": f"{ENGINE_DIR}/prefill.plan", "decode": f"{ENGINE_DIR}/decode.plan"}
LIBRARY_ENV = "KVCOMPILE_TRT_PLUGIN_LIB"  # a prebuilt plugin library to ship


@dataclass(frozen=True)
class EngineProfile:
    """The optimisation profile both engines are built for (batch and context ranges)."""

    max_batch: int = 4
    max_context: int = 2048
    opt_context: int = 256

    def axis_ranges(self, role: str) -> Dict[str, tuple]:
        """(min, opt, max) of each named axis for the prefill or decode graph."""
        top = self.max_context
        opt = min(self.opt_context, top - 1)
        ranges = {"batch": (1, 1, self.max_batch)}
        if role == "prefill":
            ranges.update(tokens=(1, opt, top), past=(0, 0, top - 1), context=(1, opt, top))
        else:  # decode: one new token over at least one cached position (the plugin's domain)
            ranges.update(tokens=(1, 1, 1), past=(1, opt, top - 1), context=(2, opt + 1, top))
        return ranges


DEFAULT_MAX_CONTEXT = 2048  # engines cover larger contexts only when asked (their activations grow with it)


def profile_for(spec: GraphSpec, max_batch: Optional[int] = None, max_context: Optional[int] = None) -> EngineProfile:
    """The profile for these options: max_context defaults to the model's, at most 2048, and
    never exceeds the model's."""
    model_limit = spec.max_context or 1 << 30
    top = min(max_context or DEFAULT_MAX_CONTEXT, model_limit)
    top = max(top, 2)
    return EngineProfile(max_batch=max_batch or EngineProfile.max_batch, max_context=top,
                         opt_context=min(EngineProfile.opt_context, top - 1))


def input_shapes(spec: GraphSpec, role: str, profile: EngineProfile) -> Shapes:
    ranges = profile.axis_ranges(role)
    shapes = {}
    for slot in spec.inputs():
        bounds = [[ranges[a][i] if isinstance(a, str) else a for a in slot.axes] for i in range(3)]
        shapes[slot.name] = tuple(tuple(b) for b in bounds)
    return shapes


def trtexec_command(role: str, shapes: Shapes, with_plugins: bool) -> str:
    """The trtexec line (run in the artifact folder) that builds one engine."""
    def shape_list(i):
        return ",".join(f"{name}:{'x'.join(map(str, bounds[i]))}" for name, bounds in shapes.items())
    onnx_file = PREFILL_FILE if role == "prefill" else DECODE_FILE
    parts = ["${TRTEXEC:-trtexec}", f"--onnx={onnx_file}", f"--saveEngine={PLAN_FILES[role]}",
             f"--minShapes={shape_list(0)}", f"--optShapes={shape_list(1)}", f"--maxShapes={shape_list(2)}"]
    if with_plugins:
        library = f"{PLUGIN_DIR}/libkvcompile_trt_plugins.so"
        parts += [f"--dynamicPlugins={library}", f"--setPluginsToSerialize={library}", "${PLUGIN_OVERRIDE}"]
    return " ".join(parts)


def build_script(commands: Dict[str, str]) -> str:
    return f"""#!/usr/bin/env bash
# Builds this artifact's TensorRT engines (written by `kvcompile export --target tensorrt`).
# Needs TensorRT's trtexec; TensorRT_ROOT (an install or a checkout of NVIDIA/TensorRT) when the
# plugin library is not yet built. See docs/TENSORRT.md in kvcompile.
set -euo pipefail
cd "$(dirname "$0")"
LIB={PLUGIN_DIR}/libkvcompile_trt_plugins.so
if [ ! -f "$LIB" ]; then
  cmake -S {PLUGIN_DIR}/tensorrt -B {PLUGIN_DIR}/build -DTensorRT_ROOT="${{TensorRT_ROOT:?set TensorRT_ROOT}}"
  cmake --build {PLUGIN_DIR}/build -j
  cp {PLUGIN_DIR}/build/libkvcompile_trt_plugins.so "$LIB"
fi
# The decode graph's nodes name plugin_namespace, which parsers from TensorRT 10.7 honour; from
# 10.15 the parser also has kENABLE_PLUGIN_OVERRIDE (trtexec --enablePluginOverride), set when
# this trtexec knows it so the plugin wins over the node's local function whatever the default.
PLUGIN_OVERRIDE=""
if "${{TRTEXEC:-trtexec}}" --help 2>&1 | grep -q -- --enablePluginOverride; then PLUGIN_OVERRIDE=--enablePluginOverride; fi
mkdir -p {ENGINE_DIR}
# prefill: kvcompile nodes through their local functions (no plugin library loaded)
{commands['prefill']}
# decode: kvcompile nodes through the plugins
{commands['decode']}
"""


def io_layout(spec: GraphSpec) -> str:
    lines = ["# role name dtype memory axes (batch, tokens, past, context = past + tokens)"]
    for role, slots in (("input", spec.inputs()), ("output", spec.outputs())):
        for slot in slots:
            dtype = spec.dtype if slot.dtype == "activation" else slot.dtype
            lines.append(f"{role} {slot.name} {dtype} {slot.memory} {','.join(map(str, slot.axes))}")
    return "\n".join(lines) + "\n"


def copy_plugin_sources(folder: Path) -> None:
    from kvcompile.plugins.tensorrt import source_files

    for source, relative in source_files():
        target = folder / PLUGIN_DIR / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def plugin_library(given: Optional[Path], work_dir: Path) -> tuple[Optional[Path], str]:
    """(library to ship, how it was found): given, $KVCOMPILE_TRT_PLUGIN_LIB, or built here with
    CMake when $TensorRT_ROOT names TensorRT headers; else (None, why not)."""
    candidate = given or (Path(os.environ[LIBRARY_ENV]) if os.environ.get(LIBRARY_ENV) else None)
    if candidate is not None:
        if not candidate.is_file():
            from kvcompile.errors import UsageError

            raise UsageError(f"plugin library {candidate} does not exist")
        return candidate, f"prebuilt ({candidate.name})"
    root = os.environ.get("TensorRT_ROOT")
    if not root:
        return None, "not built here: TensorRT_ROOT is unset (build_engines.sh builds it)"
    from kvcompile.plugins.tensorrt import PluginBuildError, build_library

    try:
        return build_library(work_dir, root), f"built at export against {root}"
    except PluginBuildError as error:
        return None, f"not built here: {str(error).splitlines()[0]}"


def export_tensorrt(compiled, out_dir, *, model_config=None, cache_config=None, source_dir: Optional[Path] = None,
                    profile: Optional[EngineProfile] = None, library: Optional[Path] = None,
                    build_engines: bool = True, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                    check: bool = True, log=lambda message: None) -> Path:
    """Export a CompiledModel as a TensorRT artifact (see the module docstring); returns DIR."""
    from kvcompile.ops import onnx_domain
    from kvcompile.plugins.tensorrt import plugin_names

    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    spec: GraphSpec = compiled.spec
    profile = profile or profile_for(spec)
    shared = compiled_fields(compiled, "tensorrt", model_config, cache_config)

    def fill(folder: Path) -> dict:
        started = time.perf_counter()
        traced, weight_bytes = trace_to_onnx(compiled.graph_module, spec, folder, shared["cache_config"])
        embed = weight_bytes <= min(external_data_threshold, _PROTOBUF_SAFE_BYTES)
        prefill = finish_graph(traced, spec, fixed_tokens=None)
        decode = finish_graph(traced, spec, fixed_tokens=1)
        plugin_ops = onnx_domain.name_plugins(decode, plugin_names())
        for name, model in ((PREFILL_FILE, prefill), (DECODE_FILE, decode)):
            _save(model, folder / name, embed)
        if embed and (folder / WEIGHTS_FILE).exists():
            (folder / WEIGHTS_FILE).unlink()
        if check:
            for name in (PREFILL_FILE, DECODE_FILE):
                check_graph(folder / name)
        fields = onnx_fields(prefill, weights=None if embed else WEIGHTS_FILE,
                             export_seconds=round(time.perf_counter() - started, 2))

        copy_plugin_sources(folder)
        shipped, library_note = plugin_library(library, folder / ".plugin_build")
        if shipped is not None:
            shutil.copyfile(shipped, folder / PLUGIN_DIR / "libkvcompile_trt_plugins.so")
        shutil.rmtree(folder / ".plugin_build", ignore_errors=True)
        (folder / LAYOUT_FILE).write_text(io_layout(spec))

        shapes = {role: input_shapes(spec, role, profile) for role in ("prefill", "decode")}
        commands = {"prefill": trtexec_command("prefill", shapes["prefill"], with_plugins=False),
                    "decode": trtexec_command("decode", shapes["decode"], with_plugins=bool(plugin_ops))}
        script = folder / BUILD_SCRIPT
        script.write_text(build_script(commands))
        script.chmod(0o755)

        trt, builder_name = find_builder() if build_engines else (None, None)
        engines = {role: {"file": PLAN_FILES[role], "built": False} for role in PLAN_FILES}
        if trt is not None:
            kept = folder / PLUGIN_DIR / "libkvcompile_trt_plugins.so"
            for role, onnx_file in (("prefill", PREFILL_FILE), ("decode", DECODE_FILE)):
                result = build_engine(trt, folder / onnx_file, shapes[role], folder / PLAN_FILES[role],
                                      kept if role == "decode" and kept.exists() else None, role, log)
                engines[role].update(result.to_dict())
        built = all(e["built"] for e in engines.values())
        note = (f"engines built with {builder_name}" if built else
                f"engines not built ({builder_name or 'no TensorRT builder importable here'}): run "
                f"{BUILD_SCRIPT} in the artifact on the deployment machine")
        tensorrt = {
            "builder": builder_name, "engines": engines, "engines_built": built, "note": note,
            "profile": asdict(profile), "input_shapes": {role: {n: [list(b) for b in v] for n, v in s.items()}
                                                          for role, s in shapes.items()},
            "plugins": {"namespace": onnx_domain.DOMAIN, "version": str(onnx_domain.DOMAIN_VERSION),
                        "named_in_decode": plugin_ops, "library": f"{PLUGIN_DIR}/libkvcompile_trt_plugins.so"
                        if shipped is not None else None, "library_note": library_note,
                        "sources": f"{PLUGIN_DIR}/tensorrt"},
            "commands": commands, "build_script": BUILD_SCRIPT, "io_layout": LAYOUT_FILE,
        }
        has_tokenizer = copy_tokenizer_files(source_dir, folder / "tokenizer")
        return {**shared, **fields, "tensorrt": tensorrt, "tokenizer": "tokenizer" if has_tokenizer else None}

    return write_artifact(out_dir, fill)
