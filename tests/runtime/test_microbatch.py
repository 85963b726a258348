"""Decoding a batch as micro-batches (runtime/microbatch.py) gives the whole batch's tokens: on
the CPU the micro-batches run in turn through the same code; on CUDA their captured steps
replay concurrently on their own streams (the `gpu` tests)."""
from __future__ import annotations

import pytest
import torch

import kvcompile
from kvcompile.errors import InputValidationError
from kvcompile.runtime.microbatch import FinishedFlags, MicroBatchDecoder, split_sizes
from tiny_models import compiled_tiny, padded_batch

# (kind, topn, select): the full cache, kcache exact (topn ≥ context) and a top-4 that selects
CACHES = [("full", None, None), ("kcache", 10**6, "head"), ("kcache", 4, "layer"), ("kcache", 4, "head")]


def compiled_for(kind, topn, select):
    return compiled_tiny("llama", kind, topn, select)[1] if kind == "kcache" else compiled_tiny("llama")[1]


def test_split_sizes_are_even_larger_first_and_at_most_the_batch():
    assert split_sizes(30, 2) == [15, 15]
    assert split_sizes(15, 2) == [8, 7]
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(2, 4) == [1, 1]
    assert split_sizes(5, 1) == [5]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputValidationError, match="microbatches"):
            split_sizes(4, bad)


def test_cache_rows_are_views_of_the_batch_cache():
    torch.set_num_threads(1)
    compiled = compiled_for("kcache", 4, "layer")
    input_ids, attention_mask = padded_batch(seed=4)
    _, cache = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, 16))
    part = cache.rows(1, 3)
    assert part.batch == 2 and part.length == cache.length and part.capacity == cache.capacity
    assert torch.equal(part.valid, cache.valid[1:]) and torch.equal(part.positions, cache.positions[1:])
    for layer in range(len(cache.keys)):
        assert part.keys[layer].data_ptr() == cache.keys[layer][1].data_ptr()
        assert part.values[layer].data_ptr() == cache.values[layer][1].data_ptr()
    part.keys[0][0, 0, 0, 0] = 123.0  # written through the view
    assert cache.keys[0][1, 0, 0, 0] == 123.0


@pytest.mark.parametrize("kind, topn, select", CACHES)
def test_microbatch_steps_equal_the_whole_batch_step(kind, topn, select):
    # Both micro-batches' steps (overlapped or one after the other) give the whole batch's
    # logits, and their rows of the shared cache hold what the whole batch's step wrote.
    torch.set_num_threads(1)
    compiled = compiled_for(kind, topn, select)
    input_ids, attention_mask = padded_batch(seed=8)
    steps, capacity = 5, input_ids.shape[1] + 5 + 2
    logits, whole = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    _, split = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    whole_decoder = compiled.cuda_graph_decoder(whole, capture=False)
    decoder = MicroBatchDecoder(compiled, split, parts=2, capture=False)
    assert decoder.sizes == [2, 1]
    next_ids = logits[:, -1].argmax(-1)
    ids = decoder.split(next_ids)
    for step in range(steps):
        want = whole_decoder.step(next_ids)[:, -1]
        got = decoder.gather(decoder.step(ids, overlap=step % 2 == 0))[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        next_ids = want.argmax(-1)
        ids = decoder.split(next_ids)
    for part, start in zip(decoder.caches, (0, 2)):
        assert part.length == whole.length
        rows = slice(start, start + part.batch)
        assert torch.equal(part.valid, whole.valid[rows]) and torch.equal(part.positions, whole.positions[rows])
        for layer in range(len(whole.keys)):
            torch.testing.assert_close(part.past(layer)[0], whole.past(layer)[0][rows], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(part.past(layer)[1], whole.past(layer)[1][rows], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind, topn, select", CACHES)
@pytest.mark.parametrize("parts", [2, 3])
def test_generate_in_microbatches_equals_generate(kind, topn, select, parts):
    torch.set_num_threads(1)
    compiled = compiled_for(kind, topn, select)
    input_ids, attention_mask = padded_batch(seed=0, batch=4, pads=(0, 3, 6, 1))
    whole = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, pad_token_id=0)
    split = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, pad_token_id=0,
                              microbatches=parts)
    assert torch.equal(split, whole)


def test_eos_pads_finished_rows_and_streams_the_same_steps():
    # An EOS that some rows emit (not all): they are padded from there on, the others run on;
    # on_tokens sees the same [B] ids each step as with the whole batch.
    torch.set_num_threads(1)
    compiled = compiled_for("kcache", 4, "layer")
    input_ids, attention_mask = padded_batch(seed=0, batch=4, pads=(0, 3, 6, 1))
    free = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, pad_token_id=0)
    eos = int(free[0, input_ids.shape[1] + 4])
    streamed = {1: [], 2: []}
    outputs = {parts: compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10,
                                        eos_token_id=eos, pad_token_id=0, microbatches=parts,
                                        on_tokens=lambda ids, parts=parts: streamed[parts].append(ids.clone()))
               for parts in (1, 2)}
    assert torch.equal(outputs[2], outputs[1])
    new = outputs[1][:, input_ids.shape[1]:]
    assert (new[0, 5:] == 0).all() and not (new == eos).all(dim=1).any()
    assert len(streamed[2]) == len(streamed[1]) == new.shape[1]
    assert all(torch.equal(a, b) for a, b in zip(streamed[2], streamed[1]))


