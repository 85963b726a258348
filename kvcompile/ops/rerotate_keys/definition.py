"""kvcompile::rerotate_keys — move cached RoPE keys to other positions (KV fusion / CacheBlend).

A chunk's KV cache computed alone sits at positions 0..L-1; reused at offset o in a new prompt,
each RoPE layer's keys must sit at p + o. RoPE rotates each pair of rotated dims by the angle
p · inv_freq[i], and rotations compose, so K_at(p + o) = R(o · inv_freq) · K_at(p) exactly,
whatever the frequency scaling (linear, llama3, yarn, ...) as long as inv_freq does not depend on
the sequence length. Attention scaling factors (yarn's mscale) multiply cos and sin at the
original position already, so they are in the cached keys and are not applied again.

Shapes:
  keys        [B, Hkv, T, D]   any strides; float32 / float16 / bfloat16 (float64 also works)
  delta       [B, T]  integer  the position shift of each token: may differ per row and per
                               token, may be negative
  inv_freq    [R/2]   float32  the layer's inverse frequencies; the first R ≤ D dims rotate,
                               dims R.. pass through unchanged
  interleaved bool             False: half-split pairs (x[i], x[i + R/2]), HF's rotate_half
                               convention x·cos + rotate_half(x)·sin with cos = cat(f, f);
                               True: adjacent pairs (x[2i], x[2i+1]) (Cohere, GLM, Llama 4's
                               complex multiplication)
  returns     [B, Hkv, T, D]   contiguous, keys' dtype

Each pair (x1, x2) becomes (x1·cos a - x2·sin a, x2·cos a + x1·sin a), a = delta · inv_freq[i].

Precision: the angle delta · inv_freq is formed and its cos / sin taken in float64, then cast to
the compute dtype (float32, or float64 for float64 keys). In float32 the product alone would be
off by up to half an ulp of the angle: at delta = 128K and inv_freq = 1 that is 0.004 rad,
a visible error on every high-frequency pair. In float64 the angle is exact to ~1e-11 rad for
any |delta| < 2^31. The pair arithmetic then runs in float32 (keys of half precision are upcast
and the result rounded once). The model computed the cached keys with a float32 angle, so
re-rotated keys equal a fresh prefill at p + o within the model's own angle rounding
(half an ulp of (p + o) · inv_freq), not bit for bit.

CUDA: the kernel library's kvc_rerotate_keys (plugins/csrc/rerotate.cu) when the library loads
and the keys are float32 / float16 / bfloat16 with a contiguous last dim; the torch code below
otherwise. Both compute the angle in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_rerotate_args(keys: Tensor, delta: Tensor, inv_freq: Tensor) -> None:
    """Raise ValueError naming the argument when the call breaks the contract above."""
    if keys.dim() != 4:
        raise ValueError(f"rerotate_keys: keys must be [B, Hkv, T, D], got shape {tuple(keys.shape)}")
    if not keys.is_floating_point():
        raise ValueError(f"rerotate_keys: keys must be floating point, got {keys.dtype}")
    B, _, T, D = keys.shape
    if tuple(delta.shape) != (B, T):
        raise ValueError(f"rerotate_keys: delta must have shape {(B, T)} (from keys {tuple(keys.shape)}), "
                         f"got {tuple(delta.shape)}")
    if delta.is_floating_point() or delta.is_complex() or delta.dtype == torch.bool:
        raise ValueError(f"rerotate_keys: delta must be an integer tensor (int64), got {delta.dtype}")
    if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        raise ValueError(f"rerotate_keys: inv_freq must be a 1-D float tensor [R/2], got "
                         f"{inv_freq.dtype} of shape {tuple(inv_freq.shape)}")
    if 2 * inv_freq.shape[0] > D:
        raise ValueError(f"rerotate_keys: inv_freq has {inv_freq.shape[0]} frequencies, so "
                         f"{2 * inv_freq.shape[0]} rotated dims, more than head dim {D}")


def rotation_cos_sin(delta: Tensor, inv_freq: Tensor, dtype: torch.dtype):
    """cos and sin of delta · inv_freq, [B, 1, T, R/2] in `dtype`, the angle taken in float64."""
    angle = delta.to(torch.float64)[:, :, None] * inv_freq.to(device=delta.device, dtype=torch.float64)
    return angle.cos().to(dtype)[:, None], angle.sin().to(dtype)[:, None]


def rerotate_reference(keys: Tensor, delta: Tensor, inv_freq: Tensor, interleaved: bool) -> Tensor:
    """The definition, in plain torch (also what CUDA runs when the kernels cannot)."""
    half = inv_freq.shape[0]
    rotary = 2 * half
    compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
    cos, sin = rotation_cos_sin(delta.to(keys.device), inv_freq.to(keys.device), compute)
    x = keys[..., :rotary].to(compute)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    rotated = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return torch.cat((rotated.to(keys.dtype), keys[..., rotary:]), dim=-1).contiguous()


@torch.library.custom_op("kvcompile::rerotate_keys", mutates_args=())
def rerotate_keys(keys: Tensor, delta: Tensor, inv_freq: Tensor, interleaved: bool) -> Tensor:
    check_rerotate_args(keys, delta, inv_freq)
    return rerotate_reference(keys, delta, inv_freq, interleaved)


@rerotate_keys.register_kernel("cuda")
def _rerotate_keys_cuda(keys, delta, inv_freq, interleaved):
    check_rerotate_args(keys, delta, inv_freq)
    from kvcompile.ops.rerotate_keys import kernels

    if kernels.can_use_kernels(keys, delta, inv_freq):
        return kernels.run(keys, delta, inv_freq, interleaved)
    return rerotate_reference(keys, delta, inv_freq, interleaved)


@rerotate_keys.register_fake
def _(keys, delta, inv_freq, interleaved):
    return keys.new_empty(keys.shape)
