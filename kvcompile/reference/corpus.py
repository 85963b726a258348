"""Training and held-out text for the reference model, built from what every machine has.

Text: the source files of the running Python's standard library (code, comments and
docstrings: the same text `inspect.getsource` returns for each module), read from disk in
sorted order. Installed third-party packages (site-packages) are never read. A module is
held out when a stable hash of its top-level name falls in the held-out bucket; its tests
(`test_<name>*`) are held out with it, so held-out bits per byte are on text never trained on.
The text differs a little between Python versions (the GPU machine trains on 3.12's library,
CI evaluates on 3.11's); the split rule is the same everywhere.

Training sequences mix that text with the training split of the synthetic task formats.
A corpus pack (corpus_pack.py) carries one machine's text to another, so the long model
trains on the CPU machine's larger library wherever it runs.
"""
from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from functools import lru_cache

import numpy as np

from kvcompile.eval.cross_chunk import training_chain_doc, training_long_program_doc, training_program_doc
from kvcompile.eval.retrieval import training_retrieval_doc
from kvcompile.eval.splits import seeded_rng
from kvcompile.frontend.tokenizer import ByteTokenizer

HELDOUT_BUCKETS = 20  # ~1 module in 20 is held out
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TOKENIZER = ByteTokenizer()


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_key(relpath: str) -> str:
    """The name a file's split is decided by: its top-level module, or for a test file the
    module it tests (test/test_json/..., test/test_json.py -> json)."""
    parts = relpath.replace(os.sep, "/").split("/")
    head = parts[0]
    if head == "test" and len(parts) > 1:
        head = parts[1]
    if head.endswith(".py"):
        head = head[:-3]
    if head.startswith("test_"):
        head = head[len("test_"):]
    return head.split(".")[0]


def is_heldout(relpath: str) -> bool:
    return zlib.crc32(module_key(relpath).encode()) % HELDOUT_BUCKETS == 3


@lru_cache(maxsize=None)
def stdlib_files(root: str | None = None) -> tuple[str, ...]:
    """Relative paths of every .py file of the standard library, sorted."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return tuple(sorted(found))


def _read(root: str, relpath: str) -> bytes:
    with open(os.path.join(root, relpath), "rb") as f:
        return f.read()


def text_bytes(split: str, max_bytes: int | None = None, root: str | None = None) -> bytes:
    """The "train" or "heldout" text: files joined by a blank line, in sorted order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    want_heldout = split == "heldout"
    pieces, size = [], 0
    for rel in stdlib_files(root):
        if is_heldout(rel) != want_heldout:
            continue
        data = _read(root, rel)
        pieces.append(data)
        size += len(data) + 2
        if max_bytes is not None and size >= max_bytes:
            break
    joined = b"\n\n".join(pieces)
    return joined[:max_bytes] if max_bytes is not None else joined


def corpus_summary(root: str | None = None) -> dict:
    root = root or stdlib_root()
    files = stdlib_files(root)
    held = [f for f in files if is_heldout(f)]
    return {
        "python": sys.version.split()[0],
        "files": len(files),
        "heldout_files": len(held),
        "heldout_modules": sorted({module_key(f) for f in held}),
    }


class SequenceMixer:
    """Draws training sequences of `seq_len` tokens: BOS, then documents joined by EOS.

    mix: probabilities of ("text", "retrieval", "program", "long_program", "chain") for each
    sequence; shorter mixes leave out the last sources and draw exactly as before (three: the
    first reference model's mixes; four: reference-long's first job). Synthetic documents
    are 128..seq_len bytes; when one ends early, another of the same kind follows, so
    long-context examples fill whole windows and short ones are packed.
    """

    SOURCES = ("text", "retrieval", "program", "long_program", "chain")
    _MAKERS = {1: training_retrieval_doc, 2: training_program_doc, 3: training_long_program_doc,
               4: training_chain_doc}

    def __init__(self, text: np.ndarray, seq_len: int, mix=(0.4, 0.3, 0.3)):
        if not 3 <= len(mix) <= len(self.SOURCES):
            raise ValueError(f"mix needs 3 to {len(self.SOURCES)} probabilities {self.SOURCES}, got {mix}")
        self.text = text  # uint8 array of the training text
        self.seq_len = seq_len
        mix = tuple(mix) + (0.0,) * (len(self.SOURCES) - len(mix))
        self.mix = np.asarray(mix, dtype=np.float64) / np.sum(mix)

    def sequence(self, rng) -> tuple[np.ndarray, int]:
        """(token ids [seq_len] int64, source index)"""
        source = int(np.searchsorted(np.cumsum(self.mix), rng.random(), side="right"))
        source = min(source, int(np.flatnonzero(self.mix)[-1]))  # rounding never picks an unused source
        body = self.seq_len - 1
        out = np.empty(self.seq_len, dtype=np.int64)
        out[0] = TOKENIZER.bos_id
        if self.SOURCES[source] == "text":
            start = rng.randrange(0, len(self.text) - body)
            out[1:] = self.text[start:start + body]
            return out, source
        make = self._MAKERS[source]
        filled = 1
        while filled < self.seq_len:
            # Long documents half the time, so 2K-token contexts are common.
            room = self.seq_len - filled
            target = room if rng.random() < 0.5 else rng.randint(min(128, room), room)
            doc = np.frombuffer(make(rng, target).encode("utf-8"), dtype=np.uint8)
            take = min(len(doc), room)
            out[filled:filled + take] = doc[:take]
            filled += take
            if filled < self.seq_len:
                out[filled] = TOKENIZER.eos_id
                filled += 1
        return out, source


def sequence_stream(text: np.ndarray, seq_len: int, seed: int, stream: int, mix=(0.4, 0.3, 0.3)):
    """An endless deterministic stream of (ids, source) for (seed, stream)."""
    rng = seeded_rng("train", seed, 3, stream)
    mixer = SequenceMixer(text, seq_len, mix)
    while True:
        yield mixer.sequence(rng)
