"""Both backends: KV round trips (raw bit-exact, codec symbol-exact), checks on read (flipped
bytes, missing or foreign HMAC, entries moved to another key), TTL, LRU eviction, listing, gc."""
from __future__ import annotations

import time

import pytest
import torch

from kvcompile.fusion.chunks import ChunkCache
from kvcompile.store import (CacheKey, EntryRefusedError, EntryTooLargeError, get_chunk_cache, open_store,
                             put_chunk_cache)
from kvcompile.store.entry import pack

SECRET = b"0123456789abcdef-shared-secret"


def chunk_cache(tokens=300, layers=3, heads=2, dim=8, dtype=torch.bfloat16, seed=0) -> ChunkCache:
    generator = torch.Generator().manual_seed(seed)
    kv = [torch.randn(1, heads, tokens, dim, generator=generator).to(dtype) for _ in range(2 * layers)]
    ids = torch.randint(0, 1000, (tokens,), generator=generator)
    return ChunkCache(ids, kv[:layers], kv[layers:], "f00dfeedf00dfeed", str(dtype).removeprefix("torch."), "full")


def tamper(store, key: str, position: int) -> None:
    """Flip one byte of the stored entry, behind the store's back."""
    if store.scheme == "file":
        path = store.path_for(key)
        data = bytearray(path.read_bytes())
        data[position] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        raw = store.client.get(store.prefix + key)
        store.client.setrange(store.prefix + key, position, bytes([raw[position] ^ 0x01]))


def plant(store, key: str, blob: bytes) -> None:
    """Write a blob as someone with access to the backend but not the store's integrity key."""
    if store.scheme == "file":
        path = store.path_for(key)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)
    else:
        store.client.set(store.prefix + key, blob)


def test_raw_round_trip_is_bit_exact(store_url):
    chunk = chunk_cache(tokens=600)  # three pieces: 256 + 256 + 88
    with open_store(store_url) as store:
        key = put_chunk_cache(store, chunk)
        assert key.pieces == 3 and all(store.get(k) is not None for k in key.piece_keys())
        back = get_chunk_cache(store, str(key))
    assert torch.equal(back.token_ids, chunk.token_ids) and back.dtype == "bfloat16"
    for a, b in zip(chunk.keys + chunk.values, back.keys + back.values):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_codec_round_trip_is_symbol_exact(store_url):
    from kvcompile import codec

    chunk = chunk_cache(tokens=300, dtype=torch.float16)
    with open_store(store_url) as store:
        key = put_chunk_cache(store, chunk, codec_level=2)
        expected = codec.encode((torch.cat([k[:, :, :256] for k in chunk.keys]),
                                 torch.cat([v[:, :, :256] for v in chunk.values])), level=2, chunk_tokens=256,
                                fingerprint=chunk.fingerprint)
        assert store.get(key.piece(0)) == expected  # the very bitstream, byte for byte
        back = get_chunk_cache(store, key)
    want_keys, want_values = codec.decode(expected)
    assert torch.equal(torch.cat(back.keys)[:, :, :256], want_keys)
    assert torch.equal(torch.cat(back.values)[:, :, :256], want_values)


