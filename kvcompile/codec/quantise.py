"""Layer-wise quantisation of a KV chunk into symbols, and back (CacheGen, arXiv 2310.07240).

A chunk is K and V as [layers, tokens, channels] (channels = kv_heads × head_dim). Each (layer,
token) row is scaled by its abs-max over the channels and rounded to 2·half + 1 levels (symbols
0 .. 2·half; `half` is zero). Shallow layers may get more levels than deep ones, separately for K
and V. Per-token scales won over per-channel and per-(layer, chunk) scales on the reference
model's tasks at equal size (docs/CODEC.md, "Scales").

Scales: level 0 stores each (layer, token) abs-max as float32 and is lossless for 8-bit input
(127 levels each side reproduce any tensor 8-bit quantised per (layer, token)). Lossy levels store
one float32 maximum per (layer, chunk) and a byte per (layer, token): scale = max · 2^(-code/16)
(code 255: zero), rounded up so nothing clips; that is 8 bits per token instead of 32.

Dequantisation is (symbol - half) / half · scale in float32, rounded once to the cache dtype:
exactly what the GPU decoder computes (it is handed SCALE_STEPS, built here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

ZERO_SCALE_CODE = 255


def _scale_steps() -> np.ndarray:
    """[256] float32: 2^(-code/16), by repeated IEEE multiplication (the same on every machine)."""
    ratio = 0.9576032806985737  # 2^(-1/16)
    steps, value = [], 1.0
    for _ in range(ZERO_SCALE_CODE):
        steps.append(value)
        value *= ratio
    return np.array(steps + [0.0], dtype=np.float32)


SCALE_STEPS = _scale_steps()


@dataclass(frozen=True)
class Side:
    """One of K or V: `shallow` levels each side for the first `split` fraction of the layers,
    `deep` after."""

    shallow: int
    deep: int
    split: float

    def halves(self, layers: int) -> np.ndarray:
        cut = int(round(self.split * layers))
        return np.array([self.shallow if layer < cut else self.deep for layer in range(layers)], dtype=np.int64)


@dataclass(frozen=True)
class Steps:
    """One of K or V with its own levels per layer group: layer l of L gets
    `halves[l * len(halves) // L]` (one entry per layer when len(halves) == L)."""

    per_group: tuple

    def halves(self, layers: int) -> np.ndarray:
        n = len(self.per_group)
        return np.array([self.per_group[layer * n // layers] for layer in range(layers)], dtype=np.int64)


@dataclass(frozen=True)
class Level:
    k: "Side | Steps"
    v: "Side | Steps"
    note: str
    log_scales: bool = True  # False: float32 scale per token (level 0)

    def side(self, which: str) -> "Side | Steps":
        return self.k if which == "k" else self.v


def encode_scales(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """absmax [L, T] float32 -> (maxima [L] float32, codes [L, T] uint8) with
    maxima · SCALE_STEPS[codes] ≥ absmax everywhere (never clips)."""
    maxima = absmax.max(axis=1, initial=0.0).astype(np.float32)
    safe = np.where(maxima > 0, maxima, np.float32(1.0))[:, None]
    ratio = np.where(absmax > 0, absmax / safe, 1.0)
    codes = np.clip(np.floor(-16.0 * np.log2(ratio)), 0, ZERO_SCALE_CODE - 1).astype(np.int64)
    for _ in range(3):  # log2 rounding may overshoot by one code: step back until it covers
        short = (maxima[:, None] * SCALE_STEPS[codes] < absmax) & (codes > 0)
        codes[short] -= 1
    codes[absmax == 0] = ZERO_SCALE_CODE
    return maxima, codes.astype(np.uint8)


def decode_scales(maxima: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return (maxima[:, None].astype(np.float32) * SCALE_STEPS[codes.astype(np.int64)]).astype(np.float32)


def quantise(x: np.ndarray, side: Side, scales: np.ndarray) -> np.ndarray:
    """x [L, T, C] float, scales [L, T] (≥ each row's abs-max) -> symbols [L, T, C] int64."""
    half = side.halves(x.shape[0]).astype(np.float32)[:, None, None]
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, :, None]
    q = np.clip(np.rint(x.astype(np.float32) / safe * half), -half, half)
    return (q + half).astype(np.int64)


def dequantise(symbols: np.ndarray, scales: np.ndarray, side: Side) -> np.ndarray:
    """symbols [L, T, C], scales [L, T] -> [L, T, C] float32."""
    half = side.halves(symbols.shape[0]).astype(np.float32)[:, None, None]
    return (symbols.astype(np.float32) - half) / half * scales[:, :, None].astype(np.float32)


# Measured on the reference model (docs/CODEC.md, "Levels"): its keys need more precision than its
# values, and its deep layers' keys more than its shallow ones' (the opposite of LMCache's
# schedule, which gives shallow layers more bins). A level's parameters are derived from its
# number in the header: never change an existing level's (old files would mis-decode), add one.
LEVELS: Dict[int, Level] = {
    0: Level(Side(127, 127, 1.0), Side(127, 127, 1.0), "lossless for per-(layer, token) 8-bit input",
             log_scales=False),
    1: Level(Side(15, 15, 1.0), Side(7, 7, 1.0), "near-lossless: K 31 levels, V 15"),
    2: Level(Side(7, 11, 0.5), Side(3, 2, 0.5), "K 15 levels then 23 in the deep half, V 7 then 5 (default before 4)"),
    3: Level(Side(5, 7, 0.5), Side(2, 2, 1.0), "aggressive: K 11 levels then 15, V 5"),
    # Level 4 (the default) sits between 1 and 2 in size (3.52x smaller than 8-bit on the reference
    # model, level 2 3.61x). Schedules per eighth of the depth, from a per-(side, layer)
    # sensitivity sweep (docs/CODEC.md, "Level 4"): the shallow half's K and V barely matter, so
    # they get fewer levels than level 2's; retrieval leans on V of the fifth eighth and the
    # cross-chunk chain on V of the seventh, which get 15 levels; the deep quarter's K 31.
    4: Level(Steps((5, 5, 5, 5, 11, 11, 15, 15)), Steps((2, 2, 2, 2, 7, 2, 7, 3)),
             "default: K 11 levels, 23 from half depth, 31 in the last quarter; V 5, 15 in the 5th and 7th eighths"),
}
