"""generate_fused(token ids, store=): caches fetched when there, recomputed (and stored) when
missing, refused or unreachable, always the same tokens as with caches computed on the spot."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from kvcompile.store import CacheKey, open_store
from redis_server import RedisServer

pytestmark = pytest.mark.slow  # compiling the tiny model and first runs take ~15 s on 2 cores
FUSED = dict(recompute_ratio=0.3, max_new_tokens=6, selector="chunk_head")


@pytest.fixture(scope="module")
def compiled():
    from kvcompile.frontend.tiny_models import tiny_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return kvcompile.compile(tiny_model("llama"))


def documents(seed=0, lengths=(11, 7)):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 250, (n,), generator=generator) for n in lengths]
    return docs, torch.randint(3, 250, (5,), generator=generator)


def on_the_spot(compiled, docs, query):
    return compiled.generate_fused([compiled.precompute_chunk(d) for d in docs], query, **FUSED)


def test_fetch_hits_and_misses(compiled, store_url):
    docs, query = documents()
    expected = on_the_spot(compiled, docs, query)
    store = open_store(store_url)
    assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
    report = compiled.fusion.last_store_report
    assert (report.hits, report.recomputed) == (0, 2)
    assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
    report = compiled.fusion.last_store_report
    assert (report.hits, report.recomputed) == (2, 0) and report.fetched_kv_bytes > 0
    new_doc = torch.randint(3, 250, (9,))
    mixed = [docs[0], compiled.precompute_chunk(docs[1]), new_doc]  # ids, a cache, ids not stored yet
    assert torch.equal(compiled.generate_fused(mixed, query, store=store, **FUSED),
                       on_the_spot(compiled, [docs[0], docs[1], new_doc], query))
    assert (compiled.fusion.last_store_report.hits, compiled.fusion.last_store_report.recomputed) == (1, 1)


def test_corrupt_entry_is_reported_and_recomputed(compiled, tmp_path, caplog):
    docs, query = documents(seed=1)
    expected = on_the_spot(compiled, docs, query)
    store = open_store(f"file://{tmp_path}")
    compiled.generate_fused(docs, query, store=store, **FUSED)
    key = CacheKey.for_tokens(docs[0], compiled.fusion.fingerprint, "full", compiled.spec.dtype)
    path = store.path_for(key.piece(0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
    report = compiled.fusion.last_store_report
    assert (report.hits, report.refused, report.recomputed) == (1, 1, 1)
    assert "is corrupt" in report.problems[0] and "is corrupt" in caplog.text
    compiled.generate_fused(docs, query, store=store, **FUSED)  # the recomputed cache was stored again
    assert compiled.fusion.last_store_report.hits == 2


def test_codec_caches_through_the_store(compiled, tmp_path):
    docs, query = documents(seed=2, lengths=(300, 20))  # 300 tokens: two pieces
    store = open_store(f"file://{tmp_path}")
    compiled.generate_fused(docs, query, store=store, codec_level=0, **FUSED)
    out = compiled.generate_fused(docs, query, store=store, codec_level=0, **FUSED)
    assert compiled.fusion.last_store_report.hits == 2 and out.shape == (1, 6)
    keys = [info.key for info in store.list()]
    assert len(keys) == 3 and all("/c0/" in k for k in keys)


def test_redis_stopped_mid_run_falls_back_then_recovers(compiled, redis_server, tmp_path):
    server = RedisServer(tmp_path / "own").start()
    try:
        docs, query = documents(seed=3)
        expected = on_the_spot(compiled, docs, query)
        store = open_store(server.url)
        assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
        assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
        assert compiled.fusion.last_store_report.hits == 2
        server.stop()
        assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
        report = compiled.fusion.last_store_report
        assert report.hits == 0 and report.recomputed == 2
        assert f"redis store redis://127.0.0.1:{server.port}/0 is unreachable" in report.problems[0]
        server.start()  # empty again: the first call refills it, the second reads it
        assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
        assert torch.equal(compiled.generate_fused(docs, query, store=store, **FUSED), expected)
        assert compiled.fusion.last_store_report.hits == 2
    finally:
        server.stop()


def test_chunks_given_by_key(compiled, tmp_path):
    from kvcompile.store import ChunkUnavailableError

    docs, query = documents(seed=4)
    expected = on_the_spot(compiled, docs, query)
    store = open_store(f"file://{tmp_path}")
    compiled.generate_fused(docs, query, store=store, **FUSED)
    keys = [CacheKey.for_tokens(d, compiled.fusion.fingerprint, "full", compiled.spec.dtype) for d in docs]
    assert torch.equal(compiled.generate_fused([keys[0], str(keys[1])], query, store=store, **FUSED), expected)
    store.delete(keys[1].piece(0))
    with pytest.raises(ChunkUnavailableError, match="chunk 1 .* cannot be recomputed: pass its token ids"):
        compiled.generate_fused(keys, query, store=store, **FUSED)


def test_streaming_loader_reads_from_redis(compiled, redis_url):
    """The codec's streaming loader takes any `get(key) -> bytes | None`: here the Redis store,
    with an integrity key, publishing with the store's `put`."""
    from kvcompile.codec import streaming
    from kvcompile.codec.saved_kv import prompt_kv

    ids = torch.randint(3, 250, (64,), generator=torch.Generator().manual_seed(5))
    kv = prompt_kv(compiled, ids)
    with open_store(redis_url, integrity_key=b"0123456789abcdef-shared") as store:
        streaming.publish(store.put, "ctx", (kv.keys, kv.values), ids, kv.fingerprint, chunk_tokens=32, levels=(2,))
        costs = streaming.Costs.linear(1, 1e12, 1.0)  # decoding costs nothing, recomputing a lot: always fetch
        cache, report = streaming.StreamingLoader(compiled, store, "ctx", deadline_s=60.0, costs=costs,
                                                  levels=(2,)).load()
    assert [c.choice for c in report.chunks] == [2, 2] and cache.length == 64
