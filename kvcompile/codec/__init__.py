"""KV codec (CacheGen, arXiv 2310.07240): quantise + entropy-code a KV cache into a bitstream.

Whole caches (keys / values [layers, kv_heads, tokens, head_dim]):

    blob = kvcompile.codec.encode((keys, values), level=4, chunk_tokens=256, fingerprint="...")
    keys, values = kvcompile.codec.decode(blob, device="cpu")

Chunk by chunk, from any file-like object (what a streaming loader uses; docs/CODEC.md):

    header = codec.read_header(stream)              # Header: shape, dtype, level, chunk sizes
    for index, data in codec.iter_chunks(stream, header):   # each checked against its CRC
        keys, values = codec.decode_chunk(header, index, data, device="cuda")  # [L, Hkv, t, D]
        first_token, tokens = header.chunk_span(index)

Every malformed input raises BitstreamError (a kvcompile InputError). LEVELS maps each level to
its description; DEFAULT_LEVEL is the best size/quality trade-off measured (docs/CODEC.md).

quantise.py  layer-wise quantisation, per-(layer, token) scales, K and V schedules per level
tables.py    the fixed bank of parametric frequency tables and the per-channel choice
rans.py      static rANS over many streams at once (CPU reference)
chunk.py     one chunk's byte layout, encode and decode
bitstream.py the versioned, checksummed container
The GPU decoder is plugins/csrc/kv_decode.cu, run through the kvcompile::kv_decode op.
"""
from __future__ import annotations

import io
import math
from typing import Dict

import numpy as np
import torch

from kvcompile.codec import chunk as chunk_codec
from kvcompile.codec import quantise as quant
from kvcompile.codec.bitstream import BitstreamError, Header, iter_chunks, read_header
from kvcompile.errors import UsageError

__all__ = ["encode", "decode", "read_header", "iter_chunks", "decode_chunk", "Header", "BitstreamError",
           "LEVELS", "DEFAULT_LEVEL", "LOSSLESS_LEVEL", "CHUNK_TOKENS"]

CHUNK_TOKENS = 256
DEFAULT_LEVEL = 4  # ≥ 3.5x smaller than 8-bit, the least task loss measured there (docs/CODEC.md, "Level 4")
LOSSLESS_LEVEL = 0  # symbol-exact for per-(layer, token) 8-bit input
LEVELS: Dict[int, str] = {level: spec.note for level, spec in quant.LEVELS.items()}
STREAM_CHANNELS = 8  # channels per rANS stream (one final state per 8 channels, not per channel)
GROUPS = (1, 2, 4, 8)  # the stream widths the GPU decoders take
_FP16_MAX = 65504.0


def _as_rows(x: torch.Tensor) -> np.ndarray:
    """[L, Hkv, T, D] -> [L, T, Hkv·D] float32 (one row of channels per token)."""
    layers, heads, tokens, dim = x.shape
    return x.detach().float().cpu().permute(0, 2, 1, 3).reshape(layers, tokens, heads * dim).numpy()


def _from_rows(rows: np.ndarray, heads: int, dim: int) -> torch.Tensor:
    layers, tokens, _ = rows.shape
    return torch.from_numpy(np.ascontiguousarray(rows)).reshape(layers, tokens, heads, dim).permute(0, 2, 1, 3)


def default_group(channels: int, chunk_tokens: int) -> int:
    """The stream width `encode` writes without `group=` (and the restore graph decodes): the
    widest up to STREAM_CHANNELS that divides `channels` and keeps a stream of chunk_tokens·group
    symbols within format 3's u16 length (at most one word a symbol, plus two)."""
    group = math.gcd(STREAM_CHANNELS, channels)
    while group > 1 and chunk_tokens * group + 2 > chunk_codec.MAX_STREAM_WORDS:
        group //= 2
    return group


def stream_group(channels: int, chunk_tokens: int, group=None) -> int:
    """Channels per rANS stream: `group` (one of GROUPS, dividing `channels`), by default
    default_group's; refused when it cannot be written."""
    if group is None:
        group = default_group(channels, chunk_tokens)
    if group not in GROUPS or channels % group:
        raise UsageError(f"group (channels per stream) must be one of {GROUPS} and divide {channels}, got {group}")
    if chunk_tokens * group + 2 > chunk_codec.MAX_STREAM_WORDS:
        raise UsageError(f"chunk_tokens x group must be at most {chunk_codec.MAX_STREAM_WORDS - 2}, got "
                         f"{chunk_tokens} x {group}")
    return group


