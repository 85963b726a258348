"""One chunk of the bitstream: its byte layout, and its encoding / decoding on the CPU.

A chunk of T tokens holds, for K then V (Layout gives the offsets; docs/CODEC.md the tables), with
S = 2·L·C/G streams in all:
  scales   level 0: f32 [2, L, T] per-(layer, token) abs-max; lossy levels: f32 [2, L] maxima,
           then u8 [2, L, T] codes (scale = max · 2^(-code/16), quantise.py), padded to 4 bytes
 format 3 (the header holds every channel's table, bitstream.py):
  own      u8 [2, L], padded to 4   1: this (side, layer) carries its own tables here, 0: the header's
  tables   for each (side, layer) with own = 1, in order: centres u8 [C], shapes u8 [C]; padded to 4
  starts   u32 [ceil(S/32)]         word offset of streams 0, 32, 64, … (a GPU warp's first stream)
  lengths  u16 [S], padded to 4     words of each stream
 format 2 instead (still read):
  centres  u8 [2, L, C], shapes u8 [2, L, C], ends u32 [S] (cumulative end of each stream, in words)
 both:
  words    u16 [Σ] the rANS streams back to back, + one zero word if their count is odd
A stream is G consecutive channels of one layer, decoded token after token, channel after channel.

Why format 3 (docs/CODEC.md, "Format 3"): on the issue's workload format 2's per-chunk tables were
1.8 points over the entropy and its u32 stream ends 0.9; a channel's statistics barely move from
chunk to chunk, so the header's tables (chosen on all chunks) serve every chunk, and a chunk pays
for its own only where they code it in fewer bits. A stream's start is its warp's u32 start plus
the u16 lengths before it in the warp (at most 31 adds on the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcompile.codec import rans, tables
from kvcompile.codec.bitstream import BitstreamError, Header
from kvcompile.codec.quantise import LEVELS, Level, decode_scales, dequantise, encode_scales, quantise

SIDES = ("k", "v")
STARTS_EVERY = 32  # format 3: one u32 start per this many streams (a warp)
MAX_STREAM_WORDS = (1 << 16) - 1  # format 3: a stream's length is a u16


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


@dataclass(frozen=True)
class Layout:
    """Byte offsets of one chunk's parts (the GPU decoder computes the same ones). Format 2 has
    no own flags and its tables at `tables` (centres, then shapes), its u32 ends at `ends`."""

    maxima: int  # lossy levels: f32 [2, L]
    scales: int  # f32 [2, L, T] (level 0) or u8 [2, L, T] codes
    own: int  # format 3: u8 [2, L] (format 2: = tables)
    tables: int  # format 3: the own (side, layer)s' centres and shapes; format 2: centres [2, L, C], shapes
    ends: int  # format 3: u32 starts; format 2: u32 ends
    lengths: int  # format 3: u16 lengths (format 2: = words)
    words: int  # offset of the first word; the fixed part ends here

    @classmethod
    def of(cls, header: Header, tokens: int, own: int = 0) -> "Layout":
        """`own`: format 3, how many (side, layer)s carry their own tables (own_count(data))."""
        L, C = header.layers, header.channels
        if LEVELS[header.level].log_scales:
            maxima, scales = 0, 4 * 2 * L
            after = scales + _pad4(2 * L * tokens)
        else:
            maxima = scales = 0
            after = 4 * 2 * L * tokens
        streams = 2 * L * (C // header.group)
        if header.version == 2:
            ends = after + 4 * L * C
            return cls(maxima, scales, after, after, ends, ends + 4 * streams, ends + 4 * streams)
        tables_at = after + _pad4(2 * L)
        ends = tables_at + _pad4(2 * C * own)
        lengths = ends + 4 * -(-streams // STARTS_EVERY)
        return cls(maxima, scales, after, tables_at, ends, lengths, lengths + _pad4(2 * streams))

    @classmethod
    def of_chunk(cls, header: Header, tokens: int, data: bytes) -> "Layout":
        """The layout of chunk `data` (format 3 reads its own flags; too short a chunk gets the
        layout of none, which its length check then refuses)."""
        if header.version == 2:
            return cls.of(header, tokens)
        at = cls.of(header, tokens).own
        flags = np.frombuffer(data, np.uint8, 2 * header.layers, at) if len(data) >= at + 2 * header.layers else None
        return cls.of(header, tokens, int(np.count_nonzero(flags)) if flags is not None else 0)


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


def alphabets(header: Header) -> np.ndarray:
    """[2, L] the alphabet of each (side, layer) at the header's level."""
    level = LEVELS[header.level]
    return np.stack([2 * level.side(w).halves(header.layers) + 1 for w in SIDES])


def check_tables(header: Header, centres: np.ndarray, shapes: np.ndarray) -> bool:
    """Every centre within its (side, layer)'s alphabet and every shape in the bank."""
    return bool(np.all(centres < alphabets(header)[:, :, None]) and np.all(shapes < tables.SHAPES))


