"""The full cache's decode merge through the kernel library (ctypes): the new token folded into
the fused attention over the past in one launch (plugins/csrc/kcache_full_merge.cu).

definition.decode_attention calls `merge` on CUDA when the library loads; without it the same
arithmetic runs as torch ops. MergeArgs mirrors `kvc_decode_merge_args` in
plugins/csrc/kvcompile_kernels.h field by field.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from kvcompile.ops.registry import KernelSymbol
from kvcompile.plugins import load_kernels
from kvcompile.plugins import kernels_available as plugin_kernels_available

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_int, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p

SYMBOLS = (
    KernelSymbol("kvc_decode_merge", ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p)),
    KernelSymbol("kvc_decode_merge_error", ctypes.c_char_p, ()),
)


class MergeArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int), ("query_heads", _int), ("kv_heads", _int), ("head_dim", _int),
        ("dtype", _int), ("bias_dtype", _int), ("scale", ctypes.c_float), ("sinks", _ptr),
        ("query", _ptr), ("query_stride_b", _i64), ("query_stride_h", _i64),
        ("key", _ptr), ("key_stride_b", _i64), ("key_stride_h", _i64),
        ("value", _ptr), ("value_stride_b", _i64), ("value_stride_h", _i64),
        ("past_out", _ptr), ("past_out_stride_b", _i64), ("past_out_stride_h", _i64),
        ("past_lse", _ptr), ("past_lse_stride_b", _i64), ("past_lse_stride_h", _i64),
        ("new_bias", _ptr), ("new_bias_stride_b", _i64),
        ("out", _ptr),
    ]


def can_merge(query: Tensor) -> bool:
    return query.is_cuda and query.dtype in DTYPE_CODES and plugin_kernels_available("cached_attention")


def _rows(t: Tensor, shape) -> Tensor:
    """t as `shape` with its last dim contiguous (a view when possible)."""
    t = t.reshape(shape)
    return t if t.stride(-1) == 1 else t.contiguous()


def merge(query, key, value, out_past, lse_past, new_bias, scale: float, sinks=None) -> Tensor:
    """out [B, Hq, 1, D] = the past's attention (out_past [B, Hkv, G, D], lse_past [B, Hkv, G])
    with the new token (key/value [B, Hkv, 1, D], new_bias [B]) merged in; sinks: [Hq] fp32
    device tensor or None."""
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    query = _rows(query, (B, Hq, D))
    key, value = _rows(key, (B, Hkv, D)), _rows(value, (B, Hkv, D))
    out_past = _rows(out_past, (B, Hq, D))
    lse_past = lse_past.reshape(B, Hq).float()
    if new_bias.dtype not in DTYPE_CODES:
        new_bias = new_bias.float()
    out = torch.empty((B, Hq, 1, D), dtype=query.dtype, device=query.device)
    args = MergeArgs(
        batch=B, query_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=DTYPE_CODES[query.dtype],
        bias_dtype=DTYPE_CODES[new_bias.dtype], scale=scale,
        sinks=sinks.data_ptr() if sinks is not None else None,
        query=query.data_ptr(), query_stride_b=query.stride(0), query_stride_h=query.stride(1),
        key=key.data_ptr(), key_stride_b=key.stride(0), key_stride_h=key.stride(1),
        value=value.data_ptr(), value_stride_b=value.stride(0), value_stride_h=value.stride(1),
        past_out=out_past.data_ptr(), past_out_stride_b=out_past.stride(0), past_out_stride_h=out_past.stride(1),
        past_lse=lse_past.data_ptr(), past_lse_stride_b=lse_past.stride(0), past_lse_stride_h=lse_past.stride(1),
        new_bias=new_bias.data_ptr(), new_bias_stride_b=new_bias.stride(0),
        out=out.data_ptr(),
    )
    lib = load_kernels()
    with torch.cuda.device(query.device):
        code = lib.kvc_decode_merge(ctypes.byref(args), torch.cuda.current_stream(query.device).cuda_stream)
    if code != 0:
        raise RuntimeError(f"kvcompile kernel library error {code}: {lib.kvc_decode_merge_error().decode()}")
    return out
