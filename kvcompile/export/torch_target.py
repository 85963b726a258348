"""The torch target: the compiled graph as a torch.export program (`program.pt2`) + manifest.

One program serves prefill and decode: new-token count T and cached count P are both dynamic
(P = 0 is prefill, T = 1 is a decode step), so there is one set of weights on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kvcompile.config import CacheConfig
from kvcompile.export.example_inputs import dynamic_shapes, example_inputs
from kvcompile.export.manifest import ArtifactError, load_manifest, write_artifact
from kvcompile.runtime.compiled import CompiledModel
from kvcompile.spec import GraphSpec
from kvcompile.text import copy_tokenizer_files

PROGRAM_FILE = "program.pt2"


def export_program(compiled: CompiledModel) -> torch.export.ExportedProgram:
    """Re-export the rewritten graph so it can be saved and reloaded without the HF model."""
    spec = compiled.spec
    with torch.no_grad():
        return torch.export.export(
            compiled.graph_module, example_inputs(spec, compiled.device), dynamic_shapes=dynamic_shapes(spec)
        )


def common_manifest_fields(compiled: CompiledModel, target: str) -> dict:
    config = compiled.model_config
    return {
        "target": target,
        "model": getattr(config, "_kvcompile_source", None) or getattr(config, "name_or_path", ""),
        "model_config": config.to_dict() if config is not None else {},
        "cache_config": compiled.cache_config.to_dict(),
        "graph_spec": compiled.spec.to_dict(),
        "inputs": compiled.spec.input_names,
        "outputs": compiled.spec.output_names,
        "cache_layout": {f"past_value.{i}": compiled.spec.value_layout(i) for i in range(compiled.spec.num_layers)},
        "passes": compiled.report.to_dict() if compiled.report is not None else {},
    }


def export_torch(compiled: CompiledModel, out_dir, source_dir: Optional[Path] = None) -> Path:
    def fill(folder: Path) -> dict:
        torch.export.save(export_program(compiled), str(folder / PROGRAM_FILE))
        has_tokenizer = copy_tokenizer_files(source_dir, folder / "tokenizer")
        return {**common_manifest_fields(compiled, "torch"), "program": PROGRAM_FILE,
                "tokenizer": "tokenizer" if has_tokenizer else None}

    return write_artifact(out_dir, fill)


def load_torch_artifact(artifact_dir, device=None) -> CompiledModel:
    """Validate the manifest, then load the program into a CompiledModel."""
    import kvcompile.ops  # noqa: F401  (the program's custom ops must be registered)
    from kvcompile.passes.manager import PassReport

    manifest = load_manifest(artifact_dir, target="torch")
    try:
        program = torch.export.load(str(Path(artifact_dir) / manifest["program"]))
    except Exception as err:  # a file that passed its checksum but torch cannot read
        raise ArtifactError(f"artifact {artifact_dir}: cannot load {manifest['program']}: {err}") from None
    module = program.module()
    if device is not None:
        module.to(device)
    model_config = config_from_dict(manifest.get("model_config", {}))
    return CompiledModel(module, GraphSpec.from_dict(manifest["graph_spec"]),
                         CacheConfig.from_dict(manifest["cache_config"]),
                         PassReport.from_dict(manifest.get("passes", {})), model_config)


def config_from_dict(data: dict):
    from transformers import AutoConfig, PretrainedConfig

    if not data:
        return None
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError):
        return PretrainedConfig(**data)