@dataclass
class Quantised:
    """A chunk after quantisation (encode's first pass): its scales' bytes and its symbols."""

    scale_bytes: bytes
    symbols: dict  # {"k", "v"}: [L, T, C] int64, each in [0, alphabet)


def quantise_chunk(header: Header, rows: dict) -> Quantised:
    """rows {"k", "v"}: [L, T, C] float32 of this chunk -> its scales' bytes and symbols."""
    level: Level = LEVELS[header.level]
    maxima, codes, scale_rows, symbols = [], [], [], {}
    for which in SIDES:
        absmax = np.abs(rows[which]).max(axis=2, initial=0.0).astype(np.float32)  # [L, T]
        if level.log_scales:
            top, code = encode_scales(absmax)
            maxima.append(top)
            codes.append(code)
            scales = decode_scales(top, code)
        else:
            scales = absmax
            scale_rows.append(absmax)
        symbols[which] = quantise(rows[which], level.side(which), scales)  # against the decoder's scales
    if level.log_scales:
        scale_bytes = np.stack(maxima).astype("<f4").tobytes() + np.stack(codes).tobytes()
        scale_bytes += b"\0" * (-len(scale_bytes) % 4)
    else:
        scale_bytes = np.stack(scale_rows).astype("<f4").tobytes()
    return Quantised(scale_bytes, symbols)


def _coded_bits(symbols: np.ndarray, centre: np.ndarray, shape: np.ndarray, alphabet: int) -> float:
    """Bits of symbols [N, C] under each channel's (centre, shape), as rANS would code them ideally
    (from each channel's counts of d: one bincount, not a gather per symbol)."""
    channels = symbols.shape[1]
    d = (symbols - centre[None, :]) % alphabet
    counts = np.bincount((np.arange(channels)[None, :] * alphabet + d).ravel(), minlength=channels * alphabet)
    return float((counts.reshape(channels, alphabet) * tables.bank_bits(alphabet)[shape]).sum())


def choose_tables(header: Header, chunks: list) -> tuple[np.ndarray, np.ndarray]:
    """Quantised chunks -> (centres, shapes) u8 [2, L, C]: each channel's table chosen on all the
    chunks' symbols together (the header's tables)."""
    A = alphabets(header)
    centres = np.zeros((2, header.layers, header.channels), dtype=np.uint8)
    shapes = np.zeros_like(centres)
    for side, which in enumerate(SIDES):
        for layer in range(header.layers if chunks else 0):  # no chunks (no tokens): zero tables
            pooled = np.concatenate([q.symbols[which][layer] for q in chunks])  # [Σ T, C]
            centres[side, layer], shapes[side, layer] = tables.choose(pooled.T, int(A[side, layer]))
    return centres, shapes


def code_chunk(header: Header, chunk: Quantised) -> bytes:
    """A quantised chunk -> its format-3 bytes, given the header's tables: a (side, layer) carries
    its own tables when they code it in fewer bits, their 2 bytes a channel included."""
    L, C, G = header.layers, header.channels, header.group
    A = alphabets(header)
    centres = header.centres.astype(np.int64).copy()
    shapes = header.shapes.astype(np.int64).copy()
    own = np.zeros((2, L), dtype=np.uint8)
    for side, which in enumerate(SIDES):
        for layer in range(L):
            symbols, alphabet = chunk.symbols[which][layer], int(A[side, layer])
            shared = _coded_bits(symbols, centres[side, layer], shapes[side, layer], alphabet)
            centre, shape = tables.choose(symbols.T, alphabet)
            if _coded_bits(symbols, centre, shape, alphabet) + 16 * C < shared:
                own[side, layer] = 1
                centres[side, layer], shapes[side, layer] = centre, shape
    d = np.stack([chunk.symbols[w] for w in SIDES])  # [2, L, T, C]
    tokens = d.shape[2]
    d = (d - centres[:, :, None, :]) % A[:, :, None, None]
    freqs, table_index = _tables_of(header, shapes)
    words = rans.encode(_symbol_streams(d.reshape(2 * L, tokens, C), G), freqs, table_index)
    lengths = np.array([w.size for w in words], dtype=np.int64)
    if lengths.max(initial=0) > MAX_STREAM_WORDS:
        raise ValueError(f"a stream of {lengths.max()} words does not fit format 3's u16 length "
                         f"(chunk_tokens x group must stay under {MAX_STREAM_WORDS - 2})")
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1][::STARTS_EVERY]
    flat = np.concatenate(words).astype("<u2")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype="<u2")])
    flags = own.tobytes() + b"\0" * (-2 * L % 4)
    blocks = b"".join(np.stack([centres[s, l], shapes[s, l]]).astype(np.uint8).tobytes()
                      for s in range(2) for l in range(L) if own[s, l])
    blocks += b"\0" * (-len(blocks) % 4)
    length_bytes = lengths.astype("<u2").tobytes()
    length_bytes += b"\0" * (-len(length_bytes) % 4)
    return b"".join([chunk.scale_bytes, flags, blocks, starts.astype("<u4").tobytes(), length_bytes, flat.tobytes()])


