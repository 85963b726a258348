"""Runs one KCache step over a cache (P > 0: a decode step, T == 1, or a prefill chunk, T > 1)
through the kernel library (ctypes).

The op's CUDA registration (definition.py) calls `can_use_kernels` and then `decode`;
everything else runs its torch reference. The argument struct mirrors
`kvc_kcache_decode_args` in plugins/csrc/kvcompile_kernels.h field by field, and SYMBOLS
declares the C functions this op needs (the kernel loader reads them from the registry).
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch import Tensor

from kvcompile.core.modes import SelectMode
from kvcompile.ops.registry import KernelSymbol
from kvcompile.plugins import load_kernels
from kvcompile.plugins import kernels_available as plugin_kernels_available

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_int, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p

SYMBOLS = (
    KernelSymbol("kvc_kcache_decode_workspace_size", ctypes.c_int,
                 (ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t))),
    KernelSymbol("kvc_kcache_decode", ctypes.c_int,
                 (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)),
    KernelSymbol("kvc_kcache_decode_describe", ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p)),
)


class DecodePlan(ctypes.Structure):
    """kvc_kcache_decode_plan."""
    _fields_ = [("score_tile", _int), ("score_tiles", _int), ("gather_rows", _int), ("gather_chunks", _int),
                ("pipeline_parts", _int), ("gather_ctas", _int), ("workspace_bytes", ctypes.c_size_t)]


class DecodeArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int), ("query_heads", _int), ("kv_heads", _int), ("past_len", _int),
        ("head_dim", _int), ("tokens", _int), ("topn", _int), ("select", _int), ("renormalize", _int),
        ("dtype", _int), ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("sinks", _ptr),
        ("query", _ptr), ("query_stride_b", _i64), ("query_stride_h", _i64), ("query_stride_t", _i64),
        ("key", _ptr), ("key_stride_b", _i64), ("key_stride_h", _i64), ("key_stride_t", _i64),
        ("value", _ptr), ("value_stride_b", _i64), ("value_stride_h", _i64), ("value_stride_t", _i64),
        ("key_cache", _ptr), ("key_cache_stride_b", _i64), ("key_cache_stride_h", _i64),
        ("key_cache_stride_p", _i64),
        ("value_host", _ptr), ("value_host_stride_b", _i64), ("value_host_stride_p", _i64),
        ("attn_bias", _ptr), ("attn_bias_stride_b", _i64), ("attn_bias_stride_t", _i64),
        ("out", _ptr),
    ]


def kernels_available() -> bool:
    return plugin_kernels_available("kcache_attention")


def _stride(t: Tensor, dim: int) -> int:
    return t.stride(dim) if t.shape[dim] > 1 else 0  # a size-1 dim's stride is meaningless


def _vector_ready(t: Tensor, dims) -> bool:
    """Last dim contiguous, data pointer and the given strides on 16-byte boundaries."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(_stride(t, d) * size % 16 == 0 for d in dims))


# A chunk of T > 1 tokens keeps per-row probabilities of the rows sharing a selection in one
# gather CTA's shared memory and partial sums per (row, chunk of kept positions): bounded here.
MAX_ROWS_PER_SELECTION = 2048  # query rows (heads x tokens) scored into one selection row
MAX_QUERY_ROWS = 8192          # B x Hq x T


def can_use_kernels(query, key, value, key_cache, value_host, attn_bias, select: str = "layer") -> bool:
    """Whether this call is one the CUDA kernels handle (args already validated): P > 0, and a
    chunk (T > 1) within the bounds above."""
    B, Hq, T, D = query.shape
    P = key_cache.shape[2]
    if not (query.is_cuda and P > 0 and query.dtype in DTYPE_CODES):
        return False
    if T > 1:
        per_selection = (Hq if select == SelectMode.LAYER else Hq // key.shape[1]) * T
        if per_selection > MAX_ROWS_PER_SELECTION or B * Hq * T > MAX_QUERY_ROWS:
            return False
    if D * query.element_size() % 16 or D > 512:
        return False
    # The gather reads value_host over the host link, so it must be pinned host memory with
    # (Hkv, D) contiguous and 16-byte aligned rows.
    if value_host.is_cuda or not value_host.is_pinned():
        return False
    Hkv = value_host.shape[2]
    if value_host.stride(3) != 1 or (Hkv > 1 and value_host.stride(2) != D):
        return False
    if not _vector_ready(value_host, (0, 1)):
        return False
    return kernels_available()


_sink_tensors: dict = {}


def sink_tensor(sinks, device):
    """The sink logits as a [Hq] fp32 device tensor, uploaded once per (values, device)."""
    if sinks is None:
        return None
    key = (tuple(sinks), str(device))
    if key not in _sink_tensors:
        _sink_tensors[key] = torch.tensor(sinks, dtype=torch.float32, device=device)
    return _sink_tensors[key]


def decode(query, key, value, key_cache, value_host, attn_bias, scale, topn, select, renormalize,
           softcap=0.0, sinks=None):
    """out [B, Hq, T, D] on query's device, enqueued on the current stream."""
    lib = load_kernels()
    args, out, _keep = _decode_args(query, key, value, key_cache, value_host, attn_bias, scale, topn, select,
                                    renormalize, softcap, sinks)
    B, Hq, T, D = query.shape
    Hkv, P = key.shape[1], key_cache.shape[2]
    with torch.cuda.device(query.device):  # the library plans for and launches on the current device
        # The workspace depends on the sizes, the device (the score tile fits the GPU's CTA
        # slots) and the library's tuning variables: asked once per combination (kvc_kcache_decode
        # checks every argument again). Allocated from torch's caching allocator (so CUDA-graph
        # capture takes it from the graph's pool).
        size_key = (B, Hq, Hkv, P, T, D, topn, args.select, args.dtype, query.device.index,
                    *(os.environ.get(name) for name in PLAN_VARIABLES))
        workspace_bytes = _workspace_sizes.get(size_key)
        if workspace_bytes is None:
            size = ctypes.c_size_t(0)
            _check(lib, lib.kvc_kcache_decode_workspace_size(ctypes.byref(args), ctypes.byref(size)))
            workspace_bytes = _workspace_sizes[size_key] = size.value
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=query.device)
        stream = torch.cuda.current_stream(query.device).cuda_stream
        _check(lib, lib.kvc_kcache_decode(ctypes.byref(args), workspace.data_ptr(), workspace_bytes, stream))
    return out


