"""The fusion methods every runtime offers (CompiledModel, the ONNX Runtime backend): one copy."""
from __future__ import annotations

from typing import Optional

import torch


class FusionMethods:
    """Mixed into a runtime with `spec`, `step`, `new_cache`, `device`, `cache_config` and
    `model_config` (and either `graph_module` or `check_graph_for`)."""

    @property
    def fusion(self):
        if getattr(self, "_fusion", None) is None:
            from kvcompile.fusion.blend import Fusion

            self._fusion = Fusion(self)
        return self._fusion

    def precompute_chunk(self, token_ids):
        """A chunk's KV cache, computed alone from position 0 (kvcompile.fusion.ChunkCache)."""
        from kvcompile.runtime.inputs import check_token_ids

        check_token_ids(torch.as_tensor(token_ids).reshape(1, -1), self.spec.vocab_size, "chunk token ids")
        return self.fusion.precompute_chunk(token_ids)

    def generate_fused(self, chunks, query_ids, recompute_ratio: float = 0.15, max_new_tokens: int = 32,
                       selector: str = "query_spans", check_layer: Optional[int] = None,
                       eos_token_id: Optional[int] = None, store=None, codec_level: Optional[int] = None):
        """Greedy new tokens [1, n] for `chunks` (precomputed ChunkCaches) + `query_ids`, recomputing
        `recompute_ratio` of the chunk tokens chosen by `selector` (kvcompile.fusion.blend); `check_layer`
        None: the artifact's exported check layer, else the selector's own (default_check_layer).
        With a `store` (kvcompile.store), chunks may be token ids: their caches are fetched from it
        (codec bitstreams at `codec_level`, raw KV if None), and computed (and stored) where missing;
        `self.fusion.last_store_report` says which."""
        from kvcompile.fusion.blend import generate_fused
        from kvcompile.runtime.inputs import check_token_ids

        check_token_ids(torch.as_tensor(query_ids).reshape(1, -1), self.spec.vocab_size, "query_ids")
        if store is not None:
            from kvcompile.store.fusion import resolve_chunks

            chunks, _ = resolve_chunks(self, chunks, store, codec_level)
        return generate_fused(self, chunks, query_ids, recompute_ratio, max_new_tokens, selector, check_layer,
                              eos_token_id)
