"""ByteTokenizer: the reference model's vocabulary is the 256 byte values plus three specials.

A byte vocabulary needs no download and no merges: encoding is `str.encode("utf-8")`. This class
is the in-code tokenizer that training and the evaluation generators use. A model folder
describes the same vocabulary in the standard Hugging Face files (`tokenizer.json` for the
`tokenizers` library, `tokenizer_config.json` for transformers), which `hf_files()` writes:
a BPE model without merges over the 256 single-byte tokens behind the ByteLevel pre-tokenizer
and decoder, so `AutoTokenizer.from_pretrained(folder)` gives exactly these ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}


@lru_cache(maxsize=None)
def byte_level_chars() -> tuple[str, ...]:
    """GPT-2's byte-to-unicode table: the printable character the ByteLevel pre-tokenizer
    turns byte b into is byte_level_chars()[b]."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


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
        # surrogateescape: a str made from invalid UTF-8 bytes (argv, os.fsdecode) gets its bytes back.
        ids = list(text.encode("utf-8", "surrogateescape"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        # Specials have no text; invalid UTF-8 (a cut multi-byte char) decodes as U+FFFD.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    # --- the standard files ---------------------------------------------------------------
    def tokenizer_json(self) -> dict:
        """The `tokenizers` library's description of this vocabulary (tokenizer.json)."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        added = [{"id": token_id, "content": SPECIAL_TOKENS[name], "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True}
                 for name, token_id in sorted(self.special_ids.items(), key=lambda item: item[1])]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,  # no Unicode normalization: the ids are the text's exact bytes
            "pre_tokenizer": byte_level,
            "post_processor": None,  # nothing added around plain text (no bos), as encode() does
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False,
                      "vocab": {char: b for b, char in enumerate(byte_level_chars())},
                      "merges": []},
        }

    def tokenizer_config(self) -> dict:
        """transformers' settings (tokenizer_config.json) for the same vocabulary. No model_max_length:
        the context is config.json's, and kvcompile checks prompts against it with its own one-line error."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS["bos"],
            "eos_token": SPECIAL_TOKENS["eos"],
            "pad_token": SPECIAL_TOKENS["pad"],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            # "<|eos|>" typed in a prompt is those 7 bytes, never the special token.
            "split_special_tokens": True,
            "added_tokens_decoder": {
                str(token_id): {"content": SPECIAL_TOKENS[name], "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True}
                for name, token_id in sorted(self.special_ids.items(), key=lambda item: item[1])},
        }

    def hf_files(self) -> dict[str, str]:
        """File name -> exact text of the standard tokenizer files (deterministic)."""
        def dump(obj: dict) -> str:
            return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

        return {TOKENIZER_FILE: dump(self.tokenizer_json()),
                TOKENIZER_CONFIG_FILE: dump(self.tokenizer_config())}

    def save(self, folder: str) -> list[str]:
        """Write the standard tokenizer files into `folder`; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = []
        for name, text in self.hf_files().items():
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            paths.append(path)
        return paths

    @classmethod
    def from_file(cls, path: str) -> "ByteTokenizer":
        """The byte tokenizer a standard tokenizer.json describes; ValueError if it is another vocabulary."""
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
            raise ValueError(f"{path}: not a byte-level tokenizer (no merge-free BPE model)")
        expected = {char: b for b, char in enumerate(byte_level_chars())}
        if model.get("vocab") != expected:
            raise ValueError(f"{path}: not a byte-level tokenizer (its vocabulary is not the 256 bytes in order)")
        if spec.get("normalizer") is not None:
            raise ValueError(f"{path}: a normalizer would change the bytes")
        by_content = {token["content"]: int(token["id"]) for token in spec.get("added_tokens", [])}
        try:
            ids = {name: by_content[content] for name, content in SPECIAL_TOKENS.items()}
        except KeyError as missing:
            raise ValueError(f"{path}: no special token {missing}") from None
        return cls(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   vocab_size=max([255, *by_content.values()]) + 1)

    @classmethod
    def for_model_dir(cls, folder: str) -> "ByteTokenizer | None":
        """The byte tokenizer when `folder`'s tokenizer.json describes this byte vocabulary, else None."""
        path = os.path.join(str(folder), TOKENIZER_FILE)
        if not os.path.isfile(path):
            return None
        try:
            return cls.from_file(path)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None  # some other tokenizer
