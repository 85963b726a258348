"""The KV bitstream: a versioned, checksummed container of independently decodable chunks.

Layout (all integers little-endian; docs/CODEC.md has the byte table):
  magic    4 bytes  b"KVCB"
  version  u16      FORMAT_VERSION; a reader refuses any other
  hlen     u32      length of the header JSON
  header   hlen     UTF-8 JSON: fingerprint, layers, kv_heads, head_dim, dtype, level,
                    chunk_tokens, tokens, chunks: [{"tokens", "bytes", "crc32"}]
  hcrc     u32      CRC-32 of magic..header
  chunk 0, chunk 1, ...   each `bytes` long, CRC-32 in the header; layout of one chunk:
    scales   f32 [2, L, T]           per-(K/V, layer, token) abs-max
    tables   u16 [2, L, C, A]        frequencies (sum 65536) per (K/V, layer, channel) stream,
                                     A = the level's largest bin count (unused symbols 0)
    counts   u32 [2, L, C]           16-bit words per stream
    words    u16 [Σ counts]          the rANS words, stream after stream
No pickle; a chunk is read and checked on its own, so a stream can be decoded as it arrives.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, List

import numpy as np

from kvcompile.errors import InputError

MAGIC = b"KVCB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")


class BitstreamError(InputError):
    """A bitstream kvcompile cannot decode: wrong magic or version, failed checksum, truncation."""


@dataclass
class Chunk:
    scales: np.ndarray  # [2, L, T] float32
    tables: np.ndarray  # [2, L, C, A] uint16
    words: List[np.ndarray]  # 2·L·C uint16 arrays

    def to_bytes(self) -> bytes:
        counts = np.array([w.size for w in self.words], dtype="<u4")
        return b"".join([self.scales.astype("<f4").tobytes(), self.tables.astype("<u2").tobytes(),
                         counts.tobytes(), np.concatenate(self.words).astype("<u2").tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes, layers: int, channels: int, tokens: int, alphabet: int) -> "Chunk":
        view = memoryview(data)
        sizes = [2 * layers * tokens * 4, 2 * layers * channels * alphabet * 2, 2 * layers * channels * 4]
        if len(data) < sum(sizes):
            raise BitstreamError("a chunk is shorter than its fixed part (truncated)")
        offset = 0
        scales = np.frombuffer(view[offset: offset + sizes[0]], dtype="<f4").reshape(2, layers, tokens)
        offset += sizes[0]
        tables = np.frombuffer(view[offset: offset + sizes[1]], dtype="<u2").reshape(2, layers, channels, alphabet)
        offset += sizes[1]
        counts = np.frombuffer(view[offset: offset + sizes[2]], dtype="<u4").astype(np.int64)
        offset += sizes[2]
        if offset + 2 * int(counts.sum()) != len(data):
            raise BitstreamError("a chunk's word counts do not match its length")
        flat = np.frombuffer(view[offset:], dtype="<u2")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        words = [flat[bounds[i]: bounds[i + 1]] for i in range(counts.size)]
        return cls(scales.astype(np.float32), tables.astype(np.uint32), words)


def write(header: dict, chunks: List[bytes]) -> bytes:
    header = dict(header, chunks=[{"bytes": len(c), "crc32": zlib.crc32(c), **meta}
                                  for c, meta in zip(chunks, header.pop("chunk_meta"))])
    text = json.dumps(header, sort_keys=True).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)) + text
    return prefix + struct.pack("<I", zlib.crc32(prefix)) + b"".join(chunks)


def read_header(blob: bytes) -> tuple:
    """-> (header dict, offset of chunk 0); checks magic, version and the header's CRC."""
    if len(blob) < _PREFIX.size + 4:
        raise BitstreamError("not a kvcompile KV bitstream (too short)")
    magic, version, length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise BitstreamError("not a kvcompile KV bitstream (bad magic)")
    if version != FORMAT_VERSION:
        raise BitstreamError(f"KV bitstream version {version} is not supported (this kvcompile reads {FORMAT_VERSION})")
    end = _PREFIX.size + length
    if len(blob) < end + 4:
        raise BitstreamError("KV bitstream header is truncated")
    (crc,) = struct.unpack_from("<I", blob, end)
    if zlib.crc32(blob[:end]) != crc:
        raise BitstreamError("KV bitstream header fails its checksum (corrupted)")
    try:
        header = json.loads(blob[_PREFIX.size:end])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BitstreamError("KV bitstream header is not valid JSON") from None
    return header, end + 4


def chunks_of(blob: bytes, header: dict, offset: int) -> Iterator[bytes]:
    """Each chunk's bytes, checked against its CRC-32 before it is handed out."""
    for index, meta in enumerate(header["chunks"]):
        data = blob[offset: offset + int(meta["bytes"])]
        if len(data) != int(meta["bytes"]):
            raise BitstreamError(f"KV bitstream chunk {index} is truncated")
        if zlib.crc32(data) != int(meta["crc32"]):
            raise BitstreamError(f"KV bitstream chunk {index} fails its checksum (corrupted)")
        yield data
        offset += len(data)
    if offset != len(blob):
        raise BitstreamError("KV bitstream has trailing bytes after its last chunk")
