"""The KV bitstream (format 3; format 2 still read): a versioned, checksummed container of
independently decodable chunks.

docs/CODEC.md has the byte table. All integers little-endian, no pickle, no JSON:

  header  magic "KVCB", version u16, fixed fields (shape, dtype, level, tokens, chunking,
          fingerprint), then one (bytes u32, crc32 u32) row per chunk, then (format 3) each
          (side, layer, channel)'s table — centre u8 [2, L, C], then shape u8 [2, L, C] — deflated
          (zlib) after its length u32, then the CRC-32 of all of it. Everything a decoder needs to
          size its output is here. (Deflate: the tables are read on the host, never by a kernel,
          and a channel's centre and shape take ~7 of their 16 bits deflated on the issue's workload.)
  chunks  back to back, chunk i is `bytes_i` long and checked against `crc32_i` on its own; a
          chunk decodes given the header alone (format 3: a chunk uses the header's tables for a
          (side, layer) unless it carries its own, chunk.py).

Format 2 stored every channel's table in every chunk (2 bytes a channel a chunk: 1.8% of the
issue's workload); format 3 stores them once, in the header (docs/CODEC.md, "Format 3").

`read_header(stream)` reads exactly the header from a file-like object (or bytes), so chunks can
then be read one at a time as they arrive (`iter_chunks`). Any inconsistency raises BitstreamError.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional, Tuple

import numpy as np

from kvcompile.errors import InputError

MAGIC = b"KVCB"
FORMAT_VERSION = 3  # what encode writes
READ_VERSIONS = (2, 3)  # what read_header accepts
MAX_TABLE_CELLS = 1 << 27  # 2·L·C of a header's tables: beyond any real model, refused before reading
DTYPES = ("float32", "float16", "bfloat16")  # dtype code = index
# magic, version, flags, layers, kv_heads, head_dim, dtype, level, group, tokens, chunk_tokens,
# chunks, fingerprint length
_FIXED = struct.Struct("<4sHHHHHBBHIIIH")
_ROW = struct.Struct("<II")
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<I")  # format 3: the deflated tables' bytes
MAX_CHUNK_BYTES = 1 << 31


class BitstreamError(InputError):
    """A bitstream kvcompile cannot decode: wrong magic or version, failed checksum, truncation,
    or contents that contradict the header."""


@dataclass
class Header:
    """What a bitstream holds; `chunk_bytes`/`chunk_crcs` have one entry per chunk."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    level: int
    group: int
    tokens: int
    chunk_tokens: int
    fingerprint: str = ""
    chunk_bytes: List[int] = field(default_factory=list)
    chunk_crcs: List[int] = field(default_factory=list)
    version: int = FORMAT_VERSION
    centres: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # format 3: u8 [2, L, C] centres
    shapes: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # format 3: u8 [2, L, C] bank shapes

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def chunks(self) -> int:
        return len(self.chunk_bytes)

    def chunk_span(self, index: int) -> Tuple[int, int]:
        """(first token, token count) of chunk `index`."""
        start = index * self.chunk_tokens
        return start, min(self.chunk_tokens, self.tokens - start)

    def to_bytes(self) -> bytes:
        name = self.fingerprint.encode()
        fixed = _FIXED.pack(MAGIC, self.version, 0, self.layers, self.kv_heads, self.head_dim,
                            DTYPES.index(self.dtype), self.level, self.group, self.tokens,
                            self.chunk_tokens, self.chunks, len(name))
        rows = b"".join(_ROW.pack(n, crc) for n, crc in zip(self.chunk_bytes, self.chunk_crcs))
        body = fixed + name + rows
        if self.version >= 3:  # the tables as held (a fuzzer's edited shape fields disagree with them), deflated
            if self.centres is None or self.shapes is None:
                raise ValueError("a format-3 header needs its centres and shapes")
            packed = zlib.compress(np.asarray(self.centres, np.uint8).tobytes()
                                   + np.asarray(self.shapes, np.uint8).tobytes(), 9)
            body += _LENGTH.pack(len(packed)) + packed
        return body + _CRC.pack(zlib.crc32(body))

    def channel_tables(self) -> np.ndarray:
        """Format 3: u8 [2, 2, L, C] (centres, then shapes) as the header stores them."""
        want = (2, self.layers, self.channels)
        if self.centres is None or self.shapes is None or self.centres.shape != want or self.shapes.shape != want:
            raise ValueError(f"a format-3 header needs centres and shapes of shape {want}")
        return np.ascontiguousarray(np.stack([self.centres, self.shapes]).astype(np.uint8))


