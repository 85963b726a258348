"""Static rANS entropy coding of many independent symbol streams at once (CPU reference).

All streams are coded together, one step at a time, as numpy vector operations: the arithmetic a
GPU decoder (plugins/csrc/kv_decode.cu) runs with one thread per stream. A stream may switch
tables from step to step: step p of stream i uses table `table_index[i, p % G]` (in the codec a
stream is G channels of one layer, token after token, each channel with its own table), so one
32-bit final state is shared by G·tokens symbols instead of tokens.

rANS state: 32 bits, kept in [2^16, 2^32), renormalised 16 bits at a time; tables are quantised
to PRECISION = 16 bits. The encoder runs backwards so the decoder reads each stream front to back:
2 words of initial state (high, low), then one word per renormalisation.

    freqs        [K, A] uint32  each row sums to TOTAL
    table_index  [S, G] int     row of `freqs` for step p of stream i: table_index[i, p % G]
    symbols      [S, N] int     (values < A, each with a non-zero frequency in its table)
"""
from __future__ import annotations

from typing import List

import numpy as np

PRECISION = 16
TOTAL = 1 << PRECISION
STATE_LOW = 1 << 16  # the state stays in [STATE_LOW, STATE_LOW << 16)


class RansError(ValueError):
    """A stream that does not decode (wrong tables, truncated or corrupted words)."""


def cumulative(freqs: np.ndarray) -> np.ndarray:
    """[K, A] -> [K, A + 1] starts (the CDF), int64."""
    starts = np.zeros((freqs.shape[0], freqs.shape[1] + 1), dtype=np.int64)
    np.cumsum(freqs, axis=1, out=starts[:, 1:])
    return starts


def encode(symbols: np.ndarray, freqs: np.ndarray, table_index: np.ndarray) -> List[np.ndarray]:
    """[S, N] symbols -> S arrays of uint16 words (front = first to decode)."""
    streams, steps = symbols.shape
    group = table_index.shape[1]
    starts = cumulative(freqs)
    freqs = freqs.astype(np.int64)
    rows = np.arange(streams)
    state = np.full(streams, STATE_LOW, dtype=np.int64)
    spilled_words, spilled_rows = [], []
    for p in range(steps - 1, -1, -1):
        table = table_index[:, p % group]
        s = symbols[:, p]
        f = freqs[table, s]
        if np.any(f == 0):
            raise RansError("a symbol has frequency 0 in its table")
        spill = state >= (f << 16)  # (STATE_LOW >> PRECISION) << 16 = 2^16; at most one word
        spilled_words.append((state[spill] & 0xFFFF).astype(np.uint16))
        spilled_rows.append(rows[spill])
        state[spill] >>= 16
        state = ((state // f) << PRECISION) + (state % f) + starts[table, s]
    # Gather each stream's words: emission order reversed is decoding order.
    all_rows = np.concatenate(spilled_rows[::-1]) if spilled_rows else np.zeros(0, np.int64)
    all_words = np.concatenate(spilled_words[::-1]) if spilled_words else np.zeros(0, np.uint16)
    # within one step each row spills at most once, so a stable sort by row keeps the order
    order = np.argsort(all_rows, kind="stable")
    counts = np.bincount(all_rows, minlength=streams)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    words = all_words[order]
    result = []
    for row in range(streams):
        head = np.array([state[row] >> 16, state[row] & 0xFFFF], dtype=np.uint16)
        result.append(np.concatenate([head, words[bounds[row]:bounds[row + 1]]]))
    return result


def decode(flat_words: np.ndarray, ends: np.ndarray, freqs: np.ndarray, table_index: np.ndarray,
           steps: int) -> np.ndarray:
    """The inverse of `encode`, with the streams' words back to back: stream i is
    flat_words[ends[i-1]:ends[i]] (ends[-1] = 0). -> [S, steps] symbols.

    Raises RansError when a stream runs out of words, has words left over or does not end in
    the initial state (what corrupted words or mismatched tables do)."""
    streams = ends.shape[0]
    group = table_index.shape[1]
    begins = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    ends = ends.astype(np.int64)
    if np.any(ends - begins < 2) or (streams and ends[-1] > flat_words.size):
        raise RansError("a stream is shorter than its initial state or past the words")
    words = np.concatenate([flat_words.astype(np.int64), [0]])  # a pad word: reads past a stream are caught below
    starts = cumulative(freqs)
    alphabet = freqs.shape[1]
    # every table's CDF in one sorted array, table k offset by k·(TOTAL + 1): one searchsorted
    # finds every stream's symbol (what the GPU does with a binary search per stream)
    flat_cdf = (starts[:, 1:] + np.arange(freqs.shape[0])[:, None] * (TOTAL + 1)).reshape(-1)
    freqs = freqs.astype(np.int64)
    state = (words[begins] << 16) | words[begins + 1]
    cursor = begins + 2
    symbols = np.zeros((streams, steps), dtype=np.int64)
    for p in range(steps):
        table = table_index[:, p % group]
        slot = state & (TOTAL - 1)
        s = np.searchsorted(flat_cdf, slot + table * (TOTAL + 1), side="right") - table * alphabet
        symbols[:, p] = s
        state = freqs[table, s] * (state >> PRECISION) + slot - starts[table, s]
        low = state < STATE_LOW
        if np.any(cursor[low] >= ends[low]):
            raise RansError("a stream ran out of words (truncated or corrupted)")
        state[low] = (state[low] << 16) | words[cursor[low]]
        cursor[low] += 1
    if np.any(cursor != ends) or np.any(state != STATE_LOW):
        raise RansError("a stream does not end where it should (corrupted or mismatched tables)")
    return symbols
