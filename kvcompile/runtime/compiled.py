"""CompiledModel: the rewritten graph plus the runtime around it (the Python compile API)."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from kvcompile.core.config import CacheConfig
from kvcompile.runtime import generate as gen
from kvcompile.fusion.api import FusionMethods
from kvcompile.codec.restore import RestoreMethods
from kvcompile.runtime.cache import KVCacheManager
from kvcompile.runtime.inputs import check_attention_mask, check_token_ids
from kvcompile.runtime.sampling import Sampling
from kvcompile.core.layout import GraphSpec


def interleave(keys: List[torch.Tensor], values: List[torch.Tensor]) -> list:
    flat = []
    for key, value in zip(keys, values):
        flat += [key, value]
    return flat


class CompiledModel(FusionMethods, RestoreMethods):
    """A traced model whose attention runs over a cache this object manages.

    prefill / decode_step work on an explicit cache (from `new_cache`); generate owns one.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, spec: GraphSpec, cache_config: CacheConfig,
                 report, model_config=None):
        self.graph_module = graph_module
        self.spec = spec
        self.cache_config = cache_config
        self.report = report
        self.model_config = model_config

    # device / dtype -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.graph_module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.spec.dtype)

    def to(self, device) -> "CompiledModel":
        """Move weights and retarget ops that create tensors (arange, zeros...) to `device`.

        There is no dtype conversion: the trace records the dtype casts the model made (e.g.
        RMSNorm's upcast and cast back), so a bf16 model must be compiled from bf16 weights.
        """
        device = torch.device(device)
        self.graph_module.to(device)
        for node in self.graph_module.graph.nodes:
            if "device" in node.kwargs:
                node.kwargs = {**node.kwargs, "device": device}
            # e.g. aten.to.device(inv_freq, device('cpu'), ...) passes the device positionally
            node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
        self.graph_module.recompile()
        self._variants, self._fusion = {}, None  # graphs derived from the old one pointed at the old device
        return self

    # backend protocol ---------------------------------------------------------------------
    def step(self, input_ids, position_ids, biases, past_keys, past_values):
        """One graph call; `biases` is the list of masks (one per spec.bias_windows()), or one tensor."""
        device = self.device
        biases = [biases] if isinstance(biases, torch.Tensor) else biases
        outputs = self.graph_for(input_ids, biases, past_keys)(
            input_ids.to(device), position_ids.to(device), *(b.to(device) for b in biases),
            *interleave(past_keys, past_values)
        )
        logits, rest = outputs[0], outputs[1:]
        return logits, list(rest[0::2]), list(rest[1::2])

    def graph_for(self, input_ids, biases, past_keys):
        """The compiled graph, or a variant of it made once (same weights): a step with no past
        whose biases are exactly causal attends with the causal kernel
        (passes/causal_prefill_graph.py: a prefill at the speed of transformers' SDPA path), and
        inside `last_logits_only()` only the last position's logits are computed
        (passes/last_logits_graph.py)."""
        from kvcompile.passes.causal_prefill_graph import bias_inputs, causal_flags, causal_prefill_graph
        from kvcompile.passes.last_logits_graph import last_logits_graph

        if not isinstance(self.graph_module, torch.fx.GraphModule):
            return self.graph_module  # a hand-written module (tests' stand-ins): no graph to derive from
        past_length = past_keys[0].shape[2] if past_keys else 0
        causal = causal_flags([b.to(self.device) for b in biases], past_length) if input_ids.shape[1] > 1 \
            else (False,) * len(biases)
        last = getattr(self, "_last_logits_depth", 0) > 0
        if not (any(causal) or last):
            return self.graph_module
        variants = self.__dict__.setdefault("_variants", {})
        if (causal, last) not in variants:
            names = {name for name, flag in zip(bias_inputs(self.graph_module, len(biases)), causal) if flag}
            graph = causal_prefill_graph(self.graph_module, names) if names else self.graph_module
            variants[(causal, last)] = last_logits_graph(graph) if last else graph
        return variants[(causal, last)]

    @contextlib.contextmanager
    def last_logits_only(self):
        """Inside, every step returns the logits of each sequence's last position only ([B, 1, V]):
        what picking the next token needs (generate runs in it; transformers' logits_to_keep=1)."""
        self._last_logits_depth = getattr(self, "_last_logits_depth", 0) + 1
        try:
            yield self
        finally:
            self._last_logits_depth -= 1

    # KV fusion: precompute_chunk / generate_fused / fusion come from FusionMethods ----------

    # cache API ----------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int = 256) -> KVCacheManager:
        return KVCacheManager(self.spec, batch, capacity, self.device, self.dtype)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCacheManager] = None):
        """Run the prompt; returns (logits [B, T, V], cache)."""
        check_token_ids(input_ids, self.spec.vocab_size)
        check_attention_mask(attention_mask, input_ids)
        input_ids = input_ids.to(self.device)
        cache = cache or self.new_cache(input_ids.shape[0], input_ids.shape[1])
        return gen.prefill(self, cache, input_ids, attention_mask), cache

    @torch.no_grad()
    def decode_step(self, next_ids: torch.Tensor, cache: KVCacheManager) -> torch.Tensor:
        """One token per sequence; returns logits [B, 1, V]."""
        check_token_ids(next_ids.reshape(cache.batch, -1) if isinstance(next_ids, torch.Tensor) else next_ids,
                        self.spec.vocab_size, "next_ids")
        return gen.decode_step(self, cache, next_ids.to(self.device))

    def cuda_graph_decoder(self, cache: KVCacheManager, warmup: int = 2, capture: bool = True):
        """A CudaGraphDecoder for `cache` (after prefill): `.step(next_ids)` replays the whole
        decode step from one CUDA graph (kvcompile/runtime/cuda_graph.py)."""
        from kvcompile.runtime.cuda_graph import CudaGraphDecoder

        return CudaGraphDecoder(self, cache, warmup, capture)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = 50, top_p: Optional[float] = 1.0, seed: Optional[int] = None,
                 on_tokens=None, cuda_graph: bool = False, microbatches: int = 1) -> torch.Tensor:
        """Greedy (or, with do_sample, sampled: transformers' semantics) generation, batched with
        left padding; returns prompt + new tokens. on_tokens([B] ids) streams each step.
        cuda_graph (CUDA only): decode steps replay one captured graph of the whole step
        (runtime/cuda_graph.py); every step then attends the prompt + max_new_tokens positions.
        microbatches > 1 (greedy; CUDA graphs and streams on CUDA): the batch decodes as that many
        micro-batches whose steps overlap on their own streams (runtime/microbatch.py), same tokens."""
        check_token_ids(input_ids, self.spec.vocab_size)
        eos_token_id, pad_token_id = gen.special_ids(self.model_config, eos_token_id, pad_token_id)
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        with self.last_logits_only():  # the loop reads logits[:, -1] only
            return gen.generate(self, self.new_cache, input_ids.to(self.device),
                                attention_mask.to(self.device) if attention_mask is not None else None,
                                max_new_tokens, eos_token_id, pad_token_id, sampling, on_tokens,
                                cuda_graph=cuda_graph, microbatches=microbatches)
