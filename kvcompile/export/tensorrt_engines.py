"""Building TensorRT engine plans from the ONNX graphs of a `--target tensorrt` artifact.

Used at export time when a TensorRT builder is importable (full TensorRT's `tensorrt`, or
TensorRT-RTX's `tensorrt_rtx` / `tensorrt_rtx_bindings`), and by bench/gpu_tensorrt.sh. A
builder whose network has no plugin layers (TensorRT-RTX: no `add_plugin_v3`) gets the decode
graph with its plugin attributes taken off, so its kvcompile nodes inline their local-function
bodies like the prefill graph's; full TensorRT gets the plugin library loaded first (and
serialised into the plan), so they resolve to the plugins.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import onnx

Shapes = Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]  # name -> (min, opt, max)


@dataclass
class BuildResult:
    role: str
    built: bool
    kvcompile_nodes: str  # "plugins" or "local functions"
    seconds: float = 0.0
    plan_bytes: int = 0
    errors: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"built": self.built, "kvcompile_nodes": self.kvcompile_nodes, "seconds": round(self.seconds, 2),
                "plan_bytes": self.plan_bytes, "errors": self.errors[:10]}


def find_builder():
    """(module, "name version") of the first importable TensorRT bindings, or (None, None)."""
    from kvcompile.plugins.tensorrt.python_plugins import tensorrt_module

    trt = tensorrt_module()
    if trt is None or not hasattr(trt, "Builder"):
        return None, None
    return trt, f"{trt.__name__} {getattr(trt, '__version__', '?')}"


def has_plugin_layers(trt) -> bool:
    return hasattr(trt, "INetworkDefinition") and hasattr(trt.INetworkDefinition, "add_plugin_v3")


def without_plugin_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes no longer name a plugin (their local functions then define them)."""
    from kvcompile.ops.onnx_domain import PLUGIN_ATTRIBUTES

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name not in PLUGIN_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(kept)
    return model


def _network(trt, builder):
    """An explicit-batch network; strongly typed where the builder offers it (TensorRT-RTX
    builds strongly typed networks only)."""
    flags = 0
    strongly_typed = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    return builder.create_network(flags)


def build_engine(trt, onnx_path: Path, shapes: Shapes, plan_path: Path, plugin_library: Optional[Path],
                 role: str, log=print) -> BuildResult:
    """Parse `onnx_path` and build a plan at `plan_path` with one optimisation profile."""
    started = time.perf_counter()
    use_plugins = plugin_library is not None and has_plugin_layers(trt)
    result = BuildResult(role=role, built=False, kvcompile_nodes="plugins" if use_plugins else "local functions")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if use_plugins:
        builder.get_plugin_registry().load_library(str(plugin_library))
    network = _network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    model = onnx.load(str(onnx_path), load_external_data=False)
    if not use_plugins:
        model = without_plugin_names(model)
    elif hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    parsed = parser.parse(model.SerializeToString(), str(onnx_path))  # the path resolves external weights
    result.errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not parsed:
        result.seconds = time.perf_counter() - started
        log(f"{role}: parse failed: {'; '.join(result.errors[:3])}")
        return result
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if use_plugins and hasattr(config, "plugins_to_serialize"):
        config.plugins_to_serialize = [str(plugin_library)]  # the plan then loads it itself
    plan = builder.build_serialized_network(network, config)
    result.seconds = time.perf_counter() - started
    if plan is None:
        result.errors.append("build_serialized_network returned no plan (see the builder log above)")
        log(f"{role}: engine build failed")
        return result
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    result.built, result.plan_bytes = True, plan_path.stat().st_size
    log(f"{role}: engine built in {result.seconds:.1f} s ({result.plan_bytes} bytes, kvcompile nodes through "
        f"{result.kvcompile_nodes})")
    return result