def describe(query, key, value, key_cache, value_host, attn_bias, topn, select) -> dict:
    """The plan the library would run for this call on query's device (score tile, fetch items,
    slices, the fetch's grid cap, workspace bytes): what a benchmark row records."""
    lib = load_kernels()
    args, _out, _keep = _decode_args(query, key, value, key_cache, value_host, attn_bias, 1.0, topn, select,
                                     False, 0.0, None)
    plan = DecodePlan()
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        _check(lib, lib.kvc_kcache_decode_describe(ctypes.byref(args), ctypes.byref(plan)))
    return {name: getattr(plan, name) for name, _ in DecodePlan._fields_}


def _decode_args(query, key, value, key_cache, value_host, attn_bias, scale, topn, select, renormalize,
                 softcap, sinks):
    """The C argument struct for one call, its output tensor, and the tensors the struct points
    into that the caller must keep alive until the call is enqueued."""
    B, Hq, T, D = query.shape
    Hkv, P = key.shape[1], key_cache.shape[2]
    # q/k/v of one token are tiny: copy them when their layout does not suit 16-byte loads.
    query, key, value = (t if _vector_ready(t, (0, 1, 2)) else t.contiguous() for t in (query, key, value))
    if not _vector_ready(key_cache, (0, 1, 2)):
        key_cache = key_cache.contiguous()  # correct but costly; the cache manager should avoid it
    bias = attn_bias.reshape(B, T, P + T)
    if bias.dtype != torch.float32 or bias.stride(2) != 1:
        bias = bias.float().contiguous()
    out = torch.empty((B, Hq, T, D), dtype=query.dtype, device=query.device)
    sink_device = sink_tensor(sinks, query.device)

    args = DecodeArgs(
        batch=B, query_heads=Hq, kv_heads=Hkv, past_len=P, head_dim=D, tokens=T, topn=topn,
        select=SelectMode(select).code, renormalize=int(renormalize),
        dtype=DTYPE_CODES[query.dtype], scale=scale, softcap=float(softcap or 0.0),
        sinks=sink_device.data_ptr() if sink_device is not None else None,
        query=query.data_ptr(), query_stride_b=_stride(query, 0), query_stride_h=_stride(query, 1),
        query_stride_t=_stride(query, 2),
        key=key.data_ptr(), key_stride_b=_stride(key, 0), key_stride_h=_stride(key, 1), key_stride_t=_stride(key, 2),
        value=value.data_ptr(), value_stride_b=_stride(value, 0), value_stride_h=_stride(value, 1),
        value_stride_t=_stride(value, 2),
        key_cache=key_cache.data_ptr(), key_cache_stride_b=_stride(key_cache, 0),
        key_cache_stride_h=_stride(key_cache, 1), key_cache_stride_p=_stride(key_cache, 2),
        value_host=value_host.data_ptr(), value_host_stride_b=_stride(value_host, 0),
        value_host_stride_p=_stride(value_host, 1),
        attn_bias=bias.data_ptr(), attn_bias_stride_b=_stride(bias, 0), attn_bias_stride_t=_stride(bias, 1),
        out=out.data_ptr(),
    )
    return args, out, (query, key, value, key_cache, bias, sink_device)


_workspace_sizes: dict = {}
# The library's $KVC_* variables that change its plan's workspace (score tiles, fetch items).
PLAN_VARIABLES = ("KVC_SCORE_TILE", "KVC_SCORE_LOADS", "KVC_GATHER_BYTES")


def _check(lib, code: int) -> None:
    if code != 0:
        raise RuntimeError(f"kvcompile kernel library error {code}: {lib.kvc_last_error().decode()}")
