"""KV fusion on CUDA: chunk caches in pinned host memory load layer by layer on a side stream
(kvcompile/fusion/loading.py) while the graphs wait per layer; the results equal the CPU's."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from family_checks import build, fusion_limit_errors
from kvcompile.fusion import ChunkCache

pytestmark = pytest.mark.gpu
TOLERANCE = 1e-3  # fp32 on both, different kernels


def documents(seed=0, lengths=(37, 29, 41), query=6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=generator) for n in lengths], \
        torch.randint(3, 250, (query,), generator=generator)


def pinned(chunk: ChunkCache) -> ChunkCache:
    chunk.keys = [k.cpu().pin_memory() for k in chunk.keys]
    chunk.values = [v.cpu().pin_memory() for v in chunk.values]
    return chunk


@pytest.mark.parametrize("family", ("llama", "qwen2", "cohere2"))  # plain; sliding + full; sliding + NoPE
def test_overlapped_loading_gives_full_prefill_and_full_reuse(family):
    compiled = kvcompile.compile(build(family).cuda())
    docs, query = documents()
    chunks = [pinned(compiled.precompute_chunk(d)) for d in docs]
    assert chunks[0].keys[0].is_pinned()
    to_prefill, to_reuse = fusion_limit_errors(compiled, docs, query, chunks, capacity=256)
    assert to_prefill <= TOLERANCE and to_reuse <= TOLERANCE


def test_partial_recompute_on_cuda_equals_the_cpu_for_the_same_rows(monkeypatch):
    model = build("llama")
    on_cpu = kvcompile.compile(model)
    docs, query = documents(seed=1)
    rows = torch.tensor([40, 41, 42, 43, 70, 71, 90, 91, 92, 100])
    monkeypatch.setattr(type(on_cpu.fusion), "select", lambda self, *args, **kwargs: rows)
    expected = on_cpu.fusion.prefill(on_cpu.new_cache(1, 256), [on_cpu.precompute_chunk(d) for d in docs], query, 0.1)
    on_cuda = kvcompile.compile(build("llama").cuda())
    chunks = [pinned(on_cuda.precompute_chunk(d)) for d in docs]
    got = on_cuda.fusion.prefill(on_cuda.new_cache(1, 256), chunks, query, 0.1)
    assert (got.cpu() - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("selector", ("query_spans", "deviation", "chunk_head", "query_attention"))
def test_every_selector_runs_on_cuda_and_decodes(selector):
    compiled = kvcompile.compile(build("llama").cuda())
    docs, query = documents(seed=2)
    chunks = [pinned(compiled.precompute_chunk(d)) for d in docs]
    out = compiled.generate_fused(chunks, query, 0.2, 8, selector=selector)
    assert out.shape == (1, 8) and out.is_cuda


@pytest.mark.parametrize("kind", ("full", "kcache"))
def test_fused_cache_continues_into_decoding(kind):
    config = kvcompile.CacheConfig(kind="kcache", topn=10**6) if kind == "kcache" else kvcompile.CacheConfig()
    compiled = kvcompile.compile(build("qwen2").cuda(), config)
    docs, query = documents(seed=3)
    chunks = [pinned(compiled.precompute_chunk(d)) for d in docs]
    full = torch.cat(docs + [query])[None].cuda()
    expected = compiled.generate(full, max_new_tokens=12)[:, full.shape[1]:]
    assert torch.equal(compiled.generate_fused(chunks, query, 1.0, 12), expected)


def test_prefill_takes_the_causal_kernel_and_agrees_in_bf16():
    compiled = kvcompile.compile(build("llama").cuda().to(torch.bfloat16))
    ids = torch.randint(3, 250, (1, 300)).cuda()
    logits, _ = compiled.prefill(ids)
    assert any(key[0] == (True,) for key in compiled._variants)
    spec = compiled.spec
    from kvcompile.runtime.masks import step_biases

    positions = torch.arange(300, device="cuda")[None]
    empty = torch.zeros(1, 0, dtype=torch.long, device="cuda")
    biases = step_biases(spec, empty.bool(), empty, torch.ones_like(ids, dtype=torch.bool), positions, torch.bfloat16)
    past = torch.zeros(1, spec.kv_heads, 0, spec.head_dim, dtype=torch.bfloat16, device="cuda")
    reference = compiled.graph_module(ids, positions, *biases, *[past] * (2 * spec.num_layers))[0]
    assert (logits.float() - reference.float()).abs().max().item() <= 2e-2 * max(1.0, reference.abs().max().item())


def test_compressed_chunk_cache_decodes_on_the_gpu(tmp_path):
    compiled = kvcompile.compile(build("llama").cuda())
    docs, query = documents(seed=4, lengths=(40, 30))
    chunks = [compiled.precompute_chunk(d) for d in docs]
    path = chunks[1].save(tmp_path / "chunk.safetensors", codec_level=1)
    on_gpu, on_cpu = ChunkCache.load(path, device="cuda"), ChunkCache.load(path)
    assert on_gpu.keys[0].is_cuda
    for a, b in zip(on_gpu.keys + on_gpu.values, on_cpu.keys + on_cpu.values):
        assert (a.cpu() - b).abs().max().item() <= 1e-5
    out = compiled.generate_fused([chunks[0], on_gpu], query, 0.2, 6)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("selector", ("query_spans", "deviation"))
def test_replayed_cuda_graphs_give_the_eager_results(selector):
    """The probe / check / recompute graphs replayed from CUDA graphs (fusion/graph_replay.py)
    equal the eager run, call after call, with the cache allocated anew each time."""
    compiled = kvcompile.compile(build("llama").cuda())
    docs, query = documents(seed=3)
    chunks = [pinned(compiled.precompute_chunk(d)) for d in docs]
    fusion = compiled.fusion
    fusion.replays.enabled = False
    eager_cache = compiled.new_cache(1, 256)
    eager = fusion.prefill(eager_cache, chunks, query, 0.2, selector)
    fusion.replays.enabled = True
    cache = compiled.new_cache(1, 256)
    storage = [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.keys, cache.values)]
    for _ in range(3):  # first sight eager, then capture + replay, then replay
        # the same cache storage each time (what a freed and re-allocated cache usually gets;
        # the graphs read the cache in place, so its address is part of their signature)
        cache.length = 0
        got = fusion.prefill(cache, chunks, query, 0.2, selector)
        assert [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.keys, cache.values)] == storage
        assert (got - eager).abs().max().item() <= TOLERANCE
        for layer in range(len(cache.keys)):
            assert torch.allclose(cache.keys[layer][:, :, :cache.length], eager_cache.keys[layer][:, :, :cache.length],
                                  atol=TOLERANCE)
    assert fusion.replays.replayed >= 2


def _hold_back_loads(fusion, cache):
    """Poison the cache with NaN and queue ~50 ms of nothing ahead of the next loads: a graph
    that reads a layer before its load finished reads NaN."""
    channel = fusion.load_channel(cache.device)
    cache.length = 0
    for keys, values in zip(cache.keys, cache.values):
        keys.fill_(float("nan"))
        values.fill_(float("nan"))
    channel.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(channel.stream):
        torch.cuda._sleep(100_000_000)


def test_replayed_recompute_waits_for_each_layers_load(monkeypatch):
    """The replayed recompute waits on the loads of the call it replays in, layer by layer
    (external events captured as wait nodes, fusion/loading.py LoadChannel): with the loads held
    back and the cache poisoned before every call, each call equals the eager result for its own
    chunks, alternating two chunk sets at one cache address (fixed rows: no selector in play)."""
    compiled = kvcompile.compile(build("llama").cuda())
    fusion = compiled.fusion
    assert fusion.load_channel(torch.device("cuda")).events is not None, "no external CUDA events in this torch"
    rows = torch.tensor([40, 41, 42, 43, 70, 71, 90, 91, 92, 100])
    monkeypatch.setattr(type(fusion), "select", lambda self, *args, **kwargs: rows)
    docs_a, query = documents(seed=4)
    docs_b, _ = documents(seed=5)
    sets = {name: [pinned(compiled.precompute_chunk(d)) for d in docs] for name, docs in (("a", docs_a), ("b", docs_b))}
    fusion.replays.enabled = False
    eager = {name: fusion.prefill(compiled.new_cache(1, 256), chunks, query, 0.1) for name, chunks in sets.items()}
    fusion.replays.enabled = True
    cache = compiled.new_cache(1, 256)
    for name in ("a", "a", "b", "a", "b", "b"):
        _hold_back_loads(fusion, cache)
        got = fusion.prefill(cache, sets[name], query, 0.1)
        assert (got - eager[name]).abs().max().item() <= TOLERANCE, name
    assert fusion.replays.replayed >= 4


def test_replayed_probe_reads_only_loaded_layers(monkeypatch):
    """The question's probe (replayed after its first sight) ranks chunk tokens from keys that
    were loaded: with the loads held back and the cache poisoned, its scores stay finite."""
    import kvcompile.fusion.selection as selection

    compiled = kvcompile.compile(build("llama").cuda())
    fusion = compiled.fusion
    finite = []
    real_span_tokens = selection.span_tokens
    monkeypatch.setattr(selection, "span_tokens",
                        lambda score, *a, **k: finite.append(bool(torch.isfinite(score).all())) or
                        real_span_tokens(score, *a, **k))
    docs, query = documents(seed=4)
    chunks = [pinned(compiled.precompute_chunk(d)) for d in docs]
    cache = compiled.new_cache(1, 256)
    for _ in range(4):
        _hold_back_loads(fusion, cache)
        fusion.prefill(cache, chunks, query, 0.2, "query_spans")
    assert finite == [True] * 4 and fusion.replays.replayed >= 2


@pytest.mark.parametrize("family", ("llama", "cohere2"))
def test_packed_chunks_fuse_like_chunks_pinned_one_by_one(family):
    """ChunkCache.pin()'s packed buffer takes LayerLoads' grouped path (a copy per chunk and
    group of layers, alike layers re-rotated in one call); the per-layer path is the reference."""
    compiled = kvcompile.compile(build(family).cuda())
    docs, query = documents(seed=6, lengths=(24, 24, 24))
    one_by_one = [pinned(compiled.precompute_chunk(d)) for d in docs]
    packed = [compiled.precompute_chunk(d).pin() for d in docs]
    assert all(c.packed.is_pinned() and c.packed_views_current() for c in packed)
    for ratio in (0.0, 0.3):
        expected = compiled.fusion.prefill(compiled.new_cache(1, 128), one_by_one, query, ratio)
        got = compiled.fusion.prefill(compiled.new_cache(1, 128), packed, query, ratio)
        assert (got - expected).abs().max().item() <= TOLERANCE
