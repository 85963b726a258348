"""KV store: chunk caches and KV bitstreams kept by content, embedded by default, Redis when shared.

    store = kvcompile.store.open_store("file://~/.cache/kvcompile/store?max_bytes=20G")
    store = kvcompile.store.open_store("rediss://user:secret@cache:6380/0?ttl=1d", integrity_key=key)
    store.put(key, value, meta); store.get(key) -> bytes | None; store.get_many(keys)
    cache_key = put_chunk_cache(store, chunk, codec_level=2); chunk = get_chunk_cache(store, cache_key)

keys.py        entry keys (model fingerprint, token-ids hash, cache kind, codec level, piece index)
entry.py       one value = header (metadata) + payload + sha256 (+ HMAC under an integrity key)
base.py        the interface every backend offers, checks on read
local.py       file:// — a directory, atomic renames, flock, LRU eviction to a size budget
redis_store.py redis:// and rediss:// — one value per entry, Lua for atomic index updates
chunks.py      ChunkCache <-> entries (raw safetensors or codec bitstreams, piece by piece)
fusion.py      what generate_fused(..., store=) runs: fetch what is there, recompute the rest
docs/STORE.md has the format, the URL options and the measurements.
"""
from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvcompile.store.base import EntryInfo, KVStore, normalise_integrity_key
from kvcompile.store.entry import Entry  # noqa: F401
from kvcompile.store.errors import (ChunkUnavailableError, EntryRefusedError, EntryTooLargeError,  # noqa: F401
                                    StoreError, StoreUnavailableError, StoreURLError)
from kvcompile.store.keys import PIECE_TOKENS, CacheKey, records_digest, tokens_hash  # noqa: F401

DEFAULT_URL = "file://~/.cache/kvcompile/store"
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_amount(text: str, units: dict, what: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]?)i?[bB]?\s*", str(text))
    if not match or match.group(2).lower() not in units or float(match.group(1)) <= 0:
        raise StoreURLError(f"{what} {text!r} is not a positive amount (e.g. {'20G' if 'g' in units else '1h'})")
    return float(match.group(1)) * units[match.group(2).lower()]


def open_store(url: Optional[str] = None, integrity_key=None, **options) -> KVStore:
    """A store for `url`: `file://PATH` (the default, PATH may start with ~) or a plain path,
    `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS). Query options, or keyword
    arguments: `max_bytes` (size budget, e.g. 20G; LRU eviction), `ttl` (seconds or 30m, 1h, 7d),
    and for Redis `prefix` and any option of redis-py's URLs (ssl_ca_certs, socket_timeout, ...).
    `integrity_key` (at least 16 bytes): entries are HMAC'd with it, and entries without a valid
    HMAC are refused."""
    url = url or DEFAULT_URL
    parts = urlsplit(url) if "://" in url else None
    query = dict(parse_qsl(parts.query)) if parts else {}
    query.update({k: str(v) for k, v in options.items()})
    common = {"integrity_key": normalise_integrity_key(integrity_key)}
    if "max_bytes" in query:
        common["budget_bytes"] = int(parse_amount(query.pop("max_bytes"), SIZE_UNITS, "max_bytes"))
    if "ttl" in query:
        common["ttl"] = parse_amount(query.pop("ttl"), TIME_UNITS, "ttl")
    scheme = parts.scheme if parts else "file"
    if scheme == "file":
        if query:
            raise StoreURLError(f"unknown file store option(s) {', '.join(sorted(query))}; known: max_bytes, ttl")
        path = url.split("://", 1)[1].split("?", 1)[0] if parts else url
        if not path:
            raise StoreURLError(f"store URL {url!r} names no folder (file:///absolute/path or file://~/path)")
        from kvcompile.store.local import LocalStore

        return LocalStore(path, **common)
    if scheme in ("redis", "rediss"):
        from kvcompile.store.redis_store import RedisStore

        prefix = query.pop("prefix", None)
        rest = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        return RedisStore(rest, **({"prefix": prefix} if prefix else {}), **common)
    raise StoreURLError(f"unknown store URL scheme {scheme!r} in {url!r}; use file://PATH, redis:// or rediss://")


__all__ = ["open_store", "KVStore", "EntryInfo", "CacheKey", "put_chunk_cache", "get_chunk_cache",
           "StoreError", "StoreUnavailableError", "EntryRefusedError", "StoreURLError", "DEFAULT_URL"]


def __getattr__(name):
    # The chunk-cache helpers need torch; loading them lazily keeps `kvcompile --help` (which
    # builds the store parser from this package) free of it.
    if name in ("get_chunk_cache", "put_chunk_cache"):
        from kvcompile.store import chunks
        return getattr(chunks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