def _read_exactly(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise BitstreamError(f"KV bitstream is truncated in {what}")
    return data


def read_header(stream) -> Header:
    """Read and check the header from a file-like object (or bytes); the stream is left at chunk 0."""
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(stream)
    fixed = _read_exactly(stream, _FIXED.size, "its header")
    (magic, version, flags, layers, heads, dim, dtype, level, group, tokens, chunk_tokens, chunks,
     name_length) = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise BitstreamError("not a kvcompile KV bitstream (bad magic)")
    if version not in READ_VERSIONS:
        raise BitstreamError(f"KV bitstream version {version} is not supported (this kvcompile reads "
                             f"{', '.join(map(str, READ_VERSIONS))})")
    cells = 2 * layers * heads * dim if version >= 3 else 0  # one table (centre + shape) each
    if cells > MAX_TABLE_CELLS:
        raise BitstreamError("KV bitstream header claims a cache too large for its tables (corrupted)")
    rest = _read_exactly(stream, name_length + chunks * _ROW.size + (_LENGTH.size if version >= 3 else 0),
                         "its header")
    packed = b""
    if version >= 3:  # the tables' deflated length, then the deflated tables
        (packed_bytes,) = _LENGTH.unpack(rest[-_LENGTH.size:])
        if packed_bytes > 2 * cells + 1024:  # deflate's worst case is a few bytes over its input
            raise BitstreamError("KV bitstream header claims tables larger than its cache's (corrupted)")
        packed = _read_exactly(stream, packed_bytes, "its header")
    crc = _read_exactly(stream, _CRC.size, "its header")
    body = fixed + rest + packed
    if zlib.crc32(body) != _CRC.unpack(crc)[0]:
        raise BitstreamError("KV bitstream header fails its checksum (corrupted)")
    # The CRC only proves the header is what the writer wrote: check it is also consistent.
    if flags != 0 or dtype >= len(DTYPES) or min(layers, heads, dim, group, chunk_tokens) == 0:
        raise BitstreamError("KV bitstream header has invalid fields")
    from kvcompile.codec.quantise import LEVELS

    if level not in LEVELS:
        raise BitstreamError(f"KV bitstream uses codec level {level}, unknown to this kvcompile")
    if (heads * dim) % group or chunks != -(-tokens // chunk_tokens):
        raise BitstreamError("KV bitstream header's group or chunk count contradicts its shape")
    try:
        fingerprint = rest[:name_length].decode()
    except UnicodeDecodeError:
        raise BitstreamError("KV bitstream fingerprint is not UTF-8") from None
    rows = [_ROW.unpack_from(rest, name_length + i * _ROW.size) for i in range(chunks)]
    if any(n > MAX_CHUNK_BYTES for n, _ in rows):
        raise BitstreamError("KV bitstream names a chunk over 2 GiB (corrupted)")
    header = Header(layers, heads, dim, DTYPES[dtype], level, group, tokens, chunk_tokens, fingerprint,
                    [n for n, _ in rows], [crc for _, crc in rows], version)
    if version >= 3:
        inflate = zlib.decompressobj()
        try:
            raw = inflate.decompress(packed, 2 * cells)
        except zlib.error:
            raise BitstreamError("KV bitstream header's tables do not inflate (corrupted)") from None
        if len(raw) != 2 * cells or not inflate.eof or inflate.unused_data or inflate.unconsumed_tail:
            raise BitstreamError("KV bitstream header's tables do not match its shape (corrupted)")
        tables = np.frombuffer(raw, np.uint8).reshape(2, 2, layers, heads * dim)
        header.centres, header.shapes = tables[0], tables[1]
        from kvcompile.codec.chunk import check_tables

        if not check_tables(header, header.centres, header.shapes):
            raise BitstreamError("KV bitstream header names a table outside the codec's bank")
    return header


def check_chunk(header: Header, index: int, data: bytes) -> bytes:
    if not 0 <= index < header.chunks:
        raise BitstreamError(f"KV bitstream has no chunk {index} (it has {header.chunks})")
    if len(data) != header.chunk_bytes[index]:
        raise BitstreamError(f"KV bitstream chunk {index} is truncated")
    if zlib.crc32(data) != header.chunk_crcs[index]:
        raise BitstreamError(f"KV bitstream chunk {index} fails its checksum (corrupted)")
    return data


def iter_chunks(stream, header: Header, check_end: bool = True) -> Iterator[Tuple[int, bytes]]:
    """(index, bytes) of each chunk read from `stream` (positioned after the header), each
    checked against its CRC before it is handed out; with check_end, trailing bytes are an error."""
    for index, size in enumerate(header.chunk_bytes):
        data = stream.read(size)
        yield index, check_chunk(header, index, data if data is not None else b"")
    if check_end and stream.read(1):
        raise BitstreamError("KV bitstream has trailing bytes after its last chunk")


def write(header: Header, chunks: List[bytes]) -> bytes:
    header.chunk_bytes = [len(c) for c in chunks]
    header.chunk_crcs = [zlib.crc32(c) for c in chunks]
    return header.to_bytes() + b"".join(chunks)
