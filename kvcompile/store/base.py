"""What every backend offers; backends implement the blob-level methods only.

    store.put(key, value, meta)   value: bytes (a codec bitstream or safetensors bytes)
    store.get(key)                -> bytes | None   (None: absent or expired)
    store.get_many(keys)          -> [bytes | None] (one round trip where the backend allows)
    store.get_entry(key)          -> Entry | None   (payload + metadata)

An entry that is there but fails its checks raises EntryRefusedError (or, in the *_many calls,
goes to `on_refused(key, error)` and reads as None), so corrupt or planted KV is never used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

from kvcompile.store.entry import Entry, pack, unpack
from kvcompile.store.errors import EntryRefusedError, EntryTooLargeError
from kvcompile.store.keys import check_key

OnRefused = Optional[Callable[[str, EntryRefusedError], None]]


@dataclass
class EntryInfo:
    """One line of a listing: from the backend's index and the entry's header (unchecked)."""
    key: str
    bytes: int
    last_used: float
    meta: dict


class KVStore:
    """Base of the backends. `budget_bytes`: the size budget (None: unbounded), evicted least
    recently used first; `ttl`: seconds an entry lives (None: until evicted)."""

    scheme = ""

    def __init__(self, url: str, integrity_key: Optional[bytes] = None, budget_bytes: Optional[int] = None,
                 ttl: Optional[float] = None):
        self.url = url
        self.integrity_key = integrity_key
        self.budget_bytes = budget_bytes
        self.ttl = ttl

    # the backend's part -------------------------------------------------------------------
    def _read_blobs(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        raise NotImplementedError

    def _write_blob(self, key: str, blob: bytes, ttl: Optional[float]) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> List[EntryInfo]:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def gc(self, verify: bool = False) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # shared -------------------------------------------------------------------------------
    def put(self, key: str, value: bytes, meta: Optional[dict] = None, ttl: Optional[float] = None) -> None:
        check_key(key)
        blob = pack(key, value, meta, self.integrity_key, ttl if ttl is not None else self.ttl)
        if self.budget_bytes is not None and len(blob) > self.budget_bytes:
            raise EntryTooLargeError(f"entry {key} takes {len(blob)} bytes, more than the store's whole budget of "
                                     f"{self.budget_bytes}")
        self._write_blob(key, blob, ttl if ttl is not None else self.ttl)

    def get_entries(self, keys: Iterable[str], on_refused: OnRefused = None) -> List[Optional[Entry]]:
        keys = [check_key(k) for k in keys]
        if not keys:
            return []
        now, entries = time.time(), []
        for key, blob in zip(keys, self._read_blobs(keys)):
            entry = None
            if blob is not None:
                try:
                    entry = unpack(blob, key, self.integrity_key)
                except EntryRefusedError as error:
                    if on_refused is None:
                        raise
                    on_refused(key, error)
                if entry is not None and entry.expired(now):
                    entry = None
            entries.append(entry)
        return entries

    def get_entry(self, key: str) -> Optional[Entry]:
        return self.get_entries([key])[0]

    def get_many(self, keys: Iterable[str], on_refused: OnRefused = None) -> List[Optional[bytes]]:
        return [e.payload if e is not None else None for e in self.get_entries(keys, on_refused)]

    def get(self, key: str) -> Optional[bytes]:
        entry = self.get_entry(key)
        return entry.payload if entry is not None else None

    def __contains__(self, key: str) -> bool:
        return self.get_entry(key) is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _verify(self, key: str, blob: Optional[bytes]) -> Optional[str]:
        """Why `blob` would be refused under `key` (None if it would not); for gc --verify."""
        if blob is None:
            return None
        try:
            unpack(blob, key, self.integrity_key)
        except EntryRefusedError as error:
            return str(error)
        return None


def normalise_integrity_key(secret) -> Optional[bytes]:
    if secret is None:
        return None
    secret = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(secret) < 16:
        from kvcompile.store.errors import StoreURLError

        raise StoreURLError(f"the integrity key has {len(secret)} bytes; use at least 16 (e.g. 32 random bytes)")
    return secret
