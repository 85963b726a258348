"""The torch target: the compiled graph as a torch.export program (`program.pt2`) + manifest.

One program serves prefill and decode: new-token count T and cached count P are both dynamic
(P = 0 is prefill, T = 1 is a decode step), so there is one set of weights on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kvcompile.core.config import CacheConfig
from kvcompile.export.example_inputs import dynamic_shapes, example_inputs
from kvcompile.export.manifest import ArtifactError, compiled_fields, load_manifest, write_artifact
from kvcompile.runtime.compiled import CompiledModel
from kvcompile.core.layout import GraphSpec
from kvcompile.frontend.text_tokenizer import copy_tokenizer_files

PROGRAM_FILE = "program.pt2"


def export_program(compiled: CompiledModel) -> torch.export.ExportedProgram:
    """Re-export the rewritten graph so it can be saved and reloaded without the HF model."""
    spec = compiled.spec
    with torch.no_grad():
        return torch.export.export(
            compiled.graph_module, example_inputs(spec, compiled.device), dynamic_shapes=dynamic_shapes(spec)
        )


def export_torch(compiled: CompiledModel, out_dir, source_dir: Optional[Path] = None) -> Path:
    def fill(folder: Path) -> dict:
        torch.export.save(export_program(compiled), str(folder / PROGRAM_FILE))
        has_tokenizer = copy_tokenizer_files(source_dir, folder / "tokenizer")
        return {**compiled_fields(compiled, "torch"), "program": PROGRAM_FILE,
                "tokenizer": "tokenizer" if has_tokenizer else None,
                "exporter": {"torch": torch.__version__}}

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
