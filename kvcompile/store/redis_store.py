"""The shared backend: a Redis server (`redis://` or `rediss://` for TLS), standard `redis` client.

One Redis string per entry, metadata inside (entry.py): a reader gets a whole entry or none.
Beside the entries, under the same prefix, the store keeps its own index for LRU eviction:

    <prefix><key>        the entry (with PX when it has a TTL)
    <prefix>~lru         sorted set: key -> last use (unix seconds)
    <prefix>~size        hash: key -> bytes, and "~total" -> the sum

Writes, deletes and evictions run as Lua scripts, which Redis executes atomically, so the index
never disagrees with the entries however many clients write at once. Reads are one pipelined
round trip: MGET of every key plus ZADD XX of their last use. Entries that expire (TTL) or that
the server evicts itself (maxmemory-policy allkeys-lru) read as misses; their index rows go at
the next eviction or `gc`. Connection errors become StoreUnavailableError: the caller recomputes,
and the connection pool reconnects by itself once the server is back.
A single server (or one behind Sentinel's address) is supported; Redis Cluster is not (eviction
touches keys the script is not handed).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import List, Optional, Sequence
from urllib.parse import urlsplit

from kvcompile.store.base import EntryInfo, KVStore
from kvcompile.store.entry import header_length, read_header
from kvcompile.store.errors import StoreUnavailableError, StoreURLError

DEFAULT_PREFIX = "kvcompile:"
DEFAULT_CONNECTIONS = 16
HEADER_PROBE = 16384
TOTAL_FIELD = "~total"

# KEYS: entry, lru, size. ARGV: value, now, ttl ms (0: none), budget (0: none), the entry's name
# in the index, the prefix. Returns the number of entries evicted (never the one just written).
PUT_SCRIPT = """
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[5]) or '0')
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
local size = string.len(ARGV[1])
redis.call('HSET', KEYS[3], ARGV[5], size)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
local total = redis.call('HINCRBY', KEYS[3], '~total', size - old)
local budget = tonumber(ARGV[4])
local evicted = 0
while budget > 0 and total > budget do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 1)
  local victim = oldest[1]
  if victim == ARGV[5] then victim = oldest[2] end
  if not victim then break end
  local victim_size = tonumber(redis.call('HGET', KEYS[3], victim) or '0')
  redis.call('DEL', ARGV[6] .. victim)
  redis.call('ZREM', KEYS[2], victim)
  redis.call('HDEL', KEYS[3], victim)
  total = redis.call('HINCRBY', KEYS[3], '~total', -victim_size)
  evicted = evicted + 1
