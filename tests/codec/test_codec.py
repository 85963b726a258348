"""KV codec (CPU reference): the entropy stage is lossless, level 0 is exact for 8-bit input,
lossy levels stay within their quantisation step, and bad bitstreams fail with the codec's error."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import kvcompile.codec as codec
from kvcompile.codec import bitstream, quantise, rans


def kv(layers=4, heads=2, tokens=300, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, heads, tokens, dim, generator=generator),
            torch.randn(layers, heads, tokens, dim, generator=generator) * 3)


def eight_bit(x):
    """Per-(layer, token) abs-max 8-bit quantisation, as a caller's 8-bit cache would hold."""
    scale = x.abs().amax(dim=(1, 3), keepdim=True)
    return torch.round(x / scale * 127) / 127 * scale


@pytest.mark.parametrize("alphabet, spread", [(32, 3.0), (16, 0.3), (255, 40.0), (8, 0.0)])
def test_rans_round_trips_every_stream(alphabet, spread):
    rng = np.random.default_rng(alphabet)
    symbols = np.clip(np.rint(rng.laplace(alphabet / 2, spread + 1e-9, (300, 257))), 0, alphabet - 1).astype(np.int64)
    symbols[0] = 3  # a stream of one repeated symbol
    counts = np.zeros((symbols.shape[0], alphabet), dtype=np.int64)
    np.add.at(counts, (np.arange(symbols.shape[0])[:, None], symbols), 1)
    freqs = rans.quantise_frequencies(counts)
    assert (freqs.sum(axis=1) == rans.TOTAL).all() and freqs.max() < rans.TOTAL
    words = rans.encode(symbols, freqs)
    assert np.array_equal(rans.decode(words, freqs, symbols.shape[1]), symbols)


def test_rans_size_is_close_to_the_entropy():
    rng = np.random.default_rng(1)
    symbols = np.clip(np.rint(rng.laplace(15.5, 3, (512, 256))), 0, 31).astype(np.int64)
    counts = np.zeros((512, 32), dtype=np.int64)
    np.add.at(counts, (np.arange(512)[:, None], symbols), 1)
    p = counts / counts.sum(axis=1, keepdims=True)
    entropy = -(counts * np.log2(np.where(p > 0, p, 1))).sum() / symbols.size
    bits = sum(w.size for w in rans.encode(symbols, rans.quantise_frequencies(counts))) * 16 / symbols.size
    assert bits <= entropy + 0.16  # 32 bits of final state per 256-symbol stream, plus rounding


def test_level_0_is_exact_for_8_bit_input():
    keys, values = (eight_bit(x) for x in kv())
    got_keys, got_values = codec.decode(codec.encode((keys, values), level=0))
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_lossy_levels_stay_within_their_step(level):
    keys, values = kv()
    blob = codec.encode((keys, values), level=level)
    got_keys, got_values = codec.decode(blob)
    schedule = quantise.LEVELS[level]
    for original, got, which in ((keys, got_keys, "k"), (values, got_values, "v")):
        half = torch.tensor((schedule.bins(original.shape[0], which) - 1) // 2, dtype=torch.float32)
        step = original.abs().amax(dim=(1, 3), keepdim=True) / half.view(-1, 1, 1, 1)
        assert ((got - original).abs() <= step / 2 + 1e-6).all()


def test_more_levels_mean_smaller_streams():
    sizes = [len(codec.encode(kv(tokens=512), level=level)) for level in (1, 2, 3)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_bad_bitstreams_fail_with_the_codec_error():
    blob = codec.encode(kv(tokens=100), level=2)
    rng = np.random.default_rng(0)
    for trial in range(400):  # flipped bytes anywhere: header or chunk checksum catches each
        data = bytearray(blob)
        data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        with pytest.raises(codec.BitstreamError):
            codec.decode(bytes(data))
    for cut in (0, 3, 10, 200, len(blob) - 1):
        with pytest.raises(codec.BitstreamError):
            codec.decode(blob[:cut])
    with pytest.raises(codec.BitstreamError, match="trailing"):
        codec.decode(blob + b"x")
    newer = bytearray(blob)
    struct.pack_into("<H", newer, 4, bitstream.FORMAT_VERSION + 1)
    with pytest.raises(codec.BitstreamError, match="version 2 is not supported"):
        codec.decode(bytes(newer))


def test_bad_arguments_are_usage_errors():
    keys, values = kv(tokens=8)
    with pytest.raises(kvcompile_usage_error(), match="unknown codec level 9"):
        codec.encode((keys, values), level=9)
    with pytest.raises(kvcompile_usage_error(), match="must both be"):
        codec.encode((keys, values[:, :, :4]), level=2)


def kvcompile_usage_error():
    from kvcompile.errors import UsageError

    return UsageError
