"""Static rANS entropy coding of many independent symbol streams at once (CPU reference).

Every stream (one (layer, channel) of a chunk in the KV codec) has its own frequency table,
quantised to PRECISION bits (the CDF is stored with the chunk). All streams are coded together,
one token step at a time, as numpy vector operations: the same arithmetic a GPU decoder runs with
one thread (or lane) per stream. rANS state: 32 bits, renormalised 16 bits at a time; the encoder
runs backwards over the tokens so the decoder reads forwards.

    freqs  [S, A] uint32, each row summing to 1 << PRECISION, every used symbol ≥ 1
    symbols [S, N] (values < A) -> words: per stream, a uint16 array (the decoder reads it front to back)
"""
from __future__ import annotations

from typing import List

import numpy as np

PRECISION = 16
TOTAL = 1 << PRECISION
STATE_LOW = 1 << 16  # the state stays in [STATE_LOW, STATE_LOW << 16)


class RansError(ValueError):
    """A stream that does not decode (wrong tables, truncated or corrupted words)."""


def quantise_frequencies(counts: np.ndarray) -> np.ndarray:
    """[S, A] symbol counts -> [S, A] frequencies summing to TOTAL, ≥ 1 where a count is > 0.

    Largest-remainder rounding of count / total · TOTAL, then every used symbol raised to at least
    1 by taking from the most frequent one (the one that loses least from it).
    """
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1
    exact = counts / totals * TOTAL
    freqs = np.floor(exact).astype(np.int64)
    freqs[(counts > 0) & (freqs == 0)] = 1
    for row in range(freqs.shape[0]):  # fix each row's sum (a few symbols at most)
        diff = TOTAL - int(freqs[row].sum())
        if diff == 0:
            continue
        used = np.nonzero(counts[row] > 0)[0]
        if used.size == 0:
            freqs[row, 0] = TOTAL
            continue
        if diff > 0:
            order = used[np.argsort(-(exact[row, used] - freqs[row, used]))]
            freqs[row, order[np.arange(diff) % order.size]] += 1
        else:
            while diff < 0:
                top = used[np.argmax(freqs[row, used])]
                take = min(-diff, int(freqs[row, top]) - 1)
                freqs[row, top] -= take
                diff += take
    # A one-symbol stream would need TOTAL itself, which a uint16 table cannot hold: give one
    # slot to a neighbouring symbol (costs ~2e-5 bits per symbol).
    full = np.nonzero(freqs.max(axis=1) >= TOTAL)[0]
    for row in full:
        top = int(np.argmax(freqs[row]))
        freqs[row, top] -= 1
        freqs[row, (top + 1) % freqs.shape[1]] += 1
    return freqs.astype(np.uint32)


def cumulative(freqs: np.ndarray) -> np.ndarray:
    """[S, A] -> [S, A + 1] starts (the CDF)."""
    starts = np.zeros((freqs.shape[0], freqs.shape[1] + 1), dtype=np.uint64)
    np.cumsum(freqs, axis=1, out=starts[:, 1:])
    return starts


def encode(symbols: np.ndarray, freqs: np.ndarray) -> List[np.ndarray]:
    """[S, N] symbols, [S, A] frequencies -> S arrays of uint16 words (front = first to decode)."""
    streams, tokens = symbols.shape
    starts = cumulative(freqs)
    rows = np.arange(streams)
    state = np.full(streams, STATE_LOW, dtype=np.uint64)
    out: list = [[] for _ in range(streams)]  # words in emission order, reversed at the end
    emitted_words, emitted_rows = [], []
    for t in range(tokens - 1, -1, -1):
        s = symbols[:, t]
        f = freqs[rows, s].astype(np.uint64)
        if np.any(f == 0):
            raise RansError("a symbol has frequency 0 in its stream's table")
        limit = ((STATE_LOW >> PRECISION) << 16) * f
        spill = state >= limit  # at most one 16-bit word: limit ≥ 2^16 and state < 2^32
        emitted_words.append((state[spill] & 0xFFFF).astype(np.uint16))
        emitted_rows.append(rows[spill])
        state[spill] >>= 16
        state = (state // f << PRECISION) + (state % f) + starts[rows, s]
    # final states: two words each, read first by the decoder
    for words, where in zip(emitted_words, emitted_rows):
        for row, word in zip(where.tolist(), words.tolist()):
            out[row].append(word)
    result = []
    for row in range(streams):
        words = out[row][::-1]
        head = [int(state[row] >> 16), int(state[row] & 0xFFFF)]
        result.append(np.array(head + words, dtype=np.uint16))
    return result


def decode(words: List[np.ndarray], freqs: np.ndarray, tokens: int) -> np.ndarray:
    """The inverse of `encode`: S word arrays -> [S, tokens] symbols. Raises RansError when a
    stream runs out of words, has words left over, or does not end in the initial state."""
    streams, alphabet = freqs.shape
    starts = cumulative(freqs)
    rows = np.arange(streams)
    # one sorted array of every stream's starts, offset by stream: a slot finds its symbol by
    # one searchsorted for all streams (what a GPU does with a per-stream lookup table)
    flat = (starts[:, 1:] + (rows[:, None].astype(np.uint64) * (TOTAL + 1))).reshape(-1)
    lengths = np.array([w.size for w in words], dtype=np.int64)
    if np.any(lengths < 2):
        raise RansError("a stream is shorter than its initial state")
    padded = np.zeros((streams, int(lengths.max()) + 1), dtype=np.uint64)
    for row, w in enumerate(words):
        padded[row, : w.size] = w
    state = (padded[:, 0] << 16) | padded[:, 1]
    cursor = np.full(streams, 2, dtype=np.int64)
    symbols = np.zeros((streams, tokens), dtype=np.int64)
    freqs64 = freqs.astype(np.uint64)
    for t in range(tokens):
        slot = state & (TOTAL - 1)
        index = np.searchsorted(flat, slot + rows.astype(np.uint64) * (TOTAL + 1), side="right")
        s = index - rows * alphabet
        if np.any((s < 0) | (s >= alphabet)):
            raise RansError("a stream decodes to a symbol outside its table (corrupted words)")
        symbols[:, t] = s
        state = freqs64[rows, s] * (state >> PRECISION) + slot - starts[rows, s]
        low = state < STATE_LOW
        if np.any(cursor[low] >= lengths[low]):
            raise RansError("a stream ran out of words (truncated)")
        state[low] = (state[low] << 16) | padded[rows[low], cursor[low]]
        cursor[low] += 1
    if np.any(cursor != lengths) or np.any(state != STATE_LOW):
        raise RansError("a stream does not end where it should (corrupted or mismatched tables)")
    return symbols
