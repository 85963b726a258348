"""Tokenizers for `kvcompile run`: the Hugging Face tokenizer saved beside the weights.

Every checkpoint's tokenizer loads through `transformers.AutoTokenizer` from local files (the
bundled reference model ships standard, byte-level tokenizer files too). Only a folder with no
tokenizer file at all (a tiny random model) falls back to the in-code byte tokenizer.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from kvcompile.errors import InputValidationError, LoadError
from kvcompile.frontend.tokenizer import ByteTokenizer, byte_level_chars

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt")

# What Python's surrogateescape makes of the invalid UTF-8 bytes 0x80..0xff (argv, os.fsdecode).
_ESCAPED = range(0xDC80, 0xDD00)
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # one that no byte was escaped to


class PromptEncodingError(InputValidationError):
    """Text that this tokenizer cannot encode (invalid UTF-8 for a tokenizer that needs valid text);
    a ValueError with a one-line message."""


class TextTokenizer:
    """encode(str) -> list[int] and decode(list[int]) -> str, whatever the tokenizer is.

    kind is "hf" (a transformers tokenizer) or "byte" (the fallback ByteTokenizer). A str with
    lone surrogates (invalid UTF-8 bytes decoded with surrogateescape) encodes to those raw bytes
    when the vocabulary has a token per byte; otherwise it is a PromptEncodingError.
    """

    def __init__(self, tokenizer, kind: str):
        self.tokenizer = tokenizer
        self.kind = kind
        self._byte_ids: Optional[list] = None
        self._byte_ids_known = False

    @property
    def byte_ids(self) -> Optional[list]:
        """Token id of each single byte 0..255 when the tokenizer is byte-level, else None."""
        if not self._byte_ids_known:
            self._byte_ids = list(range(256)) if self.kind == "byte" else _hf_byte_ids(self.tokenizer)
            self._byte_ids_known = True
        return self._byte_ids

    def encode(self, text: str) -> list:
        bad = _SURROGATE.search(text)
        if bad is not None:
            return self._encode_raw_bytes(text, bad.start())
        if self.kind == "byte":
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids) -> str:
        if self.kind == "byte":
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _encode_raw_bytes(self, text: str, bad: int) -> list:
        lone = _LONE_SURROGATE.search(text)
        if lone is not None:  # not from bytes: a str built with "\ud800" or the like
            at = len(text[:lone.start()].encode("utf-8", "surrogateescape"))
            raise PromptEncodingError(f"the prompt is not valid UTF-8 at byte {at} "
                                      f"(it holds the lone surrogate U+{ord(lone.group()):04X})")
        offset = len(text[:bad].encode("utf-8", "surrogateescape"))
        byte_ids = self.byte_ids
        if byte_ids is None:
            raise PromptEncodingError(f"the prompt is not valid UTF-8 at byte {offset}, and this tokenizer "
                                      "has no token per byte to encode it with")
        if self.kind == "byte":
            return self.tokenizer.encode(text)
        # Valid stretches go through the tokenizer; each escaped byte is its single-byte token.
        ids, start = [], 0
        for i, ch in enumerate(text):
            if ord(ch) in _ESCAPED:
                if start < i:
                    ids.extend(self.tokenizer(text[start:i], add_special_tokens=False)["input_ids"])
                ids.append(byte_ids[ord(ch) - 0xDC00])
                start = i + 1
        if start < len(text):
            ids.extend(self.tokenizer(text[start:], add_special_tokens=False)["input_ids"])
        prefix, suffix = _special_wrapping(self.tokenizer)
        return [*prefix, *ids, *suffix]


def _hf_byte_ids(tokenizer) -> Optional[list]:
    """Ids of the 256 single-byte tokens of a ByteLevel `tokenizers` vocabulary (GPT-2 style), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        pre_tokenizer = json.loads(backend.to_str()).get("pre_tokenizer")
    except (ValueError, AttributeError):
        return None
    if "ByteLevel" not in json.dumps(pre_tokenizer):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    ids = [vocab.get(char) for char in byte_level_chars()]
    return None if any(i is None for i in ids) else ids


def _special_wrapping(tokenizer) -> tuple[list, list]:
    """The ids the tokenizer puts before and after plain text (bos, eos...) when encoding it."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def load_text_tokenizer(folder: Optional[Path]) -> TextTokenizer:
    """The folder's tokenizer through AutoTokenizer (local files only); bytes when it has no tokenizer file."""
    if folder is None or not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return TextTokenizer(ByteTokenizer(), "byte")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, JSON errors...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _is_old_byte_format(Path(folder)):
            reason = ("tokenizer.json is kvcompile's old private byte format; "
                      "export the model again to get standard tokenizer files")
        raise LoadError(f"cannot load the tokenizer in {folder}: {reason}") from exc
    return TextTokenizer(tokenizer, "hf")


def _is_old_byte_format(folder: Path) -> bool:
    try:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and spec.get("type") == "kvcompile-byte"


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
