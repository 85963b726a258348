"""Runs rerotate_keys on CUDA through the kernel library (ctypes).

The op's CUDA registration (definition.py) calls `can_use_kernels` and then `run`; everything
else runs the torch reference. RerotateArgs mirrors `kvc_rerotate_args` in
plugins/csrc/kvcompile_kernels.h field by field, and SYMBOLS declares the C function this op
needs (the kernel loader reads it from the registry).

Layout the kernel takes: keys with any B / H / T strides and a contiguous last dim; delta is
passed as int64 with its own B / T strides; inv_freq contiguous float32; the output is a new
contiguous [B, Hkv, T, D] tensor.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from kvcompile.ops.registry import KernelSymbol
from kvcompile.plugins import load_kernels
from kvcompile.plugins import kernels_available as plugin_kernels_available

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # KVC_DTYPE_*
_int, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p

SYMBOLS = (
    KernelSymbol("kvc_rerotate_keys", ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p)),
)

# What a non-zero return code means (the library's kvc_last_error message belongs to the
# KCache entry points' translation unit, so this op validates everything before the call).
_CODES = {1: "invalid argument", 2: "CUDA launch error"}


class RerotateArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int), ("kv_heads", _int), ("tokens", _int), ("head_dim", _int),
        ("rotary_dims", _int), ("interleaved", _int), ("dtype", _int),
        ("keys", _ptr), ("keys_stride_b", _i64), ("keys_stride_h", _i64), ("keys_stride_t", _i64),
        ("delta", _ptr), ("delta_stride_b", _i64), ("delta_stride_t", _i64),
        ("inv_freq", _ptr),
        ("out", _ptr),
    ]


def kernels_available() -> bool:
    return plugin_kernels_available("rerotate_keys")


def can_use_kernels(keys: Tensor, delta: Tensor, inv_freq: Tensor) -> bool:
    """Whether the kernel handles this call (arguments already validated)."""
    if not (keys.is_cuda and keys.dtype in DTYPE_CODES and keys.numel() > 0):
        return False
    B, H, T, _ = keys.shape
    if max(B * T, H) >= 2 ** 31:
        return False
    return kernels_available()


def _stride(t: Tensor, dim: int) -> int:
    return t.stride(dim) if t.shape[dim] > 1 else 0  # a size-1 dim's stride is meaningless


def run(keys: Tensor, delta: Tensor, inv_freq: Tensor, interleaved: bool) -> Tensor:
    """[B, Hkv, T, D] re-rotated keys on keys' device, enqueued on the current stream."""
    lib = load_kernels()
    B, H, T, D = keys.shape
    if keys.stride(-1) != 1 and D > 1:
        keys = keys.contiguous()
    delta = delta.to(device=keys.device, dtype=torch.int64)
    inv_freq = inv_freq.to(device=keys.device, dtype=torch.float32).contiguous()
    out = torch.empty((B, H, T, D), dtype=keys.dtype, device=keys.device)
    args = RerotateArgs(
        batch=B, kv_heads=H, tokens=T, head_dim=D, rotary_dims=2 * inv_freq.shape[0],
        interleaved=int(bool(interleaved)), dtype=DTYPE_CODES[keys.dtype],
        keys=keys.data_ptr(), keys_stride_b=_stride(keys, 0), keys_stride_h=_stride(keys, 1),
        keys_stride_t=_stride(keys, 2),
        delta=delta.data_ptr(), delta_stride_b=_stride(delta, 0), delta_stride_t=_stride(delta, 1),
        inv_freq=inv_freq.data_ptr(),
        out=out.data_ptr(),
    )
    with torch.cuda.device(keys.device):
        stream = torch.cuda.current_stream(keys.device).cuda_stream
        code = lib.kvc_rerotate_keys(ctypes.byref(args), stream)
    if code != 0:
        raise RuntimeError(f"kvcompile kernel library: kvc_rerotate_keys failed with code {code} "
                           f"({_CODES.get(code, 'unknown')}) for keys {tuple(keys.shape)} {keys.dtype}")
    return out
