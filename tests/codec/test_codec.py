"""KV codec (CPU reference): the entropy stage is lossless, level 0 is exact for 8-bit input,
lossy levels stay within their quantisation step, the chunk-wise API reads a stream chunk by
chunk, and bad bitstreams fail with the codec's error."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import kvcompile.codec as codec
from kvcompile.codec import bitstream, chunk, quantise, rans, tables
from kvcompile.errors import UsageError


def kv(layers=4, heads=2, tokens=300, dim=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, heads, tokens, dim, generator=generator).to(dtype),
            (torch.randn(layers, heads, tokens, dim, generator=generator) * 3).to(dtype))


def eight_bit(x):
    """Per-(layer, token) abs-max 8-bit quantisation, as a caller's 8-bit cache would hold."""
    scale = x.abs().amax(dim=(1, 3), keepdim=True)
    return torch.round(x / scale * 127) / 127 * scale


@pytest.mark.parametrize("alphabet, spread, group", [(31, 3.0, 1), (15, 0.3, 4), (255, 40.0, 2), (5, 0.0, 4)])
def test_rans_round_trips_every_stream(alphabet, spread, group):
    rng = np.random.default_rng(alphabet)
    symbols = np.clip(np.rint(rng.laplace(alphabet / 2, spread + 1e-9, (64, 300 * group))), 0, alphabet - 1)
    symbols = symbols.astype(np.int64)
    symbols[0] = 3 % alphabet  # a stream of one repeated symbol
    table_index = rng.integers(0, tables.SHAPES, (64, group))
    words = rans.encode(symbols, tables.bank(alphabet), table_index)
    ends = np.cumsum([w.size for w in words])
    got = rans.decode(np.concatenate(words), ends, tables.bank(alphabet), table_index, symbols.shape[1])
    assert np.array_equal(got, symbols)


def test_bank_is_deterministic_and_every_symbol_codable():
    for alphabet in (3, 5, 7, 15, 31, 255):
        bank = tables.bank(alphabet)
        assert bank.shape == (tables.SHAPES, alphabet)
        assert (bank.sum(axis=1) == rans.TOTAL).all() and bank.min() >= 1
    # pinned values: a change to the bank breaks every stored bitstream
    crcs = [zlib.crc32(tables.bank(a).astype("<u4").tobytes()) for a in (5, 7, 15, 255)]
    assert crcs == [2776966955, 1949688199, 3814744972, 3478088560]


def test_chosen_tables_code_close_to_the_entropy():
    rng = np.random.default_rng(1)
    symbols = np.clip(np.rint(rng.laplace(7, 1.5, (256, 256))), 0, 14).astype(np.int64)
    centre, shape = tables.choose(symbols, 15)
    counts = np.zeros((256, 15))
    np.add.at(counts, (np.arange(256)[:, None], symbols), 1)
    p = counts / 256
    entropy = -(counts * np.log2(np.where(p > 0, p, 1))).sum() / symbols.size
    d = (symbols - centre[:, None]) % 15  # [channel, token]
    streams = chunk._symbol_streams(d.T[None], 4)  # 4 channels a stream
    words = rans.encode(streams, tables.bank(15), shape.reshape(64, 4))
    bits = sum(w.size for w in words) * 16 / symbols.size
    assert bits <= entropy * 1.06 + 0.04, (bits, entropy)
    assert (centre == 7).mean() > 0.9  # the Laplace's centre is found


def test_scale_codes_never_clip():
    rng = np.random.default_rng(2)
    absmax = (rng.lognormal(0, 3, (3, 500)) * (rng.random((3, 500)) > 0.05)).astype(np.float32)
    maxima, codes = quantise.encode_scales(absmax)
    scales = quantise.decode_scales(maxima, codes)
    assert (scales >= absmax).all()
    live = absmax > maxima[:, None] * 2.0 ** -15
    assert (scales[live] <= absmax[live] * 2 ** (1 / 16) * 1.0001).all()
    assert (scales[absmax == 0] == 0).all()


