"""Artifact folders and their manifest.json, shared by every export target.

An artifact is a folder: graph / engine / weight files plus `manifest.json`, which says what
produced them (kvcompile version, model config, cache config), how to feed them (I/O names,
cache layout, dtypes) and what they must hash to. Loaders call `load_manifest` before they
create any session or engine, so a tampered, incomplete or foreign folder fails with one
clear line instead of a runtime crash deep inside ONNX Runtime or TensorRT.

Writing is all-or-nothing: `write_artifact` lets the target fill a temporary sibling folder
and renames it into place only once the manifest (with checksums) is written. A failure
midway leaves the previous good artifact untouched and no partial folder behind.

Nothing is left behind even when the writer is killed (SIGKILL, OOM killer): every temporary
folder's name says which process owns it (`.NAME.building-<pid>.<host>.<start>-<random>`,
`.NAME.old-...` for the previous artifact while it steps aside), so `sweep_stale` (run by
every `write_artifact` for its own NAME) and `clean` (every NAME under a folder) can remove
the ones whose owner is gone, never one a live export is writing, and put the previous
artifact back if the kill came between the two renames of the swap.

manifest.json checksums itself (`manifest_sha256`), so an edit that keeps valid JSON is
refused like an edited graph file.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

import kvcompile
from kvcompile.errors import ArtifactError  # noqa: F401  (raised here)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kvcompile-artifact"
# Bump when the manifest's fields or the meaning of an artifact's files change.
MANIFEST_VERSION = 3  # 2: per-layer records in graph_spec, one field layout for every target
#                       3: manifest_sha256, the manifest's checksum of itself
MANIFEST_CHECKSUM_FIELD = "manifest_sha256"
RESERVED_FIELDS = frozenset({"format", "manifest_version", "kvcompile_version", "files", MANIFEST_CHECKSUM_FIELD})
DEFAULT_ARTIFACT_ROOT = Path("exported")  # where `kvcompile export` writes by default

# A temporary folder whose owner cannot be checked (written before owners were recorded, or by
# another host on a shared file system) is stale once nothing in it changed for this long.
STALE_UNOWNED_AFTER_S = 3600.0
# Test-only: tests/export/test_artifact_hygiene.py sets this environment variable to one of
# KILL_POINTS to have the writing process SIGKILL itself exactly there.
TEST_KILL_ENV = "KVCOMPILE_TEST_KILL_AT"
KILL_POINTS = ("created", "manifest_written", "between_renames", "swapped")

_HASH_CHUNK = 8 << 20
_log = logging.getLogger(__name__)




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


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace), leaving out its own
    `manifest_sha256` field. Computed on the data as a reader parses it back (string keys,
    lists for tuples), so writer and reader always hash the same text."""
    data = json.loads(json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_FIELD}))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def write_artifact(out_dir: str | os.PathLike, fill: Callable[[Path], dict]) -> Path:
    """Build an artifact atomically.

    `fill(tmp_dir)` writes the target's files into `tmp_dir` and returns the target-specific
    manifest fields (e.g. "target", "graphs", "inputs", "model_config", "cache_config").
    This function adds format/version/checksums, writes manifest.json and swaps the folder
    into place. Returns the final folder.

    First it sweeps what killed earlier writes of the same NAME left beside it (`sweep_stale`).
    The final folder has the permissions of any folder the user creates (0o777 & ~umask).
    """
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    parent = out_dir.resolve().parent
    try:
        sweep_stale(parent, out_dir.name)
    except OSError as error:  # a leftover we cannot remove must not stop a new export
        _log.warning("could not sweep interrupted exports beside %s: %s", out_dir, error)
    tmp_dir = _new_temp_dir(parent, out_dir.name, "building", create=True)
    try:
        _test_kill_point("created")
        fields = fill(tmp_dir)
        if not isinstance(fields, dict):
            raise ArtifactError(f"artifact fill function returned {type(fields).__name__}, expected a dict")
        reserved = RESERVED_FIELDS & fields.keys()
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
        manifest[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(manifest)
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _test_kill_point("manifest_written")
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(new_dir: Path, out_dir: Path) -> None:
    # rename() cannot replace a non-empty folder, so the old artifact steps aside first and
    # comes back if the second rename fails. Killed between the two renames, the old artifact
    # waits in `.NAME.old-<owner>-*` and the next sweep (write_artifact, clean) puts it back.
    if not out_dir.exists():
        os.replace(new_dir, out_dir)
        return
    old_dir = _new_temp_dir(out_dir.resolve().parent, out_dir.name, "old", create=False)
    os.replace(out_dir, old_dir)
    try:
        _test_kill_point("between_renames")
        os.replace(new_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        raise
    _test_kill_point("swapped")
    shutil.rmtree(old_dir, ignore_errors=True)


def _test_kill_point(point: str) -> None:
    """Test-only hook: SIGKILL this process here when the environment variable
    KVCOMPILE_TEST_KILL_AT names `point` (see KILL_POINTS), to prove that an export killed at
    that moment leaves the previous artifact loadable and nothing behind after the next sweep."""
    if os.environ.get(TEST_KILL_ENV) == point:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# --- temporary folders and who owns them -------------------------------------------------
#
# `.NAME.building-<pid>.<host>.<start>-<random>`: a new artifact being filled;
# `.NAME.old-<pid>.<host>.<start>-<random>`: the previous artifact stepping aside during the swap.
# <host> is a hash of the host name; <start> a hash of the boot id and the process's start time
# (from /proc), which tells a live owner from a later process that reuses its pid. The owner is
# part of the name, so it is recorded atomically with the folder's creation (no window in which
# a folder exists without it) and nothing extra lands in the artifact. `.NAME.building-XXXXXXXX`
# (mkdtemp's names, from kvcompile before owners were recorded) have no owner: stale when idle
# for STALE_UNOWNED_AFTER_S, as are folders owned by another host (shared file systems).

_TEMP_KINDS = ("building", "old")
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>building|old)-(?P<rest>.+)", re.DOTALL)
_OWNED_REST = re.compile(r"(?P<pid>[0-9]+)\.(?P<host>[0-9a-f]{8})\.(?P<start>[0-9a-f]{8}|x{8})-[0-9a-f]{8}")
_UNOWNED_REST = re.compile(r"[a-z0-9_]{8}")
_UNKNOWN_START = "x" * 8  # no /proc: the pid's existence is all we can check


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _host_tag() -> str:
    return _short_hash(socket.gethostname())


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_tag(pid: int) -> Optional[str]:
    """A tag of process `pid` that a later process reusing the pid will not have; None when no
    such process runs (or it is a zombie: it writes nothing more); _UNKNOWN_START when it runs
    but this system has no /proc to tell more."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if os.path.isdir("/proc/self"):
            return None  # Linux: no such process
        if os.name == "nt":  # os.kill(pid, 0) would terminate it
            return _UNKNOWN_START
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass  # exists, owned by another user
        return _UNKNOWN_START
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parens
    if len(fields) < 20:
        return _UNKNOWN_START
    if fields[0] in ("Z", "X", "x"):
        return None
    return _short_hash(f"{_boot_id()}:{fields[19]}")


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}.{_host_tag()}.{_start_tag(pid) or _UNKNOWN_START}"


def _new_temp_dir(parent: Path, name: str, kind: str, create: bool) -> Path:
    """A fresh `.NAME.KIND-<owner>-<random>` path beside the artifact; created (with the
    default permissions: the umask applies, unlike mkdtemp's 0700) when `create`."""
    owner = _owner_tag()
    for _ in range(100):
        path = parent / f".{name}.{kind}-{owner}-{secrets.token_hex(4)}"
        if create:
            try:
                os.mkdir(path, 0o777)
            except FileExistsError:
                continue
            return path
        if not os.path.lexists(path):
            return path
    raise ArtifactError(f"cannot write artifact {parent / name}: no free temporary folder name")


def _parse_temp_name(entry_name: str) -> Optional[tuple[str, str, Optional[re.Match]]]:
    """(artifact NAME, kind, owner match or None) for a kvcompile temporary folder's name."""
    match = _TEMP_NAME.fullmatch(entry_name)
    if match is None:
        return None
    rest = match["rest"]
    owned = _OWNED_REST.fullmatch(rest)
    if owned is None and _UNOWNED_REST.fullmatch(rest) is None:
        return None
    return match["name"], match["kind"], owned


def _owner_alive(owned: re.Match) -> Optional[bool]:
    """Whether the process that owns a temporary folder still runs; None when this host
    cannot tell (the owner ran on another host)."""
    if owned["host"] != _host_tag():
        return None
    tag = _start_tag(int(owned["pid"]))
    if tag is None:
        return False
    if _UNKNOWN_START in (tag, owned["start"]):
        return True  # it runs; whether it is the same process cannot be told: keep the folder
    return tag == owned["start"]


def _idle_seconds(folder: Path) -> float:
    """Seconds since anything in `folder` (the folder itself included) last changed."""
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for entry in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, entry)).st_mtime)
            except OSError:
                pass
    return time.time() - newest


