"""Cache managers: own the K/V storage of a batch of sequences across prefill and decode.

The compiled graph is functional: it reads `past_key.i`/`past_value.i` and returns this step's
`new_key.i`/`new_value.i`. The manager keeps preallocated buffers, hands the graph views of the
filled part (no copy of the past per step), and appends the new entries.

Layouts:  full layer   key [B, Hkv, cap, D] and value [B, Hkv, cap, D] on the compute device
          kcache layer key [B, Hkv, cap, D] on the device; value [B, cap, Hkv, D] in host memory
          (token-major, so one token's values for all heads are one row; pinned when on CUDA)
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch

from kvcompile.core.layout import GraphSpec
from kvcompile.errors import HostMemoryError  # noqa: F401  (raised here)




def allocate_host_values(shape, dtype, pin: bool) -> torch.Tensor:
    try:
        return torch.zeros(shape, dtype=dtype, pin_memory=pin)
    except RuntimeError as err:
        gib = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() / 2**30
        raise HostMemoryError(
            f"cannot allocate {gib:.2f} GiB of {'pinned ' if pin else ''}host memory for the V cache "
            f"{tuple(shape)}: {str(err).splitlines()[0]}; lower the batch size or the context length"
        ) from None


class KVCacheManager:
    """K/V storage for `batch` sequences, growing by doubling when a step would overflow."""

    def __init__(self, spec: GraphSpec, batch: int, capacity: int, device, dtype: torch.dtype):
        self.spec = spec
        self.batch = batch
        self.device = torch.device(device)
        self.dtype = dtype
        self.length = 0  # positions filled (same for every sequence; padding is marked invalid)
        self.capacity = 0
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host_copies_done: Optional[torch.cuda.Event] = None
        self.reserve(max(capacity, 1))

    # storage -------------------------------------------------------------------------------
    def is_host_layer(self, layer: int) -> bool:
        return self.spec.layers[layer].host_values

    def new_buffers(self, capacity: int):
        spec, batch = self.spec, self.batch
        # One allocation (and one zero fill) for every layer's device-resident K and V, seen as
        # one [B, Hkv, capacity, D] view each: 2 per layer cost ~64 launches and allocator calls
        # of host time on an 8B model (2.3 ms of a fused prefill's profile), and a cache made
        # again after one of the same size was freed lands at the same address, which the
        # replayed graphs of the fused prefill key on (fusion/graph_replay.py).
        device_values = [layer for layer in range(spec.num_layers) if not self.is_host_layer(layer)]
        block = torch.zeros(spec.num_layers + len(device_values), batch, spec.kv_heads, capacity, spec.head_dim,
                            dtype=self.dtype, device=self.device)
        # block[i], not unbind(): in-place writes into unbind's views are refused in grad mode
        keys = [block[layer] for layer in range(spec.num_layers)]
        device_value = {layer: block[spec.num_layers + i] for i, layer in enumerate(device_values)}
        values = []
        for layer in range(spec.num_layers):
            if layer in device_value:
                values.append(device_value[layer])
            else:
                shape = (batch, capacity, spec.kv_heads, spec.head_dim)
                values.append(allocate_host_values(shape, self.dtype, pin=self.device.type == "cuda"))
        return keys, values

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions, keeping what is cached."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        self.wait_for_host_copies()
        keys, values = self.new_buffers(capacity)
        for layer in range(self.spec.num_layers):
            if self.length:
                keys[layer][:, :, : self.length].copy_(self.keys[layer][:, :, : self.length])
                if self.is_host_layer(layer):
                    values[layer][:, : self.length].copy_(self.values[layer][:, : self.length])
                else:
                    values[layer][:, :, : self.length].copy_(self.values[layer][:, :, : self.length])
        self.keys, self.values, self.capacity = keys, values, capacity

    def rows(self, start: int, stop: int) -> "KVCacheManager":
        """A manager of sequences start..stop-1 over this one's storage (views: no copy), with
        its own side stream for host copies: the micro-batches of runtime/microbatch.py. What
        it appends lands in the shared buffers but not in this manager's length and masks; a
        part that outgrows the capacity gets buffers of its own (reserve the room first)."""
        self.wait_for_host_copies()
        part = copy.copy(self)
        part.batch = stop - start
        part.keys = [key[start:stop] for key in self.keys]
        part.values = [value[start:stop] for value in self.values]  # batch is dim 0 in both layouts
        part.valid, part.positions = self.valid[start:stop], self.positions[start:stop]
        part.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        part.host_copies_done = None
        return part

    # what the graph reads ------------------------------------------------------------------
    def past(self, layer: int):
        """(past_key, past_value) views of the filled positions, in the layer's layout."""
        key = self.keys[layer][:, :, : self.length]
        if self.is_host_layer(layer):
            return key, self.values[layer][:, : self.length]
        return key, self.values[layer][:, :, : self.length]

    def past_all(self):
        self.wait_for_host_copies()
        pairs = [self.past(layer) for layer in range(self.spec.num_layers)]
        return [k for k, _ in pairs], [v for _, v in pairs]

    # what the graph wrote ------------------------------------------------------------------
    def append(self, new_keys, new_values, new_valid: torch.Tensor, new_positions: torch.Tensor) -> None:
        """Store this step's K/V ([B, Hkv, T, D] per layer) after the filled positions."""
        tokens = new_valid.shape[1]
        self.reserve(self.length + tokens)
        start, end = self.length, self.length + tokens
        for layer in range(self.spec.num_layers):
            self.keys[layer][:, :, start:end].copy_(new_keys[layer])
            if not self.is_host_layer(layer):
                self.values[layer][:, :, start:end].copy_(new_values[layer])
        self.copy_values_to_host(new_values, start, end)
        self.valid = torch.cat([self.valid, new_valid.to(self.device)], dim=1)
        self.positions = torch.cat([self.positions, new_positions.to(self.device)], dim=1)
        self.length = end

    def write_rows(self, rows: torch.Tensor, new_keys: dict, new_values: dict) -> None:
        """Overwrite cached positions `rows` ([k] row indices, same for every sequence) with
        [B, Hkv, k, D] K/V of the layers given ({layer: tensor}): fusion writes recomputed
        tokens into a reused cache."""
        self.wait_for_host_copies()
        rows = rows.to(self.device)
        for layer in new_keys:
            self.keys[layer][:, :, rows] = new_keys[layer].to(self.keys[layer].dtype)
            if self.is_host_layer(layer):
                self.values[layer][:, rows.cpu()] = new_values[layer].transpose(1, 2).to(
                    device=self.values[layer].device, dtype=self.values[layer].dtype)
            else:
                self.values[layer][:, :, rows] = new_values[layer].to(self.values[layer].dtype)

    def copy_values_to_host(self, new_values, start: int, end: int) -> None:
        """Move kcache layers' new V to host memory; on CUDA on a side stream, so the next
        step's early layers run while the copy is in flight (it waits only before reading)."""
        host_layers = [layer for layer in range(self.spec.num_layers) if self.is_host_layer(layer)]
        if not host_layers:
            return
        if self.copy_stream is None:
            for layer in host_layers:
                self.values[layer][:, start:end].copy_(new_values[layer].transpose(1, 2))
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for layer in host_layers:
                source = new_values[layer].transpose(1, 2)  # [B, T, Hkv, D]
                copy_to_host_rows(self.values[layer][:, start:end], source)
                new_values[layer].record_stream(self.copy_stream)
        self.host_copies_done = torch.cuda.Event()
        self.host_copies_done.record(self.copy_stream)

    def wait_for_host_copies(self) -> None:
        if self.host_copies_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.host_copies_done)
            self.host_copies_done = None

    def device_bytes(self) -> int:
        """Bytes of cache held on the compute device (filled part only)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        per_token = self.batch * self.spec.kv_heads * self.spec.head_dim * element
        device_tensors = self.spec.num_layers + sum(not self.is_host_layer(i) for i in range(self.spec.num_layers))
        return per_token * self.length * device_tensors


def copy_to_host_rows(destination: torch.Tensor, source: torch.Tensor) -> None:
    """source (CUDA) -> destination, a view of pinned host memory, without blocking the host.

    With a batch above one, a step's rows of the host cache [B, capacity, Hkv, D] are not one
    contiguous block, and torch copies a non-contiguous host destination through a pageable
    temporary: the host then waits for the stream to reach the copy, i.e. for the whole decode
    step. That serialised micro-batches (runtime/microbatch.py: the host could not enqueue one
    micro-batch's step before the other's had finished; measured on the H200, docs/KCACHE.md).
    Each sequence's rows are contiguous, so they go as one asynchronous copy per sequence."""
    if destination.is_contiguous():
        destination.copy_(source, non_blocking=True)
        return
    source = source.contiguous()
    for row in range(destination.shape[0]):
        destination[row].copy_(source[row], non_blocking=True)