def test_get_many_is_one_call_with_misses_as_none(store_url):
    with open_store(store_url) as store:
        store.put("a/1", b"one", {"n": 1})
        store.put("a/2", b"two" * 1000)
        assert store.get_many(["a/1", "nothing", "a/2"]) == [b"one", None, b"two" * 1000]
        assert store.get_entry("a/1").meta["n"] == 1 and store.get("nothing") is None
        assert store.delete("a/1") and not store.delete("a/1") and store.get("a/1") is None


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_flipped_byte_is_detected_and_reported(store_url, where):
    with open_store(store_url) as store:
        store.put("k/flip", bytes(range(256)) * 64, {"what": "kv"})
        size = len(store._read_blobs(["k/flip"])[0])
        tamper(store, "k/flip", {"header": 20, "payload": size // 2, "checksum": size - 5}[where])
        with pytest.raises(EntryRefusedError, match="k/flip is corrupt: its sha256 does not match") as error:
            store.get("k/flip")
        assert error.value.key == "k/flip" and "\n" not in str(error.value)
        seen = []
        assert store.get_many(["k/flip"], on_refused=lambda key, e: seen.append(key)) == [None] and seen == ["k/flip"]
        assert store.gc(verify=True)["refused"] == 1 and store.get("k/flip") is None


def test_integrity_key_refuses_entries_written_without_it(store_url):
    with open_store(store_url, integrity_key=SECRET) as store:
        plant(store, "k/planted", pack("k/planted", b"evil kv", {}))  # valid sha256, no HMAC
        with pytest.raises(EntryRefusedError, match="carries no HMAC"):
            store.get("k/planted")
        plant(store, "k/forged", pack("k/forged", b"evil kv", {}, integrity_key=b"another-secret-of-16+"))
        with pytest.raises(EntryRefusedError, match="fails its HMAC"):
            store.get("k/forged")
        store.put("k/good", b"kv", {})
        assert store.get("k/good") == b"kv"
        # a genuine entry copied under another key (another prompt) is refused too
        plant(store, "k/moved", store._read_blobs(["k/good"])[0])
        with pytest.raises(EntryRefusedError, match="written under another key"):
            store.get("k/moved")
    with open_store(store_url) as reader_without_key:  # may still read (sha256 checked)
        assert reader_without_key.get("k/good") == b"kv"


def test_ttl_expires_entries(store_url):
    with open_store(store_url) as store:
        store.put("t/short", b"x", ttl=0.3)
        store.put("t/long", b"y")
        assert store.get("t/short") == b"x"
        time.sleep(0.5)
        assert store.get("t/short") is None and store.get("t/long") == b"y"
        store.gc()
        assert [info.key for info in store.list("t/")] == ["t/long"]


def test_budget_evicts_least_recently_used(store_url):
    value = b"v" * 10_000
    with open_store(store_url + "?max_bytes=35000") as store:  # three entries fit (header + checksum)
        for name in "abc":
            store.put(f"lru/{name}", value)
            time.sleep(0.02)
        assert store.get("lru/a") == value  # a is now the most recently used; b the least
        time.sleep(0.02)
        store.put("lru/d", value)
        assert store.get("lru/b") is None
        assert all(store.get(f"lru/{n}") == value for n in "acd")
        assert store.stats()["bytes"] <= 35000
        with pytest.raises(EntryTooLargeError, match="more than the store's whole budget"):
            store.put("lru/huge", b"x" * 40_000)


def test_list_stats_and_keys(store_url):
    chunk = chunk_cache(tokens=10)
    with open_store(store_url) as store:
        key = put_chunk_cache(store, chunk, records_digest="abc")
        infos = store.list("kvc1/")
        assert [i.key for i in infos] == [key.piece(0)]
        meta = infos[0].meta
        assert meta["shape"] == [3, 2, 10, 8] and meta["dtype"] == "bfloat16" and meta["positions"] == [0, 10]
        assert meta["records_digest"] == "abc" and meta["checksum"] == "sha256" and meta["created"] <= time.time()
        assert infos[0].last_used > 0 and store.stats()["entries"] == 1
    assert CacheKey.parse(key.piece(0)) == (key, 0) and CacheKey.parse(str(key)) == (key, None)


def test_pieces_that_disagree_with_their_key_are_refused(store_url):
    chunk = chunk_cache(tokens=20)
    with open_store(store_url) as store:
        key = put_chunk_cache(store, chunk)
        other = CacheKey(key.fingerprint, key.tokens_hash, key.tokens, "kcache", key.dtype)
        entry = store.get_entry(key.piece(0))
        from kvcompile.store.entry import STORE_FIELDS

        store.put(other.piece(0), entry.payload, {k: v for k, v in entry.meta.items() if k not in STORE_FIELDS})
        with pytest.raises(EntryRefusedError, match="does not match its key \\(cache_kind differ"):
            get_chunk_cache(store, other)


def test_redis_pool_is_shared_by_threads(redis_url):
    from concurrent.futures import ThreadPoolExecutor

    with open_store(redis_url + "?max_connections=4") as store:
        def work(i):
            store.put(f"pool/{i % 5}", bytes([i]) * 50_000, {"i": i})
            entry = store.get_entry(f"pool/{i % 5}")
            return entry.payload == bytes([entry.meta["i"]]) * 50_000
        with ThreadPoolExecutor(16) as threads:
            assert all(threads.map(work, range(200)))
        assert 1 <= len(store.pool._connections) <= 4  # the pool made at most 4, the threads waited their turn