def test_level_0_is_exact_for_8_bit_input():
    keys, values = (eight_bit(x) for x in kv())
    got_keys, got_values = codec.decode(codec.encode((keys, values), level=codec.LOSSLESS_LEVEL))
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_lossy_levels_stay_within_their_step(level):
    keys, values = kv()
    blob = codec.encode((keys, values), level=level)
    got_keys, got_values = codec.decode(blob)
    spec = quantise.LEVELS[level]
    for original, got, which in ((keys, got_keys, "k"), (values, got_values, "v")):
        half = torch.tensor(spec.side(which).halves(original.shape[0]), dtype=torch.float32)
        # the stored scale is at most 2^(1/16) over the (layer, token) abs-max
        step = original.abs().amax(dim=(1, 3), keepdim=True) * 2 ** (1 / 16) / half.view(-1, 1, 1, 1)
        assert ((got - original).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("level", [0, 2, 4])
def test_entropy_stage_is_lossless(level):
    keys, values = kv(tokens=70, dtype=torch.float16)
    header = bitstream.Header(4, 2, 16, "float16", level, 4, 70, 70)
    rows = {"k": codec._as_rows(keys), "v": codec._as_rows(values)}
    spec = quantise.LEVELS[level]
    data = chunk.encode_chunk(header, rows)
    parsed = chunk.parse_chunk(header, 0, data)
    got = chunk.decode_symbols(header, parsed)
    for side, which in enumerate(chunk.SIDES):
        want = quantise.quantise(rows[which], spec.side(which), parsed.scales[side])
        assert np.array_equal(got[which], want)


def test_more_levels_mean_smaller_streams():
    sizes = [len(codec.encode(kv(tokens=512), level=level)) for level in (0, 1, 2, 3)]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    # level 4: fewer shallow levels than 2, more deep ones than 1
    level4 = len(codec.encode(kv(layers=8, tokens=512), level=4))
    assert len(codec.encode(kv(layers=8, tokens=512), level=1)) > level4 > len(codec.encode(kv(layers=8, tokens=512), level=3))


def test_existing_levels_keep_their_parameters():
    """A level's parameters come from its number in the header: changing one would make old
    bitstreams decode to other values. These are the halves (levels each side of zero) per layer
    that files were written with."""
    want = {1: ([15] * 8, [7] * 8), 2: ([7] * 4 + [11] * 4, [3] * 4 + [2] * 4),
            3: ([5] * 4 + [7] * 4, [2] * 8), 4: ([5] * 4 + [11, 11, 15, 15], [2, 2, 2, 2, 7, 2, 7, 3])}
    for level, (k, v) in want.items():
        spec = quantise.LEVELS[level]
        assert spec.log_scales and list(spec.k.halves(8)) == k and list(spec.v.halves(8)) == v
    assert not quantise.LEVELS[0].log_scales and set(quantise.LEVELS[0].k.halves(8)) == {127}


def test_steps_schedule_spreads_groups_over_any_depth():
    steps = quantise.Steps((5, 11, 15))
    assert list(steps.halves(3)) == [5, 11, 15]
    assert list(steps.halves(6)) == [5, 5, 11, 11, 15, 15]
    assert list(steps.halves(2)) == [5, 11] and list(steps.halves(1)) == [5]


@pytest.mark.parametrize("layers", [1, 2, 8, 32, 80])
def test_every_level_fits_the_gpu_decoders_tables(layers):
    """The kernels take a level as data (kv_decode level_tables); what they accept: v1 stages the
    bank as uint16 CDFs in at most 96 KiB of shared memory, width ≤ 256; v2's fast path needs one
    (side, layer)'s 64 tables in 32 KiB at 4 bytes a symbol + 64 bucket bytes a table (else it
    falls back to v1's search; level 0, 255 symbols wide, does)."""
    from kvcompile.ops.kv_decode.definition import level_tables

    for level, spec in quantise.LEVELS.items():
        cdf, halves, base, _ = level_tables(level, layers)
        rows, width = cdf.shape[0], cdf.shape[1] - 1
        assert 2 <= width <= 256 and rows * width * 2 <= 96 * 1024
        assert int(halves.max()) <= 127 and int(base.max()) + tables.SHAPES <= rows
        if spec.log_scales:
            assert (32 * 1024) // (width * 4 + 64) >= tables.SHAPES


def test_chunk_api_reads_a_stream_chunk_by_chunk():
    keys, values = kv(tokens=300, dtype=torch.bfloat16)
    blob = codec.encode((keys, values), level=2, chunk_tokens=128, fingerprint="model-abc")
    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    assert (header.layers, header.kv_heads, header.head_dim, header.tokens, header.chunks) == (4, 2, 16, 300, 3)
    assert header.fingerprint == "model-abc" and header.dtype == "bfloat16" and header.level == 2
    whole_k, whole_v = codec.decode(blob)
    spans = []
    for index, data in codec.iter_chunks(stream, header):
        k, v = codec.decode_chunk(header, index, data)
        start, count = header.chunk_span(index)
        spans.append(count)
        assert k.dtype == torch.bfloat16 and k.shape == (4, 2, count, 16)
        assert torch.equal(k, whole_k[:, :, start:start + count]) and torch.equal(v, whole_v[:, :, start:start + count])
    assert spans == [128, 128, 44]
    assert set(codec.LEVELS) == {0, 1, 2, 3, 4} and codec.DEFAULT_LEVEL == 4


def test_empty_and_odd_shapes():
    keys, values = kv(layers=1, heads=1, tokens=0, dim=3)
    got = codec.decode(codec.encode((keys, values)))
    assert got[0].shape == (1, 1, 0, 3)
    keys, values = kv(layers=2, heads=3, tokens=5, dim=5)  # 15 channels: one channel a stream
    k, v = codec.decode(codec.encode((keys, values), level=1, chunk_tokens=2))
    assert k.shape == keys.shape and (k - keys).abs().max() < 0.5


def test_bad_bitstreams_fail_with_the_codec_error():
    blob = codec.encode(kv(tokens=100), level=2)
    rng = np.random.default_rng(0)
    for trial in range(300):  # flipped bytes anywhere: header or chunk checksum catches each
        data = bytearray(blob)
        data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        with pytest.raises(codec.BitstreamError):
            codec.decode(bytes(data))
    for cut in (0, 3, 10, 40, 200, len(blob) - 1):
        with pytest.raises(codec.BitstreamError):
            codec.decode(blob[:cut])
    with pytest.raises(codec.BitstreamError, match="trailing"):
        codec.decode(blob + b"x")
    newer = bytearray(blob)
    struct.pack_into("<H", newer, 4, bitstream.FORMAT_VERSION + 1)
    with pytest.raises(codec.BitstreamError, match="version 4 is not supported"):
        codec.decode(bytes(newer))


FIXTURES = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["format2_level4_float16", "format2_level0_float32", "format2_level2_bfloat16"])
def test_format_2_files_keep_decoding(name):
    """Bitstreams the format-2 encoder wrote (commit 1a33d79) decode to what it decoded them to."""
    blob = (FIXTURES / f"{name}.kvcb").read_bytes()
    assert codec.read_header(blob).version == 2
    keys, values = codec.decode(blob)
    assert np.array_equal(torch.stack([keys, values]).float().numpy(), np.load(FIXTURES / f"{name}.npy"))


