"""Attention of a few hundred queries over a long past, split along the keys to fill the GPU.

The fused prefill's recompute (kvcompile/fusion) sends ~500 scattered queries, and its question
probe 64, over a cache of a few thousand positions, with an additive bias. A fused attention
kernel gives each (batch, head, block of ~128 queries) one thread block that walks every key:
525 queries x 32 heads is 160 blocks on the H200's 132 SMs (1.2 waves, the second nearly empty),
and the 64-query probe is 32 blocks. docs/fused_attention.json measured cuDNN with the bias at
0.295 ms a layer against 0.18 for the unmasked flash kernel at the same shape, both far below
the GPU's arithmetic rate.

Splitting the keys into S equal parts and giving the parts to the kernel as S batch entries
(strided views of the op's past ++ new buffer, padded to whole parts: no other copy of K/V)
makes S times the blocks, each walking 1/S of the keys; the parts' outputs are then combined
through their log-sum-exps (flash-decoding's merge): out = sum_s exp(lse_s - lse) out_s with
lse = logsumexp_s lse_s. Exact up to rounding: the same softmax, summed in another order.

Only for one sequence (batch 1: the fused prefill's case; the S parts become the batch axis) on
CUDA with the cuDNN kernel, which takes the bias and grouped-query heads and returns the
log-sum-exp. A part whose keys are all hidden from a query gives that query a log-sum-exp near
the bias's floor and so weight 0: the hidden bias is clamped to a quarter of the dtype's lowest
value so no score overflows to -inf (decode_attention does the same).
"""
from __future__ import annotations

import torch
from torch import Tensor

# keys per part never below this: shorter parts spend more on the merge than they save
MIN_KEYS_PER_PART = 768
MAX_PARTS = 8
QUERY_BLOCK = 128  # queries per thread block in the fused kernels (cuDNN's and flash's tile)
ALIGN = 16  # rows per part a multiple of this: the bias's strides stay 32-byte aligned

_sm_counts: dict = {}
_views_accepted = [True]  # whether cuDNN took the parts as strided views (else copies)
CUDNN_DTYPES = (torch.float16, torch.bfloat16)
refused: dict = {}  # (dtype, head_dim, device) -> why cuDNN refused the parts: those calls stay unsplit


