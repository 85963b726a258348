"""Decoding one batch as micro-batches on CUDA streams of their own, so that their steps overlap.

A KCache decode step is serial: per layer the score pass reads K from HBM, then the top-N V
rows come over the host link (a gather kernel on few SMs), then attention and the MLP read HBM
again; HBM and the link are never busy at the same time. Split the batch into micro-batches,
each with its own rows of the cache (views, no copy), its own captured step
(runtime/cuda_graph.py) and its own stream, and one micro-batch's value fetch can run while
another's score pass and GEMMs run. The price: the weights are read once per micro-batch.

Each stream waits only for its own previous step: a micro-batch's next tokens are chosen on
its stream from its logits, so the host enqueues steps ahead and no step joins the streams.
Every op of a step is per row (attention, top-N selection, norms, MLP), so a row's greedy
tokens are the single batch's (a GEMM may pick another kernel for fewer rows: logits may move
in the last bits). On the CPU (no streams) the same code runs the micro-batches in turn.

    decoder = MicroBatchDecoder(compiled, cache, parts=2)   # after prefill
    ids = decoder.split(next_ids)                            # [B] -> one [b_i] per micro-batch
    for _ in range(steps):
        ids = decoder.greedy_step(ids)                       # enqueued on each micro-batch's stream
    tokens = decoder.gather(ids)                             # [B], on the caller's stream
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from kvcompile.errors import InputValidationError
from kvcompile.runtime.cuda_graph import CudaGraphDecoder


def split_sizes(batch: int, parts: int) -> List[int]:
    """Micro-batch sizes: `parts` of them (at most `batch`) as even as possible, larger first."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise InputValidationError(f"microbatches must be an int ≥ 1, got {parts!r}")
    parts = min(parts, batch)
    base, extra = divmod(batch, parts)
    return [base + (part < extra) for part in range(parts)]


