"""Which chunk tokens the fused prefill recomputes: the selectors that need the model.

`select_tokens` runs the selector named by `fusion/selectors.py`'s TokenSelector over a cache the
chunks are being placed in (fusion/loading.py): chunk heads need nothing; CacheBlend's KV
deviation and the question's attention run the check graph (layers 0..L over every token, no
past) and keep its K/V of those layers, which attend across chunks; the question's probe
(`query_spans`, the default) runs the question alone over the reused cache; gradual filtering
narrows a deviation shortlist at a deeper layer. Each returns the chosen rows, sorted: the
question's probe on the cache's device (its ranking needs no host sync), the others as a CPU
tensor (one host sync: the ranking).
"""
from __future__ import annotations

from typing import List

import torch

from kvcompile.fusion.loading import LayerLoads
from kvcompile.fusion.selectors import (TokenSelector, chunk_heads, kv_deviation, query_attention,
                                        question_attention_peaks, span_tokens, top_tokens)
from kvcompile.runtime.masks import step_biases


def select_tokens(fusion, cache, chunks, query, lengths: List[int], count: int, selector: TokenSelector,
                  check_layer: int, loads: LayerLoads) -> torch.Tensor:
    if selector is TokenSelector.CHUNK_HEAD:
        return chunk_heads(lengths, count)
    if selector is TokenSelector.QUERY_SPANS:
        return select_by_question_probe(fusion, cache, query, lengths, count, check_layer, loads)
    if selector is TokenSelector.GRADUAL_DEVIATION:  # 2x the budget at layer 1, narrowed at check_layer
        if check_layer <= 1:
            return select_tokens(fusion, cache, chunks, query, lengths, count, TokenSelector.DEVIATION,
                                 check_layer, loads)
        candidates = select_tokens(fusion, cache, chunks, query, lengths, min(2 * count, sum(lengths) - lengths[0]),
                                   TokenSelector.DEVIATION, 1, loads)
        return narrow_by_deviation(fusion, cache, chunks, candidates, count, check_layer, loads)
    total = sum(lengths)
    ids = torch.cat([torch.cat([c.token_ids for c in chunks]).to(query.device)[None], query], dim=1)
    positions = torch.arange(ids.shape[1], device=query.device)[None]
    valid = torch.ones_like(ids, dtype=torch.bool)
    empty = torch.zeros(1, 0, dtype=torch.long, device=query.device)
    biases = step_biases(fusion.spec, empty.bool(), empty, valid, positions, cache.dtype)
    past = [torch.zeros(1, fusion.spec.kv_heads, 0, fusion.spec.head_dim, dtype=cache.dtype, device=query.device)]
    host_past = torch.zeros(1, 0, fusion.spec.kv_heads, fusion.spec.head_dim, dtype=cache.dtype)
    pasts = []
    for record in fusion.spec.layers:
        pasts += [past[0], host_past if record.host_values else past[0]]
    check = fusion.variant("check", check_layer) if not fusion.windows_cut(ids.shape[1]) else None
    if check is not None:
        outputs = fusion.replays.run("check", check, [ids, positions, *biases], pasts, loads)
    else:
        outputs = fusion.check_graph(check_layer)(ids, positions, *biases, *pasts)
    new_keys, new_values, check_query = list(outputs[0:-1:2]), list(outputs[1:-1:2]), outputs[-1]
    rows = torch.arange(total)
    loads.wait(range(check_layer + 1))  # the reused rows are read and overwritten below
    if selector is TokenSelector.DEVIATION:
        old_key, old_value = cache.past(check_layer)
        old_value = old_value.transpose(1, 2) if fusion.spec.layers[check_layer].host_values else old_value
        score = kv_deviation(new_keys[check_layer][:, :, :total], new_values[check_layer][:, :, :total],
                             old_key[:, :, :total], old_value[:, :, :total].to(old_key.device))
    else:
        score = query_attention(check_query, new_keys[check_layer], fusion.spec.layers[check_layer].scale, total)
    # Layers 0..L were recomputed for every token with attention across chunks: keep that.
    layers = range(check_layer + 1)
    cache.write_rows(rows, {i: new_keys[i][:, :, :total] for i in layers},
                     {i: new_values[i][:, :, :total] for i in layers})
    return top_tokens(score.cpu(), count, exclude_first=lengths[0])

def narrow_by_deviation(fusion, cache, chunks, candidates: torch.Tensor, count: int, layer: int,
                        loads: LayerLoads) -> torch.Tensor:
    """Gradual filtering's later check: the candidates alone through layers 0..`layer` at their
    positions over the fused cache (their own stale rows hidden, the rest reused), ranked by
    the deviation of their K/V at `layer` from the reused; the top `count`, sorted."""
    device = cache.device
    rows = candidates.to(device)
    ids = torch.cat([c.token_ids for c in chunks]).to(device)[rows][None]
    positions = cache.positions[:, rows]
    keep = cache.valid.clone()
    cache.valid[:, rows] = False
    biases = step_biases(fusion.spec, cache.valid, cache.positions, torch.ones_like(ids, dtype=torch.bool), positions,
                         cache.dtype)
    cache.valid = keep
    past_keys, past_values = cache.past_all()
    probe = fusion.variant("probe", layer)
    graph = probe or fusion.check_graph(layer)
    if probe is None:
        loads.wait(range(layer + 1))
    outputs = graph(ids, positions, *biases, *[t for pair in zip(past_keys, past_values) for t in pair])
    loads.wait([layer])
    old_key, old_value = cache.past(layer)
    old_value = old_value.transpose(1, 2) if fusion.spec.layers[layer].host_values else old_value
    score = kv_deviation(outputs[2 * layer], outputs[2 * layer + 1], old_key[:, :, rows],
                         old_value.to(device)[:, :, rows])
    best = score.topk(min(count, rows.numel())).indices.cpu()
    return candidates[best].sort().values

def select_by_question_probe(fusion, cache, query, lengths: List[int], count: int, layer: int,
                             loads: LayerLoads) -> torch.Tensor:
    """QUERY_SPANS: the question alone through layers 0..`layer` over the reused cache (the
    check graph, fed the cache as its past); the chunk tokens its heads look at hardest seed
    spans. Nothing is written back: the question is computed again after the recompute."""
    total = sum(lengths)
    positions = torch.arange(total, total + query.shape[1], device=query.device)[None]
    valid = torch.ones_like(query, dtype=torch.bool)
    biases = step_biases(fusion.spec, cache.valid, cache.positions, valid, positions, cache.dtype)
    past_keys, past_values = cache.past_all()
    pasts = [t for pair in zip(past_keys, past_values) for t in pair]
    probe = fusion.variant("probe", layer)
    if probe is not None:
        outputs = fusion.replays.run("probe", probe, [query, positions, *biases], pasts, loads)
    else:  # ONNX Runtime: its graph cannot wait per layer (a check layer the model lacks is refused here)
        graph = fusion.check_graph(layer)
        loads.wait(range(layer + 1))
        outputs = graph(query, positions, *biases, *pasts)
    loads.wait([layer])
    keys = torch.cat([past_keys[layer], outputs[2 * layer]], dim=2)
    score = question_attention_peaks(outputs[-1], keys, fusion.spec.layers[layer].scale, total)
    return span_tokens(score, count, exclude_first=lengths[0])  # stays on the device: no host sync
