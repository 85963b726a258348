"""The codec's fixed bank of frequency tables, and the choice of one per (layer, channel) stream.

Storing a full table per (K/V, layer, channel) in every chunk cost a third of the bitstream on a
narrow model (A 16-bit frequencies against 256 symbols). Instead every channel names one of
SHAPES two-sided geometric (p(d) ∝ θ^|d|) or Gaussian (p(d) ∝ q^(d²)) distributions of
d = symbol - centre (wrapped mod A), plus its centre: two bytes per channel per chunk. The encoder picks, per channel, the (centre,
shape) that codes the chunk's symbols in the fewest bits, so the cost over the channel's own
empirical table is a small KL term instead of 2·A bytes.

The bank is a function of the alphabet size A only, built from exact decimal constants with IEEE
double multiplications (no exp or pow) and integer rounding, so every machine derives the same
tables; the GPU decoder is handed the bank the CPU built (plugins/csrc/kv_decode.cu never rebuilds it).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from kvcompile.codec.rans import TOTAL

GEOMETRIC = 32  # shape 0 is the uniform table, shapes 1..31 geometric from flat to peaked
GAUSSIAN = 32  # shapes 32..63: discretised Gaussians, narrow to wide
SHAPES = GEOMETRIC + GAUSSIAN
_THETA_FLATTEST = 0.995
_THETA_RATIO = 0.8  # 1 - θ grows by 1/0.8 per shape
_GAUSS_GAP_NARROWEST = 0.996  # q = 1 - gap; p(d) ∝ q^(d²), σ² = -1 / (2 ln q): σ 0.3 .. 23


def thetas() -> list[float]:
    out, gap = [], 1.0 - _THETA_FLATTEST
    for _ in range(1, GEOMETRIC):
        out.append(max(1.0 - gap, 1e-4))
        gap /= _THETA_RATIO
    return out


def gaussian_qs() -> list[float]:
    out, gap = [], _GAUSS_GAP_NARROWEST
    for _ in range(GAUSSIAN):
        out.append(1.0 - gap)
        gap *= _THETA_RATIO
    return out


def _gaussian(distance: np.ndarray, q: float) -> np.ndarray:
    """q^(d²) by the recurrence q^(d²) = q^((d-1)²) · q^(2d-1): IEEE multiplications of exact
    constants only, so every machine derives the same bank (an exp could differ in its last ulp
    between libms, move a frequency by one count and break decoding across machines)."""
    values = np.ones(int(distance.max()) + 1)
    odd = q  # q^(2d - 1)
    for d in range(1, values.size):
        values[d] = values[d - 1] * odd
        odd *= q * q
    return values[distance]


def quantise_frequencies(p: np.ndarray) -> np.ndarray:
    """[A] weights -> [A] integer frequencies summing to TOTAL, every one ≥ 1 (largest remainder,
    ties to the lower symbol; math.fsum is exactly rounded, so no summation order can differ)."""
    alphabet = p.size
    spare = TOTAL - alphabet  # one count each is reserved so every symbol stays codable
    exact = p / math.fsum(p.tolist()) * spare
    freqs = np.floor(exact).astype(np.int64)
    remainder = exact - freqs
    short = spare - int(freqs.sum())
    order = np.lexsort((np.arange(alphabet), -remainder))
    freqs[order[:short]] += 1
    return freqs + 1


@functools.lru_cache(maxsize=None)
def bank(alphabet: int) -> np.ndarray:
    """[SHAPES, A] uint32 frequency tables over d in [0, A) (d ≥ ceil(A/2) stands for d - A)."""
    if not 2 <= alphabet <= 256:
        raise ValueError(f"codec alphabets have 2..256 symbols, got {alphabet}")
    distance = np.minimum(np.arange(alphabet), alphabet - np.arange(alphabet))
    tables = [np.ones(alphabet)]
    for theta in thetas():
        powers = np.ones(int(distance.max()) + 1)
        for d in range(1, powers.size):
            powers[d] = powers[d - 1] * theta
        tables.append(powers[distance])
    for q in gaussian_qs():
        tables.append(_gaussian(distance, q))
    return np.stack([quantise_frequencies(p) for p in tables]).astype(np.uint32)


@functools.lru_cache(maxsize=None)
def joint_bank(alphabets: tuple) -> tuple[np.ndarray, dict]:
    """The banks of several alphabets as one [n·SHAPES, max A] table (shorter rows padded with
    frequency 0, which no slot ever selects) and each alphabet's first row: one rANS call then
    codes every layer of a chunk whatever its alphabet."""
    widest = max(alphabets)
    rows, first = [], {}
    for alphabet in sorted(set(alphabets)):
        first[alphabet] = len(rows) * SHAPES
        padded = np.zeros((SHAPES, widest), dtype=np.uint32)
        padded[:, :alphabet] = bank(alphabet)
        rows.append(padded)
    return np.concatenate(rows), first


@functools.lru_cache(maxsize=None)
def bank_bits(alphabet: int) -> np.ndarray:
    """[SHAPES, A] code length in bits of each symbol under each table."""
    return PRECISION_BITS - np.log2(bank(alphabet).astype(np.float64))


PRECISION_BITS = float(np.log2(TOTAL))


def choose(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """symbols [N, T] (one row per channel, values < A) -> (centre [N], shape [N]) minimising
    each row's coded size. Centres tried: the row's median ± 2 and its most frequent value (the
    best centre of a unimodal row is among them; trying all A was 5x slower for < 0.1% smaller)."""
    rows, _ = symbols.shape
    flat = (np.arange(rows)[:, None] * alphabet + symbols).ravel()
    counts = np.bincount(flat, minlength=rows * alphabet).reshape(rows, alphabet).astype(np.float64)
    median = np.median(symbols, axis=1).round().astype(np.int64)
    candidates = np.concatenate([(median[:, None] + np.arange(-2, 3)[None]) % alphabet,
                                 counts.argmax(axis=1)[:, None]], axis=1)
    bits = bank_bits(alphabet)  # [SHAPES, A]
    best_cost = np.full(rows, np.inf)
    best_centre = np.zeros(rows, dtype=np.int64)
    best_shape = np.zeros(rows, dtype=np.int64)
    index = np.arange(alphabet)
    for j in range(candidates.shape[1]):
        centre = candidates[:, j]
        shifted = np.take_along_axis(counts, (index[None] + centre[:, None]) % alphabet, axis=1)  # counts of d
        # [rows, SHAPES] by einsum's own loop, not BLAS: BLAS threads made the whole encode 2-3x slower
        cost = np.einsum("ra,sa->rs", shifted, bits)
        shape = cost.argmin(axis=1)
        value = cost[np.arange(rows), shape]
        better = value < best_cost
        best_cost[better], best_centre[better], best_shape[better] = value[better], centre[better], shape[better]
    return best_centre, best_shape
