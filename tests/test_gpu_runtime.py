"""The compiled runtime on CUDA: exact vs HF (fp32), kcache vs full cache (bf16), host V pinned."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from tiny_models import CORE_ARCHS, padded_batch
from kvcompile.frontend.tiny_models import tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_fp32_cuda_generate_matches_hf(arch):
    model = tiny_model(arch).cuda()
    compiled = kvcompile.compile(model)
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=6))
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                              pad_token_id=0)
    got = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    assert torch.equal(got, expected)


BF16_LOGIT_TOLERANCE = 2e-2


def bf16_tolerance(logits: torch.Tensor) -> float:
    """2e-2, relative to the logit scale where that exceeds 1: the tiny models' logits span
    ~0.5, the trained reference model's ~20, where bf16 rounding through 8 layers moves a
    logit by up to 1.8% of that scale (measured on CPU) whichever cache runs."""
    return BF16_LOGIT_TOLERANCE * max(1.0, logits.abs().max().item())


def decode_in_lockstep(full, kcache, input_ids, attention_mask, steps: int) -> float:
    """Greedy decoding of both models on the full cache's tokens. Logits must agree within
    `bf16_tolerance` at every step, and the chosen token wherever the full cache's own top-2
    margin exceeds that tolerance (below it, one bf16 rounding decides the token: HF's own bf16
    generate differs from fp32 there too). -> the fraction of decisive steps."""
    logits_full, cache_full = full.prefill(input_ids, attention_mask)
    _, cache_kc = kcache.prefill(input_ids, attention_mask)
    assert cache_kc.values[-1].is_pinned() and cache_kc.values[-1].device.type == "cpu"
    next_ids = logits_full[:, -1].argmax(-1)
    decisive_steps = 0
    for _ in range(steps):
        a = full.decode_step(next_ids, cache_full)[:, -1].float()
        b = kcache.decode_step(next_ids, cache_kc)[:, -1].float()
        tolerance = bf16_tolerance(a)
        assert (a - b).abs().max().item() <= tolerance
        top2 = a.topk(2, dim=-1).values
        decisive = top2[:, 0] - top2[:, 1] > tolerance
        assert torch.equal(a.argmax(-1)[decisive], b.argmax(-1)[decisive])
        decisive_steps += int(decisive.sum())
        next_ids = a.argmax(-1)
    return decisive_steps / (steps * input_ids.shape[0])


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("select", ["head", "layer"])
def test_bf16_kcache_with_full_topn_matches_full_cache(arch, select):
    # The tiny random models have nearly flat logits (range ~0.5): few steps are decisive.
    model = tiny_model(arch, dtype=torch.bfloat16).cuda()
    full = kvcompile.compile(model)
    kcache = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=10**6, select=select))
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=7))
    assert decode_in_lockstep(full, kcache, input_ids, attention_mask, steps=32) > 0


@pytest.mark.parametrize("select", ["head", "layer"])
def test_bf16_kcache_matches_full_cache_on_the_reference_model(select):
    from kvcompile.frontend.tokenizer import ByteTokenizer

    model = kvcompile.load_model("reference", dtype=torch.bfloat16).cuda()
    full = kvcompile.compile(model)
    kcache = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=10**6, select=select))
    tokenizer = ByteTokenizer()
    prompts = ["def fibonacci(n):\n    ", "The capital of the key-value store is", "for i in range(10):"]
    rows = [tokenizer.encode(p) for p in prompts]
    width, pad = max(len(r) for r in rows), tokenizer.pad_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device="cuda")
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device="cuda")
    # A trained model is decisive at most steps, so this checks most tokens.
    assert decode_in_lockstep(full, kcache, input_ids, attention_mask, steps=48) >= 0.75


def test_cpu_trace_moves_to_cuda():
    model = tiny_model("llama")
    compiled = kvcompile.compile(model)
    input_ids = torch.randint(0, 256, (2, 8))
    expected = compiled.generate(input_ids, max_new_tokens=8)
    compiled.to("cuda")
    assert torch.equal(compiled.generate(input_ids.cuda(), max_new_tokens=8).cpu(), expected)


@pytest.mark.parametrize("family, kind", [
    ("gemma2", "full"),  # soft-capping: the definition's math path on CUDA
    ("gpt_oss", "full"),  # sinks: the decode path's log-sum-exp rescale on CUDA
    ("qwen2", "full"),  # sliding + full layers: two masks
    ("cohere2", "full"),  # sliding + NoPE full layers
    ("gemma2", "kcache"),  # soft-capped kcache runs its definition on the GPU
    ("gpt_oss", "kcache"),
])
def test_fp32_cuda_hybrid_families_match_hf(family, kind):
    from family_checks import TOLERANCE, build, check_compiled

    try:
        model = build(family).cuda()
    except LookupError as error:
        pytest.skip(str(error))
    config = kvcompile.CacheConfig(kind="kcache", topn=10**6) if kind == "kcache" else kvcompile.CacheConfig()
    compiled = kvcompile.compile(model, config)
    assert check_compiled(model, compiled) <= TOLERANCE


@pytest.mark.parametrize("family", ["qwen2", "cohere2"])
def test_cuda_fusion_recompute_all_equals_full_prefill_and_none_equals_reuse(family):
    from family_checks import build, fusion_limit_errors

    model = build(family).cuda()
    compiled = kvcompile.compile(model)
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 250, (n,), generator=generator) for n in (11, 7, 13)]
    query = torch.randint(3, 250, (5,), generator=generator)
    chunks = [compiled.precompute_chunk(d) for d in docs]
    to_prefill, to_reuse = fusion_limit_errors(compiled, docs, query, chunks, capacity=64)
    assert to_prefill <= 1e-4 and to_reuse <= 1e-4


@pytest.mark.parametrize("kind, topn", [("full", None), ("kcache", 10**6), ("kcache", 4)])
def test_cuda_graph_decoder_matches_eager_decode(kind, topn):
    # The graph attends the cache's whole capacity with the unfilled positions masked: the same
    # logits as the eager step over the filled length (kcache's top-4 included: hidden
    # positions have probability 0 and are never preferred), and the same cache afterwards.
    model = tiny_model("llama").cuda()
    config = kvcompile.CacheConfig(kind="kcache", topn=topn) if kind == "kcache" else kvcompile.CacheConfig()
    compiled = kvcompile.compile(model, config)
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=8))
    steps = 12
    capacity = input_ids.shape[1] + steps + 3
    logits, eager_cache = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    _, graph_cache = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    decoder = compiled.cuda_graph_decoder(graph_cache)
    next_eager = next_graph = logits[:, -1].argmax(-1)
    for _ in range(steps):
        eager = compiled.decode_step(next_eager, eager_cache)[:, -1]
        graph = decoder.step(next_graph)[:, -1].clone()
        assert (eager - graph).abs().max().item() <= 1e-4
        next_eager, next_graph = eager.argmax(-1), graph.argmax(-1)
        assert torch.equal(next_eager, next_graph)
    length = eager_cache.length
    assert graph_cache.length == length and torch.equal(graph_cache.valid, eager_cache.valid)
    assert torch.equal(graph_cache.positions, eager_cache.positions)
    for layer in range(len(eager_cache.keys)):
        torch.testing.assert_close(graph_cache.keys[layer][:, :, :length], eager_cache.keys[layer][:, :, :length],
                                   atol=1e-5, rtol=1e-5)
        graph_cache.wait_for_host_copies()
        torch.cuda.synchronize()
        past_graph, past_eager = graph_cache.past(layer)[1], eager_cache.past(layer)[1]
        torch.testing.assert_close(past_graph.cpu(), past_eager.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["full", "kcache"])
def test_generate_with_cuda_graph_equals_eager_generate(kind):
    model = tiny_model("llama").cuda()
    config = kvcompile.CacheConfig(kind="kcache", topn=10**6) if kind == "kcache" else kvcompile.CacheConfig()
    compiled = kvcompile.compile(model, config)
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=9))
    eager = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, pad_token_id=0)
    graph = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, pad_token_id=0,
                              cuda_graph=True)
    assert torch.equal(graph, eager)
