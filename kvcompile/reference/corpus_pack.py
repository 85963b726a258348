"""A corpus pack: the training and held-out text of corpus.py, built once and carried.

    python -m kvcompile.reference.corpus_pack --out build/corpus/stdlib.pack.xz [--check]

The GPU machine's Python (3.12, a distribution build without `test/`) has 10.2 MB of
standard-library text, which the first reference model saw ~28 times over (held-out bits per
byte rose while the training text fell). A CPU machine whose Python ships `test/` (3.11.7:
30.3 MB) builds a pack of its text instead, and the training job reads that; the held-out
split travels in the same pack, so the GPU's held-out numbers are on the same modules as
`kvcompile eval` on the CPU machine. The split rule is corpus.py's, unchanged.

File: xz (lzma preset 6) of one JSON header line, then the training bytes, then the held-out
bytes. The header names the Python version, the file counts and each part's sha256, which
load() checks. The same Python build gives the same pack byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys
from dataclasses import dataclass

from kvcompile.reference.corpus import corpus_summary, text_bytes

FORMAT = "kvcompile-corpus-pack/1"


@dataclass(frozen=True)
class CorpusPack:
    header: dict
    train: bytes
    heldout: bytes

    def text(self, split: str) -> bytes:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return self.train if split == "train" else self.heldout


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(root: str | None = None) -> bytes:
    """The pack of this machine's standard library (or of `root`), as compressed bytes."""
    train, heldout = text_bytes("train", root=root), text_bytes("heldout", root=root)
    summary = corpus_summary(root)
    header = {"format": FORMAT, "python": summary["python"], "files": summary["files"],
              "heldout_files": summary["heldout_files"], "train_bytes": len(train),
              "heldout_bytes": len(heldout), "train_sha256": _sha(train), "heldout_sha256": _sha(heldout)}
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    return lzma.compress(line + train + heldout, format=lzma.FORMAT_XZ, preset=6)


def load(path: str) -> CorpusPack:
    with open(path, "rb") as f:
        raw = lzma.decompress(f.read())
    line, _, body = raw.partition(b"\n")
    header = json.loads(line)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a corpus pack ({FORMAT})")
    train, heldout = body[:header["train_bytes"]], body[header["train_bytes"]:]
    if _sha(train) != header["train_sha256"] or _sha(heldout) != header["heldout_sha256"]:
        raise ValueError(f"{path}: text does not match the sha256 in its header (truncated or altered)")
    return CorpusPack(header, train, heldout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="pack file to write (e.g. build/corpus/stdlib.pack.xz)")
    p.add_argument("--check", action="store_true", help="load an existing pack and print its header")
    args = p.parse_args(argv)
    if not args.check:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        blob = build()
        with open(args.out, "wb") as f:
            f.write(blob)
        print(f"wrote {args.out}: {len(blob)} bytes, sha256 {_sha(blob)}")
    print(json.dumps(load(args.out).header, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
