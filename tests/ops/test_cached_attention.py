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
        query.float(), keys, values, attn_mask=bias.float(), scale=scale, enable_gqa=True)


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


# --- multi-token steps with the keys split in parts (ops/cached_attention/split_keys.py) ---------

def scattered_step(P, S, Q, Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu", seed=0):
    """The fused prefill's recompute: S chosen past rows at scattered positions (their stale
    rows hidden) and Q question tokens after the past, as one step over the cache."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    chosen = torch.randperm(P, generator=g)[:S].sort().values
    q_pos = torch.cat([chosen, torch.arange(P, P + Q)])
    k_pos = torch.cat([torch.arange(P), q_pos])
    stale = torch.zeros(P + S + Q, dtype=torch.bool)
    stale[chosen] = True
    visible = (k_pos[None] <= q_pos[:, None]) & ~stale[None]
    bias = torch.zeros(1, 1, S + Q, P + S + Q).masked_fill(~visible, torch.finfo(dtype).min).to(device, dtype)
    T = S + Q
    return rand(1, Hq, T, D), rand(1, Hkv, T, D), rand(1, Hkv, T, D), rand(1, Hkv, P, D), rand(1, Hkv, P, D), bias


def split_step(*args, **kwargs):
    """The op's split path on one step (definition.split_step)."""
    from kvcompile.ops.cached_attention.definition import split_step as op_split_step

    return op_split_step(*args, **kwargs)


@pytest.mark.parametrize("parts", [2, 3, 8])
@pytest.mark.parametrize("P,S,Q", [(200, 30, 5), (61, 7, 3), (1000, 150, 20)])
def test_split_key_attention_equals_sdpa_over_the_concatenated_cache(parts, P, S, Q):
    step = scattered_step(P, S, Q)
    got = split_step(*step, 0.25, parts)
    torch.testing.assert_close(got, concat_reference(*step, 0.25), atol=1e-5, rtol=1e-5)


def test_split_parts_where_every_key_is_hidden_get_no_weight():
    # The first queries see only the first keys: every later part is wholly hidden from them,
    # with parts made of padding only, too (8 parts of 16 rows for 40 keys).
    P, T = 30, 10
    q, k, v, kc, vc, _ = scattered_step(P, 0, T)
    bias = torch.zeros(1, 1, T, P + T)
    bias[..., P:] = torch.triu(torch.full((T, T), MIN), diagonal=1)
    bias[..., 0, 5:P] = MIN  # query 0 sees keys 0..4 and itself only
    got = split_step(q, k, v, kc, vc, bias, 0.25, 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, concat_reference(q, k, v, kc, vc, bias, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blocks_heads,queries,keys,sms,want", [
    (32, 525, 3661, 132, 2),     # the 8B recompute: 160 blocks on 132 SMs -> 320
    (32, 64, 3136, 132, 4),      # the question probe: 32 blocks -> 4 parts of 784 keys (not 9)
    (32, 3136, 3136, 132, 1),    # a full prefill fills the GPU already
    (32, 64, 1500, 132, 1),      # too few keys for two parts of 768
])
def test_parts_for_splits_only_what_underfills_the_gpu(blocks_heads, queries, keys, sms, want):
    from kvcompile.ops.cached_attention.split_keys import parts_for

    assert parts_for(1, blocks_heads, queries, keys, sms) == want
    assert parts_for(2, blocks_heads, queries, keys, sms) == 1  # batch > 1: never (the parts are the batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("P,S,Q,parts", [(3072, 461, 64, 4), (3072, 0, 64, 8), (1500, 200, 17, 2)])
def test_cuda_split_key_attention_equals_the_op_unsplit(P, S, Q, parts):
    step = scattered_step(P, S, Q, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, device="cuda")
    got = split_step(*step, 0.088, parts)
    want = concat_reference(*step, 0.088).to(torch.bfloat16)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    via_op = torch.ops.kvcompile.cached_attention(*step, 0.088)  # the op's own choice of parts
    torch.testing.assert_close(via_op, want, atol=2e-2, rtol=2e-2)


def test_a_refused_split_falls_back_and_is_not_tried_again(monkeypatch):
    # a cuDNN that refuses the parts (a head size it does not take, say): the op's caller gets
    # None, attends unsplit, and the (dtype, head_dim, device) is remembered
    from kvcompile.ops.cached_attention import split_keys

    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN: no execution plan for this head size\nmore detail")

    monkeypatch.setattr(split_keys, "attend_parts", refuse)
    monkeypatch.setattr(split_keys, "refused", {})
    step = scattered_step(200, 30, 5)
    assert split_step(*step, 0.25, 2, or_none=True) is None
    assert split_keys.refused == {(torch.float32, 16, "cpu"): "cuDNN: no execution plan for this head size"}


def test_parts_for_call_never_splits_what_cudnn_cannot_take():
    from kvcompile.ops.cached_attention.split_keys import parts_for_call

    assert parts_for_call(torch.zeros(1, 32, 64, 128), 3136) == 1  # the CPU
    if torch.cuda.is_available():
        assert parts_for_call(torch.zeros(1, 32, 64, 128, device="cuda"), 3136) == 1  # fp32: not cuDNN's


@pytest.mark.parametrize("refuse", [False, True])
def test_the_op_split_path_and_its_fallback_equal_sdpa(monkeypatch, refuse):
    # the op's own branch on the CPU: parts forced to 3; refused, it attends past ++ new unsplit
    from kvcompile.ops.cached_attention import split_keys

    monkeypatch.setattr(split_keys, "parts_for_call", lambda query, keys: 3)
    monkeypatch.setattr(split_keys, "refused", {})
    if refuse:
        def refusing(*args, **kwargs):
            raise RuntimeError("refused")
        monkeypatch.setattr(split_keys, "attend_parts", refusing)
    step = scattered_step(300, 40, 6)
    got = torch.ops.kvcompile.cached_attention(*step, 0.25)
    torch.testing.assert_close(got, concat_reference(*step, 0.25), atol=1e-5, rtol=1e-5)
    assert bool(split_keys.refused) == refuse
