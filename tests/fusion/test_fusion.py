"""KV fusion: recompute_ratio 1 is full prefill, 0 is full reuse (on every RoPE variant, NoPE and
hybrid-window models); chunk caches save/load and refuse what is not theirs."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from family_checks import build
from kvcompile.fusion import ChunkCache, ChunkMismatchError
from kvcompile.runtime.eval_runner import prefill_isolated

TOLERANCE = 1e-4
# Chunked attention (Llama 4) sees blocks of 8 positions: chunks may move by multiples of 8 only.
ALIGNED = {"llama4_text_no_tuning": (8, 16, 8)}
# RoPE variants (default, llama3, yarn, partial, interleaved, complex), NoPE layers, hybrid windows
FAMILIES = ("llama", "apertus", "ministral3", "phi", "cohere", "llama4_text_no_tuning", "cohere2", "qwen2", "gemma2",
            "gpt_oss")


def documents(vocab=250, lengths=(11, 7, 13), query=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    return docs, torch.randint(3, vocab, (query,), generator=generator)


def compiled_family(family, cache=None):
    try:
        model = build(family)
    except LookupError as error:
        pytest.skip(str(error))
    return model, kvcompile.compile(model, cache or kvcompile.CacheConfig())


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_everything_equals_full_prefill(family):
    _, compiled = compiled_family(family)
    docs, query = documents(lengths=ALIGNED.get(family, (11, 7, 13)))
    chunks = [compiled.precompute_chunk(d) for d in docs]
    full = torch.cat(docs + [query])[None]
    expected_logits, _ = compiled.prefill(full)
    logits = compiled.fusion.prefill(compiled.new_cache(1, 64), chunks, query, recompute_ratio=1.0)
    assert (logits - expected_logits[:, -query.shape[0]:]).abs().max().item() <= TOLERANCE
    expected = compiled.generate(full, max_new_tokens=16)[:, full.shape[1]:]
    assert torch.equal(compiled.generate_fused(chunks, query, recompute_ratio=1.0, max_new_tokens=16), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_nothing_equals_full_reuse(family):
    """Full reuse = each chunk prefilled alone at its final positions; fusion re-rotates instead."""
    _, compiled = compiled_family(family)
    docs, query = documents(seed=1, lengths=ALIGNED.get(family, (11, 7, 13)))
    cache = compiled.new_cache(1, 64)
    offset = 0
    for doc in docs:
        prefill_isolated(compiled, cache, doc[None], first_position=offset)
        offset += doc.shape[0]
    from kvcompile.runtime import generate as gen

    expected = gen.prefill(compiled, cache, query[None])
    chunks = [compiled.precompute_chunk(d) for d in docs]
    logits = compiled.fusion.prefill(compiled.new_cache(1, 64), chunks, query, recompute_ratio=0.0)
    assert (logits - expected).abs().max().item() <= TOLERANCE


def test_kcache_model_fuses_too():
    _, compiled = compiled_family("qwen2", kvcompile.CacheConfig(kind="kcache", topn=10**6))
    docs, query = documents(seed=2)
    chunks = [compiled.precompute_chunk(d) for d in docs]
    full = torch.cat(docs + [query])[None]
    expected = compiled.generate(full, max_new_tokens=12)[:, full.shape[1]:]
    assert torch.equal(compiled.generate_fused(chunks, query, recompute_ratio=1.0, max_new_tokens=12), expected)


@pytest.mark.parametrize("selector", ["query_spans", "deviation", "gradual_deviation", "chunk_head",
                                      "query_attention"])
def test_partial_recompute_runs_for_every_selector(selector):
    _, compiled = compiled_family("llama")
    docs, query = documents(seed=3)
    chunks = [compiled.precompute_chunk(d) for d in docs]
    out = compiled.generate_fused(chunks, query, recompute_ratio=0.3, max_new_tokens=6, selector=selector)
    assert out.shape == (1, 6)


def test_chunk_cache_round_trips_and_refuses_what_is_not_its_own(tmp_path):
    model, compiled = compiled_family("llama")
    docs, query = documents(seed=4)
    chunk = compiled.precompute_chunk(docs[0])
    path = chunk.save(tmp_path / "chunk.safetensors")
    loaded = ChunkCache.load(path)
    assert loaded.fingerprint == chunk.fingerprint and torch.equal(loaded.keys[1], chunk.keys[1])
    assert torch.equal(compiled.generate_fused([loaded], query, 0.0, 4), compiled.generate_fused([chunk], query, 0.0, 4))
    _, other = compiled_family("qwen3")
    with pytest.raises(ChunkMismatchError, match="another model"):
        other.generate_fused([chunk], query, 0.0, 4)
    kcache = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=64))
    with pytest.raises(ChunkMismatchError, match="with a full cache"):
        kcache.generate_fused([chunk], query, 0.0, 4)
    bf16 = kvcompile.compile(build("llama").to(torch.bfloat16))
    with pytest.raises(ChunkMismatchError, match="float32"):
        bf16.generate_fused([chunk], query, 0.0, 4)
    many = [chunk] * 60  # 60 × 11 tokens: past the tiny model's 512 positions
    with pytest.raises(kvcompile.errors.KvcompileError, match="positions"):
        compiled.generate_fused(many, query, 0.0, 4)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ChunkMismatchError, match="cannot read chunk cache"):
        ChunkCache.load(tmp_path / "junk.safetensors")


def test_learned_absolute_positions_cannot_move_a_chunk():
    _, compiled = compiled_family("gpt2")
    docs, query = documents(seed=5)
    chunks = [compiled.precompute_chunk(d) for d in docs]
    with pytest.raises(kvcompile.errors.UnsupportedAttentionError, match="learned absolute position"):
        compiled.generate_fused(chunks, query, 0.0, 4)


def test_chunked_attention_refuses_a_misaligned_move():
    _, compiled = compiled_family("llama4_text_no_tuning")
    docs, query = documents(seed=6, lengths=(11, 8))
    chunks = [compiled.precompute_chunk(d) for d in docs]
    with pytest.raises(kvcompile.errors.UnsupportedAttentionError, match="multiples of 8"):
        compiled.generate_fused(chunks, query, 0.0, 4)


def test_span_tokens_fill_the_budget_with_spans_around_the_best_seeds():
    from kvcompile.fusion.selectors import span_tokens

    score = torch.zeros(40)
    score[20], score[30], score[3] = 3.0, 2.0, 9.0  # row 3 lies in the first chunk (exact): never chosen
    assert span_tokens(score, 11, exclude_first=10, before=2, after=8).tolist() == list(range(18, 29))
    rows = span_tokens(score, 14, exclude_first=10, before=2, after=8).tolist()
    assert rows == list(range(18, 29)) + [29, 30, 31]  # the second seed's span, cut at the budget
    assert span_tokens(score, 100, exclude_first=10).tolist() == list(range(10, 40))
    assert span_tokens(score, 0, exclude_first=10).numel() == 0


def greedy_spans(score, count, exclude_first, before, after):
    """span_tokens' definition, step by step: seeds in descending score (ties by row), each
    adding its span's rows not chosen yet, in row order, until the budget is spent."""
    total = score.shape[0]
    budget, chosen = min(count, total - exclude_first), []
    for seed in score[exclude_first:].argsort(descending=True, stable=True).add(exclude_first).tolist():
        for row in range(max(exclude_first, seed - before), min(total, seed + after + 1)):
            if row not in chosen and len(chosen) < budget:
                chosen.append(row)
    return sorted(chosen)