def test_format_3_chunks_use_the_header_tables_unless_their_own_code_smaller():
    keys, values = kv(layers=2, tokens=96)
    keys[:, :, 64:] = keys[:, :, 64:] * 0.05 + 2.0  # the last chunk's keys: another distribution
    blob = codec.encode((keys, values), level=1, chunk_tokens=32)
    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    assert header.version == 3 and header.centres.shape == (2, 2, 32)
    own = [chunk.parse_chunk(header, i, data).own for i, data in codec.iter_chunks(stream, header)]
    assert not own[0].any() and own[2][0].all()  # chunk 2's keys carry their own tables
    got = codec.decode(blob)
    assert (got[0] - keys).abs().max() <= keys.abs().amax(dim=(1, 3), keepdim=True).max() / 15


def test_format_3_header_tables_are_deflated_and_checked():
    blob = codec.encode(kv(tokens=64), level=4, chunk_tokens=32)
    header = codec.read_header(blob)
    cells = 2 * header.layers * header.channels
    fixed = bitstream._FIXED.size + len(header.fingerprint.encode()) + 8 * header.chunks
    (packed,) = struct.unpack_from("<I", blob, fixed)
    assert packed < 2 * cells  # deflated
    tables = blob[fixed + 4:fixed + 4 + packed]
    assert zlib.decompress(tables) == header.channel_tables().tobytes()
    rest = blob[fixed + 4 + packed + 4:]

    def resealed(new_tables: bytes) -> bytes:  # the header with other tables and a valid CRC
        body = blob[:fixed] + struct.pack("<I", len(new_tables)) + new_tables
        return body + struct.pack("<I", zlib.crc32(body)) + rest

    assert codec.decode(resealed(tables))[0].shape == (4, 2, 64, 16)  # the helper rebuilds the header exactly
    for bad, fragment in [(tables[:-3], "tables"), (b"\x00" * 40, "tables"),
                          (zlib.compress(b"\x00" * (2 * cells - 1)), "tables"),
                          (zlib.compress(b"\xff" * (2 * cells)), "outside the codec's bank"),
                          (b"\x00" * (2 * cells + 2000), "larger than")]:
        with pytest.raises(codec.BitstreamError, match=fragment):
            codec.read_header(resealed(bad))


