"""kvcompile::kv_decode: the torch op equals kvcompile.codec.decode (CPU and, on a GPU, the kernel,
bit for bit), for format-3 chunks and format-2 ones (old files, and what the restore graph feeds
it); its ONNX body run by ONNX Runtime equals the torch op; corrupt chunks raise the codec's error
on every path without reading or writing out of bounds."""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import kvcompile.codec as codec
import kvcompile.ops  # noqa: F401  (registers the op)
from kvcompile.codec import chunk as chunk_codec
from kvcompile.ops import registry
from kvcompile.ops.kv_decode.definition import decode_chunks, level_tables

op = torch.ops.kvcompile.kv_decode


@functools.lru_cache(maxsize=None)  # the GPU tests decode the same blobs with both kernels
def encoded(level, dtype=torch.float16, layers=3, heads=2, tokens=96, dim=8, chunk_tokens=32, seed=0, group=None,
            version=3):
    """(blob, header, chunks) of random KV; version 2: the same chunks transcoded to format 2
    (chunk.to_format2) under a format-2 header (the blob stays the format-3 one)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, tokens, dim, generator=generator)
    values = torch.randn(layers, heads, tokens, dim, generator=generator) * 2
    keys[:, :, :, 0] += 4  # an outlier channel, as real keys have
    # the keys' channels move in the later half: those chunks carry their own tables (format 3)
    keys[:, :, tokens // 2:] = keys[:, :, tokens // 2:] * 0.2 + torch.linspace(-2, 2, dim)
    blob = codec.encode((keys.to(dtype), values.to(dtype)), level=level, chunk_tokens=chunk_tokens, group=group)
    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    chunks = [data for _, data in codec.iter_chunks(stream, header)]
    if version == 2:
        chunks = [chunk_codec.to_format2(header, i, data) for i, data in enumerate(chunks)]
        header = dataclasses.replace(header, version=2, centres=None, shapes=None)
    return blob, header, chunks


FIXTURES = Path(__file__).resolve().parents[1] / "codec" / "data"  # files the format-2 encoder wrote


@pytest.mark.parametrize("level", sorted(codec.LEVELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_op_equals_the_codec(level, dtype):
    blob, header, chunks = encoded(level, dtype)
    keys, values = codec.decode(blob)
    for version in (3, 2):
        _, header, chunks = encoded(level, dtype, version=version)
        out = decode_chunks(header, chunks)
        assert out.dtype == dtype and out.shape == (2, 3, 2, 96, 8)
        assert torch.equal(out[0], keys) and torch.equal(out[1], values), version


def test_format_3_needs_its_header_tables():
    _, header, chunks = encoded(1)
    tables = level_tables(1, 3)
    data = torch.frombuffer(bytearray(chunks[0]), dtype=torch.uint8)
    args = (3, 2, 8, 32, header.group, 1, 1)
    with pytest.raises(ValueError, match="channel_tables"):
        op(data, torch.zeros(1, dtype=torch.int64), *tables, *args, None, 3)
    bad = torch.from_numpy(header.channel_tables().copy())
    bad[1, 0, 0, 0] = 200  # a shape beyond the bank
    with pytest.raises(codec.BitstreamError, match="outside the codec's bank"):
        op(data, torch.zeros(1, dtype=torch.int64), *tables, *args, bad, 3)


def test_registered_with_a_fake_kernel():
    entry = registry.get("kv_decode")
    assert entry is not None and entry.kernel_symbols[0].name == "kvc_kv_decode"
    _, header, chunks = encoded(2)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        tables = [torch.empty_like(t) for t in level_tables(2, 3)]
        data = torch.empty(4096, dtype=torch.uint8)
        out = op(data, torch.zeros(3, dtype=torch.int64), *tables, 3, 2, 8, 32, 4, 1, 1)
    assert out.shape == (2, 3, 2, 96, 8) and out.dtype == torch.float16


def test_cpu_op_rejects_corrupt_chunks():
    _, header, chunks = encoded(2)
    bad = bytearray(chunks[1])
    bad[-3] ^= 0x5A  # a word near the end of the last stream
    with pytest.raises(codec.BitstreamError):
        decode_chunks(header, [chunks[0], bytes(bad)])
    with pytest.raises(codec.BitstreamError):
        decode_chunks(header, [chunks[0][:100]])
    # a chunk cut inside its zero padding still holds every stream's words: refused all the same,
    # as codec.decode refuses it (the fuzz corpus found the op decoding such chunks, padded back)
    with pytest.raises(codec.BitstreamError, match="not a multiple of 4"):
        decode_chunks(header, [chunks[0][:-1]])


def single_node_model(attributes: dict):
    import onnx
    from onnx import TensorProto, helper

    from kvcompile.ops import onnx_domain

    names = ("data", "chunk_offsets", "bank_cdf", "halves", "table_base", "scale_steps")
    types = (TensorProto.UINT8, TensorProto.INT64, TensorProto.INT32, TensorProto.INT64, TensorProto.INT64,
             TensorProto.FLOAT)
    node = helper.make_node("kv_decode", list(names), ["out"], domain=onnx_domain.DOMAIN, **attributes)
    ranks = (1, 1, 2, 1, 1, 1)
    graph = helper.make_graph([node], "kv_decode",
                              [helper.make_tensor_value_info(n, t, [None] * r) for n, t, r in zip(names, types, ranks)],
                              [helper.make_tensor_value_info("out", attributes["onnx_dtype"], [None] * 5)])
    model = helper.make_model(graph, functions=onnx_domain.function_protos(["kv_decode"]),
                              opset_imports=[helper.make_opsetid("", onnx_domain.STANDARD_OPSET),
                                             helper.make_opsetid(onnx_domain.DOMAIN, onnx_domain.DOMAIN_VERSION)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("level, dtype", [(0, torch.float32), (2, torch.float16), (3, torch.float32)])
def test_onnx_body_matches_torch_op(level, dtype):
    ort = pytest.importorskip("onnxruntime")
    from kvcompile.ops.kv_decode import onnx_function

    # the ONNX body reads format-2 chunks: what the restore graph feeds it (chunk.to_format2)
    _, header, chunks = encoded(level, dtype, tokens=24, chunk_tokens=12, version=2)
    offsets, at = [], 0
    for data in chunks:
        offsets.append(at)
        at += len(data)
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    offsets = torch.tensor(offsets, dtype=torch.int64)
    tables = level_tables(level, header.layers)
    dtype_code = (torch.float32, torch.float16, torch.bfloat16).index(dtype)
    args = (header.layers, header.kv_heads, header.head_dim, 12, header.group,
            int(level != codec.LOSSLESS_LEVEL), dtype_code)
    want = op(data, offsets, *tables, *args)
    attributes = onnx_function.node_attributes(*args)
    session = ort.InferenceSession(single_node_model(attributes).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feeds = dict(zip(("data", "chunk_offsets", "bank_cdf", "halves", "table_base", "scale_steps"),
                     (t.numpy() for t in (data, offsets, *tables))))
    got = torch.from_numpy(session.run(None, feeds)[0])
    assert got.shape == want.shape and torch.equal(got, want)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
KERNELS = ("v1", "v2")  # plugins/csrc/kv_decode.cu, kv_decode_v2.cu: the same bits, two speeds
reference = functools.lru_cache(maxsize=None)(codec.decode)  # the CPU decoder, once per blob for both kernels


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("level", sorted(codec.LEVELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_the_cpu_decoder(level, dtype, kernel, monkeypatch):
    from kvcompile.ops.kv_decode import kernels

    monkeypatch.setenv("KVCOMPILE_KV_DECODE_KERNEL", kernel)  # the library's default, read per call
    assert kernels.kernels_available()
    # 15 channels: one channel a stream, many (side, layer)s a block (v2's slow path);
    # 256 channels: two (side, layer)s a block, K's and V's in one; 512 and 1024: a (side, layer)
    # fills whole 128-stream blocks (v2's fast path); each in format 3 and transcoded to format 2,
    # the 1024-channel one also with 8 channels a stream
    for shape, group, version in [(s, None, v) for s in ((3, 2, 96, 8), (2, 3, 64, 5), (4, 8, 256, 64),
                                                          (2, 8, 64, 128), (3, 4, 64, 64)) for v in (3, 2)] \
            + [((2, 8, 64, 128), 8, 3), ((3, 2, 96, 8), 8, 3)]:
        layers, heads, tokens, dim = shape  # whole chunks only: decode_chunks gives every chunk 32 tokens
        blob, header, chunks = encoded(level, dtype, layers, heads, tokens, dim, chunk_tokens=32, group=group,
                                       version=version)
        got = decode_chunks(header, chunks, device="cuda")
        keys, values = reference(blob)
        assert torch.equal(got[0].cpu(), keys) and torch.equal(got[1].cpu(), values), (level, dtype, shape, version)
    # the public API on CUDA: full chunks in one launch, the short last one in another
    blob, header, _ = encoded(level, dtype, tokens=100, chunk_tokens=32)
    keys, values = reference(blob)
    got_keys, got_values = codec.decode(blob, device="cuda")
    assert got_keys.is_cuda and torch.equal(got_keys.cpu(), keys) and torch.equal(got_values.cpu(), values)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_decodes_format_2_files(kernel, monkeypatch):
    """Files the format-2 encoder wrote decode on the GPU to what the CPU decodes them to."""
    monkeypatch.setenv("KVCOMPILE_KV_DECODE_KERNEL", kernel)
    for path in sorted(FIXTURES.glob("format2_*.kvcb")):
        blob = path.read_bytes()
        assert codec.read_header(blob).version == 2
        got = codec.decode(blob, device="cuda")
        want = codec.decode(blob)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), path.name


def launch_guarded(header, chunks, kernel, pad=4096):
    """Decode `chunks` with `kernel` into a cache that sits between two sentinel regions ->
    (status [N], the cache, whether the sentinels are intact)."""
    from kvcompile.ops.kv_decode import kernels
    from kvcompile.ops.kv_decode.definition import level_tables

    device = torch.device("cuda")
    tokens = header.chunk_tokens
    data, table = kernels.packed_chunks(chunks, tokens, device)
    shape = (2, header.layers, header.kv_heads, len(chunks) * tokens, header.head_dim)
    n = int(np.prod(shape))
    sentinel = -12345.0
    buffer = torch.full((pad + n + pad,), sentinel, dtype=torch.float32, device=device)
    out = buffer[pad:pad + n].view(shape)
    status = torch.zeros(len(chunks), dtype=torch.int32, device=device)
    tables = kernels._kernel_tables(*level_tables(header.level, header.layers, device))
    channel_tables = torch.from_numpy(header.channel_tables()).to(device) if header.version == 3 else None
    kernels.launch(data, table, tables, out, header.layers, header.kv_heads, header.head_dim, header.group,
                   int(header.level != codec.LOSSLESS_LEVEL), 0, status, kernel=kernel, version=header.version,
                   channel_tables=channel_tables)
    torch.cuda.synchronize()
    intact = bool((buffer[:pad] == sentinel).all() and (buffer[pad + n:] == sentinel).all())
    return status.cpu(), out, intact


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("version", [3, 2])
def test_kernel_rejects_corrupt_chunks_and_stays_in_bounds(kernel, version, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_KV_DECODE_KERNEL", kernel)
    _, header, chunks = encoded(2, torch.float16, tokens=64, chunk_tokens=32, version=version)
    rng = np.random.default_rng(0)
    failures = 0
    for trial in range(200):
        bad = bytearray(chunks[1])
        for _ in range(int(rng.integers(1, 4))):
            bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        try:
            decode_chunks(header, [chunks[0], bytes(bad)], device="cuda")
        except codec.BitstreamError as error:
            failures += 1
            assert "chunk 1" in str(error)
    assert failures >= 150
    with pytest.raises(codec.BitstreamError):
        decode_chunks(header, [chunks[0], chunks[1][:-8]], device="cuda")
    torch.cuda.synchronize()  # no launch error left behind


@pytest.mark.gpu
@cuda
def test_kernels_agree_on_status_and_stay_inside_the_cache():
    """v1 and v2 give every corrupted chunk the same KVC_DECODE_* code, the same bits for the
    chunks that survive, and neither writes a byte outside the cache (fp32: sentinels around it)."""
    for level, shape, version in ((2, (2, 8, 64, 128), 3), (1, (3, 2, 64, 8), 3), (0, (2, 2, 64, 16), 3),
                                  (2, (2, 8, 64, 128), 2), (1, (3, 2, 64, 8), 2)):
        layers, heads, tokens, dim = shape
        _, header, chunks = encoded(level, torch.float32, layers, heads, tokens, dim, chunk_tokens=32, version=version)
        rng = np.random.default_rng(level)
        for trial in range(60):
            bad = bytearray(chunks[1])
            for _ in range(int(rng.integers(1, 6))):
                bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
            if trial % 4 == 0:
                bad = bad[:int(rng.integers(len(bad)))]
            bad = bytes(bad) + b"\0" * (-len(bad) % 4)
            results = [launch_guarded(header, [chunks[0], bad], kernel) for kernel in KERNELS]
            (s1, out1, ok1), (s2, out2, ok2) = results
            assert ok1 and ok2, (level, trial)
            assert torch.equal(s1, s2), (level, trial, s1, s2)
            assert s1[0] == 0
            good = out1[:, :, :, :32]
            assert torch.equal(good, out2[:, :, :, :32])
            if s1[1] == 0:
                assert torch.equal(out1, out2)
