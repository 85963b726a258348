"""Fusion's graphs replayed from CUDA graphs, one captured graph per input signature.

The fused prefill runs two graphs over the fused cache: the question's probe (layers 0..L) and
the recompute (every layer). Launched op by op from Python they cost ~60 host calls per layer;
on the H200 machine that host time (~1 ms a layer) exceeds the GPU time of a 64-token probe
several times and still exceeds a 525-token recompute's (profiled: bench_fusion_ttft.py
--profile). Replaying a captured graph removes that host time.

A CUDA graph fixes shapes and addresses. The small inputs (token ids, positions, attention
biases) are copied into the graph's own buffers before each replay; the cache's K/V are read
where they are, so their addresses are part of the signature (a cache allocated again at the
same place — what the caching allocator does for same-sized requests — hits). A signature
seen once runs eagerly: capturing costs about one more eager run, which only pays for shapes
that come back. The replayed graph waits per layer for the chunk loads as the eager one does:
the loads record the same "external" events every call (fusion/loading.py, LoadChannel), and a
wait on such an event is captured as a graph node, which waits for the event's latest record
when the graph runs. Without external events (older torch) the stream waits for every load
before a replay instead.

Outputs of a replay are the graph's static buffers, overwritten by its next replay: callers
copy what they keep.
"""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from collections import Counter, OrderedDict
from typing import Optional, Sequence

import torch

from kvcompile.fusion.loading import LayerLoads, no_layer_waits


def _signature(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class GraphReplays:
    """`run(name, graph, copied, in_place, loads)` = graph(*copied, *in_place), from a CUDA graph
    once that signature has been seen before (eager on the CPU, on first sight, or when disabled
    by KVCOMPILE_FUSION_CUDA_GRAPHS=0). Keeps the `capacity` most recently used graphs."""

    def __init__(self, capacity: int = 4, enabled: Optional[bool] = None):
        self.capacity = capacity
        self.enabled = os.environ.get("KVCOMPILE_FUSION_CUDA_GRAPHS", "1") != "0" if enabled is None else enabled
        self._graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self._sightings: Counter = Counter()
        self._refused: dict = {}  # signature -> why its capture failed
        self.replayed = 0  # replays so far (tests and benchmarks read it)

    def run(self, name: str, graph, copied: Sequence[torch.Tensor], in_place: Sequence[torch.Tensor],
            loads: Optional[LayerLoads] = None):
        args = [*copied, *in_place]
        # host-resident values (kcache) are copied by the host inside the graph: not capturable
        if (not self.enabled or not all(t.is_cuda for t in args) or torch.cuda.is_current_stream_capturing()):
            return graph(*args)
        # waits inside: the graph waits on these events per layer (captured as wait nodes)
        waits = tuple(id(event) for event in loads.events) if loads is not None and loads.graph_waitable else None
        key = (name, id(graph), tuple(_signature(t) for t in copied),
               tuple(_signature(t) + (t.data_ptr(),) for t in in_place), waits)
        entry = self._graphs.get(key)
        if key in self._refused:
            return graph(*args)
        if entry is None:
            if len(self._sightings) > 1024:  # signatures that never came back
                self._sightings.clear()
            self._sightings[key] += 1
            if self._sightings[key] < 2:
                return graph(*args)
        if loads is not None and waits is None:
            loads.finish()
        with no_layer_waits() if waits is None else nullcontext():
            if entry is None:
                try:
                    entry = self._capture(graph, copied, in_place)
                except RuntimeError as error:  # an op that cannot be captured: this signature runs eagerly
                    self._refused[key] = str(error).splitlines()[0] if str(error) else type(error).__name__
                    warnings.warn(f"fusion's {name} graph runs eagerly: CUDA graph capture failed "
                                  f"({self._refused[key]})", RuntimeWarning, stacklevel=3)
                    return graph(*args)
                self._graphs[key] = entry
                while len(self._graphs) > self.capacity:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            for buffer, value in zip(entry.inputs, copied):
                buffer.copy_(value, non_blocking=True)
            entry.graph.replay()
        self.replayed += 1
        return entry.outputs

    @staticmethod
    def _capture(graph, copied, in_place) -> _Captured:
        from kvcompile.runtime.cuda_graph import capture_graph

        inputs = [t.clone() for t in copied]
        captured, outputs = capture_graph(lambda: graph(*inputs, *in_place), copied[0].device)
        return _Captured(captured, inputs, outputs)