end
return evicted
"""

# KEYS: entry, lru, size. ARGV: the entry's name in the index. Returns 1 if the entry was there.
DELETE_SCRIPT = """
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[3], '~total', -size) end
return existed
"""


def _redis():
    try:
        import redis
    except ImportError:
        raise StoreURLError("a redis:// store needs the `redis` package: pip install redis") from None
    return redis


class RedisStore(KVStore):
    scheme = "redis"

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, max_connections: int = DEFAULT_CONNECTIONS,
                 connect_timeout: float = 2.0, timeout: float = 10.0, **options):
        redis = _redis()
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"
        super().__init__(shown, **options)  # no password in what is printed
        self.prefix = prefix
        self.lru_key, self.size_key = prefix + "~lru", prefix + "~size"
        try:
            # One quick retry: a pooled connection the server dropped (a restart) reconnects at once;
            # a server that is down fails within connect_timeout and the caller recomputes.
            self.pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout, socket_connect_timeout=connect_timeout,
                socket_timeout=timeout, retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
                health_check_interval=30)
        except ValueError as error:
            raise StoreURLError(f"bad redis store URL {shown}: {error}") from None
        self.client = redis.Redis(connection_pool=self.pool)
        self._put = self.client.register_script(PUT_SCRIPT)
        self._delete = self.client.register_script(DELETE_SCRIPT)

    @contextmanager
    def _talking(self, what: str):
        """Redis' own exceptions -> the store's, one line naming the server."""
        redis = _redis()
        try:
            yield
        except redis.exceptions.AuthenticationError as error:
            raise StoreUnavailableError(f"redis store {self.url} refused the credentials ({error}): check the user "
                                        "and password in the URL") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise StoreUnavailableError(f"redis store {self.url} is unreachable while {what} ({first})") from None
        except redis.exceptions.NoPermissionError as error:  # an ACL that forbids these keys or commands
            raise StoreUnavailableError(f"redis store {self.url} refused {what}: {error}") from None
        except redis.exceptions.ResponseError as error:
            if "NOPERM" in str(error) or "NOAUTH" in str(error):
                raise StoreUnavailableError(f"redis store {self.url} refused {what}: {error}") from None
            raise StoreUnavailableError(f"redis store {self.url} failed while {what}: {error}") from None

    # blobs --------------------------------------------------------------------------------
    def _write_blob(self, key: str, blob: bytes, ttl: Optional[float]) -> None:
        ttl_ms = int(ttl * 1000) if ttl else 0
        with self._talking(f"writing {key}"):
            self._put(keys=[self.prefix + key, self.lru_key, self.size_key],
                      args=[blob, time.time(), ttl_ms, self.budget_bytes or 0, key, self.prefix])

    def _read_blobs(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        with self._talking(f"reading {len(keys)} entr{'y' if len(keys) == 1 else 'ies'}"):
            pipe = self.client.pipeline(transaction=False)
            pipe.mget([self.prefix + k for k in keys])
            pipe.zadd(self.lru_key, {k: time.time() for k in keys}, xx=True)  # last use, only if indexed
            blobs, _ = pipe.execute()
        return blobs

    def delete(self, key: str) -> bool:
        with self._talking(f"deleting {key}"):
            return bool(self._delete(keys=[self.prefix + key, self.lru_key, self.size_key], args=[key]))

    # listing and maintenance --------------------------------------------------------------
    def _index(self) -> list:
        with self._talking("reading the index"):
            ranked = self.client.zrange(self.lru_key, 0, -1, withscores=True)
            sizes = self.client.hmget(self.size_key, [k for k, _ in ranked]) if ranked else []
        return [(k.decode(), int(s or 0), float(t)) for (k, t), s in zip(ranked, sizes)]

    def _headers(self, keys: Sequence[str]) -> List[Optional[dict]]:
        with self._talking("reading headers"):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(self.prefix + key, 0, HEADER_PROBE - 1)
            starts = pipe.execute() if keys else []
            headers = []
            for key, start in zip(keys, starts):
                need = header_length(start)
                if need > len(start):
                    start = self.client.getrange(self.prefix + key, 0, need - 1)
                headers.append(read_header(start) if start else None)
        return headers

    def list(self, prefix: str = "") -> List[EntryInfo]:
        index = [row for row in self._index() if row[0].startswith(prefix)]
        headers = self._headers([k for k, _, _ in index])
        return sorted((EntryInfo(k, size, used, header) for (k, size, used), header in zip(index, headers)
                       if header is not None), key=lambda info: info.key)

    def stats(self) -> dict:
        index = self._index()
        with self._talking("reading stats"):
            total = self._total()
            memory = self.client.info("memory")
        return {"backend": "redis", "url": self.url, "entries": len(index), "bytes": total,
                "budget_bytes": self.budget_bytes, "server_used_memory": memory.get("used_memory"),
                "server_maxmemory": memory.get("maxmemory"),
                "server_maxmemory_policy": memory.get("maxmemory_policy"),
                "least_recent_use": min((t for _, _, t in index), default=None),
                "most_recent_use": max((t for _, _, t in index), default=None)}

    def gc(self, verify: bool = False) -> dict:
        """Drop index rows of entries that expired or the server evicted (and with `verify`,
        entries that fail their checks), then evict to the budget."""
        removed = {"expired": 0, "refused": 0, "evicted": 0}
        keys = [k for k, _, _ in self._index()]
        with self._talking("collecting garbage"):
            for start in range(0, len(keys), 256):
                batch = keys[start:start + 256]
                blobs = (self.client.mget([self.prefix + k for k in batch]) if verify else
                         [b"" if present else None for present in self._exist(batch)])
                for key, blob in zip(batch, blobs):
                    if blob is None:
                        removed["expired"] += self._forget(key)
                    elif verify and self._verify(key, blob):
                        self._delete(keys=[self.prefix + key, self.lru_key, self.size_key], args=[key])
                        removed["refused"] += 1
            removed["evicted"] = self._evict_to_budget()
        return removed

    def _exist(self, keys: Sequence[str]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.prefix + key)
        return pipe.execute()

    def _forget(self, key: str) -> int:
        self._delete(keys=[self.prefix + key, self.lru_key, self.size_key], args=[key])
        return 1

    def _evict_to_budget(self) -> int:
        evicted = 0
        while self.budget_bytes is not None and self._total() > self.budget_bytes:
            oldest = self.client.zrange(self.lru_key, 0, 0)
            if not oldest:
                break
            self._forget(oldest[0].decode())
            evicted += 1
        return evicted

    def _total(self) -> int:
        return int(self.client.hget(self.size_key, TOTAL_FIELD) or 0)

    def close(self) -> None:
        self.pool.disconnect()
