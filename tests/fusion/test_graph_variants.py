"""The graph variants fusion and the prefill run (passes/causal_prefill_graph.py,
last_logits_graph.py, layer_ready_graph.py) compute what the compiled graph computes."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from family_checks import build
from kvcompile.fusion.loading import wait_for_layer
from kvcompile.passes.causal_prefill_graph import bias_inputs, biases_are_causal, causal_flags, causal_prefill_graph
from kvcompile.passes.last_logits_graph import last_logits_graph
from kvcompile.passes.layer_ready_graph import layer_ready_graph
from kvcompile.runtime.masks import step_biases

TOLERANCE = 1e-5


def compiled_family(family):
    try:
        return kvcompile.compile(build(family))
    except LookupError as error:
        pytest.skip(str(error))


def prefill_inputs(compiled, tokens: int, seed: int = 0):
    spec = compiled.spec
    ids = torch.randint(3, 250, (1, tokens), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(tokens)[None]
    empty = torch.zeros(1, 0, dtype=torch.long)
    biases = step_biases(spec, empty.bool(), empty, torch.ones_like(ids, dtype=torch.bool), positions, torch.float32)
    empty_kv = torch.zeros(1, spec.kv_heads, 0, spec.head_dim)
    return ids, positions, biases, [empty_kv] * (2 * spec.num_layers)


# llama: plain; qwen2: sliding + full layers; gemma2: soft-capping (kept); gpt_oss: sinks (kept)
@pytest.mark.parametrize("family", ("llama", "qwen2", pytest.param("gemma2", marks=pytest.mark.slow),
                                    pytest.param("gpt_oss", marks=pytest.mark.slow)))
def test_causal_prefill_graph_equals_the_compiled_graph(family):
    compiled = compiled_family(family)
    for tokens in (6, 13):  # the hybrids' sliding window (8) cuts 13 tokens: only their full layers change
        ids, positions, biases, pasts = prefill_inputs(compiled, tokens)
        flags = causal_flags(biases, 0)
        assert all(flags) == (tokens == 6 or family == "llama")
        expected = compiled.graph_module(ids, positions, *biases, *pasts)
        names = {n for n, flag in zip(bias_inputs(compiled.graph_module, len(biases)), flags) if flag}
        causal = causal_prefill_graph(compiled.graph_module, names)
        got = causal(ids, positions, *biases, *pasts)
        assert all((a - b).abs().max().item() <= TOLERANCE for a, b in zip(got, expected))
        keeps_all = family in ("gemma2", "gpt_oss")  # soft-capping, sinks: no fused kernel
        assert (causal.rewritten_attention == 0) if keeps_all else causal.rewritten_attention > 0


def test_biases_that_are_not_causal_keep_the_compiled_graph():
    compiled = compiled_family("llama")
    spec = compiled.spec
    valid = torch.tensor([[False, True, True, True, True, True], [True] * 6])  # left padding
    positions = torch.arange(6)[None].expand(2, 6)
    empty = torch.zeros(2, 0, dtype=torch.long)
    padded = step_biases(spec, empty.bool(), empty, valid, positions, torch.float32)
    assert not biases_are_causal(padded, 0)
    _, _, biases, _ = prefill_inputs(compiled, 6)
    assert not biases_are_causal(biases, past_length=4)


def test_prefill_and_generate_use_the_variants_and_agree():
    compiled = compiled_family("qwen2")
    ids = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    logits, _ = compiled.prefill(ids)
    assert logits.shape[1] == 20  # the public prefill keeps every position's logits
    with compiled.last_logits_only():
        last, _ = compiled.prefill(ids)
    assert last.shape[1] == 1 and (last[:, 0] - logits[:, -1]).abs().max().item() <= TOLERANCE
    assert set(compiled._variants) == {((False, True), False), ((False, True), True)}  # sliding (8) cut, full not
    reference = build("qwen2")
    expected = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8), expected)


def test_last_logits_graph_keeps_the_kv_outputs():
    compiled = compiled_family("gemma2")  # a final soft-cap after the head
    ids, positions, biases, pasts = prefill_inputs(compiled, 9)
    expected = compiled.graph_module(ids, positions, *biases, *pasts)
    got = last_logits_graph(compiled.graph_module)(ids, positions, *biases, *pasts)
    assert got[0].shape[1] == 1 and (got[0][:, 0] - expected[0][:, -1]).abs().max().item() <= TOLERANCE
    assert all(torch.equal(a, b) for a, b in zip(got[1:], expected[1:]))


def test_layer_ready_graph_waits_right_before_each_layer_reads_its_cache():
    compiled = compiled_family("llama")
    ready = layer_ready_graph(compiled.graph_module)
    nodes = list(ready.graph.nodes)
    waits = [n for n in nodes if n.op == "call_function" and n.target is wait_for_layer]
    assert sorted(n.args[0] for n in waits) == sorted(2 * list(range(compiled.spec.num_layers)))
    for wait in waits:  # the placeholder feeds the wait only; the wait feeds the attention just after it
        assert list(wait.args[1].users) == [wait]
        (reader,) = wait.users
        assert 0 < nodes.index(reader) - nodes.index(wait) <= 2
    ids, positions, biases, pasts = prefill_inputs(compiled, 7)
    expected = compiled.graph_module(ids, positions, *biases, *pasts)
    assert all(torch.equal(a, b) for a, b in zip(ready(ids, positions, *biases, *pasts), expected))