def test_span_tokens_equal_the_greedy_spans_on_random_scores():
    """The tensor-op form (no host sync on the GPU) chooses the greedy's rows, ties included."""
    from kvcompile.fusion.selectors import span_tokens

    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        total = int(torch.randint(1, 80, (1,), generator=generator))
        exclude_first = int(torch.randint(0, total + 1, (1,), generator=generator))
        count = int(torch.randint(0, total + 5, (1,), generator=generator))
        before, after = (int(x) for x in torch.randint(0, 6, (2,), generator=generator))
        score = torch.randint(0, 5 if trial % 2 else 1000, (total,), generator=generator).float()  # ties often
        got = span_tokens(score, count, exclude_first, before, after).tolist()
        assert got == greedy_spans(score, count, exclude_first, before, after), (trial, total, exclude_first, count)


def test_default_check_layers():
    from kvcompile.fusion.selectors import DEFAULT_SELECTOR, TokenSelector

    assert DEFAULT_SELECTOR is TokenSelector.QUERY_SPANS
    assert TokenSelector.QUERY_SPANS.default_check_layer(8) == 5 and TokenSelector.DEVIATION.default_check_layer(8) == 1
    assert TokenSelector.QUERY_SPANS.default_check_layer(1) == 0 and TokenSelector.DEVIATION.default_check_layer(1) == 0


