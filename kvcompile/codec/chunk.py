"""One chunk of the bitstream: its byte layout, and its encoding / decoding on the CPU.

A chunk of T tokens holds, for K then V (layout() gives the offsets; docs/CODEC.md the table):
  scales   level 0: f32 [2, L, T] per-(layer, token) abs-max; lossy levels: f32 [2, L] maxima,
           then u8 [2, L, T] codes (scale = max · 2^(-code/16), quantise.py), padded to 4 bytes
  centres  u8 [2, L, C]   each channel's table centre (the symbol coded as d = 0)
  shapes   u8 [2, L, C]   each channel's table in the bank (tables.py)
  ends     u32 [2, L, S]  cumulative end, in words, of each stream (S = C / G streams per layer)
  words    u16 [ends[-1]] the rANS streams back to back, + one zero word if their count is odd
A stream is G consecutive channels of one layer, decoded token after token, channel after channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcompile.codec import rans, tables
from kvcompile.codec.bitstream import BitstreamError, Header
from kvcompile.codec.quantise import LEVELS, Level, decode_scales, dequantise, encode_scales, quantise

SIDES = ("k", "v")


@dataclass(frozen=True)
class Layout:
    """Byte offsets of one chunk's parts (the GPU decoder computes the same ones)."""

    maxima: int  # lossy levels: f32 [2, L]
    scales: int  # f32 [2, L, T] (level 0) or u8 [2, L, T] codes
    centres: int
    shapes: int
    ends: int
    words: int  # offset of the first word; the fixed part ends here

    @classmethod
    def of(cls, header: Header, tokens: int) -> "Layout":
        L, C = header.layers, header.channels
        if LEVELS[header.level].log_scales:
            maxima, scales = 0, 4 * 2 * L
            centres = scales + -(-2 * L * tokens // 4) * 4
        else:
            maxima = scales = 0
            centres = 4 * 2 * L * tokens
        shapes = centres + 2 * L * C
        ends = shapes + 2 * L * C
        streams = 2 * L * (C // header.group)
        return cls(maxima, scales, centres, shapes, ends, ends + 4 * streams)


def _symbol_streams(symbols: np.ndarray, group: int) -> np.ndarray:
    """[L, T, C] -> [L·C/G, T·G]: stream (l, g) is channels g·G.. of layer l, token-major."""
    layers, tokens, channels = symbols.shape
    grouped = symbols.reshape(layers, tokens, channels // group, group).transpose(0, 2, 1, 3)
    return grouped.reshape(layers * (channels // group), tokens * group)


def _stream_symbols(streams: np.ndarray, layers: int, tokens: int, channels: int, group: int) -> np.ndarray:
    grouped = streams.reshape(layers, channels // group, tokens, group).transpose(0, 2, 1, 3)
    return grouped.reshape(layers, tokens, channels)


def _tables_of(header: Header, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shapes [2, L, C] -> (the joint bank [K, A], each stream's table rows [2·L·S, G])."""
    level = LEVELS[header.level]
    alphabets = np.stack([2 * level.side(w).halves(header.layers) + 1 for w in SIDES])  # [2, L]
    freqs, first = tables.joint_bank(tuple(int(a) for a in np.unique(alphabets)))
    base = np.vectorize(first.__getitem__)(alphabets)  # [2, L]
    rows = base[:, :, None] + shapes  # [2, L, C]
    return freqs, rows.reshape(-1, header.group)


def encode_chunk(header: Header, rows: dict) -> bytes:
    """rows {"k", "v"}: [L, T, C] float32 of this chunk -> the chunk's bytes."""
    level: Level = LEVELS[header.level]
    layers, tokens, channels = rows["k"].shape
    group = header.group
    maxima, codes, scale_rows, centres, shapes, coded = [], [], [], [], [], []
    for which in SIDES:
        side = level.side(which)
        absmax = np.abs(rows[which]).max(axis=2, initial=0.0).astype(np.float32)  # [L, T]
        if level.log_scales:
            top, code = encode_scales(absmax)
            maxima.append(top)
            codes.append(code)
            scales = decode_scales(top, code)
        else:
            scales = absmax
            scale_rows.append(absmax)
        symbols = quantise(rows[which], side, scales)  # against the decoder's scales
        halves = side.halves(layers)
        centre = np.zeros((layers, channels), dtype=np.int64)
        shape = np.zeros((layers, channels), dtype=np.int64)
        for layer in range(layers):
            alphabet = int(2 * halves[layer] + 1)
            centre[layer], shape[layer] = tables.choose(symbols[layer].T, alphabet)
        centres.append(centre)
        shapes.append(shape)
        alphabets = (2 * halves + 1)[:, None, None]
        coded.append((symbols - centre[:, None, :]) % alphabets)  # d, [L, T, C]
    freqs, table_index = _tables_of(header, np.stack(shapes))
    d = np.concatenate(coded)  # [2L, T, C]
    words = rans.encode(_symbol_streams(d, group), freqs, table_index)
    ends = np.cumsum([w.size for w in words])
    flat = np.concatenate(words).astype("<u2")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype="<u2")])
    if level.log_scales:
        scale_bytes = np.stack(maxima).astype("<f4").tobytes() + np.stack(codes).tobytes()
        scale_bytes += b"\0" * (-len(scale_bytes) % 4)
    else:
        scale_bytes = np.stack(scale_rows).astype("<f4").tobytes()
    return b"".join([scale_bytes, np.stack(centres).astype(np.uint8).tobytes(),
                     np.stack(shapes).astype(np.uint8).tobytes(), ends.astype("<u4").tobytes(),
                     flat.tobytes()])


@dataclass
class ParsedChunk:
    """A chunk's parts as arrays (views of its bytes), checked for consistency."""

    scales: list  # [L, T] float32 for K and V
    centres: np.ndarray  # [2, L, C]
    shapes: np.ndarray  # [2, L, C]
    ends: np.ndarray  # [2·L·S] int64, words from the chunk's first word
    words: np.ndarray  # [W] uint16
    tokens: int


# the largest magnitude each cache dtype holds: a scale above it cannot come from real K/V of
# that dtype, and would decode to inf (a resealed corrupted maximum did, in the fuzzer)
DTYPE_MAX = {"float32": float(np.finfo(np.float32).max), "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def check_scales(header: Header, index: int, data: bytes, layout: Layout, tokens: int) -> np.ndarray:
    """The chunk's stored scales (lossy levels: maxima [2, L]; level 0: [2, L, T]), refused when
    negative, non-finite, or beyond what the header's dtype can hold. Both decoders depend on
    it: the CPU one here, the GPU one through codec._decode_on_gpu before its launch."""
    L = header.layers
    if LEVELS[header.level].log_scales:
        stored = np.frombuffer(data, "<f4", 2 * L, layout.maxima).reshape(2, L)
    else:
        stored = np.frombuffer(data, "<f4", 2 * L * tokens, layout.scales).reshape(2, L, tokens)
    if not np.all(np.isfinite(stored)) or np.any(stored < 0) or np.any(stored > DTYPE_MAX[header.dtype]):
        raise BitstreamError(f"KV bitstream chunk {index} has a negative, non-finite or out-of-range scale")
    return stored


def parse_chunk(header: Header, index: int, data: bytes) -> ParsedChunk:
    _, tokens = header.chunk_span(index)
    layout = Layout.of(header, tokens)
    L, C = header.layers, header.channels
    if len(data) < layout.words:
        raise BitstreamError(f"KV bitstream chunk {index} is shorter than its fixed part")
    stored = check_scales(header, index, data, layout, tokens)
    if LEVELS[header.level].log_scales:
        codes = np.frombuffer(data, np.uint8, 2 * L * tokens, layout.scales).reshape(2, L, tokens)
        scales = [decode_scales(stored[side], codes[side]) for side in range(2)]
    else:
        scales = [stored[0].astype(np.float32), stored[1].astype(np.float32)]
    centres = np.frombuffer(data, np.uint8, 2 * L * C, layout.centres).reshape(2, L, C).astype(np.int64)
    shapes = np.frombuffer(data, np.uint8, 2 * L * C, layout.shapes).reshape(2, L, C).astype(np.int64)
    streams = 2 * L * (C // header.group)
    ends = np.frombuffer(data, "<u4", streams, layout.ends).astype(np.int64)
    words = np.frombuffer(data, "<u2", (len(data) - layout.words) // 2, layout.words)
    if (len(data) - layout.words) % 4 or np.any(np.diff(ends) < 2) or ends[0] < 2 \
            or -(-int(ends[-1]) // 2) * 2 != words.size or (words.size > ends[-1] and words[-1] != 0):
        raise BitstreamError(f"KV bitstream chunk {index}'s stream ends contradict its length")
    level = LEVELS[header.level]
    for side, which in enumerate(SIDES):
        alphabets = 2 * level.side(which).halves(L) + 1
        if np.any(centres[side] >= alphabets[:, None]) or np.any(shapes[side] >= tables.SHAPES):
            raise BitstreamError(f"KV bitstream chunk {index} names a table outside the codec's bank")
    return ParsedChunk(scales, centres, shapes, ends, words, tokens)


def decode_symbols(header: Header, chunk: ParsedChunk) -> dict:
    """-> {"k", "v"}: symbols [L, T, C] int64 (the entropy stage, exactly the encoder's symbols)."""
    level = LEVELS[header.level]
    L, C, G, T = header.layers, header.channels, header.group, chunk.tokens
    freqs, table_index = _tables_of(header, chunk.shapes)
    try:
        d = rans.decode(chunk.words, chunk.ends, freqs, table_index, T * G)
    except rans.RansError as error:
        raise BitstreamError(f"KV bitstream does not decode: {error}") from None
    d = _stream_symbols(d, 2 * L, T, C, G).reshape(2, L, T, C)
    out = {}
    for side, which in enumerate(SIDES):
        alphabets = (2 * level.side(which).halves(L) + 1)[:, None, None]
        out[which] = (d[side] + chunk.centres[side][:, None, :]) % alphabets
    return out


def decode_chunk_rows(header: Header, index: int, data: bytes) -> dict:
    """-> {"k", "v"}: [L, T, C] float32 values of chunk `index`."""
    chunk = parse_chunk(header, index, data)
    symbols = decode_symbols(header, chunk)
    level = LEVELS[header.level]
    return {which: dequantise(symbols[which], chunk.scales[side], level.side(which))
            for side, which in enumerate(SIDES)}
