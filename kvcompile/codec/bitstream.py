"""The KV bitstream (format 2): a versioned, checksummed container of independently decodable chunks.

docs/CODEC.md has the byte table. All integers little-endian, no pickle, no JSON:

  header  magic "KVCB", version u16, fixed fields (shape, dtype, level, tokens, chunking,
          fingerprint), then one (bytes u32, crc32 u32) row per chunk, then the CRC-32 of all
          of it. Everything a decoder needs to size its output is here.
  chunks  back to back, chunk i is `bytes_i` long and checked against `crc32_i` on its own.

`read_header(stream)` reads exactly the header from a file-like object (or bytes), so chunks can
then be read one at a time as they arrive (`iter_chunks`). Any inconsistency raises BitstreamError.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Tuple

from kvcompile.errors import InputError

MAGIC = b"KVCB"
FORMAT_VERSION = 2
DTYPES = ("float32", "float16", "bfloat16")  # dtype code = index
# magic, version, flags, layers, kv_heads, head_dim, dtype, level, group, tokens, chunk_tokens,
# chunks, fingerprint length
_FIXED = struct.Struct("<4sHHHHHBBHIIIH")
_ROW = struct.Struct("<II")
_CRC = struct.Struct("<I")
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
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, self.layers, self.kv_heads, self.head_dim,
                            DTYPES.index(self.dtype), self.level, self.group, self.tokens,
                            self.chunk_tokens, self.chunks, len(name))
        rows = b"".join(_ROW.pack(n, crc) for n, crc in zip(self.chunk_bytes, self.chunk_crcs))
        body = fixed + name + rows
        return body + _CRC.pack(zlib.crc32(body))


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
    if version != FORMAT_VERSION:
        raise BitstreamError(f"KV bitstream version {version} is not supported (this kvcompile reads {FORMAT_VERSION})")
    rest = _read_exactly(stream, name_length + chunks * _ROW.size + _CRC.size, "its header")
    body = fixed + rest[:-_CRC.size]
    if zlib.crc32(body) != _CRC.unpack(rest[-_CRC.size:])[0]:
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
    return Header(layers, heads, dim, DTYPES[dtype], level, group, tokens, chunk_tokens, fingerprint,
                  [n for n, _ in rows], [crc for _, crc in rows])


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