def stream_scope(stream):
    """Work inside is enqueued on `stream` (None: the current stream, as on the CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def used_on(tensor: Tensor, stream) -> Tensor:
    """`tensor`, after telling torch's caching allocator that `stream` reads it: memory made on
    one stream and freed while another still has to read it could otherwise be handed out again."""
    if stream is not None and tensor.is_cuda:
        tensor.record_stream(stream)
    return tensor


class MicroBatchDecoder:
    """Decode steps of `cache`'s batch as `parts` micro-batches, one CudaGraphDecoder each.

    Built after prefill (the cache holds the prompts and room for the decode). Micro-batch i
    holds rows sizes[0] + ... + sizes[i-1] onward of the batch; `step`/`greedy_step` take and
    return one tensor per micro-batch, living on that micro-batch's stream: `gather` (or
    `join`) before the caller's stream reads them. Use it from one caller stream.
    capture=False runs the static-shape step eagerly (any device), as CudaGraphDecoder does.
    priorities: one CUDA stream priority per micro-batch (lower runs first where both have
    blocks waiting; torch.cuda.Stream's `priority`), to try a fixed order; default all equal.
    """

    def __init__(self, compiled, cache, parts: int = 2, warmup: int = 2, capture: bool = True,
                 priorities: Optional[Sequence[int]] = None):
        self.sizes = split_sizes(cache.batch, parts)
        self.device = cache.device
        starts = [sum(self.sizes[:part]) for part in range(len(self.sizes))]
        self.caches = [cache.rows(start, start + size) for start, size in zip(starts, self.sizes)]
        cuda = self.device.type == "cuda"
        priorities = list(priorities) if priorities is not None else [0] * len(self.sizes)
        if len(priorities) != len(self.sizes):
            raise InputValidationError(f"{len(priorities)} stream priorities for {len(self.sizes)} micro-batches")
        self.streams = [torch.cuda.Stream(self.device, priority=priority) if cuda else None
                        for priority in priorities]
        self.decoders = []
        for part_cache, stream in zip(self.caches, self.streams):
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(self.device))  # the prefill wrote the rows
            with stream_scope(stream):  # each graph is captured on, and replayed from, its own stream
                self.decoders.append(CudaGraphDecoder(compiled, part_cache, warmup, capture, capture_stream=stream))
        self._on_own_streams = True

    def _streams_for(self, overlap: bool) -> list:
        """The stream each micro-batch's step goes on: its own (overlap), or the caller's, one
        micro-batch after the other (the serial control). Switching waits once, so that a
        micro-batch's steps stay in order."""
        if self.streams[0] is None:
            return self.streams
        current = torch.cuda.current_stream(self.device)
        if overlap != self._on_own_streams:
            for stream in self.streams:
                if overlap:
                    stream.wait_stream(current)
                else:
                    current.wait_stream(stream)
            self._on_own_streams = overlap
        return self.streams if overlap else [current] * len(self.streams)

    def split(self, ids: Tensor) -> List[Tensor]:
        """[B] (or [B, 1]) ids made on the caller's stream -> one [b_i] view per micro-batch;
        the micro-batches' streams wait for the caller's (once, not per step)."""
        parts = list(ids.reshape(-1).split(self.sizes))
        if self.streams[0] is not None:
            current = torch.cuda.current_stream(self.device)
            for stream in self.streams:
                stream.wait_stream(current)
                used_on(ids, stream)
        return parts

    @torch.no_grad()
    def step(self, ids: List[Tensor], overlap: bool = True) -> List[Tensor]:
        """Feed micro-batch i its [b_i] ids; returns its logits [b_i, 1, V] (when captured, a
        static buffer that its next step overwrites)."""
        logits = []
        for decoder, stream, part_ids in zip(self.decoders, self._streams_for(overlap), ids):
            with stream_scope(stream):
                logits.append(decoder.step(used_on(part_ids, stream)))
        return logits

    @torch.no_grad()
    def greedy_step(self, ids: List[Tensor], overlap: bool = True) -> List[Tensor]:
        """`step`, then each micro-batch's next ids [b_i] (argmax), chosen on its own stream, so
        that its next step needs nothing from another stream."""
        next_ids = []
        for decoder, stream, part_ids in zip(self.decoders, self._streams_for(overlap), ids):
            with stream_scope(stream):
                next_ids.append(decoder.step(used_on(part_ids, stream))[:, -1].argmax(dim=-1))
        return next_ids

    def join(self) -> None:
        """The caller's stream waits for the work enqueued so far on every micro-batch's stream
        (the micro-batches' streams do not wait for anything)."""
        if self.streams[0] is not None:
            current = torch.cuda.current_stream(self.device)
            for stream in self.streams:
                current.wait_stream(stream)

    def gather(self, parts: List[Tensor], dim: int = 0) -> Tensor:
        """The micro-batches' tensors joined along the batch `dim`, on the caller's stream."""
        self.join()
        current = torch.cuda.current_stream(self.device) if self.streams[0] is not None else None
        return torch.cat([used_on(part, current) for part in parts], dim=dim)


class FinishedFlags:
    """Whether every sequence has finished after each step, learned by the host without joining
    the streams: each micro-batch copies its flag to pinned memory on its own stream, and the host
    reads a step's flags once its events are done. It blocks only for steps more than `lag`
    behind the one being enqueued, which bounds the steps decoded past the end (their tokens,
    all padding, are dropped)."""

    def __init__(self, parts: int, steps: int, device: torch.device, lag: int):
        self.cuda = device.type == "cuda"
        self.flags = torch.zeros(parts, steps, dtype=torch.bool, pin_memory=self.cuda)
        self.events: List[list] = [[] for _ in range(parts)]
        self.lag = lag
        self.read = 0  # steps whose flags the host has read
        self.stop: Optional[int] = None  # the first step after which every sequence had finished

    def record(self, part: int, step: int, finished: Tensor) -> None:
        """On micro-batch `part`'s stream, after its `finished` [b_i] is updated for `step`."""
        self.flags[part, step].copy_(finished.all(), non_blocking=True)
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self.events[part].append(event)

    def poll(self, step: int, wait: bool = False) -> Optional[int]:
        """The stopping step if known by now, reading flags up to `step` (all of them: wait)."""
        while self.stop is None and self.read <= step:
            if self.cuda:
                events = [part_events[self.read] for part_events in self.events]
                must_read = wait or self.read <= step - self.lag
                if not must_read and not all(event.query() for event in events):
                    break
                for event in events:
                    event.synchronize()
            if bool(self.flags[:, self.read].all()):
                self.stop = self.read
            self.read += 1
        return self.stop


@torch.no_grad()
def greedy_decode_in_microbatches(backend, cache, first_ids: Tensor, parts: int, max_new_tokens: int,
                                  eos_token_id: Optional[int], pad: Optional[int],
                                  on_tokens: Optional[Callable[[Tensor], None]], capture: bool) -> Tensor:
    """generate.generate's greedy loop after prefill, with `cache`'s batch decoded as `parts`
    micro-batches; `first_ids` [B] are the tokens chosen from the prefill. Returns the new tokens
    [B, n], n ≤ max_new_tokens, equal to the plain loop's (which stops once every sequence has
    hit EOS). The host syncs per step only where the plain loop does: with `on_tokens`."""
    decoder = MicroBatchDecoder(backend, cache, parts, capture=capture)
    ids = decoder.split(first_ids)
    finished = []
    for stream, size in zip(decoder.streams, decoder.sizes):
        with stream_scope(stream):
            finished.append(torch.zeros(size, dtype=torch.bool, device=cache.device))
    # streaming callers see exactly the plain loop's steps, so they read every step's flags at once
    flags = (FinishedFlags(len(decoder.sizes), max_new_tokens, cache.device, lag=0 if on_tokens else 2)
             if eos_token_id is not None else None)
    generated: List[List[Tensor]] = [[] for _ in decoder.sizes]
    for step in range(max_new_tokens):
        for part, stream in enumerate(decoder.streams):
            with stream_scope(stream):
                if pad is not None:
                    ids[part] = torch.where(finished[part], torch.full_like(ids[part], pad), ids[part])
                generated[part].append(ids[part])
                if flags is not None:
                    finished[part] |= ids[part] == eos_token_id
                    flags.record(part, step, finished[part])
        if on_tokens is not None:
            on_tokens(decoder.gather(ids))
        if flags is not None and flags.poll(step) is not None:
            break
        if step + 1 < max_new_tokens:
            ids = decoder.greedy_step(ids)
    stop = flags.poll(len(generated[0]) - 1, wait=True) if flags is not None else None
    steps = len(generated[0]) if stop is None else stop + 1
    columns = []
    for stream, part_ids in zip(decoder.streams, generated):
        with stream_scope(stream):
            columns.append(torch.stack(part_ids[:steps], dim=1))  # [b_i, steps]
    return decoder.gather(columns)
