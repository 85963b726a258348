"""The fused prefill: chunk caches placed in a new prompt, the tokens that matter recomputed.

For a prompt `chunk_1 … chunk_k query` whose chunks were each precomputed alone from position 0:
  1. place: each chunk's keys are re-rotated from 0.. to their offset in the prompt (per layer,
     from its record: any RoPE layout, partial rotary, scaling; NoPE layers keep theirs) and
     appended with their values to the cache — this alone is "full reuse";
  2. select (recompute_ratio r of the chunk tokens): the check graph (passes/check_layer_graph.py)
     recomputes layers 0..L for every token with attention across chunks; the selector ranks the
     tokens (KV deviation at layer L, the question's attention, or chunk heads) and the check
     pass's K/V of layers 0..L replace the reused ones;
  3. recompute: the chosen tokens and the query run through every layer as one step of the
     compiled graph, at their own positions, attending over the fused cache (the chosen tokens'
     stale rows hidden); their new K/V are written into their rows, the query's appended.
Decoding then continues from the fused cache with the model's cache kind (full or kcache).
r = 1 recomputes everything (= full prefill); r = 0 recomputes only the query (= full reuse).

The chunks load layer by layer on a side stream while the graphs compute (fusion/loading.py);
on the torch runtime the graphs are variants of the compiled one (built once, sharing its
weights): they wait for each layer's load just before reading it (passes/layer_ready_graph.py),
the check pass attends with the causal kernel (passes/causal_prefill_graph.py), and the
recompute can return the last token's logits only (passes/last_logits_graph.py). The host waits
once, for the chosen rows.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from kvcompile.core.records import WindowKind
from kvcompile.errors import ConfigError, UnsupportedAttentionError, UsageError
from kvcompile.fusion.chunks import ChunkCache, model_fingerprint
from kvcompile.fusion.graph_replay import GraphReplays
from kvcompile.fusion.loading import LayerLoads, LoadChannel
from kvcompile.fusion.selectors import DEFAULT_SELECTOR, TokenSelector
from kvcompile.runtime.masks import step_biases


def uses_learned_positions(graph_module) -> bool:
    """Whether position ids feed an embedding table (GPT-2 style absolute positions): then every
    layer's K/V depends on the absolute position and a chunk cache cannot move."""
    position_ids = next((n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name == "position_ids"),
                        None)
    frontier, seen = [position_ids] if position_ids is not None else [], set()
    while frontier and len(seen) < 50:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "call_function" and user.target == torch.ops.aten.embedding.default and user.args[1] is node:
                return True
            if user.op == "call_function" and user.target in (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
                                                              torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                                                              torch.ops.aten.to.dtype, torch.ops.aten.unsqueeze.default,
                                                              torch.ops.aten.clone.default):
                frontier.append(user)
    return False


