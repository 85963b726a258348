"""Decode steps replayed from one CUDA graph: the whole step (every layer) for one cache.

An eager decode step of a 16-layer model launches hundreds of kernels from Python, and at
small models that host time, not the GPU, sets the step time (docs/BENCHMARKS.md measured
65 ms of CPU against 44 ms of GPU over two full-cache steps). A CUDA graph replays the
launches without the host. A graph needs fixed shapes and addresses, so the decoder gives the
compiled graph the cache's whole capacity C as its past (static views of the cache buffers)
and hides the unfilled positions through the mask, whose inputs (which positions hold real
tokens, and their position ids) live in static [B, C] tensors the graph itself updates:

  graph:   positions = Σ valid; masks from (valid, positions) -> model step over the C-long past
           -> new K (and device V) written at `write_index` with index_copy_; valid / positions
           marked there too
  host:    ids and write_index filled; replay; the new host-resident V rows copied to pinned
           memory on the cache's side stream (the next replay waits for them)

Attention then reads C positions instead of the filled length, so give the cache no more
capacity than the decode needs. The result equals the eager step: hidden positions get zero
probability, and KCache's top-N, which can only add zero-weight rows, keeps its output (a
fractional topn is computed from C + 1 instead of the filled length).
"""
from __future__ import annotations

import torch

from kvcompile.errors import ContextLengthError
from kvcompile.runtime.masks import step_biases


def capture_graph(fn, device, warmup: int = 1, after_warmup=None, stream=None, error_mode: str = "global"):
    """(a CUDA graph of `fn()`, what `fn` returned while captured: the graph's output buffers).

    `fn` runs `warmup` times eagerly on a side stream first (`after_warmup()` after each, to
    undo what a run changed): lazily created kernel state (cuBLAS workspaces, cuDNN plans)
    must exist before a capture, which may not allocate it. `stream`: the stream to capture on
    (default: torch's capture stream); `error_mode`: torch.cuda.graph's capture_error_mode.
    Nothing has run when this returns: replay the graph for the first result."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
            if after_warmup is not None:
                after_warmup()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode=error_mode):
        outputs = fn()
    return graph, outputs


class CudaGraphDecoder:
    """`step(next_ids) -> logits [B, 1, V]` for `cache`, replayed from a captured graph.

    The returned logits are a static buffer, overwritten by the next step. The cache must not
    be grown or written by anything else while the decoder is used (it checks the growth).
    capture=False runs the same static-shape step eagerly (any device; what the CPU tests
    compare with the plain decode step). capture_stream: the stream to capture on (default:
    torch's one capture stream). Graphs replayed concurrently need streams of their own: torch
    keys cuBLAS workspaces by stream, so graphs captured on one stream share a workspace.
    """

    def __init__(self, compiled, cache, warmup: int = 2, capture: bool = True, capture_stream=None):
        if capture and cache.device.type != "cuda":
            raise ValueError("CUDA graph decoding needs a cache on a CUDA device")
        if cache.length < 1:
            raise ValueError("CUDA graph decoding starts after prefill: the cache is empty")
        if cache.length >= cache.capacity:
            raise ContextLengthError(f"the cache is full ({cache.length} of {cache.capacity} positions): "
                                     "reserve room for the decode steps before capturing")
        self.compiled, self.cache = compiled, cache
        spec, batch, device = cache.spec, cache.batch, cache.device
        self.capacity = cache.capacity
        self._storage = cache.keys[0].data_ptr()
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)
        self.new_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, self.capacity, dtype=torch.long, device=device)
        self.valid[:, : cache.length] = cache.valid
        self.positions[:, : cache.length] = cache.positions
        cache.wait_for_host_copies()
        self.past_keys, self.past_values = [], []
        for layer in range(spec.num_layers):
            self.past_keys.append(cache.keys[layer][:, :, : self.capacity])
            self.past_values.append(cache.values[layer][:, : self.capacity] if cache.is_host_layer(layer)
                                    else cache.values[layer][:, :, : self.capacity])
        self.host_layers = [layer for layer in range(spec.num_layers) if cache.is_host_layer(layer)]
        self.write_index.fill_(cache.length)
        self.capture_stream = capture_stream
        self.graph = None
        if capture:
            self._capture(warmup)

    def _body(self):
        cache, spec = self.cache, self.cache.spec
        positions = self.valid.long().sum(dim=1, keepdim=True)  # [B, 1]: real tokens so far
        biases = step_biases(spec, self.valid, self.positions, self.new_valid, positions, cache.dtype)
        logits, new_keys, new_values = self.compiled.step(self.ids, positions, biases, self.past_keys,
                                                          self.past_values)
        for layer in range(spec.num_layers):
            cache.keys[layer].index_copy_(2, self.write_index, new_keys[layer])
            if not cache.is_host_layer(layer):
                cache.values[layer].index_copy_(2, self.write_index, new_values[layer])
        self.valid.index_fill_(1, self.write_index, True)
        self.positions.index_copy_(1, self.write_index, positions)
        return logits, new_values

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        # Warm-up runs (kernel choices, library loads, cuDNN plans) happen eagerly on a side
        # stream, as capture requires; they write the slot of the next token, which the first
        # real step overwrites, and the mask state is restored afterwards.
        # The past length is fixed from here on, so the full cache's decode may take a kernel
        # that plans per shape (cuDNN: decode_backends).
        from kvcompile.ops.cached_attention import decode_backends

        valid, positions = self.valid.clone(), self.positions.clone()

        def restore_masks():
            self.valid.copy_(valid)
            self.positions.copy_(positions)

        with decode_backends.static_past_length():
            # "relaxed": the kcache op asks whether its host buffer is pinned (a driver query
            # that the strict capture mode refuses, though it enqueues nothing)
            self.graph, (self.logits, self.new_values) = capture_graph(
                self._body, self.cache.device, warmup, restore_masks, self.capture_stream, "relaxed")

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.keys[0].data_ptr() != self._storage:
            raise RuntimeError("the cache was reallocated since capture; make a new CudaGraphDecoder")
        if cache.length >= self.capacity:
            raise ContextLengthError(f"the cache is full ({cache.length} of {self.capacity} positions)")
        start = cache.length
        self.ids.copy_(next_ids.reshape(cache.batch, 1))
        self.write_index.fill_(start)
        cache.wait_for_host_copies()  # last step's host V rows are read by this one
        if self.graph is None:
            self.logits, self.new_values = self._body()
        else:
            self.graph.replay()
        if self.host_layers:
            cache.copy_values_to_host(self.new_values, start, start + 1)
        cache.length = start + 1
        cache.valid = self.valid[:, : cache.length]
        cache.positions = self.positions[:, : cache.length]
        return self.logits
