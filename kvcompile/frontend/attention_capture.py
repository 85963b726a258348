"""Capture each layer's attention through transformers' attention-function interface.

Most transformers decoders compute attention as

    attention_interface(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)

with key/value still per KV head and the layer's facts as keywords: `sliding_window`, `softcap`,
`s_aux` (sinks). The function registered here under the name "kvcompile" calls
`kvcompile::captured_attention`, so torch.export keeps one node per layer holding those facts
as constants — including for models whose attention transformers runs only eagerly (soft-capping,
sinks), which SDPA matching cannot see. Nothing here is per architecture: it reads keywords.

No mask function is registered under the name, so transformers builds no masks at all (its
mask builders return None for an implementation they do not know): the cached graph takes the
runtime's masks instead, built from each layer's record.

A keyword that carries numerics this function does not model (sparse-attention `indices`, packed
`cu_seq_lens_*`, `position_bias`) is refused by name rather than ignored.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

import kvcompile.ops  # noqa: F401  (registers torch.ops.kvcompile.captured_attention)
from kvcompile.errors import UnsupportedAttentionError  # noqa: F401  (raised here)

IMPLEMENTATION = "kvcompile"

# Keywords read below, and keywords that carry nothing attention computes.
READ = {"sliding_window", "softcap", "s_aux", "is_causal"}
INERT = {"position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits",
         "output_hidden_states", "position_embeddings", "past_key_values", "return_dict", "cache"}




def layer_name(module) -> str:
    index = getattr(module, "layer_idx", None)
    return f"layer {index} ({type(module).__name__})" if index is not None else type(module).__name__


def kvcompile_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                        scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function contract -> kvcompile::captured_attention; [B, T, Hq, D]."""
    where = layer_name(module)
    if dropout and module.training:
        raise UnsupportedAttentionError(f"{where}: attention dropout in training mode; call model.eval()")
    if attention_mask is not None:  # a ready 4D mask passed by the caller; padding is the runtime's
        raise UnsupportedAttentionError(f"{where}: the model passed its own attention mask "
                                        f"{tuple(attention_mask.shape)}; kvcompile builds the masks")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in READ | INERT)
    if unknown:
        raise UnsupportedAttentionError(f"{where}: attention keyword(s) {', '.join(unknown)} are not supported "
                                        "(e.g. sparse or packed attention)")
    if value.shape[-1] != key.shape[-1]:
        raise UnsupportedAttentionError(f"{where}: value head dim {value.shape[-1]} differs from key head dim "
                                        f"{key.shape[-1]} (latent / MLA attention) — not supported")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer = getattr(module, "layer_idx", None)
    out = torch.ops.kvcompile.captured_attention(
        query, key, value, kwargs.get("s_aux"), scale, float(kwargs.get("softcap") or 0.0),
        int(kwargs.get("sliding_window") or 0), chunk_of(module, layer), bool(causal), -1 if layer is None else int(layer))
    return out.transpose(1, 2).contiguous(), None


def chunk_of(module, layer) -> int:
    """Chunked attention (Llama 4) is not passed as a keyword: the config's layer type says it."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    if types and layer is not None and layer < len(types) and types[layer] == "chunked_attention":
        return int(getattr(config, "attention_chunk_size", 0) or 0)
    return 0


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, kvcompile_attention)


def uses_interface(model) -> bool:
    """Whether the model's attention runs through transformers' attention-function interface."""
    return getattr(model.config, "_attn_implementation", None) == IMPLEMENTATION


@contextlib.contextmanager
def captured(model):
    """Switch the model to kvcompile's attention function while tracing, then back.

    Models whose attention classes do not use the interface either refuse the switch or ignore
    it; they keep their implementation (SDPA matching then handles them, or refuses by name).
    """
    register()
    before = getattr(model.config, "_attn_implementation", None)
    switched = False
    if before != IMPLEMENTATION:
        try:
            model.set_attn_implementation(IMPLEMENTATION)
            switched = True
        except (ValueError, KeyError, AttributeError, TypeError, NotImplementedError):
            pass
    try:
        yield uses_interface(model)
    finally:
        if switched and before is not None:
            with contextlib.suppress(ValueError, KeyError, AttributeError, TypeError):
                model.set_attn_implementation(before)


register()
