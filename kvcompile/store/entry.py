"""One stored value: header (metadata), payload and checksum in a single blob.

Metadata lives inside the value, never under a second key, so a reader sees a header and a
payload that were written together or nothing (LMCache's Redis connector writes bytes and
metadata as two keys; a reader between the two writes mixes them). Layout (docs/STORE.md):

    "KVCS" | version u8 | flags u8 | header length u32 LE | header (JSON) | payload
    | sha256 of everything before (32 bytes) | HMAC-SHA256 of the same bytes (32, if flags & 1)

The sha256 catches flipped or truncated bytes; the HMAC, under a secret the readers share,
catches entries written by someone without it. The header names the key it was written under,
so a valid entry copied to another key (another prompt) is refused too.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from dataclasses import dataclass
from typing import Optional

from kvcompile.store.errors import EntryRefusedError

MAGIC = b"KVCS"
VERSION = 1
FLAG_HMAC = 1
PREFIX = struct.Struct("<4sBBI")  # magic, version, flags, header length
DIGEST_BYTES = 32
# Fields the store writes; a caller's metadata may not shadow them.
STORE_FIELDS = ("key", "created", "expires", "payload_bytes", "checksum")


@dataclass
class Entry:
    key: str
    payload: bytes
    meta: dict  # the caller's metadata plus STORE_FIELDS

    @property
    def created(self) -> float:
        return float(self.meta.get("created", 0.0))

    def expired(self, now: Optional[float] = None) -> bool:
        expires = self.meta.get("expires")
        return expires is not None and (now or time.time()) >= float(expires)


def pack(key: str, payload: bytes, meta: Optional[dict] = None, integrity_key: Optional[bytes] = None,
         ttl: Optional[float] = None) -> bytes:
    meta = dict(meta or {})
    clashes = sorted(set(meta) & set(STORE_FIELDS))
    if clashes:
        raise ValueError(f"metadata fields {clashes} are the store's own")
    now = time.time()
    header = {**meta, "key": key, "created": now, "expires": now + ttl if ttl else None,
              "payload_bytes": len(payload), "checksum": "sha256" + ("+hmac-sha256" if integrity_key else "")}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    flags = FLAG_HMAC if integrity_key else 0
    parts = [PREFIX.pack(MAGIC, VERSION, flags, len(head)), head, bytes(payload)]
    digest = hashlib.sha256()
    mac = hmac.new(integrity_key, digestmod=hashlib.sha256) if integrity_key else None
    for part in parts:
        digest.update(part)
        if mac:
            mac.update(part)
    parts.append(digest.digest())
    if mac:
        parts.append(mac.digest())
    return b"".join(parts)


def read_header(blob: bytes) -> Optional[dict]:
    """The header alone, unchecked (for listings); None if the bytes are not an entry's start."""
    if len(blob) < PREFIX.size:
        return None
    magic, version, _, length = PREFIX.unpack_from(blob)
    if magic != MAGIC or version != VERSION or len(blob) < PREFIX.size + length:
        return None
    try:
        return json.loads(blob[PREFIX.size:PREFIX.size + length])
    except ValueError:
        return None


def header_length(blob: bytes) -> int:
    """Bytes from the start through the header (0 if the prefix is not an entry's)."""
    if len(blob) < PREFIX.size:
        return 0
    magic, _, _, length = PREFIX.unpack_from(blob)
    return PREFIX.size + length if magic == MAGIC else 0


def unpack(blob: bytes, key: str, integrity_key: Optional[bytes] = None) -> Entry:
    """The entry stored under `key`, checked; EntryRefusedError (one line, naming the key) if not."""
    def refuse(why: str):
        raise EntryRefusedError(f"store entry {key} {why}; it is not used", key)

    view = memoryview(blob)
    if len(blob) < PREFIX.size + DIGEST_BYTES:
        refuse(f"is truncated ({len(blob)} bytes)")
    magic, version, flags, length = PREFIX.unpack_from(blob)
    if magic != MAGIC:
        refuse("is not a kvcompile store entry (bad magic)")
    if version != VERSION:
        refuse(f"has format version {version}, this kvcompile reads {VERSION}")
    tag_bytes = DIGEST_BYTES if flags & FLAG_HMAC else 0
    body_end = len(blob) - DIGEST_BYTES - tag_bytes
    if body_end < PREFIX.size + length:
        refuse("is truncated (its header runs past its end)")
    if not hmac.compare_digest(hashlib.sha256(view[:body_end]).digest(), view[body_end:body_end + DIGEST_BYTES]):
        refuse("is corrupt: its sha256 does not match (flipped or truncated bytes)")
    if integrity_key is not None:
        if not flags & FLAG_HMAC:
            refuse("carries no HMAC and this store requires one (written without the integrity key)")
        expected = hmac.new(integrity_key, view[:body_end], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, view[body_end + DIGEST_BYTES:]):
            refuse("fails its HMAC: written under another integrity key")
    try:
        meta = json.loads(view[PREFIX.size:PREFIX.size + length].tobytes())
    except ValueError:
        refuse("has a header that is not JSON")
    if meta.get("key") != key:
        refuse(f"was written under another key ({meta.get('key')})")
    payload = view[PREFIX.size + length:body_end].tobytes()
    if len(payload) != meta.get("payload_bytes"):
        refuse(f"holds {len(payload)} payload bytes, its header says {meta.get('payload_bytes')}")
    return Entry(key, payload, meta)
