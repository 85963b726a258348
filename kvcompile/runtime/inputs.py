"""Checks of what a caller hands the runtime, before anything is traced or run.

Bad token ids or masks otherwise surface deep inside the graph as an IndexError, a guard
assertion or silently wrong text; here each becomes one InputValidationError line naming the
argument and the problem.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvcompile.errors import ContextLengthError, InputValidationError


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise InputValidationError(f"{name} must be a torch tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InputValidationError(f"{name} must hold integer token ids, got {str(input_ids.dtype).removeprefix('torch.')}")
    if input_ids.dim() != 2:
        raise InputValidationError(f"{name} must be [batch, tokens], got shape {tuple(input_ids.shape)}"
                                   + (" (add a batch axis: ids[None])" if input_ids.dim() == 1 else ""))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputValidationError(f"{name} is empty (shape {tuple(input_ids.shape)}): give at least one token")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputValidationError(f"{name} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids")


def check_attention_mask(attention_mask, input_ids) -> None:
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise InputValidationError(f"attention_mask must be a torch tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputValidationError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                   f"{tuple(input_ids.shape)}: they must match")
    values = attention_mask.unique()
    if not bool(((values == 0) | (values == 1)).all()):
        raise InputValidationError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputValidationError(f"attention_mask hides every token of batch row(s) {empty}: "
                                   "each sequence needs at least one token")
    # Left padding only: a 0 after a 1 would put padding inside the sequence.
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise InputValidationError("attention_mask must pad on the left (zeros before the tokens), "
                                   "found padding after a token")


def check_fits(prompt_tokens: int, max_new_tokens: int, max_context: int, cached: int = 0) -> None:
    """Refuse up front what would run into the context limit midway."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputValidationError(f"max_new_tokens must be an int ≥ 0, got {max_new_tokens!r}")
    total = cached + prompt_tokens + max_new_tokens
    if total > max_context:
        room = max_context - cached - prompt_tokens
        hint = (f"lower max_new_tokens to {room}" if room > 0 else
                f"shorten the prompt by {1 - room} tokens")
        raise ContextLengthError(f"prompt ({prompt_tokens} tokens) + {max_new_tokens} new tokens"
                                 + (f" after {cached} cached" if cached else "")
                                 + f" exceed the model's context of {max_context} positions by "
                                 f"{total - max_context}: {hint}")


def check_generation(input_ids, attention_mask: Optional[torch.Tensor], vocab_size: int, max_context: int,
                     max_new_tokens: int) -> None:
    check_token_ids(input_ids, vocab_size)
    check_attention_mask(attention_mask, input_ids)
    check_fits(int(input_ids.shape[1]), max_new_tokens, max_context)
