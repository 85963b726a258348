"""Moving a layer's cached keys to other positions, from its LayerRecord and the model config.

The runtime's KV fusion calls these: a chunk's cache computed alone at positions 0..L-1 and
reused at offset o needs every RoPE layer's keys rotated by o · inv_freq (see definition.py);
NoPE layers (and learned absolute positions, which live in the hidden state, not in K) need
nothing; values carry no position.

    inv_freq = rope_inverse_frequencies(record, model_config)   # None for a layer without RoPE
    keys_at_o = reposition_keys(keys_at_0, record, model_config, delta=o)

The frequencies are transformers' own: `ROPE_INIT_FUNCTIONS[rope_type]` for scaled RoPE
(linear, llama3, yarn, proportional), the standard formula for "default" (which every model
class computes inline). They are computed from the layer's resolved rope parameters
(`record.positions.scaling`, which `passes/layer_facts.rope_parameters` already picked for
the layer's type when transformers 5 keys them by layer type), so per-layer RoPE needs nothing
more. The attention scaling these functions also return (yarn's mscale) is NOT applied: it
multiplied cos and sin at the keys' original position, so it is already in the cached keys.

Refused (UnsupportedAttentionError naming the layer): frequencies that depend on the sequence
length ("dynamic" NTK, and "longrope", whose short / long factors switch at
original_max_position_embeddings), rope types transformers has no frequency function for, a
rotation layout other than half-split or interleaved, and frequencies whose count disagrees
with the layer's rotated dims.
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from torch import Tensor

from kvcompile.core.records import LayerRecord, PositionKind
from kvcompile.errors import UnsupportedAttentionError

LAYOUTS = {"half-split": False, "interleaved": True}  # layout -> the op's `interleaved`
# rope types whose inverse frequencies change with the sequence length: a rotation by a
# fixed angle per position cannot move keys computed with them
LENGTH_DEPENDENT = {
    "dynamic": "dynamic NTK scaling recomputes its frequencies from the sequence length",
    "longrope": "longrope switches between short and long factors at original_max_position_embeddings",
}


def _where(record: LayerRecord) -> str:
    return f"layer {record.layer} ({record.module})" if record.module else f"layer {record.layer}"


def _as_config(model_config):
    """A private transformers config to hand to a rope init function (never the caller's)."""
    if isinstance(model_config, dict):  # e.g. an artifact manifest's "model_config"
        from transformers import AutoConfig, PreTrainedConfig

        data = dict(model_config)
        model_type = data.pop("model_type", None)
        try:
            return AutoConfig.for_model(model_type, **data) if model_type else PreTrainedConfig(**data)
        except ValueError:  # a model type this transformers does not know
            return PreTrainedConfig(**data)
    return copy.deepcopy(model_config)


def _default_inverse_frequencies(theta: float, rotary_dims: int) -> Tensor:
    # The expression every transformers model class uses for rope_type "default" (in float32).
    return 1.0 / (theta ** (torch.arange(0, rotary_dims, 2, dtype=torch.int64).to(dtype=torch.float) / rotary_dims))


def rope_inverse_frequencies(record: LayerRecord, model_config) -> Optional[Tensor]:
    """The layer's RoPE inverse frequencies, [rotary_dims / 2] float32 on the CPU; None when the
    layer has no rotary embedding (NoPE, learned absolute positions).

    `model_config`: the model's transformers config (or its dict, as a manifest stores it).
    Raises UnsupportedAttentionError (one line naming the layer) for what cannot be re-rotated.
    """
    positions = record.positions
    if positions.kind is not PositionKind.ROPE:
        return None
    where = _where(record)
    if positions.layout not in LAYOUTS:
        raise UnsupportedAttentionError(f"{where}: cannot re-rotate keys of a {positions.layout!r} RoPE layout "
                                        f"(only half-split and interleaved)")
    params = dict(positions.scaling or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in LENGTH_DEPENDENT:
        raise UnsupportedAttentionError(f"{where}: cannot re-rotate keys of rope type {rope_type!r}: "
                                        f"{LENGTH_DEPENDENT[rope_type]}")
    rotary_dims = positions.rotary_dims or positions.head_dim or record.head_dim
    if rope_type == "default":
        theta = params.get("rope_theta", positions.theta)
        if theta is None:
            raise UnsupportedAttentionError(f"{where}: cannot re-rotate keys: the layer's rope_theta is unknown")
        inv_freq = _default_inverse_frequencies(float(theta), rotary_dims)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise UnsupportedAttentionError(f"{where}: cannot re-rotate keys of rope type {rope_type!r} "
                                            f"(transformers has no frequency function for it)")
        if model_config is None:
            raise UnsupportedAttentionError(f"{where}: re-rotating keys of rope type {rope_type!r} needs the model config")
        config = _as_config(model_config)
        # The layer's resolved parameters, as one flat dict: the init function then reads them
        # whatever layer-type keying the model's config uses.
        if positions.theta is not None:
            params.setdefault("rope_theta", positions.theta)
        config.rope_parameters = params
        inv_freq, _attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    inv_freq = inv_freq.to(torch.float32).reshape(-1)
    if 2 * inv_freq.numel() != rotary_dims:
        raise UnsupportedAttentionError(f"{where}: rope type {rope_type!r} gives {inv_freq.numel()} frequencies for "
                                        f"{rotary_dims} rotated dims; cannot re-rotate keys")
    return inv_freq


def _delta_tensor(delta, batch: int, tokens: int, device) -> Tensor:
    """An offset (int), one per row ([B]) or one per token ([B, T]) -> [B, T] int64."""
    delta = torch.as_tensor(delta, device=device)
    if delta.is_floating_point() or delta.is_complex() or delta.dtype == torch.bool:
        raise ValueError(f"reposition_keys: delta must be an integer or integer tensor, got {delta.dtype}")
    if delta.dim() == 0:
        delta = delta.expand(batch, tokens)
    elif delta.dim() == 1 and delta.shape[0] == batch:
        delta = delta[:, None].expand(batch, tokens)
    if tuple(delta.shape) != (batch, tokens):
        raise ValueError(f"reposition_keys: delta must be an int, [B] or [B, T] = {[batch, tokens]}, "
                         f"got shape {tuple(delta.shape)}")
    return delta.to(torch.int64)


def reposition_keys(keys: Tensor, record: LayerRecord, model_config, delta: Union[int, Tensor],
                    inv_freq: Optional[Tensor] = None) -> Tensor:
    """One layer's cached keys [B, Hkv, T, D] moved by `delta` positions (an int, [B] or [B, T]).

    RoPE layers: kvcompile::rerotate_keys with the layer's frequencies (`inv_freq` may be passed
    to reuse a rope_inverse_frequencies result). Layers without RoPE: `keys` itself, unchanged.
    """
    if inv_freq is None:
        inv_freq = rope_inverse_frequencies(record, model_config)
    if inv_freq is None:
        return keys
    if keys.dim() != 4 or keys.shape[-1] != record.head_dim:
        raise ValueError(f"reposition_keys: {_where(record)} keys must be [B, Hkv, T, {record.head_dim}], "
                         f"got shape {tuple(keys.shape)}")
    batch, _, tokens, _ = keys.shape
    return torch.ops.kvcompile.rerotate_keys(keys, _delta_tensor(delta, batch, tokens, keys.device),
                                             inv_freq.to(keys.device), LAYOUTS[record.positions.layout])