def encode(kv, level: int = DEFAULT_LEVEL, chunk_tokens: int = CHUNK_TOKENS, fingerprint: str = "",
           group=None) -> bytes:
    """(keys, values), each [layers, kv_heads, tokens, head_dim] -> bitstream bytes (format 3).
    `group`: channels per rANS stream (stream_group; wider streams cost fewer bits and give the
    GPU fewer threads)."""
    if level not in quant.LEVELS:
        raise UsageError(f"unknown codec level {level}; levels: {', '.join(map(str, LEVELS))}")
    keys, values = kv
    if keys.shape != values.shape or keys.dim() != 4:
        raise UsageError(f"keys and values must both be [layers, kv_heads, tokens, head_dim], got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    dtype = str(keys.dtype).removeprefix("torch.")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"the codec takes float32/float16/bfloat16 KV, got {keys.dtype}")
    if not 1 <= chunk_tokens < 2 ** 31:
        raise UsageError(f"chunk_tokens must be ≥ 1, got {chunk_tokens}")
    layers, heads, tokens, dim = keys.shape
    if max(layers, heads, dim) >= 2 ** 16 or tokens >= 2 ** 32:
        raise UsageError(f"KV of shape {tuple(keys.shape)} is too large for the bitstream's fields")
    rows = {"k": _as_rows(keys), "v": _as_rows(values)}
    if level != 0 and max(np.abs(r).max(initial=0.0) for r in rows.values()) > _FP16_MAX:
        raise UsageError("lossy codec levels store float16 scales; this KV exceeds 65504: use level 0")
    header = Header(layers, heads, dim, dtype, level, stream_group(heads * dim, chunk_tokens, group), tokens,
                    chunk_tokens, fingerprint)
    quantised = [chunk_codec.quantise_chunk(header, {w: r[:, start:start + chunk_tokens] for w, r in rows.items()})
                 for start in range(0, tokens, chunk_tokens)]
    # the header's tables are chosen on every chunk's symbols; a chunk overrides them per (side, layer)
    header.centres, header.shapes = chunk_codec.choose_tables(header, quantised)
    chunks = [chunk_codec.code_chunk(header, q) for q in quantised]
    from kvcompile.codec import bitstream

    return bitstream.write(header, chunks)


def decode_chunk(header: Header, index: int, data: bytes, device="cpu"):
    """Chunk `index` (its bytes, CRC already checked by iter_chunks) -> (keys, values), each
    [layers, kv_heads, tokens of the chunk, head_dim] in the encoded dtype on `device`; on a CUDA
    device the GPU decoder (the kvcompile::kv_decode op) decodes it."""
    if torch.device(device).type == "cuda":
        out = _decode_on_gpu(header, [(index, data)], device)
        return out[0], out[1]
    rows = chunk_codec.decode_chunk_rows(header, index, data)
    dtype = getattr(torch, header.dtype)
    return tuple(_from_rows(rows[w], header.kv_heads, header.head_dim).to(device=device, dtype=dtype).contiguous()
                 for w in chunk_codec.SIDES)


def _decode_on_gpu(header: Header, chunks, device) -> torch.Tensor:
    """[(index, bytes)] of chunks with the same token count -> [2, L, Hkv, Σ tokens, D] on `device`."""
    from kvcompile.ops.kv_decode.definition import decode_chunks

    tokens = {header.chunk_span(index)[1] for index, _ in chunks}
    if len(tokens) != 1:
        raise ValueError("_decode_on_gpu takes chunks of one token count")
    count = tokens.pop()
    for index, data in chunks:  # before any allocation sized by the header
        layout = chunk_codec.Layout.of_chunk(header, count, data)
        if len(data) < layout.words or len(data) % 4:
            raise BitstreamError(f"KV bitstream chunk {index} is shorter than its fixed part or not whole words")
        chunk_codec.check_scales(header, index, data, layout, count)  # the kernel trusts finite, in-range scales
    return decode_chunks(header, [data for _, data in chunks], device=device, tokens=count)


def decode(blob: bytes, device="cpu"):
    """bitstream -> (keys, values) [layers, kv_heads, tokens, head_dim] in the encoded dtype; on a
    CUDA device the GPU decoder decodes every full chunk in one launch."""
    stream = io.BytesIO(blob)
    header = read_header(stream)
    dtype = getattr(torch, header.dtype)
    shape = (header.layers, header.kv_heads, header.tokens, header.head_dim)
    if torch.device(device).type == "cuda":
        chunks = list(iter_chunks(stream, header))  # read and checked before allocating
        for index, data in chunks:
            if len(data) < chunk_codec.Layout.of_chunk(header, header.chunk_span(index)[1], data).words:
                raise BitstreamError(f"KV bitstream chunk {index} is shorter than its fixed part")
        keys = torch.empty(shape, dtype=dtype, device=device)
        values = torch.empty_like(keys)
        full = [(i, d) for i, d in chunks if header.chunk_span(i)[1] == header.chunk_tokens]
        short = [(i, d) for i, d in chunks if header.chunk_span(i)[1] != header.chunk_tokens]
        for group in (full, short):
            if group:
                out = _decode_on_gpu(header, group, device)
                start = header.chunk_span(group[0][0])[0]
                keys[:, :, start:start + out.shape[3]] = out[0]
                values[:, :, start:start + out.shape[3]] = out[1]
        return keys, values
    keys, values = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    for index, data in iter_chunks(stream, header):
        start, count = header.chunk_span(index)
        k, v = decode_chunk(header, index, data)
        keys[:, :, start:start + count] = k
        values[:, :, start:start + count] = v
    return keys.to(device), values.to(device)
