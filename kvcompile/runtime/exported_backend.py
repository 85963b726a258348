"""What the backends that run exported graphs (ONNX Runtime, TensorRT) share besides their engine:
the step's inputs in the graph's order, and the torch runtime's conveniences (new_cache,
generate) through the shared loop in generate.py."""
from __future__ import annotations

from typing import List, Optional

import torch

from kvcompile.runtime.cache import KVCacheManager
from kvcompile.runtime.generate import generate, special_ids
from kvcompile.runtime.sampling import Sampling


class ExportedGraphBackend:
    """Mixin. The backend provides `spec` (GraphSpec), `input_names` (the graph's, in order),
    `manifest` (its model_config names the special tokens) and `device` (where step takes its
    tensors, and where the cache lives)."""

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.spec.dtype)

    def step_feeds(self, input_ids, position_ids, biases, past_keys: List[torch.Tensor],
                   past_values: List[torch.Tensor]) -> list:
        """step's arguments as the graph's inputs, in input_names order: ids, positions, one bias
        per window (in the cache dtype), then each layer's past key and value."""
        biases = [biases] if isinstance(biases, torch.Tensor) else biases
        feeds = [input_ids.long(), position_ids.long(), *(b.to(self.dtype) for b in biases)]
        for key, value in zip(past_keys, past_values):
            feeds += [key, value]
        if len(feeds) != len(self.input_names):
            raise ValueError(f"expected {self.spec.num_layers} layers of past K/V, got {len(past_keys)}")
        return feeds

    def new_cache(self, batch: int, capacity: int = 256):
        return KVCacheManager(self.spec, batch, capacity, self.device, self.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = 50, top_p: Optional[float] = 1.0, seed: Optional[int] = None,
                 on_tokens=None) -> torch.Tensor:
        """The same loop, checks and options as CompiledModel.generate."""
        eos_token_id, pad_token_id = special_ids(self.manifest.get("model_config") or {}, eos_token_id, pad_token_id)
        # a non-tensor prompt goes on to check_generation, which refuses it in one line
        input_ids = input_ids.to(self.device) if isinstance(input_ids, torch.Tensor) else input_ids
        return generate(self, self.new_cache, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                        Sampling(do_sample, temperature, top_k, top_p, seed), on_tokens)