def encode_chunk(header: Header, rows: dict) -> bytes:
    """rows {"k", "v"}: [L, T, C] float32 of this chunk -> the chunk's bytes. A header without
    tables gets this chunk's (what a one-chunk bitstream stores); codec.encode chooses them on
    all chunks instead (choose_tables)."""
    quantised = quantise_chunk(header, rows)
    if header.centres is None:
        header.centres, header.shapes = choose_tables(header, [quantised])
    return code_chunk(header, quantised)


@dataclass
class ParsedChunk:
    """A chunk's parts as arrays (views of its bytes), checked for consistency; format 3's
    tables are resolved (the header's, or the chunk's own) and its lengths summed into ends."""

    scales: list  # [L, T] float32 for K and V
    centres: np.ndarray  # [2, L, C]
    shapes: np.ndarray  # [2, L, C]
    ends: np.ndarray  # [2·L·S] int64, cumulative end of each stream in words from the chunk's first word
    words: np.ndarray  # [W] uint16
    tokens: int
    own: np.ndarray = None  # format 3: [2, L] 1 where the chunk carries its own tables


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
    layout = Layout.of_chunk(header, tokens, data)
    L, C = header.layers, header.channels
    if len(data) < layout.words:
        raise BitstreamError(f"KV bitstream chunk {index} is shorter than its fixed part")
    stored = check_scales(header, index, data, layout, tokens)
    if LEVELS[header.level].log_scales:
        codes = np.frombuffer(data, np.uint8, 2 * L * tokens, layout.scales).reshape(2, L, tokens)
        scales = [decode_scales(stored[side], codes[side]) for side in range(2)]
    else:
        scales = [stored[0].astype(np.float32), stored[1].astype(np.float32)]
    streams = 2 * L * (C // header.group)
    own = None
    if header.version == 2:
        centres = np.frombuffer(data, np.uint8, 2 * L * C, layout.tables).reshape(2, L, C).astype(np.int64)
        shapes = np.frombuffer(data, np.uint8, 2 * L * C, layout.tables + 2 * L * C).reshape(2, L, C).astype(np.int64)
        ends = np.frombuffer(data, "<u4", streams, layout.ends).astype(np.int64)
        lengths = np.diff(np.concatenate([[0], ends]))
        starts_agree = True
    else:
        own = np.frombuffer(data, np.uint8, 2 * L, layout.own).reshape(2, L)
        if np.any(own > 1):
            raise BitstreamError(f"KV bitstream chunk {index} has an own-tables flag other than 0 or 1")
        centres, shapes = header.centres.astype(np.int64), header.shapes.astype(np.int64)
        if own.any():
            blocks = np.frombuffer(data, np.uint8, 2 * C * int(own.sum()), layout.tables).reshape(-1, 2, C)
            centres, shapes = centres.copy(), shapes.copy()
            centres[own == 1], shapes[own == 1] = blocks[:, 0], blocks[:, 1]  # (side, layer) order
        lengths = np.frombuffer(data, "<u2", streams, layout.lengths).astype(np.int64)
        ends = np.cumsum(lengths)
        starts = np.frombuffer(data, "<u4", -(-streams // STARTS_EVERY), layout.ends).astype(np.int64)
        starts_agree = np.array_equal(starts, (ends - lengths)[::STARTS_EVERY])
    words = np.frombuffer(data, "<u2", (len(data) - layout.words) // 2, layout.words)
    if (len(data) - layout.words) % 4 or np.any(lengths < 2) or not starts_agree \
            or -(-int(ends[-1]) // 2) * 2 != words.size or (words.size > ends[-1] and words[-1] != 0):
        raise BitstreamError(f"KV bitstream chunk {index}'s stream ends contradict its length")
    if not check_tables(header, centres, shapes):
        raise BitstreamError(f"KV bitstream chunk {index} names a table outside the codec's bank")
    return ParsedChunk(scales, centres, shapes, ends, words, tokens, own)


def to_format2(header: Header, index: int, data: bytes) -> bytes:
    """A format-3 chunk laid out as format 2 (the same scales and words; its tables resolved and
    stored per chunk, its lengths as u32 ends): what the restore graph and an exported
    restore.onnx read, their kv_decode node taking no header tables."""
    if header.version == 2:
        return data
    parsed = parse_chunk(header, index, data)
    layout = Layout.of_chunk(header, parsed.tokens, data)
    return b"".join([data[:layout.own], parsed.centres.astype(np.uint8).tobytes(),
                     parsed.shapes.astype(np.uint8).tobytes(), parsed.ends.astype("<u4").tobytes(),
                     data[layout.words:]])


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
