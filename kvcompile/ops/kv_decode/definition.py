"""kvcompile::kv_decode — KV codec chunks (docs/CODEC.md) decoded into a KV cache.

Shapes:
  data           [B] uint8     N chunks' bytes, chunk n starting at chunk_offsets[n] and ending
                               where the next starts (the last at B); offsets multiples of 4
  chunk_offsets  [N] int64
  bank_cdf       [R, W+1] int32  the level's table bank as CDFs (row[0] = 0, row[W] = 65536,
                               padded with 65536 past a row's alphabet)
  halves         [2·L] int64   levels each side of zero per (K/V, layer): alphabet 2·half + 1
  table_base     [2·L] int64   each (K/V, layer)'s first row in bank_cdf
  scale_steps    [256] float32 2^(-code/16) (code 255 = 0)
  attributes     layers, kv_heads, head_dim, tokens (per chunk: every chunk of one call has the
                 same count), group (channels per stream), log_scales (0 for level 0), dtype
                 (0 float32, 1 float16, 2 bfloat16: KVC_DTYPE_*)
  channel_tables [2, 2, L, C] uint8  format 3: the bitstream header's centres then shapes (None
                 for format 2, whose chunks carry their own)
  version        the chunks' bitstream format, 2 (default) or 3
  returns        [2, L, Hkv, N·tokens, D] in dtype: keys then values, chunk n at tokens
                 n·tokens .. (n+1)·tokens - 1

`level_tables(level, layers)` gives the four table inputs of a codec level; they are inputs, not
constants, so the ONNX body can read them. Values are exactly kvcompile.codec.decode's.
The ONNX body reads format-2 chunks only (the restore graph feeds it chunk.to_format2's);
`decode_chunks` passes format 3 to the torch op with its header's tables.

CPU: the codec's reference decoder (numpy), which raises BitstreamError on any inconsistency.
CUDA: the kernel library's kvc_kv_decode (all chunks in one launch) when it loads, which checks
every length on the device and raises BitstreamError naming the first chunk that failed; the
CPU path otherwise.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # KVC_DTYPE_* order


@functools.lru_cache(maxsize=None)
def _level_tables_numpy(level: int, layers: int):
    import kvcompile.codec.quantise as quantise
    import kvcompile.codec.tables as tables

    spec = quantise.LEVELS[level]
    halves = np.concatenate([spec.side(w).halves(layers) for w in ("k", "v")]).astype(np.int64)
    freqs, first = tables.joint_bank(tuple(int(a) for a in np.unique(2 * halves + 1)))
    cdf = np.zeros((freqs.shape[0], freqs.shape[1] + 1), dtype=np.int32)
    np.cumsum(freqs, axis=1, out=cdf[:, 1:])
    table_base = np.array([first[int(2 * h + 1)] for h in halves], dtype=np.int64)
    return cdf, halves, table_base, quantise.SCALE_STEPS.astype(np.float32)


def level_tables(level: int, layers: int, device="cpu"):
    """(bank_cdf, halves, table_base, scale_steps) of codec level `level` for `layers` layers."""
    return tuple(torch.from_numpy(a).to(device) for a in _level_tables_numpy(level, layers))


def check_args(data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads, head_dim,
               tokens, group, log_scales, dtype, channel_tables=None, version=2) -> None:
    """Raise ValueError naming the argument that breaks the contract above (shapes only: the
    bytes are checked while decoding)."""
    if data.dim() != 1 or data.dtype != torch.uint8:
        raise ValueError(f"kv_decode: data must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    if chunk_offsets.dim() != 1 or chunk_offsets.dtype != torch.int64:
        raise ValueError("kv_decode: chunk_offsets must be a 1-D int64 tensor")
    if min(layers, kv_heads, head_dim, tokens, group) < 1 or (kv_heads * head_dim) % group:
        raise ValueError("kv_decode: layers, kv_heads, head_dim, tokens, group must be ≥ 1, group dividing kv_heads·head_dim")
    if tuple(halves.shape) != (2 * layers,) or tuple(table_base.shape) != (2 * layers,):
        raise ValueError(f"kv_decode: halves and table_base must be [2·layers] = [{2 * layers}]")
    if bank_cdf.dim() != 2 or bank_cdf.dtype != torch.int32 or tuple(scale_steps.shape) != (256,):
        raise ValueError("kv_decode: bank_cdf must be int32 [R, W+1] and scale_steps [256]")
    if dtype not in range(len(DTYPES)) or log_scales not in (0, 1):
        raise ValueError(f"kv_decode: dtype must be 0, 1 or 2 and log_scales 0 or 1, got {dtype}, {log_scales}")
    if version not in (2, 3):
        raise ValueError(f"kv_decode: version must be 2 or 3, got {version}")
    want = (2, 2, layers, kv_heads * head_dim)
    if version == 3 and (channel_tables is None or channel_tables.dtype != torch.uint8
                         or tuple(channel_tables.shape) != want):
        raise ValueError(f"kv_decode: format 3 needs channel_tables, uint8 {list(want)}")


def _header(layers, kv_heads, head_dim, tokens, group, log_scales, dtype, halves, channel_tables, version):
    """The codec Header (and level) these attributes describe, for the reference decoder."""
    import kvcompile.codec.quantise as quantise
    from kvcompile.codec.bitstream import DTYPES as NAMES, Header
    from kvcompile.codec.chunk import check_tables

    for level, spec in quantise.LEVELS.items():
        want = np.concatenate([spec.side(w).halves(layers) for w in ("k", "v")])
        if spec.log_scales == bool(log_scales) and np.array_equal(want, halves):
            header = Header(layers, kv_heads, head_dim, NAMES[dtype], level, group, tokens, tokens, version=version)
            if version == 3:
                header.centres, header.shapes = channel_tables.cpu().numpy()
                if not check_tables(header, header.centres, header.shapes):
                    from kvcompile.codec.bitstream import BitstreamError

                    raise BitstreamError("kv_decode: channel_tables name a table outside the codec's bank")
            return header
    raise ValueError("kv_decode: halves and log_scales match no codec level")


def kv_decode_reference(data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads,
                        head_dim, tokens, group, log_scales, dtype, channel_tables=None, version=2) -> Tensor:
    import kvcompile.codec.chunk as chunk

    halves_np = halves.cpu().numpy()
    header = _header(layers, kv_heads, head_dim, tokens, group, log_scales, dtype, halves_np, channel_tables, version)
    expected = level_tables(header.level, layers)
    if not (torch.equal(bank_cdf.cpu(), expected[0]) and torch.equal(table_base.cpu(), expected[2])
            and torch.equal(scale_steps.cpu().float(), expected[3])):
        raise ValueError("kv_decode: bank_cdf, table_base or scale_steps are not the codec level's (level_tables)")
    raw = data.cpu().numpy().tobytes()
    offsets = chunk_offsets.cpu().tolist()
    bounds = offsets[1:] + [len(raw)]
    out = torch.empty((2, layers, kv_heads, len(offsets) * tokens, head_dim), dtype=DTYPES[dtype])
    for n, (begin, end) in enumerate(zip(offsets, bounds)):
        if not 0 <= begin <= end <= len(raw):
            from kvcompile.codec.bitstream import BitstreamError

            raise BitstreamError(f"kv_decode: chunk {n} lies outside the data ({begin}..{end} of {len(raw)})")
        rows = chunk.decode_chunk_rows(header, 0, raw[begin:end])
        for side, which in enumerate(chunk.SIDES):
            values = torch.from_numpy(rows[which]).reshape(layers, tokens, kv_heads, head_dim).permute(0, 2, 1, 3)
            out[side, :, :, n * tokens:(n + 1) * tokens] = values.to(DTYPES[dtype])
    return out.to(data.device)


@torch.library.custom_op("kvcompile::kv_decode", mutates_args=())
def kv_decode(data: Tensor, chunk_offsets: Tensor, bank_cdf: Tensor, halves: Tensor, table_base: Tensor,
              scale_steps: Tensor, layers: int, kv_heads: int, head_dim: int, tokens: int, group: int,
              log_scales: int, dtype: int, channel_tables: Optional[Tensor] = None, version: int = 2) -> Tensor:
    args = (data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads, head_dim, tokens,
            group, log_scales, dtype, channel_tables, version)
    check_args(*args)
    return kv_decode_reference(*args)


@kv_decode.register_kernel("cuda")
def _kv_decode_cuda(data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads, head_dim,
                    tokens, group, log_scales, dtype, channel_tables=None, version=2):
    args = (data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads, head_dim, tokens,
            group, log_scales, dtype, channel_tables, version)
    check_args(*args)
    from kvcompile.ops.kv_decode import kernels

    if kernels.can_use_kernels(data, group, int(bank_cdf.shape[1]) - 1):
        return kernels.run(*args)
    return kv_decode_reference(*args)


@kv_decode.register_fake
def _(data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads, head_dim, tokens, group,
      log_scales, dtype, channel_tables=None, version=2):
    chunks = chunk_offsets.shape[0]
    return data.new_empty((2, layers, kv_heads, chunks * tokens, head_dim), dtype=DTYPES[dtype])


def decode_chunks(header, chunks, device="cpu", tokens=None) -> Tensor:
    """Convenience: chunks (bytes, CRCs checked by the caller) of one codec Header, all of
    `tokens` tokens (default header.chunk_tokens) -> [2, L, Hkv, N·tokens, D] on `device`."""
    from kvcompile.codec.bitstream import BitstreamError

    offsets, at = [], 0
    for n, data in enumerate(chunks):
        if len(data) % 4:  # every part of a chunk is padded to 4 bytes: codec.decode refuses it too
            raise BitstreamError(f"KV bitstream chunk {n} is {len(data)} bytes, not a multiple of 4")
        offsets.append(at)
        at += len(data)
    joined = b"".join(chunks)  # torch.frombuffer refuses an empty buffer: empty chunks are the decoder's to refuse
    blob = (torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)).to(device)
    bank_cdf, halves, table_base, steps = level_tables(header.level, header.layers, device)
    from kvcompile.codec.bitstream import DTYPES as NAMES
    from kvcompile.codec.quantise import LEVELS

    tables = torch.from_numpy(header.channel_tables()).to(device) if header.version >= 3 else None
    return kv_decode(blob, torch.tensor(offsets, dtype=torch.int64, device=device), bank_cdf, halves, table_base,
                     steps, header.layers, header.kv_heads, header.head_dim, tokens or header.chunk_tokens, header.group,
                     int(LEVELS[header.level].log_scales), NAMES.index(header.dtype), tables, header.version)