def _sm_count(device) -> int:
    key = str(device)
    if key not in _sm_counts:
        _sm_counts[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[key]


def parts_for(batch: int, query_heads: int, queries: int, keys: int, sm_count: int) -> int:
    """How many parts to split `keys` into: enough for two thread blocks per SM, with parts of at
    least MIN_KEYS_PER_PART keys, at most MAX_PARTS. 1 means do not split (batch > 1, a GPU
    already filled twice, or too few keys).

    Fitted to the H200 at the 8B recompute's shape (docs/fused_attention.json, 2026-11-29): the
    recompute's 160 blocks ran 0.338 / 0.221 / 0.224 / 0.254 ms in 1 / 2 / 3 / 4 parts (this rule:
    2), the 64-query probe's 32 blocks 0.100 / 0.085 / 0.086 / 0.081 / 0.100 in 1 / 2 / 3 / 4 / 6
    parts (this rule: 4, parts of 784 keys)."""
    if batch != 1:
        return 1
    blocks = query_heads * -(-queries // QUERY_BLOCK)
    wanted = -(-2 * sm_count // blocks)
    return max(1, min(wanted, keys // MIN_KEYS_PER_PART, MAX_PARTS))


def parts_for_call(query: Tensor, keys: int) -> int:
    # cuDNN's attention takes fp16/bf16 only; a (dtype, head_dim, device) it refused once is not tried again
    if not query.is_cuda or query.dtype not in CUDNN_DTYPES or _refusal_key(query) in refused:
        return 1
    return parts_for(query.shape[0], query.shape[1], query.shape[2], keys, _sm_count(query.device))


def _refusal_key(query: Tensor):
    return query.dtype, query.shape[-1], str(query.device)


def padded_rows(keys: int, parts: int) -> int:
    """Rows of the padded past ++ new: `keys` rounded up to `parts` parts of a multiple of ALIGN."""
    return -(-keys // (parts * ALIGN)) * parts * ALIGN


def padded_bias(attn_bias: Tensor, rows: int, dtype) -> Tensor:
    """[B, 1, M, rows] in `dtype`: the bias clamped to a quarter of the dtype's lowest value,
    the padding hidden."""
    B, _, M, N = attn_bias.shape
    floor = torch.finfo(dtype).min / 4
    out = torch.empty(B, 1, M, rows, dtype=dtype, device=attn_bias.device)
    out[..., :N].copy_(attn_bias.clamp(min=floor))
    out[..., N:].fill_(floor)
    return out


def attend_parts(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float, parts: int):
    """Each part's attention and log-sum-exp: query [1, Hq, M, D], keys/values [1, Hkv, R, D] and
    bias [1, 1, M, R] with R a multiple of `parts` -> out [parts, Hq, M, D], lse [parts, Hq, M] fp32."""
    _, Hq, M, D = query.shape
    Hkv, R = keys.shape[1], keys.shape[2]
    length = R // parts

    def split(t):  # [1, H, R, D] -> [parts, H, R / parts, D] (a view)
        return t.as_strided((parts, t.shape[1], length, D), (length * D, t.stride(1), D, 1), t.storage_offset())

    part_bias = bias.as_strided((parts, 1, M, length), (length, bias.stride(1), R, 1), bias.storage_offset())
    part_query = query.expand(parts, Hq, M, D)
    if query.is_cuda:
        inputs = (part_query, split(keys), split(values), part_bias)
        if not _views_accepted[0]:
            inputs = tuple(t.contiguous() for t in inputs)
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                *inputs, True, 0.0, False, False, scale=scale)[:2]
        except RuntimeError:
            if not _views_accepted[0] or torch.cuda.is_current_stream_capturing():
                raise
            # a cuDNN that refuses the strided views (a stride-0 batch, parts interleaved with
            # heads) gets contiguous copies from now on
            _views_accepted[0] = False
            return attend_parts(query, keys, values, bias, scale, parts)
    else:  # the same arithmetic on the CPU, for tests (no GQA there: heads repeated)
        groups = Hq // Hkv
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            part_query.contiguous(), split(keys).repeat_interleave(groups, 1),
            split(values).repeat_interleave(groups, 1), 0.0, False, attn_mask=part_bias, scale=scale)
    if lse.dim() == 4:
        lse = lse[..., 0]
    return out, lse[..., :M].float()


def merge_parts(out: Tensor, lse: Tensor) -> Tensor:
    """[parts, Hq, M, D] outputs and [parts, Hq, M] log-sum-exps -> [1, Hq, M, D] in out's dtype."""
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # exp(lse_s - logsumexp_s lse_s), fp32
    return (out * weights).sum(dim=0, keepdim=True).to(out.dtype)  # promoted to fp32 in the product


def split_key_attention(query: Tensor, keys: Tensor, values: Tensor, attn_bias: Tensor, scale: float,
                        parts: int) -> Tensor:
    """cached_attention's multi-token step (batch 1, no sinks or softcap) with the keys in `parts`:
    keys/values [1, Hkv, R, D] are the past ++ new padded with zeros to R = padded_rows(...)
    (definition.past_then_new), attn_bias [1, 1, M, P + T] the step's bias."""
    bias = padded_bias(attn_bias, keys.shape[2], query.dtype)
    out, lse = attend_parts(query, keys, values, bias, scale, parts)
    return merge_parts(out, lse)


def split_key_attention_or_none(query: Tensor, keys: Tensor, values: Tensor, attn_bias: Tensor, scale: float,
                                parts: int):
    """split_key_attention, or None when the kernel refuses this call (a head size or layout this
    cuDNN does not take): the caller then attends unsplit, and calls alike are not split again.
    Inside a CUDA graph capture a refusal is raised instead (the warm-up before it decides)."""
    try:
        return split_key_attention(query, keys, values, attn_bias, scale, parts)
    except RuntimeError as error:
        if query.is_cuda and torch.cuda.is_current_stream_capturing():
            raise
        refused[_refusal_key(query)] = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None
