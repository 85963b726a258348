"""kvcompile.plugins: CUDA kernels with a C ABI and the TensorRT plugins that wrap them.

`csrc/` holds the kernels (`kvcompile_kernels.h` is the ABI); `build.py` compiles them into
one shared library; `load_kernels()` opens it with ctypes and declares the symbols every
registered op lists (kvcompile/ops/registry.py), so the torch ops can call them. `tensorrt/`
holds the TensorRT plugins, which link the same library.
"""
from __future__ import annotations

import ctypes
import os
import threading

from kvcompile.plugins.build import BuildError, library_path
from kvcompile.errors import KernelLibraryError  # noqa: F401  (raised here)

ABI_VERSION = 4  # must equal KVC_ABI_VERSION in csrc/kvcompile_kernels.h




_lock = threading.Lock()
_handle = None


def _declare(lib: ctypes.CDLL) -> None:
    lib.kvc_abi_version.restype = ctypes.c_int
    lib.kvc_abi_version.argtypes = []
    lib.kvc_last_error.restype = ctypes.c_char_p
    lib.kvc_last_error.argtypes = []
    # Each op declares its own symbols in its registry entry (kvcompile/ops/<op>/kernels.py).
    from kvcompile.ops import registry

    for symbol in registry.kernel_symbols():
        function = getattr(lib, symbol.name)
        function.restype = symbol.restype
        function.argtypes = list(symbol.argtypes)


def load_kernels() -> ctypes.CDLL:
    """The kernel library as a ctypes handle, built on first use; raises KernelLibraryError.

    $KVCOMPILE_KERNELS_LIB names a prebuilt library to load instead of building.
    """
    global _handle
    with _lock:
        if _handle is not None:
            return _handle
        path = os.environ.get("KVCOMPILE_KERNELS_LIB")
        try:
            path = path or str(library_path())
            lib = ctypes.CDLL(path)
        except BuildError as error:
            raise KernelLibraryError(f"could not build kvcompile's CUDA kernels: {error}") from error
        except OSError as error:
            raise KernelLibraryError(f"could not load kvcompile's CUDA kernels from {path}: {error}") from error
        _declare(lib)
        if lib.kvc_abi_version() != ABI_VERSION:
            raise KernelLibraryError(f"{path} has ABI {lib.kvc_abi_version()}, expected {ABI_VERSION}")
        _handle = lib
        return lib


_warned_unavailable: set = set()


def kernels_available(op_name: str) -> bool:
    """True when the library loads; otherwise warns once per op (which then runs its torch
    definition on CUDA) and returns False."""
    try:
        load_kernels()
        return True
    except KernelLibraryError as error:
        if op_name not in _warned_unavailable:
            import warnings

            warnings.warn(f"{op_name} runs its torch reference on CUDA: {error}")
            _warned_unavailable.add(op_name)
        return False
