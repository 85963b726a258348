"""kvcompile::cached_attention: the decode path (T = 1, past attended alone, new token merged
through the log-sum-exp) must equal SDPA over the concatenated cache."""
from __future__ import annotations

import pytest
import torch

import kvcompile.ops  # noqa: F401  (registers the ops)
from kvcompile.ops.cached_attention.definition import decode_attention

MIN = torch.finfo(torch.float32).min

# (B, Hq, Hkv, P, D): GQA, MHA, MQA; P not a multiple of 16 (bias padding) and P = 1.
SHAPES = [(3, 8, 2, 37, 32), (2, 4, 4, 16, 64), (1, 6, 1, 5, 16), (2, 4, 2, 1, 32)]


def make_step(B, Hq, Hkv, P, D, device="cpu", dtype=torch.float32, spare=7):
    g = torch.Generator().manual_seed(B * 1000 + P)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    # Past K/V as the cache manager hands them out: views of buffers with spare capacity.
    key_cache = rand(B, Hkv, P + spare, D)[:, :, :P]
    value_cache = rand(B, Hkv, P + spare, D)[:, :, :P]
    bias = torch.zeros(B, 1, 1, P + 1, device=device)
    bias[0, ..., : min(3, P)] = MIN  # left padding of the first sequence
    return rand(B, Hq, 1, D), rand(B, Hkv, 1, D), rand(B, Hkv, 1, D), key_cache, value_cache, bias


def concat_reference(query, key, value, key_cache, value_cache, bias, scale):
    keys = torch.cat([key_cache, key], dim=2).float()
    values = torch.cat([value_cache, value], dim=2).float()
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys, values, attn_mask=bias, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_path_equals_sdpa_over_concatenated_cache(shape):
    step = make_step(*shape)
    got = torch.ops.kvcompile.cached_attention(*step, 0.3)
    assert got.shape == step[0].shape
    torch.testing.assert_close(got, concat_reference(*step, 0.3), atol=1e-5, rtol=1e-5)


def test_fully_masked_past_gives_the_new_value():
    query, key, value, key_cache, value_cache, bias = make_step(2, 4, 2, 9, 16)
    bias[..., :9] = MIN
    got = decode_attention(query, key, value, key_cache, value_cache, bias, 0.25)
    want = value.repeat_interleave(2, dim=1)  # each query head reads its group's new value
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_prefill_and_multi_token_steps_keep_the_concat_path():
    # T > 1 has a causal mask among the new tokens: the op must still equal plain SDPA.
    B, Hq, Hkv, P, T, D = 2, 4, 2, 6, 3, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    kc, vc = torch.randn(B, Hkv, P, D), torch.randn(B, Hkv, P, D)
    bias = torch.zeros(B, 1, T, P + T)
    bias[..., P:] = torch.triu(torch.full((T, T), MIN), diagonal=1)
    got = torch.ops.kvcompile.cached_attention(q, k, v, kc, vc, bias, 0.25)
    torch.testing.assert_close(got, concat_reference(q, k, v, kc, vc, bias, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape", SHAPES + [(4, 32, 8, 4099, 128)])
def test_cuda_decode_path_equals_sdpa_over_concatenated_cache(shape, dtype, atol):
    step = make_step(*shape, device="cuda", dtype=dtype)
    got = torch.ops.kvcompile.cached_attention(*step, shape[-1] ** -0.5)
    assert got.dtype == dtype and got.is_cuda
    want = concat_reference(*step, shape[-1] ** -0.5)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)