def test_format_3_chunks_transcode_to_format_2():
    """to_format2 (what the restore graph reads) keeps every symbol: the same values decode."""
    blob = codec.encode(kv(tokens=100), level=4, chunk_tokens=32)
    stream = io.BytesIO(blob)
    header = codec.read_header(stream)
    old = bitstream.Header(header.layers, header.kv_heads, header.head_dim, header.dtype, header.level, header.group,
                           header.tokens, header.chunk_tokens, version=2)
    for index, data in codec.iter_chunks(stream, header):
        want = chunk.decode_chunk_rows(header, index, data)
        got = chunk.decode_chunk_rows(old, index, chunk.to_format2(header, index, data))
        assert all(np.array_equal(want[w], got[w]) for w in chunk.SIDES)


def test_stream_groups_and_their_limits():
    keys, values = kv(layers=1, tokens=40)
    for group in (1, 2, 4, 8):
        blob = codec.encode((keys, values), level=1, chunk_tokens=16, group=group)
        assert codec.read_header(blob).group == group
        assert torch.equal(codec.decode(blob)[0], codec.decode(codec.encode((keys, values), level=1, chunk_tokens=16))[0])
    with pytest.raises(UsageError, match="one of"):
        codec.encode((keys, values), level=1, group=3)
    with pytest.raises(UsageError, match="chunk_tokens x group"):
        codec.encode((keys, values), level=1, chunk_tokens=40000, group=2)
    assert codec.stream_group(32, 40000) == 1 and codec.stream_group(32, 256) == codec.STREAM_CHANNELS == 8


def test_corrupt_chunk_contents_fail_even_with_a_valid_crc():
    keys, values = kv(tokens=64)
    header = codec.read_header(codec.encode((keys, values), level=2))
    data = chunk.encode_chunk(header, {"k": codec._as_rows(keys), "v": codec._as_rows(values)})
    layout = chunk.Layout.of(header, 64)
    rng = np.random.default_rng(3)
    failures = 0
    for trial in range(60):
        bad = bytearray(data)
        where = int(rng.integers(layout.own, len(bad)))
        bad[where] ^= int(rng.integers(1, 256))
        try:
            chunk.decode_chunk_rows(header, 0, bytes(bad))
        except codec.BitstreamError:
            failures += 1
    assert failures >= 50  # a flipped centre/shape can still decode (to other values): no CRC here


def test_bad_arguments_are_usage_errors():
    keys, values = kv(tokens=8)
    with pytest.raises(UsageError, match="unknown codec level 9"):
        codec.encode((keys, values), level=9)
    with pytest.raises(UsageError, match="must both be"):
        codec.encode((keys, values[:, :, :4]), level=2)
