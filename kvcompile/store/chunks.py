"""ChunkCache <-> store entries: one entry per PIECE_TOKENS tokens, raw or codec-coded.

A piece's value is either safetensors bytes of its K/V slices (`key.i`, `value.i`, [1, Hkv, t, D]
per layer; bit-exact) or a codec bitstream of them (`kvcompile.codec.encode`, decoded
symbol-exactly). Its metadata says what it is: shape [layers, kv_heads, tokens, head_dim], dtype,
positions (first, last + 1) within the chunk, its token ids, the model fingerprint, cache kind,
codec level and layer records' digest. A cache is served only if every piece is there and all of
them agree with the key asked for; otherwise the caller recomputes it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

import torch

from kvcompile.store.base import KVStore, OnRefused
from kvcompile.store.entry import Entry
from kvcompile.store.errors import EntryRefusedError, StoreURLError
from kvcompile.store.keys import PIECE_TOKENS, CacheKey, tokens_hash

if TYPE_CHECKING:  # the store itself does not need the fusion package loaded
    from kvcompile.fusion.chunks import ChunkCache

RAW, CODEC = "raw-safetensors", "codec-bitstream"


def cache_key_of(chunk: ChunkCache, codec_level: Optional[int] = None) -> CacheKey:
    return CacheKey.for_tokens(chunk.token_ids, chunk.fingerprint, chunk.cache_kind, chunk.dtype, codec_level)


def piece_entries(chunk: ChunkCache, codec_level: Optional[int] = None, records_digest: Optional[str] = None):
    """[(entry key, value bytes, metadata)] for every piece of `chunk`."""
    key = cache_key_of(chunk, codec_level)
    layers = len(chunk.keys)
    shapes = {tuple(t.shape[1:2]) + tuple(t.shape[3:]) for t in list(chunk.keys) + list(chunk.values)}
    pieces = []
    for index in range(key.pieces):
        start, stop = index * PIECE_TOKENS, min(chunk.length, (index + 1) * PIECE_TOKENS)
        keys = [k[:, :, start:stop].detach().cpu().contiguous() for k in chunk.keys]
        values = [v[:, :, start:stop].detach().cpu().contiguous() for v in chunk.values]
        if codec_level is None:
            from safetensors.torch import save

            tensors = {f"key.{i}": k for i, k in enumerate(keys)} | {f"value.{i}": v for i, v in enumerate(values)}
            value, layout = save(tensors), RAW
        else:
            from kvcompile import codec

            if len(shapes) != 1:
                raise StoreURLError("the codec needs every layer's K and V of one shape; this model's differ: store "
                                    "its chunk caches raw (codec level None)")
            value = codec.encode((torch.cat(keys), torch.cat(values)), level=codec_level,
                                 chunk_tokens=PIECE_TOKENS, fingerprint=chunk.fingerprint)
            layout = CODEC
        first = chunk.keys[0]
        meta = {"layout": layout, "shape": [layers, int(first.shape[1]), stop - start, int(first.shape[3])],
                "dtype": chunk.dtype, "positions": [start, stop], "tokens_total": chunk.length,
                "pieces": key.pieces, "token_ids": chunk.token_ids[start:stop].tolist(),
                "fingerprint": chunk.fingerprint, "cache_kind": chunk.cache_kind, "codec_level": codec_level,
                "records_digest": records_digest}
        pieces.append((key.piece(index), value, meta))
    return pieces


def put_chunk_cache(store: KVStore, chunk: ChunkCache, codec_level: Optional[int] = None,
                    records_digest: Optional[str] = None, ttl: Optional[float] = None) -> CacheKey:
    """Store `chunk` piece by piece; returns its key."""
    for key, value, meta in piece_entries(chunk, codec_level, records_digest):
        store.put(key, value, meta, ttl=ttl)
    return cache_key_of(chunk, codec_level)


def decode_piece(entry: Entry, device="cpu"):
    """An entry's (keys, values), each a list per layer of [1, Hkv, t, D]; bitstreams are decoded
    on `device` (by the codec's GPU decoder on a CUDA device), raw KV stays on the host."""
    meta = entry.meta
    layers = int(meta["shape"][0])
    if meta.get("layout") == RAW:
        from safetensors.torch import load

        tensors = load(entry.payload)
        return [tensors[f"key.{i}"] for i in range(layers)], [tensors[f"value.{i}"] for i in range(layers)]
    from kvcompile import codec

    keys, values = codec.decode(entry.payload, device=device)
    return list(keys.unsqueeze(1)), list(values.unsqueeze(1))


def chunk_from_entries(key: CacheKey, entries: Sequence[Optional[Entry]], records_digest: Optional[str] = None,
                       device="cpu") -> Optional[ChunkCache]:
    """The cache the pieces make, None if one is missing; EntryRefusedError if they do not agree
    with `key` (another model, kind, dtype, codec level, tokens, or layer records)."""
    if any(entry is None for entry in entries):
        return None
    keys: List[list] = []
    values: List[list] = []
    token_ids = []
    for index, entry in enumerate(entries):
        meta = entry.meta
        expected = {"fingerprint": key.fingerprint, "cache_kind": key.cache_kind, "dtype": key.dtype,
                    "codec_level": key.codec_level,
                    "tokens_total": key.tokens, "pieces": key.pieces,
                    "positions": [index * PIECE_TOKENS, min(key.tokens, (index + 1) * PIECE_TOKENS)]}
        if records_digest is not None:
            expected["records_digest"] = records_digest
        wrong = [name for name, value in expected.items() if meta.get(name) != value]
        if wrong:
            raise EntryRefusedError(f"store entry {entry.key} does not match its key ({', '.join(wrong)} differ); it "
                                    "is not used", entry.key)
        piece_keys, piece_values = decode_piece(entry, device)
        keys.append(piece_keys)
        values.append(piece_values)
        token_ids.extend(meta["token_ids"])
    from kvcompile.fusion.chunks import ChunkCache

    ids = torch.tensor(token_ids, dtype=torch.long)
    if tokens_hash(ids) != key.tokens_hash:
        raise EntryRefusedError(f"store entries under {key} hold other token ids than their key names; not used",
                                str(key))
    first = entries[0].meta
    return ChunkCache(ids, [torch.cat([piece[i] for piece in keys], dim=2) for i in range(len(keys[0]))],
                      [torch.cat([piece[i] for piece in values], dim=2) for i in range(len(values[0]))],
                      first["fingerprint"], first["dtype"], first["cache_kind"],
                      {"store_key": str(key), "codec_level": key.codec_level})


def get_chunk_caches(store: KVStore, cache_keys: Sequence[CacheKey], records_digest: Optional[str] = None,
                     on_refused: OnRefused = None, device="cpu") -> List[Optional[ChunkCache]]:
    """Every cache in one round trip (get_many over all their pieces); None where a piece is
    missing. Refused entries raise, or with `on_refused` are reported there and read as missing."""
    piece_keys = [k.piece_keys() for k in cache_keys]
    entries = store.get_entries([p for keys in piece_keys for p in keys], on_refused)
    caches, at = [], 0
    for key, pieces in zip(cache_keys, piece_keys):
        mine = entries[at:at + len(pieces)]
        at += len(pieces)
        try:
            caches.append(chunk_from_entries(key, mine, records_digest, device))
        except EntryRefusedError as error:
            if on_refused is None:
                raise
            on_refused(error.key, error)
            caches.append(None)
    return caches


def get_chunk_cache(store: KVStore, cache_key, records_digest: Optional[str] = None) -> Optional[ChunkCache]:
    if isinstance(cache_key, str):
        cache_key, _ = CacheKey.parse(cache_key)
    return get_chunk_caches(store, [cache_key], records_digest)[0]
