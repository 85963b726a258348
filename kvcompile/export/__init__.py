"""kvcompile.export: write a compiled model as a deployable artifact folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from kvcompile.core.config import CacheConfig
from kvcompile.errors import TargetError  # noqa: F401  (raised here)

TARGETS = ("torch", "onnx", "tensorrt")




def check_target(target: str) -> None:
    if target not in TARGETS:
        raise TargetError(f"unknown target {target!r}; expected one of: {', '.join(TARGETS)}")


def check_output_dir(out_dir: Path) -> None:
    """Fail in one line, before expensive work, if an artifact cannot be written at `out_dir`:
    the parent must exist and accept a new folder (tried, not guessed: /proc looks writable)."""
    import tempfile

    from kvcompile.export.manifest import check_writable_parent

    check_writable_parent(out_dir)
    parent = Path(out_dir).resolve().parent
    try:
        Path(tempfile.mkdtemp(prefix=".kvcompile-probe-", dir=parent)).rmdir()
    except OSError as error:
        from kvcompile.errors import ArtifactError

        raise ArtifactError(f"cannot write artifact {out_dir}: {parent} does not accept new folders "
                            f"({error.strerror or error})") from None


def export(model, target: str = "torch", out_dir="exported/model", cache: Optional[CacheConfig] = None,
           source_dir: Optional[Path] = None, fuse_check_layer: Optional[int] = None,
           codec_level: Optional[int] = None, engine_profile: Optional[dict] = None) -> Path:
    """Compile `model` (a HF model or a CompiledModel) for `cache` and write a `target` artifact;
    `codec_level` records the KV codec level contexts are restored at (manifest field "codec")."""
    from kvcompile.core.pipeline import compile as compile_model
    from kvcompile.runtime.compiled import CompiledModel

    check_target(target)
    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # before the expensive trace
    compiled = model if isinstance(model, CompiledModel) else compile_model(model, cache or CacheConfig())
    if codec_level is not None:
        from kvcompile.codec.restore import codec_manifest_field

        compiled.codec = codec_manifest_field(compiled, codec_level)
    if source_dir is None and compiled.model_config is not None:
        source = getattr(compiled.model_config, "_kvcompile_source", None)
        if source:
            from kvcompile.frontend.loading import resolve_model_dir

            candidate = resolve_model_dir(source)
            source_dir = candidate if candidate.is_dir() else None
    if target == "torch":
        if fuse_check_layer is not None:
            raise TargetError("--fuse applies to --target onnx: a torch artifact fuses with its own program")
        from kvcompile.export.torch_target import export_torch

        return export_torch(compiled, out_dir, source_dir)
    if target == "tensorrt":  # engine_profile: max_batch / max_context of the engines' profile
        if fuse_check_layer is not None:
            raise TargetError("--fuse applies to --target onnx")
        from kvcompile.export.tensorrt_target import export_tensorrt, profile_for

        return export_tensorrt(compiled, out_dir, source_dir=source_dir,
                               profile=profile_for(compiled.spec, **(engine_profile or {})))
    from kvcompile.export.onnx_target import export_onnx

    return export_onnx(compiled, out_dir, source_dir=source_dir, fuse_check_layer=fuse_check_layer)
