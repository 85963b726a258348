"""Train/eval split of the synthetic tasks' names and of the seeds that drive them.

A name (a retrieval key, a program variable) belongs to exactly one split, decided by a
stable hash of its text, so no key, variable or (key, value) pair seen in training can
appear in an evaluation prompt. Seeds are split too: evaluation generators mix in a salt
that training never uses.
"""
from __future__ import annotations

import random
import string
import zlib

SPLITS = ("train", "eval")
_EVAL_BUCKETS = 4  # 1 name in 4 is reserved for evaluation
EVAL_SEED_SALT = 0x5EED_E7A1
TRAIN_SEED_SALT = 0x7A1_0000


def split_of(name: str) -> str:
    """"eval" or "train": crc32 is stable across Python versions and processes."""
    return "eval" if zlib.crc32(name.encode("utf-8")) % _EVAL_BUCKETS == 0 else "train"


def seeded_rng(split: str, seed: int, *stream: int) -> random.Random:
    """A Random for (split, seed, stream...) that the other split can never reproduce."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    salt = EVAL_SEED_SALT if split == "eval" else TRAIN_SEED_SALT
    # A string seed is hashed with SHA-512 by random.seed, independent of PYTHONHASHSEED.
    return random.Random(f"{salt}:{seed}:" + ":".join(str(s) for s in stream))


def random_name(rng: random.Random, length: int, split: str) -> str:
    """A lowercase name of `length` letters drawn from `split` only (rejection sampling)."""
    while True:
        name = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if split_of(name) == split:
            return name


def all_names(length: int, split: str, alphabet: str = string.ascii_lowercase) -> list[str]:
    """Every name of `length` characters of `alphabet` in `split` (small lengths only)."""
    names = [""]
    for _ in range(length):
        names = [n + c for n in names for c in alphabet]
    return [n for n in names if split_of(n) == split]
