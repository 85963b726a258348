"""The fused kernel that attends the past in a full-cache decode step, chosen by measurement.

A decode step (T = 1) attends the cached past with one fused attention call that also returns
the log-sum-exp (the new token is merged in afterwards: definition.decode_attention). Torch
has several such kernels and none is fastest everywhere; at B=48, 32/8 heads, d=64, 16K, bf16
the issue measured cuDNN at the HBM floor (0.36 ms per layer) and the flash kernel at 2.4x.
So the first decode call of each (device, dtype, head_dim, group, batch, heads, ~past length)
runs every candidate on the call's own tensors, drops those that fail or disagree with the
memory-efficient kernel (the reference among them: it takes a bias and returns the
log-sum-exp), and keeps the fastest. The choice is cached; `chosen()` reports it
(benchmarks record it). $KVCOMPILE_DECODE_BACKEND forces one candidate by name.

cuDNN builds an execution plan per shape, and an eager decode step has a new past length each
step: on the H200 the eager full-cache step took 95 ms with cuDNN (a plan per layer per step)
against 9.4 ms replayed from a CUDA graph, whose past length is fixed. So cuDNN is a candidate
only inside `static_past_length()` (the CUDA-graph decoder's capture, or a caller that repeats
one shape); elsewhere decode uses the memory-efficient kernel.

Candidates (all read K and V once: none expands the KV heads):
  efficient_rows  memory-efficient kernel, a KV head's query group as its query rows
  cudnn_rows      cuDNN, the same layout
  cudnn_gqa       cuDNN with grouped-query heads (query heads as heads, one query row)
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
from torch import Tensor

CANDIDATES = ("efficient_rows", "cudnn_rows", "cudnn_gqa")
PER_SHAPE_PLANS = ("cudnn_rows", "cudnn_gqa")  # candidates only while the past length is static
_chosen: dict = {}
_timings: dict = {}
_static_past = [False]


@contextlib.contextmanager
def static_past_length():
    """Within: decode calls repeat one past length (a CUDA graph's warm-up and capture), so a
    backend that plans per shape pays its plan once."""
    previous = _static_past[0]
    _static_past[0] = True
    try:
        yield
    finally:
        _static_past[0] = previous


def _lse_rows(lse: Tensor, shape) -> Tensor:
    """A kernel's log-sum-exp as [B, H, M] float32 (cuDNN may add a trailing 1, the efficient
    kernel pads M to 32)."""
    B, H, M = shape
    if lse.dim() == 4:
        lse = lse[..., 0]
    return lse[..., :M].float().reshape(B, H, M)


def _efficient(query, keys, values, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, keys, values, bias, True, 0.0, False, scale=scale)[:2]
    return out, _lse_rows(lse, query.shape[:3])


def _cudnn(query, keys, values, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, keys, values, bias, True, 0.0, False, False, scale=scale)[:2]
    return out, _lse_rows(lse, query.shape[:3])


def attend_past(backend: str, rows: Tensor, key_cache: Tensor, value_cache: Tensor, bias_rows, scale: float):
    """Attention of rows [B, Hkv, G, D] over the past [B, Hkv, P, D] with bias_rows
    ([B, Hkv, G, P] view, or None) -> (out [B, Hkv, G, D], lse [B, Hkv, G] float32)."""
    B, Hkv, G, D = rows.shape
    if backend == "efficient_rows":
        return _efficient(rows, key_cache, value_cache, bias_rows, scale)
    if backend == "cudnn_rows":
        return _cudnn(rows, key_cache, value_cache, bias_rows, scale)
    if backend == "cudnn_gqa":
        query = rows.reshape(B, Hkv * G, 1, D)
        bias = None if bias_rows is None else bias_rows.reshape(B, Hkv * G, 1, -1)
        out, lse = _cudnn(query, key_cache, value_cache, bias, scale)
        return out.reshape(B, Hkv, G, D), lse.reshape(B, Hkv, G)
    raise ValueError(f"decode backend must be one of {CANDIDATES}, got {backend!r}")


def _key(rows: Tensor, key_cache: Tensor):
    B, Hkv, G, D = rows.shape
    P = key_cache.shape[2]
    return (str(rows.device), rows.dtype, D, G, B, Hkv, P.bit_length(), _static_past[0])  # past length by octave


def _time_ms(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def choose(rows: Tensor, key_cache: Tensor, value_cache: Tensor, bias_rows, scale: float) -> str:
    """The backend for this call's shape: forced, cached, or measured now (first call)."""
    forced = os.environ.get("KVCOMPILE_DECODE_BACKEND")
    if forced:
        return forced
    if not rows.is_cuda:
        return "efficient_rows"  # not reached: CPU decode takes the flash-for-CPU kernel
    if not _static_past[0]:
        return "efficient_rows"
    key = _key(rows, key_cache)
    if key in _chosen:
        return _chosen[key]
    if torch.cuda.is_current_stream_capturing():
        return "efficient_rows"  # cannot measure inside a graph capture; warm up first
    want_out, want_lse = attend_past("efficient_rows", rows, key_cache, value_cache, bias_rows, scale)
    timings = {}
    for name in CANDIDATES:
        try:
            out, lse = attend_past(name, rows, key_cache, value_cache, bias_rows, scale)
            same = (torch.allclose(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
                    and torch.allclose(lse, want_lse, atol=1e-2, rtol=1e-3))
            if not same:
                timings[name] = "disagrees with efficient_rows"
                continue
            timings[name] = _time_ms(lambda name=name: attend_past(name, rows, key_cache, value_cache, bias_rows, scale))
        except Exception as error:  # noqa: BLE001 - a kernel that refuses the shape is skipped
            timings[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    measured = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
    _chosen[key] = min(measured, key=measured.get) if measured else "efficient_rows"
    _timings[key] = timings
    return _chosen[key]


def chosen() -> list:
    """[{shape, backend, timings}] for every shape decided in this process."""
    return [dict(shape=dict(device=k[0], dtype=str(k[1]), head_dim=k[2], group=k[3], batch=k[4],
                            kv_heads=k[5], past_octave=k[6], static_past=k[7]),
                 backend=backend, timings_ms=_timings.get(k))
            for k, backend in _chosen.items()]
