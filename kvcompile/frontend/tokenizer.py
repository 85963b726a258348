"""ByteTokenizer: the reference model's vocabulary is the 256 byte values plus three specials.

A byte vocabulary needs no download and no merges file: encoding is `str.encode("utf-8")`.
The model folder describes it in `tokenizer.json` (a kvcompile format, not the `tokenizers`
library's): {"type": "kvcompile-byte", "byte_offset": 0, "vocab_size": ..., "special": {...}}.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_TYPE = "kvcompile-byte"


@dataclass(frozen=True)
class ByteTokenizer:
    """Token id b (0..255) is the byte b; bos/eos/pad come after the bytes."""

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 259

    @property
    def special_ids(self) -> dict[str, int]:
        return {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        # Specials have no text; invalid UTF-8 (a cut multi-byte char) decodes as U+FFFD.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {
            "type": TOKENIZER_TYPE,
            "vocab_size": self.vocab_size,
            "byte_offset": 0,
            "special": self.special_ids,
            "note": "token id b in [0, 256) is the UTF-8 byte b; special ids follow.",
        }

    def save(self, folder: str) -> str:
        path = os.path.join(folder, TOKENIZER_FILE)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_file(cls, path: str) -> "ByteTokenizer":
        with open(path) as f:
            spec = json.load(f)
        if spec.get("type") != TOKENIZER_TYPE:
            raise ValueError(f"{path}: not a {TOKENIZER_TYPE} tokenizer (type={spec.get('type')!r})")
        if spec.get("byte_offset", 0) != 0:
            raise ValueError(f"{path}: byte_offset {spec['byte_offset']} is not supported")
        special = spec["special"]
        return cls(bos_id=int(special["bos"]), eos_id=int(special["eos"]),
                   pad_id=int(special["pad"]), vocab_size=int(spec["vocab_size"]))

    @classmethod
    def for_model_dir(cls, folder: str) -> "ByteTokenizer | None":
        """The byte tokenizer when `folder` holds our tokenizer JSON, else None."""
        path = os.path.join(str(folder), TOKENIZER_FILE)
        if not os.path.isfile(path):
            return None
        try:
            return cls.from_file(path)
        except (ValueError, KeyError, json.JSONDecodeError):
            return None  # some other tokenizer.json (e.g. a HF `tokenizers` file)
