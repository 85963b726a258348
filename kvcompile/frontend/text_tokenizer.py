"""Tokenizers for `kvcompile run`: ours (byte-level) or a HF tokenizer saved beside the weights."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from kvcompile.frontend.tokenizer import ByteTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt")


class TextTokenizer:
    """encode(str) -> list[int] and decode(list[int]) -> str, whatever the tokenizer is."""

    def __init__(self, tokenizer, kind: str):
        self.tokenizer = tokenizer
        self.kind = kind

    def encode(self, text: str) -> list:
        if self.kind == "byte":
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids) -> str:
        if self.kind == "byte":
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_text_tokenizer(folder: Optional[Path]) -> TextTokenizer:
    """Our byte tokenizer if the folder describes one, a local HF tokenizer if present, else bytes."""
    if folder is not None:
        byte_tokenizer = ByteTokenizer.for_model_dir(str(folder))
        if byte_tokenizer is not None:
            return TextTokenizer(byte_tokenizer, "byte")
        if any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                return TextTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), "hf")
            except (OSError, ValueError):
                pass
    return TextTokenizer(ByteTokenizer(), "byte")


def copy_tokenizer_files(source: Optional[Path], destination: Path) -> bool:
    """Copy whatever tokenizer files `source` has into `destination`; False if none."""
    if source is None or not Path(source).is_dir():
        return False
    copied = False
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / name, destination / name)
            copied = True
    return copied