@pytest.mark.parametrize("stream", [False, True])
def test_the_loop_stops_when_every_sequence_has_finished(stream):
    # Identical prompts emit identical tokens: with the 4th as EOS every row finishes at step 3,
    # and both paths return 4 new tokens (not max_new_tokens).
    torch.set_num_threads(1)
    compiled = compiled_for("full", None, None)
    prompt, _ = padded_batch(seed=0, batch=1)
    input_ids = prompt.repeat(3, 1)
    free = compiled.generate(input_ids, max_new_tokens=8)
    eos = int(free[0, input_ids.shape[1] + 3])
    assert (free[0, input_ids.shape[1]: input_ids.shape[1] + 3] != eos).all()
    on_tokens = (lambda ids: None) if stream else None
    whole = compiled.generate(input_ids, max_new_tokens=8, eos_token_id=eos, on_tokens=on_tokens)
    split = compiled.generate(input_ids, max_new_tokens=8, eos_token_id=eos, microbatches=2, on_tokens=on_tokens)
    assert whole.shape[1] == input_ids.shape[1] + 4
    assert torch.equal(split, whole)


class FakeEvent:
    """Stands in for a CUDA event: done or not, and whether the host waited for it."""

    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_finished_flags_read_late_but_never_more_than_the_lag_behind():
    # Every sequence has finished after step 1. The host learns it without waiting while the
    # events are pending, waits only for steps more than `lag` behind, and reads done steps at once.
    flags = FinishedFlags(parts=2, steps=6, device=torch.device("cpu"), lag=2)
    flags.cuda = True  # poll as on CUDA, with the events below
    flags.flags[:, 1:] = True
    flags.events = [[FakeEvent(False) for _ in range(6)] for _ in range(2)]
    assert flags.poll(1) is None and flags.read == 0  # steps 0-1 pending, within the lag
    assert flags.poll(2) is None and flags.read == 1  # step 0 waited for (2 behind), not finished
    assert [part[0].waited for part in flags.events] == [True, True]
    assert flags.poll(3) == 1  # step 1 waited for: every sequence finished there
    assert not any(part[2].waited for part in flags.events)
    early = FinishedFlags(parts=2, steps=6, device=torch.device("cpu"), lag=2)
    early.cuda = True
    early.flags[:, 0] = True
    early.events = [[FakeEvent(True) for _ in range(6)] for _ in range(2)]
    assert early.poll(0) == 0  # done events are read at once
    late = FinishedFlags(parts=2, steps=6, device=torch.device("cpu"), lag=2)
    late.cuda = True
    late.flags[:, 4] = True
    late.events = [[FakeEvent(False) for _ in range(6)] for _ in range(2)]
    assert late.poll(5) is None and late.poll(5, wait=True) == 4  # the end of the loop waits for all


def test_one_stream_priority_per_micro_batch():
    compiled = compiled_for("full", None, None)
    input_ids, attention_mask = padded_batch(seed=1)
    _, cache = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, 16))
    with pytest.raises(InputValidationError, match="1 stream priorities for 2 micro-batches"):
        MicroBatchDecoder(compiled, cache, parts=2, capture=False, priorities=[0])