class Fusion:
    """The fused prefill over one CompiledModel (its check graphs are built once and kept)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.spec = compiled.spec
        self.fingerprint = model_fingerprint(compiled.spec, compiled.model_config)
        self._check_graphs: dict = {}
        self._learned_positions: Optional[bool] = None
        self._inverse_frequencies: dict = {}  # layer -> _rope's entry
        self._variants: dict = {}
        self.replays = GraphReplays()  # the variant graphs replayed from CUDA graphs (graph_replay.py)
        self._load_channels: dict = {}  # device -> LoadChannel: the loads' stream and per-layer events

    # chunk caches -------------------------------------------------------------------------
    @torch.no_grad()
    def precompute_chunk(self, token_ids) -> ChunkCache:
        from kvcompile.runtime import generate as gen

        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(self.compiled.device)
        cache = self.compiled.new_cache(1, ids.shape[1])
        gen.prefill(self.compiled, cache, ids)
        keys, values = cache.past_all()
        values = [v.transpose(1, 2) if self.spec.layers[i].host_values else v for i, v in enumerate(values)]
        return ChunkCache(ids[0].cpu(), [k.clone() for k in keys], [v.contiguous().clone() for v in values],
                          self.fingerprint, self.spec.dtype, self.compiled.cache_config.kind.value)

    def check_graph(self, layer: int):
        """The graph cut after `layer`: cut from the torch graph, or an artifact's check.onnx."""
        if layer not in self._check_graphs:
            if hasattr(self.compiled, "check_graph_for"):
                self._check_graphs[layer] = self.compiled.check_graph_for(layer)
            else:
                from kvcompile.passes.check_layer_graph import check_layer_graph

                self._check_graphs[layer] = check_layer_graph(self.compiled.graph_module, layer)
        return self._check_graphs[layer]

    def variant(self, name: str, layer: Optional[int] = None):
        """A torch-runtime graph made for fusion, built once (None on ONNX Runtime):
        "recompute" / "recompute_last": the compiled graph waiting per layer (all logits / the last);
        "probe": the check graph cut after `layer`, waiting per layer; "check": the same cut, with
        the causal kernel (for a pass over every token from position 0, no past)."""
        if not isinstance(getattr(self.compiled, "graph_module", None), torch.fx.GraphModule):
            return None  # ONNX Runtime, or a hand-written module: no graph to derive from
        key = (name, layer)
        if key not in self._variants:
            from kvcompile.passes.causal_prefill_graph import causal_prefill_graph
            from kvcompile.passes.last_logits_graph import last_logits_graph
            from kvcompile.passes.layer_ready_graph import layer_ready_graph

            build = {"recompute": lambda: layer_ready_graph(self.compiled.graph_module),
                     "recompute_last": lambda: layer_ready_graph(last_logits_graph(self.compiled.graph_module)),
                     "probe": lambda: layer_ready_graph(self.check_graph(layer)),
                     "check": lambda: causal_prefill_graph(self.check_graph(layer))}
            self._variants[key] = build[name]()
        return self._variants[key]

    def windows_cut(self, tokens: int) -> bool:
        """Whether some layer's window hides part of a `tokens`-long prompt from its end (then the
        bias is not the causal one and the causal kernel does not apply)."""
        return any(window.kind is not WindowKind.NONE and window.size < tokens for window in self.spec.bias_windows())

    # the fused prefill --------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, cache, chunks: Sequence[ChunkCache], query_ids, recompute_ratio: float = 0.15,
                selector=DEFAULT_SELECTOR, check_layer: Optional[int] = None,
                last_logits_only: bool = False) -> torch.Tensor:
        """Fill the empty `cache` (batch 1) with chunks + query; returns the query's logits [1, Tq, V]
        ([1, 1, V], its last token's, with `last_logits_only`)."""
        selector = TokenSelector.parse(selector, "token selector")
        check_layer = self.resolve_check_layer(selector, check_layer)
        if not 0.0 <= recompute_ratio <= 1.0:
            raise ConfigError(f"recompute_ratio must lie in [0, 1], got {recompute_ratio}")
        if not chunks:
            raise ConfigError("generate_fused needs at least one chunk cache")
        query = torch.as_tensor(query_ids, dtype=torch.long).reshape(1, -1).to(self.compiled.device)
        if query.shape[1] == 0:
            raise ConfigError("the query is empty: fusion needs at least one query token")
        lengths = [chunk.length for chunk in chunks]
        loads = self.place(cache, chunks)
        total = sum(lengths)
        count = total if recompute_ratio >= 1.0 else int(round(recompute_ratio * total))
        try:
            with loads.awaited():
                selected = torch.zeros(0, dtype=torch.long)
                if 0 < count < total:
                    selected = self.select(cache, chunks, query, lengths, count, selector, check_layer, loads)
                elif count >= total:
                    selected = torch.arange(total)
                chunk_ids = torch.cat([chunk.token_ids for chunk in chunks]).to(self.compiled.device)
                return self.recompute(cache, chunk_ids, selected, query, loads, last_logits_only)
        finally:
            loads.finish()

    def place(self, cache, chunks: Sequence[ChunkCache]) -> LayerLoads:
        """Every chunk's K/V at its offset, loaded layer by layer (LayerLoads: keys re-rotated,
        each token moved by its chunk's offset, values as they are); returns the loads in flight."""
        if cache.length:
            raise ConfigError("the fused prefill starts from an empty cache")
        offsets, offset = [], 0
        for index, chunk in enumerate(chunks):
            chunk.check_usable(self.fingerprint, self.spec.dtype, self.compiled.cache_config.kind.value, offset,
                               self.spec.max_context, name=f"chunk {index}")
            if offset and self.learned_positions():
                raise UnsupportedAttentionError("the model adds learned absolute position embeddings to its input: a "
                                                f"chunk cache cannot move to another position (chunk {index} at {offset})")
            for record in self.spec.layers:
                # Chunked attention sees positions in blocks of N: a chunk moved by other than a
                # multiple of N would have seen other tokens (sliding windows are relative: fine).
                if record.window.kind is WindowKind.CHUNKED and offset % record.window.size:
                    raise UnsupportedAttentionError(
                        f"layer {record.layer}: chunked attention ({record.window.size}) — a chunk cache can only move "
                        f"by multiples of {record.window.size} positions (chunk {index} would start at {offset})")
            offsets.append(offset)
            offset += chunk.length
        return LayerLoads(cache, chunks, offsets, self.reposition, self.rotation_of,
                          channel=self.load_channel(cache.device) if cache.device.type == "cuda" else None)

    def load_channel(self, device) -> LoadChannel:
        """The side stream and per-layer events every fused prefill on `device` loads with (kept,
        so replayed graphs can wait on the same events: fusion/loading.py)."""
        key = str(device)
        if key not in self._load_channels:
            self._load_channels[key] = LoadChannel(device, self.spec.num_layers)
        return self._load_channels[key]

    def inverse_frequencies(self, layer: int, device):
        """The layer's RoPE inverse frequencies on `device` (None: no RoPE), computed once per
        layer and moved once per device: no host copy per call."""
        per_device = self._rope(layer)
        if str(device) not in per_device:
            per_device[str(device)] = per_device["cpu"].to(device) if per_device["cpu"] is not None else None
        return per_device[str(device)]

    def _rope(self, layer: int) -> dict:
        """{"cpu": the layer's inverse frequencies or None, "rotation": rotation_of's key, device
        name: the frequencies there}, made once per layer."""
        if layer not in self._inverse_frequencies:
            from kvcompile.ops.rerotate_keys.reposition import rope_inverse_frequencies

            record = self.spec.layers[layer]
            inv_freq = rope_inverse_frequencies(record, self.compiled.model_config)
            rotation = None if inv_freq is None else (record.positions.layout, tuple(inv_freq.double().tolist()))
            self._inverse_frequencies[layer] = {"cpu": inv_freq, "rotation": rotation}
        return self._inverse_frequencies[layer]

    def reposition(self, keys, layer: int, delta):
        from kvcompile.ops.rerotate_keys.reposition import reposition_keys

        inv_freq = self.inverse_frequencies(layer, keys.device)
        if inv_freq is None:
            return keys
        return reposition_keys(keys, self.spec.layers[layer], self.compiled.model_config, delta, inv_freq=inv_freq)

    def rotation_of(self, layer: int):
        """What a layer's re-rotation depends on (layout and frequencies; None: no RoPE), so
        layers that share it are re-rotated in one call (fusion/loading.py)."""
        return self._rope(layer)["rotation"]

    def learned_positions(self) -> bool:
        if self._learned_positions is None:
            recorded = getattr(self.compiled, "learned_positions", None)  # an ONNX artifact records it
            if recorded is None and not hasattr(self.compiled, "graph_module"):
                raise UsageError("this ONNX artifact was exported without --fuse: re-export it with "
                                 "`kvcompile export MODEL --target onnx --fuse` to fuse chunk caches")
            self._learned_positions = (recorded if recorded is not None
                                       else uses_learned_positions(self.compiled.graph_module))
        return self._learned_positions

    def resolve_check_layer(self, selector: TokenSelector, check_layer: Optional[int]) -> int:
        """`check_layer`, or when None the artifact's exported check layer, else the selector's default."""
        if check_layer is not None:
            return check_layer
        exported = getattr(self.compiled, "exported_check_layer", None)
        return exported if exported is not None else selector.default_check_layer(self.spec.num_layers)

    def select(self, cache, chunks, query, lengths: List[int], count: int, selector: TokenSelector,
               check_layer: int, loads: LayerLoads) -> torch.Tensor:
        """The `count` chunk rows to recompute (fusion/selection.py)."""
        from kvcompile.fusion.selection import select_tokens

        return select_tokens(self, cache, chunks, query, lengths, count, selector, check_layer, loads)

    def recompute(self, cache, chunk_ids, selected: torch.Tensor, query, loads: Optional[LayerLoads] = None,
                  last_logits_only: bool = False) -> torch.Tensor:
        """The chosen rows and the query through every layer, over the fused cache."""
        device = self.compiled.device
        selected = selected.to(device)
        keep = cache.valid.clone()
        cache.valid[:, selected] = False  # their stale reused K/V must not be attended
        total = chunk_ids.shape[0]
        ids = torch.cat([chunk_ids[selected][None], query], dim=1)
        positions = torch.cat([selected, torch.arange(total, total + query.shape[1], device=device)])[None]
        valid = torch.ones_like(ids, dtype=torch.bool)
        biases = step_biases(self.spec, cache.valid, cache.positions, valid, positions, cache.dtype)
        past_keys, past_values = cache.past_all()
        graph = self.variant("recompute_last" if last_logits_only else "recompute")
        if graph is not None:  # waits for each layer's load inside (or for all before a replay)
            pasts = [t for pair in zip(past_keys, past_values) for t in pair]
            outputs = self.replays.run("recompute", graph, [ids, positions, *biases], pasts, loads)
            logits, new_keys, new_values = outputs[0], list(outputs[1::2]), list(outputs[2::2])
        else:
            if loads is not None:
                loads.finish()
            logits, new_keys, new_values = self.compiled.step(ids, positions, biases, past_keys, past_values)
            logits = logits[:, -1:] if last_logits_only else logits
        if loads is not None:
            loads.finish()  # the rows written below were loaded on the side stream
        chosen = selected.shape[0]
        if chosen:
            cache.write_rows(selected, {i: k[:, :, :chosen] for i, k in enumerate(new_keys)},
                             {i: v[:, :, :chosen] for i, v in enumerate(new_values)})
        cache.valid = keep
        cache.reserve(cache.length + query.shape[1])
        cache.append([k[:, :, chosen:] for k in new_keys], [v[:, :, chosen:] for v in new_values],
                     valid[:, chosen:], positions[:, chosen:])
        # a copy: a replayed graph's logits are its static buffer (graph_replay.py)
        return (logits if last_logits_only else logits[:, chosen:]).clone()


@torch.no_grad()
def generate_fused(compiled, chunks, query_ids, recompute_ratio: float = 0.15, max_new_tokens: int = 32,
                   selector=DEFAULT_SELECTOR, check_layer: Optional[int] = None, eos_token_id: Optional[int] = None):
    """Greedy tokens [1, n] after the fused prefill of `chunks` + `query_ids`."""
    from kvcompile.runtime import generate as gen
    from kvcompile.runtime.inputs import check_fits

    fusion = compiled.fusion
    total = sum(chunk.length for chunk in chunks) + int(torch.as_tensor(query_ids).numel())
    check_fits(total, max_new_tokens, compiled.spec.max_context)
    cache = compiled.new_cache(1, total + max_new_tokens)
    logits = fusion.prefill(cache, chunks, query_ids, recompute_ratio, selector, check_layer, last_logits_only=True)
    tokens = []
    for step in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(dim=-1)
        tokens.append(next_ids)
        if eos_token_id is not None and bool((next_ids == eos_token_id).all()):
            break
        if step + 1 < max_new_tokens:
            logits = gen.decode_step(compiled, cache, next_ids)
    return torch.stack(tokens, dim=1) if tokens else torch.zeros(1, 0, dtype=torch.long)
