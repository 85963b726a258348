"""KV codec (CacheGen, arXiv 2310.07240): quantise + entropy-code a KV cache into a bitstream.

    blob = kvcompile.codec.encode((keys, values), level=2)   # keys/values [layers, kv_heads, tokens, head_dim]
    keys, values = kvcompile.codec.decode(blob)

quantise.py   layer-wise quantisation with per-(layer, token) scales; levels 0 (lossless for 8-bit
              input) to 3 (aggressive)
rans.py       static rANS over many streams at once, one table per (K/V, layer, channel)
bitstream.py  the versioned, checksummed container (docs/CODEC.md)
This is the CPU reference coder; the GPU decoder (plugins/csrc) is still to come.
"""
from __future__ import annotations

import numpy as np
import torch

from kvcompile.codec import bitstream, quantise as quant, rans
from kvcompile.codec.bitstream import BitstreamError  # noqa: F401
from kvcompile.errors import UsageError

CHUNK_TOKENS = 256
LEVELS = tuple(quant.LEVELS)


def _as_rows(x: torch.Tensor) -> np.ndarray:
    """[L, Hkv, T, D] -> [L, T, Hkv·D] float32 (one row of channels per token)."""
    layers, heads, tokens, dim = x.shape
    return x.detach().float().cpu().permute(0, 2, 1, 3).reshape(layers, tokens, heads * dim).numpy()


def encode(kv, level: int = 2, chunk_tokens: int = CHUNK_TOKENS, fingerprint: str = "") -> bytes:
    """(keys, values), each [layers, kv_heads, tokens, head_dim] -> bitstream bytes."""
    if level not in quant.LEVELS:
        raise UsageError(f"unknown codec level {level}; levels: {', '.join(map(str, LEVELS))}")
    keys, values = kv
    if keys.shape != values.shape or keys.dim() != 4:
        raise UsageError(f"keys and values must both be [layers, kv_heads, tokens, head_dim], got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    layers, heads, tokens, dim = keys.shape
    schedule = quant.LEVELS[level]
    bins = {"k": schedule.bins(layers, "k"), "v": schedule.bins(layers, "v")}
    alphabet = int(max(bins["k"].max(), bins["v"].max()))
    rows = {"k": _as_rows(keys), "v": _as_rows(values)}
    chunks, meta = [], []
    for start in range(0, tokens, chunk_tokens):
        stop = min(tokens, start + chunk_tokens)
        scales, tables, words = [], [], []
        for which in ("k", "v"):
            symbols, scale = quant.quantise(rows[which][:, start:stop], bins[which])  # [L, t, C]
            streams = symbols.transpose(0, 2, 1).reshape(-1, stop - start)  # [(L·C), t]
            counts = np.zeros((streams.shape[0], alphabet), dtype=np.int64)
            np.add.at(counts, (np.arange(streams.shape[0])[:, None], streams), 1)
            freqs = rans.quantise_frequencies(counts)
            scales.append(scale)
            tables.append(freqs.reshape(layers, heads * dim, alphabet))
            words.extend(rans.encode(streams, freqs))
        chunk = bitstream.Chunk(np.stack(scales), np.stack(tables).astype(np.uint16), words)
        chunks.append(chunk.to_bytes())
        meta.append({"tokens": stop - start})
    header = {"fingerprint": fingerprint, "layers": layers, "kv_heads": heads, "head_dim": dim, "tokens": tokens,
              "dtype": str(keys.dtype).removeprefix("torch."), "level": level, "chunk_tokens": chunk_tokens,
              "alphabet": alphabet, "chunk_meta": meta}
    return bitstream.write(header, chunks)


def decode(blob: bytes, device="cpu"):
    """bitstream -> (keys, values) [layers, kv_heads, tokens, head_dim] in the encoded dtype."""
    header, offset = bitstream.read_header(blob)
    layers, heads, dim = int(header["layers"]), int(header["kv_heads"]), int(header["head_dim"])
    level, alphabet = int(header["level"]), int(header["alphabet"])
    if level not in quant.LEVELS:
        raise BitstreamError(f"KV bitstream uses codec level {level}, unknown here")
    schedule = quant.LEVELS[level]
    bins = {"k": schedule.bins(layers, "k"), "v": schedule.bins(layers, "v")}
    channels = heads * dim
    parts = {"k": [], "v": []}
    for data, meta in zip(bitstream.chunks_of(blob, header, offset), header["chunks"]):
        tokens = int(meta["tokens"])
        chunk = bitstream.Chunk.from_bytes(data, layers, channels, tokens, alphabet)
        for index, which in enumerate(("k", "v")):
            streams = layers * channels
            words = chunk.words[index * streams:(index + 1) * streams]
            freqs = chunk.tables[index].reshape(streams, alphabet)
            if np.any(freqs.sum(axis=1) != rans.TOTAL):
                raise BitstreamError("a frequency table does not sum to 65536 (corrupted)")
            try:
                symbols = rans.decode(words, freqs, tokens)
            except rans.RansError as error:
                raise BitstreamError(f"KV bitstream does not decode: {error}") from None
            symbols = symbols.reshape(layers, channels, tokens).transpose(0, 2, 1)
            parts[which].append(quant.dequantise(symbols, chunk.scales[index], bins[which]))
    dtype = getattr(torch, header["dtype"])

    def tensor(which):
        rows = np.concatenate(parts[which], axis=1)  # [L, T, C]
        out = torch.from_numpy(rows).reshape(layers, rows.shape[1], heads, dim).permute(0, 2, 1, 3)
        return out.contiguous().to(device=device, dtype=dtype)
    return tensor("k"), tensor("v")