def test_sampling_with_microbatches_is_refused():
    compiled = compiled_for("full", None, None)
    input_ids, attention_mask = padded_batch(seed=1)
    with pytest.raises(InputValidationError, match="greedily"):
        compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=True,
                          seed=0, microbatches=2)


# CUDA: concurrent replay on the micro-batches' streams ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind, topn", [("full", None), ("kcache", 10**6), ("kcache", 4)])
def test_cuda_graph_generate_in_microbatches_equals_the_whole_batch(kind, topn):
    from kvcompile.frontend.tiny_models import tiny_model

    model = tiny_model("llama").cuda()
    config = kvcompile.CacheConfig(kind="kcache", topn=topn, select="layer") if kind == "kcache" \
        else kvcompile.CacheConfig()
    compiled = kvcompile.compile(model, config)
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=0, batch=4, pads=(0, 3, 6, 1)))
    whole = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=24, pad_token_id=0,
                              cuda_graph=True)
    for parts in (2, 3):
        split = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=24, pad_token_id=0,
                                  cuda_graph=True, microbatches=parts)
        assert torch.equal(split, whole), parts
    # with an EOS some rows emit: the host reads the stop flags late, the tokens do not change
    eos = int(whole[0, input_ids.shape[1] + 5])
    with_eos = [compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=24, eos_token_id=eos,
                                  pad_token_id=0, cuda_graph=True, microbatches=parts) for parts in (1, 2)]
    assert torch.equal(with_eos[1], with_eos[0])


@pytest.mark.gpu
@pytest.mark.parametrize("kind, priorities", [("full", None), ("kcache", None), ("kcache", (-1, 0))])
def test_overlapped_and_serial_replays_give_the_same_tokens(kind, priorities):
    # Many steps enqueued back to back on two streams, no join in between, then the same number
    # replayed one micro-batch after the other: each matches the whole batch's graph.
    from kvcompile.frontend.tiny_models import tiny_model

    model = tiny_model("llama").cuda()
    config = kvcompile.CacheConfig(kind="kcache", topn=4, select="layer") if kind == "kcache" \
        else kvcompile.CacheConfig()
    compiled = kvcompile.compile(model, config)
    input_ids, attention_mask = (t.cuda() for t in padded_batch(seed=8))
    steps = 16
    capacity = input_ids.shape[1] + 2 * steps + 2
    logits, whole = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    _, split = compiled.prefill(input_ids, attention_mask, cache=compiled.new_cache(3, capacity))
    whole_decoder = compiled.cuda_graph_decoder(whole)
    decoder = MicroBatchDecoder(compiled, split, parts=2, priorities=priorities)
    next_ids = logits[:, -1].argmax(-1)
    ids = decoder.split(next_ids)
    want, got = [], []
    for step in range(2 * steps):
        next_ids = whole_decoder.step(next_ids)[:, -1].argmax(-1)
        want.append(next_ids)
        ids = decoder.greedy_step(ids, overlap=step < steps)
        got.append(ids)
    got = [decoder.gather(ids) for ids in got]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_host_rows_copy_per_sequence_equals_one_strided_copy():
    """copy_to_host_rows (runtime/cache.py): a step's rows of a host cache [B, capacity, Hkv, D]
    are written one sequence at a time when they are not one block (no host-blocking copy)."""
    from kvcompile.runtime.cache import copy_to_host_rows

    generator = torch.Generator().manual_seed(0)
    host = torch.zeros(3, 10, 2, 4)
    source = torch.randn(3, 2, 1, 4, generator=generator).transpose(1, 2)  # [B, T=1, Hkv, D], as the decoder's
    expected = host.clone()
    expected[:, 6:7] = source
    copy_to_host_rows(host[:, 6:7], source)
    assert torch.equal(host, expected)
    single = torch.zeros(1, 10, 2, 4)  # one sequence: one contiguous block
    copy_to_host_rows(single[:, 2:5], torch.ones(1, 3, 2, 4))
    assert single[:, 2:5].eq(1).all() and single[:, :2].eq(0).all() and single[:, 5:].eq(0).all()