def _is_stale(folder: Path, owned: Optional[re.Match]) -> bool:
    alive = _owner_alive(owned) if owned is not None else None
    if alive is not None:
        return not alive
    try:
        return _idle_seconds(folder) > STALE_UNOWNED_AFTER_S
    except OSError:
        return False


def _is_complete_artifact(folder: Path) -> bool:
    """A manifest that parses and lists files that are all there with their recorded sizes:
    an artifact that was moved aside whole, not one a removal had started on. (Versions and
    checksums are load_manifest's business: an old but whole artifact is still the user's.)"""
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
        return bool(files) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == entry["bytes"]
            for name, entry in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def sweep_stale(parent: str | os.PathLike, name: Optional[str] = None) -> list[Path]:
    """Remove the temporary folders that interrupted (killed) exports left in `parent`: those of
    artifact `name`, or of every artifact when `name` is None. Returns the removed folders.

    A folder is stale when the process that owns it no longer runs (or, without a known owner,
    when nothing in it changed for STALE_UNOWNED_AFTER_S); one that a live export is writing
    is never touched. If an export was killed between the two renames of its swap, so that
    NAME is missing and its previous artifact waits, whole, in `.NAME.old-*`, that artifact is
    moved back to NAME instead of being removed."""
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    stale: dict[str, list[tuple[str, Path]]] = {}
    for entry in entries:
        parsed = _parse_temp_name(entry.name)
        if parsed is None or (name is not None and parsed[0] != name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        path = parent / entry.name
        if _is_stale(path, parsed[2]):
            stale.setdefault(parsed[0], []).append((parsed[1], path))

    removed = []
    for artifact_name, folders in stale.items():
        out_dir = parent / artifact_name
        olds = [path for kind, path in folders if kind == "old"]
        if olds and not os.path.lexists(out_dir):
            olds.sort(key=lambda path: path.lstat().st_mtime, reverse=True)
            for old in olds:
                if not _is_complete_artifact(old):
                    continue
                try:
                    os.rename(old, out_dir)
                except OSError:
                    break  # another sweep put one back first, or a new artifact arrived
                _log.warning("restored %s from %s, which an interrupted export had moved aside", out_dir, old.name)
                folders.remove(("old", old))
                break
        for _, path in folders:
            if not os.path.lexists(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
            else:
                _log.warning("could not remove %s completely", path)
    return removed


def clean(root: str | os.PathLike = DEFAULT_ARTIFACT_ROOT) -> list[Path]:
    """Sweep (`sweep_stale`) every stale kvcompile temporary folder under `root` (default
    `exported/`), at any depth but not inside artifacts or hidden folders. `root` may also name
    one artifact folder, present or not: then the temporaries of that artifact beside it are
    swept (and its previous version put back if an export was killed mid-swap). Returns the
    removed folders; a live export's folders are never touched."""
    root = Path(root)
    if not root.is_dir() or (root / MANIFEST_NAME).is_file():
        return sweep_stale(root.parent, root.name) if root.name else []
    removed = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        removed += sweep_stale(here)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".")
            and not os.path.islink(here / d)
            and os.path.isdir(here / d)
            and not (here / d / MANIFEST_NAME).is_file()
        )
    return removed


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
        "codec": getattr(compiled, "codec", None),  # KV codec level for restored contexts (codec/restore.py)
    }


def load_manifest(
    artifact_dir: str | os.PathLike,
    target: str | None = None,
    verify_checksums: bool = True,
) -> dict:
    """Read and validate `artifact_dir/manifest.json`; return it as a dict.

    Checks, in order: folder and manifest exist and parse, format and manifest version,
    kvcompile version (an artifact's graphs encode this version's op semantics), the
    manifest's own checksum (an edit that keeps valid JSON), target, every listed file present
    with the recorded size and sha256. `verify_checksums=False` skips only the per-file sha256
    (the expensive part); the manifest's checksum is always checked. Raises ArtifactError.
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
    if manifest.get(MANIFEST_CHECKSUM_FIELD) != manifest_checksum(manifest):
        raise ArtifactError(f"{where}: {MANIFEST_NAME} was modified after export (its checksum does not match)")
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
