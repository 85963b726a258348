"""Write the reference model's tokenizer files (standard Hugging Face format, byte-level).

    python -m kvcompile.reference.make_tokenizer [--out kvcompile/reference/weights] [--check]

Writes tokenizer.json (a `tokenizers` BPE model without merges over the 256 single-byte tokens,
ByteLevel pre-tokenizer and decoder, no normalizer) and tokenizer_config.json, so
`transformers.AutoTokenizer.from_pretrained(WEIGHTS_DIR)` loads the vocabulary the model was
trained on: token id b (0..255) is the byte b, then bos 256, eos 257, pad 258 (the ids of
`kvcompile.frontend.tokenizer.ByteTokenizer`). Encoding plain text adds no special token.
The output depends on nothing but this code, so rerunning it reproduces the shipped files
byte for byte; --check verifies that instead of writing.
"""
from __future__ import annotations

import argparse
import os
import sys

from kvcompile.frontend.tokenizer import ByteTokenizer
from kvcompile.reference import WEIGHTS_DIR


def expected_files(tokenizer: ByteTokenizer | None = None) -> dict[str, str]:
    """File name -> the exact text write() puts in the folder."""
    return (tokenizer or ByteTokenizer()).hf_files()


def write(folder: str = WEIGHTS_DIR, tokenizer: ByteTokenizer | None = None) -> list[str]:
    """Write the tokenizer files into `folder`; returns their paths."""
    return (tokenizer or ByteTokenizer()).save(folder)


def stale_files(folder: str = WEIGHTS_DIR) -> list[str]:
    """Names of the tokenizer files in `folder` that are missing or differ from what write() makes."""
    stale = []
    for name, text in expected_files().items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            stale.append(name)
            continue
        with open(path, encoding="utf-8", newline="") as f:
            if f.read() != text:
                stale.append(name)
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=WEIGHTS_DIR, help="model folder (default: the bundled reference weights)")
    p.add_argument("--check", action="store_true", help="only verify the files are up to date")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(f"{args.out}: out of date: {', '.join(stale)} (run python -m kvcompile.reference.make_tokenizer)")
            return 1
        print(f"{args.out}: tokenizer files are up to date")
        return 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
