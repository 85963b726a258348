"""The kvcompile plugins through TensorRT's Python plugin API (`tensorrt.plugin`, "trtp").

Registered under the same names as the C++ plugins (`kvcompile::kcache_attention`,
`kvcompile::rerotate_keys`, `kvcompile::kv_decode`: namespace::name, version 1), with the ONNX node's attributes as
their attributes, so an ONNX graph exported with `--target tensorrt` resolves to either. Their
`impl` runs the same kernel library as the torch ops and the C++ plugins, on TensorRT's stream.
Register one kind only in a process: two creators of one name/version/namespace conflict.

    from kvcompile.plugins.tensorrt.python_plugins import register_python_plugins
    register_python_plugins()   # raises TensorRTUnavailable (one line) without TensorRT

Whichever bindings are installed are used: `tensorrt`, else `tensorrt_rtx` (its bindings
wheel's module is `tensorrt_rtx_bindings`). The shape and field logic below is plain Python
(`output_like_input`, `kv_decode_output_shape`, `kept_positions`, `check_kcache_fields`) and is
tested without TensorRT.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence, Tuple

from kvcompile.errors import RuntimeFailure

BINDINGS = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
NO_SINK = float("-inf")  # kvcompile.ops.onnx_domain.NO_SINK (not imported: onnxscript is heavy)


class TensorRTUnavailable(RuntimeFailure):
    """No TensorRT Python bindings here, or bindings without the Python plugin API."""


def tensorrt_module():
    """The first of BINDINGS that imports, or None."""
    for name in BINDINGS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def plugin_api():
    """(trt, trtp): the bindings and their plugin module; raises TensorRTUnavailable."""
    trt = tensorrt_module()
    if trt is None:
        raise TensorRTUnavailable("TensorRT's Python bindings are not installed (pip install tensorrt, or "
                                  "tensorrt-rtx): the kvcompile Python plugins were not registered")
    try:
        trtp = importlib.import_module(f"{trt.__name__}.plugin")
    except ImportError:
        raise TensorRTUnavailable(f"{trt.__name__} {getattr(trt, '__version__', '?')} has no Python plugin API "
                                  f"({trt.__name__}.plugin, TensorRT ≥ 10.6): the kvcompile Python plugins were "
                                  "not registered") from None
    return trt, trtp


# plain-Python logic shared by the registrations and the tests ---------------------------------
def output_like_input(input_shapes: Sequence[Tuple]) -> Tuple:
    """Both plugins return a tensor shaped like their first input."""
    return tuple(input_shapes[0])


def kept_positions(context: int, topn: int, numerator: int, denominator: int) -> int:
    """Positions kept for a context: topn, or max(1, round-half-up(context · num / den)) when
    den > 0 (kvcompile.core.config.topn_for_context), at most the context."""
    wanted = max(1, (context * numerator + denominator // 2) // denominator) if denominator > 0 else topn
    return min(wanted, context)


def check_kcache_fields(scale: float, topn: int, topn_numerator: int, topn_denominator: int, select_layer: int,
                        renormalize: int, softcap: float) -> Optional[str]:
    """None when the fields are valid, else what is wrong (the C++ creator's rules)."""
    import math

    if not math.isfinite(scale):
        return "scale must be finite"
    if topn_numerator < 0 or topn_denominator < 0:
        return "topn_numerator/denominator must be >= 0"
    if topn_denominator == 0 and topn < 1:
        return "topn must be >= 1 when topn_denominator is 0"
    if select_layer not in (0, 1):
        return "select_layer must be 0 or 1"
    if renormalize not in (0, 1):
        return "renormalize must be 0 or 1"
    if not (softcap >= 0 and math.isfinite(softcap)):
        return "softcap must be finite and >= 0"
    return None


ONNX_DTYPE_CODES = {1: 0, 10: 1, 16: 2}  # kv_decode's onnx_dtype (TensorProto) -> KVC_DTYPE_*


def kv_decode_output_shape(chunks, layers: int, kv_heads: int, head_dim: int, tokens: int) -> Tuple:
    """[2, L, Hkv, N · tokens, D]; `chunks` may be an int or a shape expression."""
    return (2, layers, kv_heads, chunks * tokens, head_dim)


def sink_list(sinks) -> Optional[list]:
    values = [float(s) for s in sinks]
    return None if len(values) == 1 and values[0] == NO_SINK else values


# registration --------------------------------------------------------------------------------
_registered = False


def register_python_plugins() -> list:
    """Register every kvcompile plugin with TensorRT's Python plugin API; returns their names
    (namespace::name). Idempotent within a process."""
    global _registered
    trt, trtp = plugin_api()
    names = [f"kvcompile::{name}" for name in ("kcache_attention", "rerotate_keys", "kv_decode")]
    if _registered:
        return names
    import numpy as np
    import numpy.typing as npt
    import torch

    @trtp.register("kvcompile::kcache_attention")
    def kcache_attention_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                              key_cache: trtp.TensorDesc, value_host: trtp.TensorDesc, attn_bias: trtp.TensorDesc,
                              scale: float, topn: int, topn_numerator: int, topn_denominator: int,
                              select_layer: int, renormalize: int, softcap: float,
                              sinks: npt.NDArray[np.float32]) -> trtp.TensorDesc:
        problem = check_kcache_fields(scale, topn, topn_numerator, topn_denominator, select_layer, renormalize, softcap)
        if problem:
            raise ValueError(f"kvcompile::kcache_attention: {problem}")
        return query.like()

    @trtp.impl("kvcompile::kcache_attention")
    def kcache_attention_impl(query: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor, key_cache: trtp.Tensor,
                              value_host: trtp.Tensor, attn_bias: trtp.Tensor, scale: float, topn: int,
                              topn_numerator: int, topn_denominator: int, select_layer: int, renormalize: int,
                              softcap: float, sinks: npt.NDArray[np.float32], outputs: Tuple[trtp.Tensor],
                              stream: int) -> None:
        from kvcompile.core.modes import SelectMode
        from kvcompile.ops.kcache_attention import kernels

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            # value_host's address is pinned host memory (mapped): wrapped as it is, the kernel
            # library reads only the chosen rows from it.
            q, k, v, kc, vh, bias = (torch.as_tensor(t, device="cuda")
                                     for t in (query, key, value, key_cache, value_host, attn_bias))
            out = torch.as_tensor(outputs[0], device="cuda")
            context = kc.shape[2] + q.shape[2]
            select = next(m for m in SelectMode if m.code == select_layer).value
            result = kernels.decode(q, k, v, kc, vh, bias, scale, kept_positions(context, topn, topn_numerator,
                                                                                   topn_denominator),
                                    select, bool(renormalize), softcap, sink_list(sinks))
            out.copy_(result)

    @trtp.register("kvcompile::rerotate_keys")
    def rerotate_keys_desc(keys: trtp.TensorDesc, delta: trtp.TensorDesc, inv_freq: trtp.TensorDesc,
                           interleaved: int) -> trtp.TensorDesc:
        if interleaved not in (0, 1):
            raise ValueError(f"kvcompile::rerotate_keys: interleaved must be 0 or 1, got {interleaved}")
        return keys.like()

    @trtp.impl("kvcompile::rerotate_keys")
    def rerotate_keys_impl(keys: trtp.Tensor, delta: trtp.Tensor, inv_freq: trtp.Tensor, interleaved: int,
                           outputs: Tuple[trtp.Tensor], stream: int) -> None:
        from kvcompile.ops.rerotate_keys import kernels

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            k, d, f = (torch.as_tensor(t, device="cuda") for t in (keys, delta, inv_freq))
            torch.as_tensor(outputs[0], device="cuda").copy_(kernels.run(k, d, f, bool(interleaved)))

    @trtp.register("kvcompile::kv_decode")
    def kv_decode_desc(data: trtp.TensorDesc, chunk_offsets: trtp.TensorDesc, bank_cdf: trtp.TensorDesc,
                       halves: trtp.TensorDesc, table_base: trtp.TensorDesc, scale_steps: trtp.TensorDesc,
                       layers: int, kv_heads: int, head_dim: int, tokens: int, group: int, log_scales: int,
                       onnx_dtype: int) -> trtp.TensorDesc:
        dtype = {1: trt.float32, 10: trt.float16, 16: trt.bfloat16}.get(onnx_dtype)
        if dtype is None:
            raise ValueError(f"kvcompile::kv_decode: onnx_dtype must be 1, 10 or 16, got {onnx_dtype}")
        shape = kv_decode_output_shape(chunk_offsets.shape_expr[0], layers, kv_heads, head_dim, tokens)
        return trtp.from_shape_expr(shape, dtype=dtype)

    @trtp.impl("kvcompile::kv_decode")
    def kv_decode_impl(data: trtp.Tensor, chunk_offsets: trtp.Tensor, bank_cdf: trtp.Tensor, halves: trtp.Tensor,
                       table_base: trtp.Tensor, scale_steps: trtp.Tensor, layers: int, kv_heads: int, head_dim: int,
                       tokens: int, group: int, log_scales: int, onnx_dtype: int, outputs: Tuple[trtp.Tensor],
                       stream: int) -> None:
        from kvcompile.ops.kv_decode import kernels

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            inputs = [torch.as_tensor(t, device="cuda") for t in (data, chunk_offsets, bank_cdf, halves, table_base,
                                                                   scale_steps)]
            # unlike the C++ plugin, this one waits for the per-chunk status and raises BitstreamError
            decoded = kernels.run(*inputs, layers, kv_heads, head_dim, tokens, group, log_scales,
                                  ONNX_DTYPE_CODES[onnx_dtype])
            torch.as_tensor(outputs[0], device="cuda").copy_(decoded)

    _registered = True
    return names

