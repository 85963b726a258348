"""ONNX Runtime backend: runs an exported ONNX artifact behind the shared generation loop.

`load_onnx_artifact(dir)` validates the manifest (version, files, sha256) BEFORE creating any
session, so a tampered or incomplete folder fails with one line. The backend implements the
protocol of kvcompile.runtime.generate (`spec`, `step`), so prefill/decode, padding, positions
and host-resident V are handled by the same cache managers as the torch runtime.

Calls with one new token per sequence run `decode.onnx` (T fixed to 1), all others
`prefill.onnx`. Inputs are bound with IO binding as OrtValues that wrap the torch tensors'
memory, so past K/V are not copied again on the way in (the cache manager hands out views of
its buffers, made contiguous here, which is the one copy ORT's dense tensors require).

Host-resident V of kcache layers stays in the cache manager's CPU buffers and is bound as CPU
memory. On the CPU execution provider that is all there is to it. With a CUDA provider the
kcache function body would run on the device and ORT would copy each host V tensor over
whole, so real host residency on a GPU needs the TensorRT plugin (or an ORT custom op) that
replaces the node; the CUDA branch here is untested (no onnxruntime-gpu in CI).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch

from kvcompile.export.manifest import ArtifactError, load_manifest
from kvcompile.codec.restore import RestoreMethods
from kvcompile.fusion.api import FusionMethods
from kvcompile.core.layout import GraphSpec
from kvcompile.runtime.exported_backend import ExportedGraphBackend


class OnnxRuntimeBackend(FusionMethods, RestoreMethods, ExportedGraphBackend):
    """Two ORT sessions (prefill, decode) over one artifact, with the backend `step` protocol."""

    def __init__(self, artifact_dir, manifest: dict, providers: Optional[Sequence[str]] = None,
                 intra_op_threads: Optional[int] = None):
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.spec = GraphSpec.from_dict(manifest["graph_spec"])
        self.providers = list(providers or ["CPUExecutionProvider"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.options = options
        self.sessions = {
            role: ort.InferenceSession(str(self.artifact_dir / graph["file"]), sess_options=options,
                                       providers=self.providers)
            for role, graph in manifest["graphs"].items() if role in ("prefill", "decode")
        }
        self._check_session = None
        self.input_names = self.spec.input_names
        self.output_names = self.spec.output_names
        for role, session in self.sessions.items():
            # checksums prove the files are the exported ones; this proves manifest and graph agree
            got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            if got != (self.input_names, self.output_names):
                raise ArtifactError(f"artifact {artifact_dir}: {role} graph's inputs/outputs do not match "
                                    f"its manifest's graph_spec")
        self.device_type = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._host_inputs = {slot.name for slot in self.spec.inputs() if slot.memory == "host"}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # step takes and returns CPU tensors

    def session_for(self, tokens: int) -> ort.InferenceSession:
        return self.sessions["decode" if tokens == 1 else "prefill"]

    def _ort_value(self, name: str, tensor: torch.Tensor) -> ort.OrtValue:
        array = tensor.detach().to("cpu").contiguous().numpy()
        if self.device_type == "cpu" or name in self._host_inputs:
            return ort.OrtValue.ortvalue_from_numpy(array)  # wraps the tensor's memory, no copy
        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def step(self, input_ids, position_ids, biases, past_keys: List[torch.Tensor],
             past_values: List[torch.Tensor]):
        """-> (logits [B, T, V], new_keys [B, Hkv, T, D] per layer, new_values per layer), CPU tensors."""
        tokens = input_ids.shape[1]
        session = self.session_for(tokens)
        feeds = self.step_feeds(input_ids, position_ids, biases, past_keys, past_values)
        binding = session.io_binding()
        keep_alive = []  # OrtValues borrow torch memory: keep the arrays alive until run ends
        for name, tensor in zip(self.input_names, feeds):
            value = self._ort_value(name, tensor)
            keep_alive.append(value)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = [torch.from_numpy(value.numpy()) for value in binding.get_outputs()]
        logits, rest = outputs[0], outputs[1:]
        return logits, list(rest[0::2]), list(rest[1::2])

    # KV fusion (kvcompile/fusion): the same Fusion as the torch runtime's ------------------------
    @property
    def model_config(self) -> dict:
        return self.manifest.get("model_config") or {}

    @property
    def cache_config(self):
        from kvcompile.core.config import CacheConfig

        return CacheConfig.from_dict(self.manifest["cache_config"])

    @property
    def learned_positions(self) -> Optional[bool]:
        return (self.manifest["graphs"].get("check") or {}).get("learned_positions")

    @property
    def exported_check_layer(self) -> Optional[int]:
        """The layer check.onnx was cut after (export --fuse), which fusion uses by default."""
        return (self.manifest["graphs"].get("check") or {}).get("layer")

    def check_graph_for(self, layer: int):
        """check.onnx (export --fuse) as a callable with the torch check graph's protocol."""
        from kvcompile.errors import UsageError

        graph = self.manifest["graphs"].get("check")
        if graph is None or graph["layer"] != layer:
            have = f"check layer {graph['layer']}" if graph else "no check graph"
            raise UsageError(f"artifact {self.artifact_dir} has {have}; fusion with check layer {layer} needs "
                             f"`kvcompile export --target onnx --fuse --check-layer {layer}`")
        if self._check_session is None:
            self._check_session = ort.InferenceSession(str(self.artifact_dir / graph["file"]),
                                                       sess_options=self.options, providers=self.providers)
        session = self._check_session
        wanted = {i.name for i in session.get_inputs()}  # torch.onnx drops inputs the cut graph never reads

        def run(*tensors):
            feeds = {name: t.detach().cpu().contiguous().numpy()
                     for name, t in zip(self.input_names, tensors) if name in wanted}
            return tuple(torch.from_numpy(x) for x in session.run(None, feeds))
        return run


def load_onnx_artifact(artifact_dir, providers: Optional[Sequence[str]] = None,
                       intra_op_threads: Optional[int] = None) -> OnnxRuntimeBackend:
    """Validate DIR/manifest.json (raises ArtifactError) and open its ONNX Runtime sessions."""
    manifest = load_manifest(artifact_dir, target="onnx")
    graphs = manifest.get("graphs") or {}
    for role in ("prefill", "decode"):
        if role not in graphs:
            raise ArtifactError(f"artifact {artifact_dir}: manifest names no {role} graph")
        if graphs[role]["file"] not in manifest["files"]:
            raise ArtifactError(f"artifact {artifact_dir}: {graphs[role]['file']} is not a checksummed file")
    available = ort.get_available_providers()
    missing = [p for p in (providers or []) if p not in available]
    if missing:
        raise ArtifactError(f"ONNX Runtime here lacks {missing}; available: {available}")
    return OnnxRuntimeBackend(artifact_dir, manifest, providers, intra_op_threads)
