"""Builds every `plugins/csrc/*.cu` into one shared library with nvcc.

No GPU is needed to build. The library is cached under `~/.cache/kvcompile/<hash>/` (or
`$KVCOMPILE_CACHE_DIR/<hash>/`), where the hash covers the sources, the nvcc version and the
flags, so an edited kernel never loads a stale library. The build writes to a temporary name
and renames it into place, so concurrent processes never see a half-written library.

    python -m kvcompile.plugins.build          # build (or find) the library, print its path
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
LIBRARY_NAME = "libkvcompile_kernels.so"
DEFAULT_ARCHS = ("sm_80", "sm_90")  # A100, H100; PTX of the newest for later GPUs
DEFAULT_PTX_ARCH = "compute_90"
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--threads", "0",
              "-lineinfo")


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message carries its output."""


def find_nvcc() -> str:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise BuildError("nvcc not found: install the CUDA toolkit or set $NVCC to build kvcompile's kernels")


def source_files() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def arch_flags(archs, ptx_arch) -> list[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch.split('_')[1]},code={arch}"]
    if ptx_arch:
        flags += ["-gencode", f"arch={ptx_arch},code={ptx_arch}"]
    return flags


def nvcc_command(output: Path, archs=DEFAULT_ARCHS, ptx_arch=DEFAULT_PTX_ARCH) -> list[str]:
    return [find_nvcc(), *NVCC_FLAGS, *arch_flags(archs, ptx_arch), "-I", str(CSRC),
            "-o", str(output), *map(str, source_files())]


def compile_library(output, archs=DEFAULT_ARCHS, ptx_arch=DEFAULT_PTX_ARCH) -> str:
    """Compile the sources into `output`; returns nvcc's diagnostics (empty when clean)."""
    if not source_files():
        raise BuildError(f"no CUDA sources under {CSRC}")
    command = nvcc_command(Path(output), archs, ptx_arch)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"nvcc failed ({result.returncode}):\n{' '.join(command)}\n"
                         f"{result.stdout}{result.stderr}")
    return (result.stdout + result.stderr).strip()


def source_hash(archs=DEFAULT_ARCHS, ptx_arch=DEFAULT_PTX_ARCH) -> str:
    digest = hashlib.sha256()
    for path in sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    version = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update(" ".join([*NVCC_FLAGS, *arch_flags(archs, ptx_arch)]).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("KVCOMPILE_CACHE_DIR", "~/.cache/kvcompile")).expanduser()


def library_path(build: bool = True) -> Path:
    """Path of the cached library for the current sources, building it first if needed."""
    target = cache_dir() / source_hash() / LIBRARY_NAME
    if target.exists() or not build:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=LIBRARY_NAME + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        diagnostics = compile_library(temporary)
        if diagnostics:
            (target.parent / "nvcc.log").write_text(diagnostics + "\n")
        os.replace(temporary, target)  # atomic: readers see no library or a whole one
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


if __name__ == "__main__":
    print(library_path())
