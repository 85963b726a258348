"""TensorRT backend: runs a `--target tensorrt` artifact's engines behind the shared generation loop.

`load_tensorrt_artifact(dir)` validates the manifest before anything else, then needs TensorRT's
Python bindings, a CUDA device and the artifact's engine plans (built at export, or afterwards by
DIR/build_engines.sh); each missing piece is one line naming what to do. The plugin library
shipped in DIR/plugins/ is loaded into the runtime's registry before the plans are
deserialised (plans built by build_engines.sh also carry it, --setPluginsToSerialize).

The backend implements kvcompile.runtime.generate's `step` protocol, so prefill/decode, padding,
positions and host-resident V are the cache manager's (runtime/cache.py): keys on the device,
kcache layers' past values in pinned host memory whose addresses are bound as they are, so the
decode engine's kcache plugin reads only the chosen rows over the host link. A call with one new
token over a non-empty past runs the decode engine; every other call the prefill engine.

Where TensorRT is absent, `load_graphs_on_onnxruntime(dir)` runs the same artifact's ONNX graphs
on ONNX Runtime through their local functions (`kvcompile run DIR --backend onnxruntime`).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from kvcompile.core.layout import GraphSpec
from kvcompile.errors import ArtifactError, RuntimeFailure
from kvcompile.export.manifest import load_manifest
from kvcompile.runtime.exported_backend import ExportedGraphBackend
from kvcompile.plugins.tensorrt.python_plugins import TensorRTUnavailable, tensorrt_module

TARGET = "tensorrt"


def load_graphs_on_onnxruntime(artifact_dir):
    """The artifact's prefill/decode ONNX graphs on ONNX Runtime (CPU), kvcompile nodes through
    their local functions."""
    from kvcompile.runtime.onnxruntime import OnnxRuntimeBackend

    manifest = load_manifest(artifact_dir, target=TARGET)
    return OnnxRuntimeBackend(artifact_dir, manifest)


class TensorRTBackend(ExportedGraphBackend):
    """Two execution contexts (prefill, decode) over one artifact, with the backend `step` protocol."""

    def __init__(self, artifact_dir, manifest: dict, trt, engines: dict):
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.spec = GraphSpec.from_dict(manifest["graph_spec"])
        self.trt = trt
        self.engines = engines
        self.contexts = {role: engine.create_execution_context() for role, engine in engines.items()}
        self.input_names = self.spec.input_names
        self.output_names = self.spec.output_names
        self._host_inputs = {slot.name for slot in self.spec.inputs() if slot.memory == "host"}
        self._placeholder = torch.empty(16, dtype=torch.uint8, device="cuda")  # address for empty tensors

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    def role_for(self, tokens: int, past: int) -> str:
        return "decode" if tokens == 1 and past >= 1 else "prefill"

    def _bind(self, context, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in self._host_inputs:
            # pinned host memory, bound by address (a strided view is copied once into pinned memory)
            if not (tensor.is_contiguous() and tensor.is_pinned()):
                tensor = tensor.contiguous().pin_memory()
        else:
            tensor = tensor.to(self.device).contiguous()
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr())
        return tensor

    def step(self, input_ids, position_ids, biases, past_keys: List[torch.Tensor], past_values: List[torch.Tensor]):
        """-> (logits [B, T, V], new_keys [B, Hkv, T, D] per layer, new_values per layer), CUDA tensors."""
        role = self.role_for(input_ids.shape[1], past_keys[0].shape[2] if past_keys else 0)
        context, engine = self.contexts[role], self.engines[role]
        feeds = self.step_feeds(input_ids, position_ids, biases, past_keys, past_values)
        keep_alive = [self._bind(context, name, tensor) for name, tensor in zip(self.input_names, feeds)]
        outputs = []
        for name in self.output_names:
            dtype = torch_dtype(self.trt, engine.get_tensor_dtype(name))
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            context.set_tensor_address(name, out.data_ptr() if out.numel() else self._placeholder.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeFailure(f"TensorRT could not run the {role} engine of {self.artifact_dir} "
                                 f"(see TensorRT's log above)")
        stream.synchronize()  # the host-value buffers in keep_alive must outlive the step
        del keep_alive
        logits, rest = outputs[0], outputs[1:]
        return logits, list(rest[0::2]), list(rest[1::2])


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def load_tensorrt_artifact(artifact_dir) -> TensorRTBackend:
    """Validate DIR/manifest.json, then deserialise its engines; one clear error for each
    missing piece (TensorRT, CUDA, engines)."""
    folder = Path(artifact_dir)
    manifest = load_manifest(folder, target=TARGET)
    trt = tensorrt_module()
    if trt is None or not hasattr(trt, "Runtime"):
        raise TensorRTUnavailable(f"TensorRT is not installed here, so {folder}'s engines cannot run; "
                                  f"`kvcompile run {folder} --backend onnxruntime` runs its ONNX graphs instead")
    if not torch.cuda.is_available():
        raise RuntimeFailure(f"TensorRT engines need a CUDA device, and torch sees none here")
    section = manifest["tensorrt"]
    plans = {role: folder / engine["file"] for role, engine in section["engines"].items()}
    missing = [str(path.relative_to(folder)) for path in plans.values() if not path.is_file()]
    if missing:
        raise ArtifactError(f"artifact {folder} has no engine {', '.join(missing)}: run {folder}/"
                            f"{section['build_script']} on this machine first (it needs TensorRT's trtexec)")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    library = folder / section["plugins"]["library"] if section["plugins"].get("library") else \
        folder / "plugins" / "libkvcompile_trt_plugins.so"
    from kvcompile.export.tensorrt_engines import has_plugin_layers

    if library.is_file() and has_plugin_layers(trt):  # TensorRT-RTX has no plugins to register
        runtime.get_plugin_registry().load_library(str(library))
    engines = {}
    for role, path in plans.items():
        try:
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as error:  # the bindings raise where the C++ API returns null (e.g. an unsupported GPU)
            raise RuntimeFailure(f"{trt.__name__} {getattr(trt, '__version__', '?')} could not load {path}: "
                                 f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        if engine is None:
            raise RuntimeFailure(f"{trt.__name__} {getattr(trt, '__version__', '?')} could not load {path} (built by "
                                 "another TensorRT version, or for another GPU); rebuild it with "
                                 f"{section['build_script']}")
        engines[role] = engine
    return TensorRTBackend(folder, manifest, trt, engines)