@pytest.mark.slow
def test_query_spans_recover_the_cross_chunk_answers_full_reuse_loses():
    """The reference model's chain task (docs/FUSION.md): 15% of the tokens, chosen by the default
    selector, bring back what full reuse loses."""
    from kvcompile.eval.cross_chunk import cross_chunk_example
    from kvcompile.eval.retrieval import answer_of

    torch.set_num_threads(1)
    compiled = kvcompile.compile(kvcompile.load_model("reference"))
    right = {0.0: 0, 0.15: 0}
    for index in range(12):
        example = cross_chunk_example(index, kind="chain")
        chunks = [compiled.precompute_chunk(torch.tensor(c)) for c in example["chunks"]]
        for ratio in right:
            out = compiled.generate_fused(chunks, torch.tensor(example["question"]), ratio, 2)
            right[ratio] += answer_of(out[0].tolist()) == example["answer"]
    assert right[0.0] <= 6 and right[0.15] >= 10, right


def test_chunk_cache_saved_compressed_with_the_codec(tmp_path):
    _, compiled = compiled_family("llama")
    docs, query = documents(seed=7, lengths=(40, 30))
    chunks = [compiled.precompute_chunk(d) for d in docs]
    raw = chunks[1].save(tmp_path / "raw.safetensors")
    packed = chunks[1].save(tmp_path / "packed.safetensors", codec_level=1)
    assert packed.stat().st_size < raw.stat().st_size / 2
    loaded = ChunkCache.load(packed)
    assert loaded.fingerprint == chunks[1].fingerprint and torch.equal(loaded.token_ids, chunks[1].token_ids)
    for exact, decoded in zip(chunks[1].keys + chunks[1].values, loaded.keys + loaded.values):
        assert decoded.shape == exact.shape and decoded.dtype == exact.dtype
        # level 1 on this tiny random model: 10.5% relative RMS error at worst (measured)
        assert ((decoded - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item() <= 0.15
    reused = compiled.fusion.prefill(compiled.new_cache(1, 128), chunks, query, recompute_ratio=0.0)
    from_codec = compiled.fusion.prefill(compiled.new_cache(1, 128), [chunks[0], loaded], query, recompute_ratio=0.0)
    assert (from_codec - reused).abs().max().item() <= 0.03 * reused.abs().max().item()  # 1.4% measured
    blob = bytearray(packed.read_bytes())
    blob[-20] ^= 0xFF  # a flipped bit inside the bitstream: its CRC refuses it
    (tmp_path / "bad.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ChunkMismatchError, match="bad.safetensors"):
        ChunkCache.load(tmp_path / "bad.safetensors")


def test_kcache_fused_partial_recompute_decodes_like_the_full_cache():
    """A kcache model (V in host memory; top-n over the whole context: exact) fuses and decodes
    exactly as the full-cache model does, with a partial recompute chosen by the default selector."""
    model, full = compiled_family("qwen2")
    kcache = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=10**6))
    docs, query = documents(seed=8)
    expected = full.generate_fused([full.precompute_chunk(d) for d in docs], query, 0.3, 10)
    assert torch.equal(kcache.generate_fused([kcache.precompute_chunk(d) for d in docs], query, 0.3, 10), expected)


@pytest.mark.parametrize("lengths", ((8, 8, 8), (11, 7, 13)))  # one batched write / one per chunk
@pytest.mark.parametrize("family", ("llama", "cohere2"))  # plain RoPE; with NoPE layers
def test_staged_loading_places_what_the_direct_copy_places(family, lengths, monkeypatch):
    """LayerLoads' CUDA path (chunks staged whole, then re-rotated and written by few kernels)
    run here on the CPU: the same cache as the direct per-chunk copies."""
    from kvcompile.fusion.loading import LayerLoads

    _, compiled = compiled_family(family)
    docs, _ = documents(lengths=lengths, seed=4)
    chunks = [compiled.precompute_chunk(d) for d in docs]
    direct = compiled.new_cache(1, 64)
    compiled.fusion.place(direct, chunks).finish()
    monkeypatch.setattr(LayerLoads, "load_layer", LayerLoads.load_layer_staged)
    staged = compiled.new_cache(1, 64)
    compiled.fusion.place(staged, chunks).finish()
    for layer in range(len(direct.keys)):
        assert torch.equal(staged.keys[layer][:, :, :direct.length], direct.keys[layer][:, :, :direct.length])
        assert torch.equal(staged.values[layer][:, :, :direct.length], direct.values[layer][:, :, :direct.length])


@pytest.mark.parametrize("family", ("llama", "cohere2"))  # every layer alike; NoPE and sliding layers mixed
@pytest.mark.parametrize("group", (8, 1, 3))
def test_packed_chunks_load_in_layer_groups_like_the_direct_copy(family, group):
    """ChunkCache.pin() packs a chunk's layers into one buffer; LayerLoads' CUDA path then moves
    a group of layers per copy and re-rotates alike layers in one call. Run here on the CPU
    (its stream is None): the same cache as the per-chunk copies."""
    from kvcompile.fusion.loading import LayerLoads, packed_alike

    _, compiled = compiled_family(family)
    docs, _ = documents(lengths=(8, 8, 8), seed=5)
    chunks = [compiled.precompute_chunk(d).pin() for d in docs]
    assert all(c.packed_views_current() for c in chunks)
    direct = compiled.new_cache(1, 64)
    loads = compiled.fusion.place(direct, chunks)
    packed = compiled.new_cache(1, 64)
    packed.reserve(24)
    assert packed_alike(chunks, packed)
    for first in range(0, len(packed.keys), group):
        loads.cache = packed
        loads.load_packed_group(range(first, min(first + group, len(packed.keys))), chunks,
                                compiled.fusion.reposition, compiled.fusion.rotation_of)
    for layer in range(len(direct.keys)):
        assert torch.equal(packed.keys[layer][:, :, :24], direct.keys[layer][:, :, :24])
        assert torch.equal(packed.values[layer][:, :, :24], direct.values[layer][:, :, :24])
    chunks[0].keys[0] = chunks[0].keys[0].clone()  # a replaced tensor: the packed buffer is stale
    assert not packed_alike(chunks, packed)


def test_pinned_chunk_keeps_its_values_saves_and_fuses_the_same(tmp_path):
    """pin() repacks the K/V (one buffer, views per layer) without changing a value: the chunk
    saves, encodes and fuses as before; a chunk whose layers differ in shape is pinned tensor
    by tensor instead (nothing to pack)."""
    _, compiled = compiled_family("llama")
    docs, query = documents(seed=7)
    chunk = compiled.precompute_chunk(docs[0])
    keys, values = [k.clone() for k in chunk.keys], [v.clone() for v in chunk.values]
    expected = compiled.generate_fused([chunk], query, 0.0, 4)
    assert chunk.pin() is chunk and chunk.packed is not None and chunk.packed_views_current()
    assert all(torch.equal(a, b) for a, b in zip(chunk.keys + chunk.values, keys + values))
    assert torch.equal(compiled.generate_fused([chunk], query, 0.0, 4), expected)
    loaded = ChunkCache.load(chunk.save(tmp_path / "pinned.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys + loaded.values, keys + values))
    ragged = ChunkCache(chunk.token_ids, [keys[0], keys[1][..., :4]], [values[0], values[1][..., :4]],
                        chunk.fingerprint, chunk.dtype, chunk.cache_kind)
    assert ragged.pin().packed is None and torch.equal(ragged.keys[1], keys[1][..., :4])
