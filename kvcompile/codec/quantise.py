"""Layer-wise quantisation of a KV chunk into symbols, and back (CacheGen, arXiv 2310.07240).

A chunk is K and V as [layers, tokens, channels] (channels = kv_heads × head_dim). Each
(layer, token) row is scaled by its absolute maximum and rounded to `bins` levels; shallow
layers get more bins than deep ones (they matter more), separately for K and V. Level 0 is
lossless for 8-bit input: 255 levels of the row's abs-max, which reproduces any tensor that was
8-bit quantised per (layer, token) exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np


@dataclass(frozen=True)
class LevelSchedule:
    """Bins per layer: `shallow` bins for the first `split` fraction of the layers, `deep` after."""

    k_shallow: int
    k_deep: int
    k_split: float
    v_shallow: int
    v_deep: int
    v_split: float

    def bins(self, layers: int, which: str) -> np.ndarray:
        shallow, deep, split = ((self.k_shallow, self.k_deep, self.k_split) if which == "k"
                                else (self.v_shallow, self.v_deep, self.v_split))
        cut = int(round(split * layers))
        return np.array([shallow if layer < cut else deep for layer in range(layers)], dtype=np.int64)


# LMCache's defaults are level 2 (K 32 bins for the first 10 of 32 layers, V 32 for the first 2).
LEVELS: Dict[int, LevelSchedule] = {
    0: LevelSchedule(255, 255, 1.0, 255, 255, 1.0),  # lossless for per-(layer, token) 8-bit input
    1: LevelSchedule(64, 32, 0.3125, 64, 32, 0.0625),  # near-lossless
    2: LevelSchedule(32, 16, 0.3125, 32, 16, 0.0625),  # default
    3: LevelSchedule(16, 8, 0.3125, 16, 8, 0.0625),  # aggressive
}


def quantise(x: np.ndarray, bins: np.ndarray):
    """x [L, T, C] float -> (symbols [L, T, C] int64 in [0, bins_l), scales [L, T] float32)."""
    half = ((bins - 1) // 2).astype(np.float32)[:, None, None]  # levels -half..half
    scales = np.abs(x).max(axis=2).astype(np.float32)  # [L, T]
    safe = np.where(scales > 0, scales, 1.0)[:, :, None]
    q = np.clip(np.rint(x / safe * half), -half, half)
    return (q + half).astype(np.int64), scales


def dequantise(symbols: np.ndarray, scales: np.ndarray, bins: np.ndarray) -> np.ndarray:
    half = ((bins - 1) // 2).astype(np.float32)[:, None, None]
    return (symbols.astype(np.float32) - half) / half * scales[:, :, None]
