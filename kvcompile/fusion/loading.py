"""Layer-wise loading of chunk caches into the fused cache, overlapped with compute.

CacheBlend's pipelining: while layer i computes, layer i + 1's chunk K/V are still on their way
from host memory, so slower storage costs no time to first token. Here every layer's copy (host
or device chunk tensors -> the cache's rows) and its keys' re-rotation are enqueued at once on
a side CUDA stream, each layer closing with an event; the graphs fusion runs wait for layer i's
event just before layer i first reads its cache (passes/layer_ready_graph.py inserts
`wait_for_layer` there), so the compute stream never waits for a layer it does not need yet
and the host never waits at all. Pinned host tensors make the copies truly asynchronous.

On the CPU, or for a cache with host-resident values (kcache: the host writes those rows
itself), everything is done in order at once and the waits are no-ops.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, List, Optional, Sequence

import torch

# the events of the loads the running graph belongs to (None: nothing to wait for)
_READY_EVENTS: ContextVar[Optional[list]] = ContextVar("kvcompile_fusion_ready_events", default=None)


def wait_for_layer(layer: int, tensor: torch.Tensor) -> torch.Tensor:
    """Make the current stream wait until layer `layer`'s chunk K/V are in place; returns `tensor`
    (called from inside the graphs, at the first reader of that layer's cache)."""
    events = _READY_EVENTS.get()
    if events is not None and events[layer] is not None:
        torch.cuda.current_stream(tensor.device).wait_event(events[layer])
    return tensor


class LayerLoads:
    """Fill an empty cache's first rows with `chunks` at `offsets`: values as they are, keys
    re-rotated by `reposition(keys, layer, delta)`; layer by layer, on a side stream on CUDA."""

    def __init__(self, cache, chunks: Sequence, offsets: List[int], reposition: Callable,
                 rotation_of: Optional[Callable] = None, group: int = 8, channel: Optional["LoadChannel"] = None):
        self.cache = cache
        total = offsets[-1] + chunks[-1].length
        device = cache.device
        self.overlapped = device.type == "cuda" and not any(cache.is_host_layer(i) for i in range(len(cache.keys)))
        self.events: List[Optional[torch.cuda.Event]] = [None] * len(cache.keys)
        self.stream = None
        # whether a CUDA graph captured over these loads may wait on their events inside it
        self.graph_waitable = False
        if self.overlapped:
            channel = channel if channel is not None else LoadChannel(device, len(cache.keys))
            self.stream = channel.stream
            if channel.events is not None:
                self.events, self.graph_waitable = list(channel.events), True
        cache.reserve(total)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the cache buffers exist
        # Each token's shift: its chunk's offset (repeat_interleave with output_size: no host
        # sync). Made on the loads' stream: made on the current one, they would be freed at
        # the end of this call and their memory handed to the current stream's next tensor
        # while the loads, queued behind slow copies, have yet to read them (a GPU test holds
        # the loads back and caught exactly that).
        with torch.cuda.stream(self.stream) if self.stream is not None else _no_stream():
            lengths = torch.tensor([c.length for c in chunks], device=device)
            self.offsets = torch.tensor(offsets, device=device)
            delta = torch.repeat_interleave(self.offsets, lengths, output_size=total)[None]
        if self.stream is not None and packed_alike(chunks, cache):
            # A first group of 2 layers, then groups of `group`: a graph waiting for layer i
            # waits for its group's last copy, so CacheBlend's check of layers 0-1 starts after
            # 2/32 of the 8B transfer instead of 8/32; later groups stay large because each
            # costs host time (~25 launches: its copies, re-rotation and writes) and every load
            # is enqueued before the first graph launches (groups of 2 throughout measured
            # +3-4 ms of host time on the H200, docs/FUSION.md).
            for layers in layer_groups(len(cache.keys), group):
                with torch.cuda.stream(self.stream):
                    self.load_packed_group(layers, chunks, reposition, rotation_of)
        else:
            for layer in range(len(cache.keys)):
                with torch.cuda.stream(self.stream) if self.stream is not None else _no_stream():
                    self.load_layer(layer, chunks, offsets, total, delta, reposition)
                    self.record(layer)
        cache.valid = torch.ones(1, total, dtype=torch.bool, device=device)
        cache.positions = torch.arange(total, device=device)[None]
        cache.length = total

    def record(self, layer: int) -> None:
        if self.stream is not None:
            if not self.graph_waitable:
                self.events[layer] = torch.cuda.Event()
            self.events[layer].record(self.stream)

    def load_packed_group(self, layers: range, chunks, reposition, rotation_of) -> None:
        """Equal-length chunks packed by ChunkCache.pin(): one copy per chunk moves this group of
        layers' K and V to a device staging buffer; layers sharing a rotation are re-rotated in
        one call (chunks × layers as its batch), and each layer's K and V are written into the
        cache's rows with one kernel each. Per 8-layer group of 6 chunks: 6 copies, 1-2
        re-rotations, 16 writes — against 6 × 2 copies, a re-rotation and 2 writes per layer."""
        cache = self.cache
        count, length = len(chunks), chunks[0].length
        heads, dim = chunks[0].keys[0].shape[1], chunks[0].keys[0].shape[3]
        staged = torch.empty((count, len(layers), *chunks[0].packed.shape[1:]), dtype=cache.keys[0].dtype,
                             device=cache.device)  # [chunks, layers, 2, 1, Hkv, L, D]
        for index, chunk in enumerate(chunks):
            staged[index].copy_(chunk.packed[layers.start:layers.stop], non_blocking=True)
        keys = staged[:, :, 0, 0]  # [chunks, layers, Hkv, L, D]
        offsets_device = self.offsets
        rotated: dict = {}  # position in the group -> that layer's re-rotated keys [chunks, Hkv, L, D]
        groups: dict = {}
        for j, layer in enumerate(layers):
            groups.setdefault(rotation_of(layer) if rotation_of is not None else ("layer", layer), []).append(j)
        for rotation, members in groups.items():
            if len(members) == len(layers) and rotation is not None:  # every layer alike: one call
                delta = offsets_device.repeat_interleave(len(layers))[:, None].expand(-1, length)
                out = reposition(keys.reshape(count * len(layers), heads, length, dim), layers.start, delta)
                rotated.update((j, view) for j, view in enumerate(out.view(count, len(layers), heads, length, dim)
                                                                  .unbind(1)))
                continue
            for j in members:
                rotated[j] = reposition(keys[:, j], layers[j], offsets_device[:, None].expand(-1, length))
        for j, layer in enumerate(layers):
            write_chunks(cache.keys[layer], rotated[j])
            write_chunks(cache.values[layer], staged[:, j, 1, 0])
            self.record(layer)

    def load_layer(self, layer: int, chunks, offsets, total: int, delta, reposition) -> None:
        if self.stream is not None:
            return self.load_layer_staged(layer, chunks, offsets, total, delta, reposition)
        cache = self.cache
        host_values = cache.is_host_layer(layer)
        for chunk, offset in zip(chunks, offsets):
            rows = slice(offset, offset + chunk.length)
            cache.keys[layer][:, :, rows].copy_(chunk.keys[layer], non_blocking=True)
            if host_values:  # [B, cap, Hkv, D] in host memory
                cache.values[layer][:, rows].copy_(chunk.values[layer].transpose(1, 2))
            else:
                cache.values[layer][:, :, rows].copy_(chunk.values[layer], non_blocking=True)
        keys = cache.keys[layer][:, :, :total]
        moved = reposition(keys, layer, delta)
        if moved is not keys:  # NoPE layers keep their keys
            keys.copy_(moved)

    def load_layer_staged(self, layer: int, chunks, offsets, total: int, delta, reposition) -> None:
        """The CUDA path: each chunk's K and V land whole in a device staging buffer (one plain
        memcpy each), then are re-rotated and written into the cache's rows by few kernels.
        Copying host chunks straight into the cache's rows (strided: [B, Hkv, rows, D]) made
        torch stage every copy through a temporary and a copy kernel of its own: ~50 µs of host
        time per chunk, layer and K/V (16 ms of the 8B benchmark's placement, profiled)."""
        cache = self.cache
        batch, heads, _, dim = cache.keys[layer].shape
        equal = all(chunk.length == chunks[0].length for chunk in chunks)
        staged = torch.empty((2, len(chunks), batch, heads, chunks[0].length, dim) if equal else
                             (2, batch * heads * total * dim), dtype=cache.keys[layer].dtype, device=cache.device)
        pieces, start = [], 0
        for index, chunk in enumerate(chunks):  # contiguous host tensors -> contiguous device slots
            if equal:
                key_slot, value_slot = staged[0, index], staged[1, index]
            else:
                size = chunk.keys[layer].numel()
                key_slot = staged[0, start:start + size].view(chunk.keys[layer].shape)
                value_slot = staged[1, start:start + size].view(chunk.values[layer].shape)
                start += size
            key_slot.copy_(chunk.keys[layer], non_blocking=True)
            value_slot.copy_(chunk.values[layer], non_blocking=True)
            pieces.append((key_slot, value_slot))
        if equal and batch == 1:
            # chunks as the batch axis: one re-rotation (delta per chunk and token) and one write
            # each for K and V into the cache's rows, seen as [Hkv, chunks, tokens, D]
            count, length = len(chunks), chunks[0].length
            keys = staged[0].reshape(count, heads, length, dim)
            write_chunks(cache.keys[layer], reposition(keys, layer, delta.reshape(count, length)))
            write_chunks(cache.values[layer], staged[1].reshape(count, heads, length, dim))
            return
        for (key_slot, value_slot), chunk, offset in zip(pieces, chunks, offsets):
            rows = slice(offset, offset + chunk.length)
            cache.keys[layer][:, :, rows].copy_(reposition(key_slot, layer, delta[:, rows].expand(batch, -1)))
            cache.values[layer][:, :, rows].copy_(value_slot)

    def wait(self, layers) -> None:
        """The current stream waits for these layers (before reading or writing their rows outside a graph)."""
        for layer in layers:
            if self.events[layer] is not None:
                torch.cuda.current_stream(self.cache.device).wait_event(self.events[layer])

    def finish(self) -> None:
        """Everything loaded before anything after the fused prefill runs."""
        self.wait(range(len(self.events)))

    @contextmanager
    def awaited(self):
        """Graphs run inside wait for each layer's event before reading it (wait_for_layer)."""
        token = _READY_EVENTS.set(self.events if self.overlapped else None)
        try:
            yield
        finally:
            _READY_EVENTS.reset(token)


class LoadChannel:
    """The side stream chunk loads run on and one event per layer, kept across fused prefills.

    The events are "external" ones: a CUDA graph captured while waiting on them keeps the waits
    as graph nodes, so a replayed probe or recompute still waits for each layer's load (the
    loads of the call it replays in record the same events again) instead of for all of them
    before it starts. A torch without external events gets None: replays then wait for every
    load first (fusion/graph_replay.py)."""

    def __init__(self, device, layers: int):
        self.stream = torch.cuda.Stream(device)
        try:
            self.events: Optional[List[torch.cuda.Event]] = [torch.cuda.Event(external=True) for _ in range(layers)]
        except TypeError:
            self.events = None


def layer_groups(layers: int, group: int, first: int = 2) -> List[range]:
    """Consecutive layer ranges: the first `first` layers, then up to each multiple of `group`."""
    bounds = [0, min(first, layers)] + [b for b in range(group, layers, group) if b > first] + [layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def write_chunks(layer_cache: torch.Tensor, rows: torch.Tensor) -> None:
    """rows [chunks, Hkv, L, D] of equal-length chunks laid side by side -> the first chunks · L
    positions of one layer's cache [1, Hkv, capacity, D], in one copy kernel (the cache's
    positions seen as [Hkv, chunks, L, D])."""
    count, heads, length, dim = rows.shape
    layer_cache[0, :, :count * length].view(heads, count, length, dim).copy_(rows.transpose(0, 1))


def packed_alike(chunks, cache) -> bool:
    """Whether load_packed_group applies: every chunk packed by pin() (views intact), of one
    length and shape, batch 1, into a cache whose layers all match that shape."""
    first = chunks[0]
    if not all(c.packed_views_current() and c.length == first.length for c in chunks):
        return False
    if {tuple(c.packed.shape) for c in chunks} != {tuple(first.packed.shape)} or first.packed.shape[2] != 1:
        return False
    shape = first.packed.shape  # [layers, 2, 1, Hkv, L, D]
    return len(cache.keys) == shape[0] and all(
        k.shape[1] == shape[3] and k.shape[3] == shape[5] and k.dtype == first.packed.dtype for k in cache.keys)


@contextmanager
def no_layer_waits():
    """Graphs run inside do not wait per layer (a CUDA graph captured or replayed over loads
    whose events it cannot wait on: the stream waited for every load before, graph_replay.py)."""
    token = _READY_EVENTS.set(None)
    try:
        yield
    finally:
        _READY_EVENTS.reset(token)


@contextmanager
def _no_stream():
    yield
