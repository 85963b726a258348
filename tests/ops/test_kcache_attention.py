"""kvcompile::kcache_attention: the torch reference against an independent naive loop, exactness
against cached_attention, argument checks, the CUDA sources compiling, and (GPU) the kernels
against the reference."""
from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

import kvcompile.ops  # noqa: F401  (registers the ops)
from kvcompile.ops.kcache_attention.definition import kcache_attention_reference

HIDDEN = torch.finfo(torch.float32).min
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
op = torch.ops.kvcompile.kcache_attention


def make_bias(B, T, P, pads, causal=True):
    """[B, 1, T, P+T]: left padding of pads[b] positions hidden, causal over the new rows."""
    S = P + T
    bias = torch.zeros(B, 1, T, S)
    for b, pad in enumerate(pads):
        bias[b, :, :, :pad] = HIDDEN
    if causal:
        for t in range(T):
            bias[:, :, t, P + t + 1:] = HIDDEN
    return bias


def make_inputs(B, Hq, Hkv, T, P, D, pads=None, dtype=torch.float32, seed=0, spread=1.0):
    """Random inputs; key_cache and value_host are views of larger buffers (as the runtime's are)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    P_max = P + 5
    query = (rnd(B, Hq, T, D) * spread).to(dtype)
    key, value = rnd(B, Hkv, T, D).to(dtype), rnd(B, Hkv, T, D).to(dtype)
    key_cache = rnd(B, Hkv, P_max, D).to(dtype)[:, :, :P]
    value_host = rnd(B, P_max, Hkv, D).to(dtype)[:, :P]
    bias = make_bias(B, T, P, pads or [0] * B)
    return query, key, value, key_cache, value_host, bias


def naive_kcache(query, key, value, key_cache, value_host, bias, scale, topn, select, renormalize):
    """Position-by-position float64 loop written from the contract, independent of the op's code."""
    B, Hq, T, D = query.shape
    Hkv, P = key.shape[1], key_cache.shape[2]
    S, G = P + T, Hq // Hkv
    q, bias = query.double(), bias.double()

    def key_at(b, h, s):
        return (key_cache[b, h, s] if s < P else key[b, h, s - P]).double()

    def value_at(b, h, s):
        return (value_host[b, s, h] if s < P else value[b, h, s - P]).double()

    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        probs = torch.zeros(Hq, T, S, dtype=torch.float64)
        for hq in range(Hq):
            h = hq // G
            for t in range(T):
                logits = [float(q[b, hq, t] @ key_at(b, h, s)) * scale + float(bias[b, 0, t, s])
                          for s in range(S)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                probs[hq, t] = torch.tensor([w / total for w in weights], dtype=torch.float64)
        for hq in range(Hq):
            h = hq // G
            if P == 0:
                kept = list(range(S))
            else:
                heads = range(h * G, (h + 1) * G) if select == "head" else range(Hq)
                score = [sum(float(probs[x, t, s]) for x in heads for t in range(T)) for s in range(S)]
                kept = sorted(range(S), key=lambda s: -score[s])[:min(topn, S)]
            for t in range(T):
                acc = sum(probs[hq, t, s] * value_at(b, h, s) for s in kept)
                if renormalize and P > 0:
                    acc = acc / sum(probs[hq, t, s] for s in kept)
                out[b, hq, t] = acc
    return out


SHAPES = [  # (B, Hq, Hkv, T, P, D, pads)
    (1, 4, 4, 1, 17, 8, None),          # MHA decode, odd context
    (2, 8, 2, 1, 31, 16, [0, 7]),       # GQA decode, padded batch of different lengths
    (3, 4, 1, 1, 9, 8, [0, 3, 8]),      # MQA, one row with a single visible past token
    (2, 4, 2, 3, 12, 8, [2, 0]),        # several new tokens over a cache (causal + padding)
    (2, 6, 3, 5, 0, 8, [1, 0]),         # prefill: plain attention
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-P{}-D{}".format(*s[:6]))
@pytest.mark.parametrize("select", ["head", "layer"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_matches_naive_loop(shape, select, renormalize):
    B, Hq, Hkv, T, P, D, pads = shape
    args = make_inputs(B, Hq, Hkv, T, P, D, pads, seed=B * 100 + P, spread=2.0)
    scale = D ** -0.5
    S = P + T
    for topn in sorted({1, 3, S // 2 + 1, S, S + 4}):
        got = op(*args, scale, topn, select, renormalize)
        want = naive_kcache(*args, scale, topn, select, renormalize)
        assert got.shape == (B, Hq, T, D) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5,
                                   msg=lambda m: f"topn={topn}: {m}")


@pytest.mark.parametrize("select", ["head", "layer"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T,P", [(1, 1), (1, 40), (4, 23), (6, 0)])
def test_topn_covering_context_equals_cached_attention(select, renormalize, T, P):
    B, Hq, Hkv, D = 2, 8, 2, 32
    query, key, value, key_cache, value_host, bias = make_inputs(B, Hq, Hkv, T, P, D, [0, min(P, 3)], seed=7)
    value_cache = value_host.permute(0, 2, 1, 3)  # [B, Hkv, P, D], the full-cache layout
    scale = 0.3
    want = torch.ops.kvcompile.cached_attention(query, key, value, key_cache, value_cache, bias, scale)
    for topn in (P + T, P + T + 100):
        got = op(query, key, value, key_cache, value_host, bias, scale, topn, select, renormalize)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_low_precision_dtypes_keep_dtype_and_stay_close():
    for dtype in (torch.bfloat16, torch.float16):
        args = make_inputs(2, 4, 2, 1, 20, 16, [0, 5], dtype=dtype, seed=3)
        got = op(*args, 0.25, 6, "head", True)
        want = naive_kcache(*args, 0.25, 6, "head", True)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_smaller_topn_drops_low_probability_mass():
    # One key is made to dominate: topn=1 must return (about) its value row from the host.
    query, key, value, key_cache, value_host, bias = make_inputs(1, 2, 1, 1, 10, 8, seed=5)
    key_cache[0, 0, 4] = query[0, 0, 0] * 20
    got = op(query, key, value, key_cache, value_host, bias, 1.0, 1, "head", True)
    torch.testing.assert_close(got[0, 0, 0], value_host[0, 4, 0])


def test_opcheck_schema_and_fake_kernel():
    args = make_inputs(2, 4, 2, 1, 9, 8, [0, 2], seed=11)
    torch.library.opcheck(op.default, (*args, 0.35, 4, "layer", False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("change,message", [
    (dict(topn=0), "topn"),
    (dict(topn=-3), "topn"),
    (dict(select="max"), "select"),
    (dict(value_host=torch.zeros(2, 2, 9, 8)), "value_host"),      # head-major layout by mistake
    (dict(attn_bias=torch.zeros(2, 1, 1, 9)), "attn_bias"),         # forgot the new token
    (dict(key_cache=torch.zeros(2, 2, 9, 4)), "key_cache"),         # wrong head dim
    (dict(query=torch.zeros(2, 3, 1, 8)), "multiple"),              # 3 query heads over 2 KV heads
    (dict(key=torch.zeros(2, 2, 1, 8, dtype=torch.float16)), "dtype"),
])
def test_bad_arguments_raise_clear_errors(change, message):
    query, key, value, key_cache, value_host, bias = make_inputs(2, 4, 2, 1, 9, 8, seed=1)
    kwargs = dict(query=query, key=key, value=value, key_cache=key_cache, value_host=value_host,
                  attn_bias=bias, scale=0.3, topn=4, select="head", renormalize=False)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        op(**kwargs)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    from kvcompile.plugins import build

    diagnostics = build.compile_library(tmp_path / "libkvcompile_kernels.so", archs=("sm_90",), ptx_arch=None)
    assert (tmp_path / "libkvcompile_kernels.so").stat().st_size > 0
    assert "warning" not in diagnostics.lower(), diagnostics


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_library_abi_plans_workspace_and_rejects_bad_args():
    # Without a GPU the workspace query's only CUDA calls (the device's CTA slots, for the score
    # tile) fail quietly and the plan keeps its defaults, so the ctypes struct layout is checked
    # on CPU too.
    import ctypes

    from kvcompile.plugins import load_kernels
    from kvcompile.ops.kcache_attention.kernels import DecodeArgs

    lib = load_kernels()
    B, Hq, Hkv, P, D, topn = 2, 8, 2, 1000, 64, 100
    fake = 1 << 20  # aligned, never dereferenced
    args = DecodeArgs(batch=B, query_heads=Hq, kv_heads=Hkv, past_len=P, head_dim=D, tokens=1, topn=topn,
                      select=0, renormalize=0, dtype=2, scale=0.125, query=fake, key=fake,
                      value=fake, key_cache=fake, value_host=fake, attn_bias=fake, out=fake,
                      key_cache_stride_p=D, value_host_stride_p=Hkv * D)
    size = ctypes.c_size_t(0)
    assert lib.kvc_kcache_decode_workspace_size(ctypes.byref(args), ctypes.byref(size)) == 0
    S = P + 1
    at_least = 4 * (B * Hq * S + B * Hkv * S + B * Hkv * topn)  # logits, scores, indices
    assert at_least <= size.value < at_least + 64 * 1024
    args.topn = 0
    assert lib.kvc_kcache_decode_workspace_size(ctypes.byref(args), ctypes.byref(size)) != 0
    assert b"topn" in lib.kvc_last_error()
    args.topn, args.head_dim = topn, 36  # 72 bytes: not a whole number of 16-byte vectors
    assert lib.kvc_kcache_decode_workspace_size(ctypes.byref(args), ctypes.byref(size)) != 0
    assert b"head_dim" in lib.kvc_last_error()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_describe_reports_the_plan_the_call_would_run(monkeypatch):
    # kvc_kcache_decode_describe: the tilings and slices a benchmark row records. On a machine
    # without a GPU the score tile is the default (the device's CTA slots cannot be asked).
    from kvcompile.ops.kcache_attention.kernels import describe

    B, Hq, Hkv, P, D = 2, 8, 2, 1000, 64
    q, k, v = (torch.randn(B, h, 1, D, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    key_cache = torch.randn(B, Hkv, P, D, dtype=torch.bfloat16)
    value_host = torch.randn(B, P, Hkv, D, dtype=torch.bfloat16)
    bias = torch.zeros(B, 1, 1, P + 1)
    for name in ("KVC_PIPELINE_PARTS", "KVC_SCORE_TILE", "KVC_GATHER_BYTES", "KVC_GATHER_CTAS"):
        monkeypatch.delenv(name, raising=False)
    plan = describe(q, k, v, key_cache, value_host, bias, 100, "head")
    # 16 KiB fetch items of 128-byte rows; one slice (a small call), so no grid cap
    assert plan["score_tile"] == 2048 and plan["score_tiles"] == 1
    assert (plan["gather_rows"], plan["gather_chunks"], plan["pipeline_parts"], plan["gather_ctas"]) == (128, 1, 1, 0)
    layer = describe(q, k, v, key_cache, value_host, bias, 100, "layer")
    assert (layer["gather_rows"], layer["gather_chunks"]) == (64, 2)  # rows of Hkv * D: 256 bytes
    monkeypatch.setenv("KVC_PIPELINE_PARTS", "2")
    monkeypatch.setenv("KVC_SCORE_TILE", "512")
    piped = describe(q, k, v, key_cache, value_host, bias, 100, "head")
    assert (piped["pipeline_parts"], piped["gather_ctas"]) == (2, 64)  # a pipelined fetch is capped
    assert (piped["score_tile"], piped["score_tiles"]) == (512, 2)
    # the workspace it reports is the one the call asks for
    import ctypes

    from kvcompile.ops.kcache_attention.kernels import _decode_args
    from kvcompile.plugins import load_kernels

    args, _, _keep = _decode_args(q, k, v, key_cache, value_host, bias, 1.0, 100, "head", False, 0.0, None)
    size = ctypes.c_size_t(0)
    assert load_kernels().kvc_kcache_decode_workspace_size(ctypes.byref(args), ctypes.byref(size)) == 0
    assert piped["workspace_bytes"] == size.value


# Score kernel device µs on the H200 (396 CTA slots: 132 SMs x 3) by keys per CTA, from
# docs/kcache_timeline_h200/score_tiles_*.json (32 query / 8 KV heads, d=128: 8 rows a sequence).
# The tile rule must pick the fastest measured tile, or one within 1% of it.
H200_SCORE_US = {
    (1, 8192): {256: 7.71, 512: 9.95, 768: 12.64, 1024: 15.3, 2048: 25.32},
    (1, 32768): {256: 28.71, 512: 29.62, 768: 24.21, 1024: 24.39, 2048: 34.25},
    (2, 8192): {256: 14.5, 512: 11.04, 768: 14.45, 1024: 15.52, 2048: 25.18},
    (2, 32768): {256: 50.33, 512: 46.93, 768: 44.48, 1024: 50.84, 2048: 41.68},
    (8, 8192): {1536: 42.78, 2048: 41.61, 2816: 49.49},
    (8, 32768): {1536: 156.7, 2048: 153.36, 2816: 147.86},
    (15, 32768): {2048: 268.0, 2560: 266.81, 4096: 289.6},
    (30, 32768): {2048: 523.84, 2560: 519.76, 4096: 521.52},
}


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_score_tile_rule_picks_the_measured_fastest_tile(tmp_path):
    # plugins/csrc/kcache_score_tile.h is plain C++ (no CUDA): compiled here and asked for the
    # shapes the H200 timed.
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[2] / "plugins" / "csrc"
    source = tmp_path / "rule.cpp"
    source.write_text('#include <cstdio>\n#include "kcache_score_tile.h"\nint main() {\n' + "".join(
        f'  std::printf("%d\\n", kvc::choose_score_tile({8 * b}, {s}, 396));\n' for b, s in H200_SCORE_US)
        + '  std::printf("%d\\n", kvc::choose_score_tile(64, 32768, 0));\n}\n')
    binary = tmp_path / "rule"
    subprocess.run(["g++", "-std=c++17", "-I", str(csrc), str(source), "-o", str(binary)], check=True)
    picks = [int(line) for line in subprocess.run([str(binary)], capture_output=True, text=True,
                                                  check=True).stdout.split()]
    for (shape, timings), tile in zip(H200_SCORE_US.items(), picks):
        assert tile % 256 == 0 and 256 <= tile <= 4096
        if tile in timings:  # a measured tile: within 1% of the fastest measured
            assert timings[tile] <= 1.01 * min(timings.values()), (shape, tile, timings)
        else:
            pytest.fail(f"{shape}: the rule picks {tile}, which was not measured")
    assert picks[-1] == 2048  # slots unknown (no GPU): the measured default


def bench_floors():
    """bench/floors.py, which loads the host-row-gather probe for its link-rate floors."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import floors

    return floors


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_host_row_gather_probe_rejects_bad_args_before_any_cuda_call():
    floors = bench_floors()
    lib = floors._gather_library()  # the probe's signature, as the floors benchmark declares it
    fake = 1 << 20
    assert lib.kvc_host_row_gather(fake, 24, fake, 4, fake, None) == 1  # 24 B rows: not 16-byte vectors
    assert b"multiple of 16" in lib.kvc_host_row_gather_error()
    assert lib.kvc_host_row_gather(None, 64, fake, 4, fake, None) == 1


@pytest.mark.gpu
@requires_cuda
def test_host_row_gather_probe_copies_the_chosen_rows():
    floors = bench_floors()
    lib = floors._gather_library()
    host = torch.randint(0, 256, (1000, 96), dtype=torch.uint8).pin_memory()
    rows = torch.tensor([5, 999, 0, 17, 17, 400], dtype=torch.int32, device="cuda")
    out = torch.zeros(len(rows), 96, dtype=torch.uint8, device="cuda")
    assert lib.kvc_host_row_gather(host.data_ptr(), 96, rows.data_ptr(), len(rows), out.data_ptr(),
                                   torch.cuda.current_stream().cuda_stream) == 0
    assert torch.equal(out.cpu(), host[rows.long().cpu()])


# ---------------------------------------------------------------- GPU: kernels vs reference

GPU_SHAPES = [  # (B, Hq, Hkv, P, D, pads)
    (1, 4, 4, 1, 64, None),
    (2, 8, 2, 37, 64, [0, 11]),
    (3, 32, 8, 1000, 128, [0, 100, 999]),
    (2, 12, 4, 4099, 128, [5, 0]),          # G = 3 (generic head-group path)
    (1, 16, 1, 2500, 80, None),             # MQA, D = 80 (generic score kernel)
    (1, 16, 1, 700, 64, None),              # MQA, 16 query heads: two head tiles per KV head
    (8, 32, 8, 3000, 128, [0, 1, 2, 3, 300, 600, 900, 2999]),
    (2, 8, 2, 1500, 256, [0, 9]),           # D = 256: the widest tensor-core score tile
    (1, 8, 8, 2100, 96, None),              # MHA (one query head per mma), D = 96
]


def to_cuda_args(args, pinned=True):
    """Device copies; key_cache and value_host as views of larger buffers (strided B and P)."""
    query, key, value, key_cache, value_host, bias = args
    B, Hkv, P, D = key_cache.shape
    cache_buffer = torch.zeros(B, Hkv, P + 3, D, dtype=key_cache.dtype, device="cuda")
    cache_buffer[:, :, :P] = key_cache.cuda()
    host_buffer = torch.zeros(B, P + 3, Hkv, D, dtype=value_host.dtype, pin_memory=pinned)
    host_buffer[:, :P] = value_host
    return (query.cuda(), key.cuda(), value.cuda(), cache_buffer[:, :, :P], host_buffer[:, :P], bias.cuda())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-P{}-D{}".format(*s[:5]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("select", ["head", "layer"])
def test_cuda_decode_matches_reference(shape, dtype, select):
    from kvcompile.ops.kcache_attention import kernels as kcache_decode

    B, Hq, Hkv, P, D, pads = shape
    args = make_inputs(B, Hq, Hkv, 1, P, D, pads, dtype=dtype, seed=P, spread=3.0)
    gpu_args = to_cuda_args(args)
    assert kcache_decode.can_use_kernels(*gpu_args), "decode should run the CUDA kernels"
    tol = dict(float32=2e-4, bfloat16=3e-2, float16=5e-3)[str(dtype).split(".")[1]]
    for topn in sorted({1, 7, 64, P + 1}):
        for renormalize in (False, True):
            want = kcache_attention_reference(*args, D ** -0.5, topn, select, renormalize)
            got = op(*gpu_args, D ** -0.5, topn, select, renormalize)
            assert got.device.type == "cuda" and got.dtype == dtype
            torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"topn={topn} renorm={renormalize}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_cuda_other_cases_fall_back_to_reference_on_gpu():
    from kvcompile.ops.kcache_attention import kernels as kcache_decode

    # a chunk too large for the kernels (8 heads x 300 tokens in one "layer" selection),
    # prefill, and a decode step whose host values are not pinned
    # (no padding in prefill: rows of padded queries see nothing, and SDPA backends differ there)
    for T, P, pinned, pads in ((300, 50, True, [0, 2]), (4, 0, True, [0, 0]), (1, 40, False, [0, 2])):
        args = make_inputs(2, 8, 2, T, P, 64, pads, seed=T)
        gpu_args = to_cuda_args(args, pinned=pinned)
        assert not kcache_decode.can_use_kernels(*gpu_args, select="head" if T < 300 else "layer")
        select = "layer" if T == 300 else "head"
        got = op(*gpu_args, 0.125, 16, select, False)
        want = kcache_attention_reference(*args, 0.125, 16, select, False)
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


CHUNK_SHAPES = [  # (B, Hq, Hkv, T, P, D, pads): chunked prefill, T new tokens over P cached
    (2, 8, 2, 3, 50, 64, [0, 2]),
    (1, 32, 8, 16, 700, 128, None),
    (3, 4, 1, 37, 1000, 80, [0, 500, 999]),   # MQA, D = 80, a row whose past is all hidden but one
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-P{}-D{}".format(*s[:6]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("select", ["head", "layer"])
def test_cuda_prefill_chunk_matches_reference(shape, dtype, select):
    from kvcompile.ops.kcache_attention import kernels as kcache_decode

    B, Hq, Hkv, T, P, D, pads = shape
    args = make_inputs(B, Hq, Hkv, T, P, D, pads, dtype=dtype, seed=T, spread=3.0)
    gpu_args = to_cuda_args(args)
    assert kcache_decode.can_use_kernels(*gpu_args, select=select), "the chunk should run the CUDA kernels"
    tol = dict(float32=2e-4, bfloat16=3e-2)[str(dtype).split(".")[1]]
    for topn in sorted({1, 9, 100, P + T}):
        for renormalize in (False, True):
            want = kcache_attention_reference(*args, D ** -0.5, topn, select, renormalize)
            got = op(*gpu_args, D ** -0.5, topn, select, renormalize)
            torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"topn={topn} renorm={renormalize}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_cuda_crowded_boundary_bin_takes_the_whole_row_path():
    # Logits of std 0.03 put ~99% of the probabilities in the radix bin of the N-th largest
    # (a quarter octave wide), more than the shared-memory candidate list holds: the select
    # finishes over the whole row. Neighbouring values stay ~1e-5 apart, far above rounding.
    args = make_inputs(2, 8, 2, 1, 20000, 64, [0, 0], seed=4, spread=0.03)
    gpu_args = to_cuda_args(args)
    for topn in (100, 1000, 20001):
        want = kcache_attention_reference(*args, 0.125, topn, "head", False)
        got = op(*gpu_args, 0.125, topn, "head", False)
        torch.testing.assert_close(got.cpu(), want, atol=3e-4, rtol=1e-3)


@pytest.mark.gpu
@requires_cuda
def test_cuda_all_equal_scores_keep_exactly_topn_rows():
    # Every past key and value row identical: any N positions give the same output, N·p·v.
    B, Hq, Hkv, P, D = 2, 4, 2, 9000, 64
    query, key, value, key_cache, value_host, bias = make_inputs(B, Hq, Hkv, 1, P, D, seed=6)
    key_cache = key_cache[:, :, :1].expand(B, Hkv, P, D).contiguous()
    value_host = value_host[:, :1].expand(B, P, Hkv, D).contiguous()
    key, value = key_cache[:, :, :1].clone(), value_host[:, :1].transpose(1, 2).clone()
    args = (query, key, value, key_cache, value_host, bias)
    for select in ("head", "layer"):
        want = kcache_attention_reference(*args, 0.125, 300, select, False)
        got = op(*to_cuda_args(args), 0.125, 300, select, False)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("select", ["head", "layer"])
def test_cuda_decode_with_softcap_and_sinks_matches_reference(dtype, select):
    from kvcompile.ops.kcache_attention import kernels as kcache_decode

    B, Hq, Hkv, P, D = 3, 8, 2, 1500, 64
    args = make_inputs(B, Hq, Hkv, 1, P, D, [0, 7, 300], dtype=dtype, seed=11, spread=3.0)
    gpu_args = to_cuda_args(args)
    assert kcache_decode.can_use_kernels(*gpu_args)
    sinks = [float(x) for x in torch.linspace(-2.0, 3.0, Hq)]
    tol = dict(float32=2e-4, bfloat16=3e-2)[str(dtype).split(".")[1]]
    for softcap, sink in ((5.0, None), (0.0, sinks), (5.0, sinks)):
        for topn in (7, P + 1):
            want = kcache_attention_reference(*args, D ** -0.5, topn, select, False, softcap, sink)
            got = op(*gpu_args, D ** -0.5, topn, select, False, softcap, sink)
            torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"softcap={softcap} sinks={sink is not None} topn={topn}: {m}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("select", ["head", "layer"])
@pytest.mark.parametrize("T", [1, 5])
def test_cuda_pipelined_slices_equal_one_call_also_under_graph_capture(select, T, monkeypatch):
    # $KVC_PIPELINE_PARTS splits the batch into slices whose fetch runs on a side stream while
    # the next slice is scored: every stage works per sequence, so the output is bit-identical,
    # eager and replayed from a CUDA graph (the side stream forks from and joins the capture).
    B, Hq, Hkv, P, D = 5, 16, 4, 3000, 128
    args = make_inputs(B, Hq, Hkv, T, P, D, [0, 3, 0, 100, 2999], dtype=torch.bfloat16, seed=21, spread=3.0)
    gpu_args = to_cuda_args(args)
    monkeypatch.setenv("KVC_PIPELINE_PARTS", "1")
    want = op(*gpu_args, D ** -0.5, 100, select, False)
    for parts in ("2", "3", "8"):  # 8 > B: one sequence a slice
        monkeypatch.setenv("KVC_PIPELINE_PARTS", parts)
        got = op(*gpu_args, D ** -0.5, 100, select, False)
        assert torch.equal(got, want), f"parts={parts}"
        static_out = [None]
        graph = torch.cuda.CUDAGraph()
        op(*gpu_args, D ** -0.5, 100, select, False)  # warm-up outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out[0] = op(*gpu_args, D ** -0.5, 100, select, False)
        static_out[0].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out[0], want), f"graph, parts={parts}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("select", ["head", "layer"])
@pytest.mark.parametrize("spread", [3.0, 0.03], ids=["few-in-bin", "crowded-bin"])
def test_cuda_topn_cluster_sizes_give_identical_output(select, spread, monkeypatch):
    # On sm_90 a selection row is split over a thread-block cluster ($KVC_TOPN_CLUSTER CTAs);
    # ranks run over the whole row, so the kept positions and their order, and with them the
    # output, are the same for every cluster size: bit-identical, also replayed from a graph.
    # spread=0.03 crowds the boundary bin past the candidate list (the whole-row path).
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    B, Hq, Hkv, P, D = 3, 16, 4, 20000, 128
    args = make_inputs(B, Hq, Hkv, 1, P, D, [0, 5, 19999], dtype=torch.bfloat16, seed=31, spread=spread)
    gpu_args = to_cuda_args(args)
    for topn in (1, 100, 1000, 5000):
        monkeypatch.setenv("KVC_TOPN_CLUSTER", "1")
        want = op(*gpu_args, D ** -0.5, topn, select, False)
        reference = kcache_attention_reference(*args, D ** -0.5, topn, select, False)
        torch.testing.assert_close(want.cpu().float(), reference.float(), atol=3e-2, rtol=3e-2)
        for cluster in ("2", "4", "8"):
            monkeypatch.setenv("KVC_TOPN_CLUSTER", cluster)
            got = op(*gpu_args, D ** -0.5, topn, select, False)
            assert torch.equal(got, want), f"topn={topn} cluster={cluster}"
    graph = torch.cuda.CUDAGraph()
    op(*gpu_args, D ** -0.5, 1000, select, False)  # warm-up outside the capture (cluster 8)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = op(*gpu_args, D ** -0.5, 1000, select, False)
    static_out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setenv("KVC_TOPN_CLUSTER", "1")
    assert torch.equal(static_out, op(*gpu_args, D ** -0.5, 1000, select, False))
