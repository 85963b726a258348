"""Entry keys: what a stored chunk cache is valid for, spelled as one string.

A chunk cache (the KV of one document computed alone from position 0) is stored as pieces of
`PIECE_TOKENS` tokens, one entry each, so a loader can stream them and a miss costs one piece:

    kvc1/<model fingerprint>/<token-ids hash>.<tokens>/<cache kind>/<dtype>/<raw | c<level>>/<piece index>

`CacheKey` names the whole cache (everything but the piece index); `CacheKey.piece(i)` is one
entry's key. The token count rides in the key so a reader knows how many pieces to fetch in one
round trip; the dtype, because the fingerprint leaves it out (one config, two dtypes: two caches
that must not overwrite each other). Keys are plain ASCII (`KEY_CHARACTERS`): file names and Redis keys alike.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Optional


from kvcompile.store.errors import StoreURLError

KEY_VERSION = "kvc1"
PIECE_TOKENS = 256  # the codec's chunk (kvcompile.codec.CHUNK_TOKENS): one entry per codec chunk
KEY_CHARACTERS = re.compile(r"^[A-Za-z0-9._:@=+\-/]{1,400}$")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_CHARACTERS.match(key):
        raise StoreURLError(f"store key {key!r} must be 1-400 characters of A-Z a-z 0-9 . _ : @ = + - /")
    return key


def tokens_hash(token_ids) -> str:
    """sha256 of the token ids as little-endian int64 (the same ids hash the same everywhere)."""
    import torch  # here, not at the top: `kvcompile --help` builds the store parser without torch
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).cpu().contiguous()
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()[:32]


def records_digest(spec) -> str:
    """sha256 of every layer's record, including how it is cached (kind, where V lives): the model
    fingerprint leaves those out, the store checks them too."""
    payload = json.dumps([r.to_dict() for r in spec.layers], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def level_name(codec_level: Optional[int]) -> str:
    return "raw" if codec_level is None else f"c{int(codec_level)}"


@dataclass(frozen=True)
class CacheKey:
    fingerprint: str
    tokens_hash: str
    tokens: int
    cache_kind: str
    dtype: str
    codec_level: Optional[int] = None  # None: raw KV (safetensors), else the codec level

    @classmethod
    def for_tokens(cls, token_ids, fingerprint: str, cache_kind: str, dtype: str, codec_level: Optional[int] = None):
        import torch
        count = int(torch.as_tensor(token_ids).numel())
        return cls(fingerprint, tokens_hash(token_ids), count, cache_kind, str(dtype).removeprefix("torch."),
                   codec_level)

    @property
    def pieces(self) -> int:
        return max(1, -(-self.tokens // PIECE_TOKENS))

    def piece(self, index: int) -> str:
        return f"{self}/{index}"

    def piece_keys(self) -> list:
        return [self.piece(i) for i in range(self.pieces)]

    def __str__(self) -> str:
        return (f"{KEY_VERSION}/{self.fingerprint}/{self.tokens_hash}.{self.tokens}/{self.cache_kind}/{self.dtype}/"
                f"{level_name(self.codec_level)}")

    @classmethod
    def parse(cls, text: str):
        """A cache key or a piece key -> (CacheKey, piece index or None)."""
        parts = text.strip("/").split("/")
        try:
            if parts[0] != KEY_VERSION or len(parts) not in (6, 7):
                raise ValueError
            token_hash, count = parts[2].rsplit(".", 1)
            level = None if parts[5] == "raw" else int(parts[5].removeprefix("c"))
            if parts[5] != "raw" and not parts[5].startswith("c"):
                raise ValueError
            index = int(parts[6]) if len(parts) == 7 else None
            return cls(parts[1], token_hash, int(count), parts[3], parts[4], level), index
        except (ValueError, IndexError):
            raise StoreURLError(f"{text!r} is not a chunk-cache key ({KEY_VERSION}/FINGERPRINT/HASH.TOKENS/KIND/DTYPE/"
                                f"raw|cLEVEL[/PIECE])") from None
