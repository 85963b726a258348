"""Trace a Hugging Face causal LM with torch.export into an ATen graph with attention kept whole.

Attention is captured as one `kvcompile::captured_attention` node per layer where the model uses
transformers' attention-function interface (attention_capture.py), else kept as its SDPA node.

The traced function is stateless: (input_ids [B, T], position_ids [B, T]) -> logits [B, T, V].
Caching is not traced; the `insert_kv_cache` pass adds it to the graph afterwards, so the trace
does not depend on how a given transformers version implements its cache classes.
"""
from __future__ import annotations

import contextlib
import torch
from torch import nn
from torch.export import Dim

from kvcompile.frontend.attention_capture import UnsupportedAttentionError, captured
from kvcompile.errors import TraceError  # noqa: F401  (raised here)

# Trace with sizes that no symbolic dimension can be confused with (0/1 would specialise).
EXAMPLE_BATCH, EXAMPLE_TOKENS = 2, 7


class LogitsOnly(nn.Module):
    """The HF model's forward reduced to tensors in, logits out (no cache, no mask building)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits




def max_context(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def trace_model(model: nn.Module, capture: bool = True) -> torch.export.ExportedProgram:
    """torch.export the model's logits function with dynamic batch and sequence length.

    capture=False traces the model's own attention implementation (SDPA matching then finds it).
    """
    device = next(model.parameters()).device
    input_ids = torch.randint(0, model.config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_TOKENS), device=device)
    position_ids = torch.arange(EXAMPLE_TOKENS, device=device).expand(EXAMPLE_BATCH, -1).contiguous()
    batch = Dim("batch", min=1, max=1024)
    tokens = Dim("tokens", min=1, max=max_context(model))
    shapes = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
    try:
        with torch.no_grad(), (captured(model) if capture else contextlib.nullcontext()):
            # Deferred asserts: some transformers versions (5.17) reshape repeat_kv's output in a
            # way export cannot prove for every sequence length at trace time; the check then
            # runs in the graph instead of failing the trace.
            return torch.export.export(LogitsOnly(model).eval(), (input_ids, position_ids), dynamic_shapes=shapes,
                                       prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as err:  # torch.export raises many types; one line for the user
        cause = err
        while cause is not None and not isinstance(cause, UnsupportedAttentionError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise UnsupportedAttentionError(str(cause).strip().splitlines()[0]) from None
        name = type(model).__name__
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(f"torch.export could not trace {name}: {first}") from err
