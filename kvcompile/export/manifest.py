"""Artifact folders and their manifest.json, shared by every export target.

An artifact is a folder: graph / engine / weight files plus `manifest.json`, which says what
produced them (kvcompile version, model config, cache config), how to feed them (I/O names,
cache layout, dtypes) and what they must hash to. Loaders call `load_manifest` before they
create any session or engine, so a tampered, incomplete or foreign folder fails with one
clear line instead of a runtime crash deep inside ONNX Runtime or TensorRT.

Writing is all-or-nothing: `write_artifact` lets the target fill a temporary sibling folder
and renames it into place only once the manifest (with checksums) is written. A failure
midway leaves the previous good artifact untouched and no partial folder behind.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import kvcompile

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kvcompile-artifact"
# Bump when the manifest's fields or the meaning of an artifact's files change.
MANIFEST_VERSION = 2  # 2: per-layer records in graph_spec, one field layout for every target

_HASH_CHUNK = 8 << 20


class ArtifactError(RuntimeError):
    """An artifact folder that cannot be written or must not be loaded."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (recursively, except the manifest) -> its size and sha256."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            continue
        table[relative] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return table


def check_writable_parent(out_dir: Path) -> None:
    """Fail early, before any expensive export work, if `out_dir` cannot be created."""
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write artifact {out_dir}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write artifact {out_dir}: parent folder {parent} is not writable")
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"cannot write artifact {out_dir}: a file of that name is in the way")


def write_artifact(out_dir: str | os.PathLike, fill: Callable[[Path], dict]) -> Path:
    """Build an artifact atomically.

    `fill(tmp_dir)` writes the target's files into `tmp_dir` and returns the target-specific
    manifest fields (e.g. "target", "graphs", "inputs", "model_config", "cache_config").
    This function adds format/version/checksums, writes manifest.json and swaps the folder
    into place. Returns the final folder.
    """
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    parent = out_dir.resolve().parent
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=parent))
    try:
        fields = fill(tmp_dir)
        if not isinstance(fields, dict):
            raise ArtifactError(f"artifact fill function returned {type(fields).__name__}, expected a dict")
        reserved = {"format", "manifest_version", "kvcompile_version", "files"} & fields.keys()
        if reserved:
            raise ArtifactError(f"artifact fill function may not set reserved manifest fields {sorted(reserved)}")
        manifest = {
            "format": MANIFEST_FORMAT,
            "manifest_version": MANIFEST_VERSION,
            "kvcompile_version": kvcompile.__version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **fields,
            "files": _file_table(tmp_dir),
        }
        if not manifest["files"]:
            raise ArtifactError("artifact fill function wrote no files")
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(new_dir: Path, out_dir: Path) -> None:
    # rename() cannot replace a non-empty folder, so the old artifact steps aside first and
    # comes back if the second rename fails.
    if not out_dir.exists():
        os.replace(new_dir, out_dir)
        return
    old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.resolve().parent))
    os.rmdir(old_dir)
    os.replace(out_dir, old_dir)
    try:
        os.replace(new_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def model_config_dict(config) -> dict:
    """A HF config (or dict) as plain JSON data: dtypes and the like become strings."""
    if config is None:
        return {}
    data = config if isinstance(config, dict) else (config.to_dict() if hasattr(config, "to_dict") else vars(config))
    return json.loads(json.dumps(data, default=str))


def compiled_fields(compiled, target: str, model_config=None, cache_config=None) -> dict:
    """The manifest fields every target shares, read off a CompiledModel (or anything with
    `.spec`, and optionally `.model_config`, `.cache_config`, `.report`): what was compiled,
    with which cache, the graph's I/O layout and each layer's record."""
    spec = compiled.spec
    config = model_config if model_config is not None else getattr(compiled, "model_config", None)
    cache = cache_config if cache_config is not None else getattr(compiled, "cache_config", None)
    report = getattr(compiled, "report", None)

    def slots(items):
        return [{"name": slot.name, "dtype": spec.dtype if slot.dtype == "activation" else slot.dtype,
                 "axes": list(slot.axes), "memory": slot.memory} for slot in items]
    return {
        "target": target,
        "model": (getattr(config, "_kvcompile_source", None) or getattr(config, "name_or_path", None)) if config else None,
        "model_config": model_config_dict(config),
        "cache_config": cache.to_dict() if hasattr(cache, "to_dict") else cache,
        "graph_spec": spec.to_dict(),
        "inputs": slots(spec.inputs()),
        "outputs": slots(spec.outputs()),
        "cache_layout": [
            {"layer": r.layer, "kind": r.kind.value, "key": "B,Hkv,P,D", "value": spec.value_layout(i),
             "value_memory": r.value_home.value}
            for i, r in enumerate(spec.layers)
        ],
        "passes": report.to_dict() if report is not None else {},
    }


def load_manifest(
    artifact_dir: str | os.PathLike,
    target: str | None = None,
    verify_checksums: bool = True,
) -> dict:
    """Read and validate `artifact_dir/manifest.json`; return it as a dict.

    Checks, in order: folder and manifest exist and parse, format and manifest version,
    kvcompile version (an artifact's graphs encode this version's op semantics), target,
    every listed file present with the recorded size and sha256. Raises ArtifactError.
    """
    folder = Path(artifact_dir)
    where = f"artifact {folder}"
    if not folder.is_dir():
        raise ArtifactError(f"{where}: no such folder")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{where}: {MANIFEST_NAME} is missing (incomplete or not a kvcompile artifact)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} is not a kvcompile artifact manifest")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(
            f"{where}: manifest version {manifest.get('manifest_version')!r} is not supported "
            f"(this kvcompile reads version {MANIFEST_VERSION}); re-export the model"
        )
    if manifest.get("kvcompile_version") != kvcompile.__version__:
        raise ArtifactError(
            f"{where}: exported by kvcompile {manifest.get('kvcompile_version')!r}, "
            f"this is kvcompile {kvcompile.__version__}; re-export the model"
        )
    if target is not None and manifest.get("target") != target:
        raise ArtifactError(f"{where}: is a {manifest.get('target')!r} artifact, expected {target!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} lists no files")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{where}: {name} is missing (incomplete artifact)")
        if path.stat().st_size != entry.get("bytes"):
            raise ArtifactError(
                f"{where}: {name} is {path.stat().st_size} bytes, manifest says {entry.get('bytes')} (modified or truncated)"
            )
        if verify_checksums and sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{where}: {name} does not match its sha256 checksum (modified or corrupted)")
    return manifest
