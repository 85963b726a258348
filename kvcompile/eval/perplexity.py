"""Held-out perplexity in bits per byte, on standard-library modules the model never saw.

Windows are [BOS] + (window - 1) bytes, back to back (no overlap), so every byte is scored
once with the context its window gives it. Tokens are bytes, so bits per token = bits per byte.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvcompile.frontend.tokenizer import ByteTokenizer

_TOKENIZER = ByteTokenizer()


def heldout_windows(window: int = 2048, count: int = 8, text: bytes | None = None) -> list[list[int]]:
    """`count` windows of held-out text ([BOS] + window-1 bytes each)."""
    if text is None:
        from kvcompile.reference.corpus import text_bytes
        text = text_bytes("heldout", max_bytes=count * (window - 1))
    body = window - 1
    windows = []
    for i in range(count):
        piece = text[i * body:(i + 1) * body]
        if len(piece) < body:
            break
        windows.append([_TOKENIZER.bos_id, *piece])
    return windows


@torch.no_grad()
def bits_per_byte(runner, windows: list[list[int]], batch_size: int = 4) -> dict:
    """Mean negative log2-likelihood of every byte after BOS."""
    total_nats, total_bytes = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start:start + batch_size], dtype=torch.long)  # [B, T]
        logits = runner.logits(ids).float().cpu()  # [B, T, V]
        nats = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1), reduction="sum")
        total_nats += float(nats)
        total_bytes += ids[:, 1:].numel()
    return {"bpb": total_nats / max(1, total_bytes) / math.log(2), "bytes": total_bytes}


def score_perplexity(runner, window: int = 2048, count: int = 8, batch_size: int = 4,
                     text: bytes | None = None) -> dict:
    """text: the held-out bytes to score (default: this Python's held-out modules)."""
    import sys
    result = bits_per_byte(runner, heldout_windows(window, count, text), batch_size)
    result.update(window=window, windows=count, python=sys.version.split()[0])
    return result
