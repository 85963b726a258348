"""generate_fused(..., store=): fetch the chunk caches the store has, recompute the others.

Each chunk is given as its token ids; its key follows from the model (fingerprint, cache kind,
dtype), the ids and the codec level. Every piece of every chunk is fetched in one round trip. A
chunk whose pieces are missing, refused (corrupt, planted, another model) or unreachable (server
down) is recomputed with precompute_chunk and, if the store is reachable, written back. Nothing
the store does fails the generation: problems are logged on the `kvcompile.store` logger and
counted in the FetchReport. A ChunkCache is used as it is; a CacheKey (or key string) is fetched
but cannot be recomputed, so one the store cannot serve raises ChunkUnavailableError.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from kvcompile.fusion.chunks import ChunkCache
from kvcompile.store.base import KVStore
from kvcompile.store.chunks import get_chunk_caches, put_chunk_cache
from kvcompile.store.errors import ChunkUnavailableError, StoreError
from kvcompile.store.keys import CacheKey, records_digest

log = logging.getLogger("kvcompile.store")


@dataclass
class FetchReport:
    """What the store gave one generate_fused call."""
    hits: int = 0
    recomputed: int = 0
    refused: int = 0
    fetched_kv_bytes: int = 0
    fetch_seconds: float = 0.0
    problems: List[str] = field(default_factory=list)


def resolve_chunks(compiled, chunks: Sequence, store: KVStore, codec_level: Optional[int] = None,
                   write_back: bool = True):
    """(ChunkCaches in the order given, FetchReport)."""
    fusion = compiled.fusion
    kind = compiled.cache_config.kind.value
    digest = records_digest(compiled.spec)
    report = FetchReport()
    wanted = {}  # position in `chunks` -> (token ids, key)
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, (CacheKey, str)):  # a key alone: fetched, but not recomputable
            key = CacheKey.parse(chunk)[0] if isinstance(chunk, str) else chunk
            wanted[index] = (None, key)
        elif not isinstance(chunk, ChunkCache):
            ids = torch.as_tensor(chunk, dtype=torch.long).reshape(-1).cpu()
            wanted[index] = (ids, CacheKey.for_tokens(ids, fusion.fingerprint, kind, compiled.spec.dtype, codec_level))
    fetched: List[Optional[ChunkCache]] = [None] * len(wanted)
    reachable = True

    def refused(key, error):
        report.refused += 1
        report.problems.append(str(error))
        log.warning("%s", error)

    if wanted:
        start = time.perf_counter()
        try:
            fetched = get_chunk_caches(store, [key for _, key in wanted.values()], digest, on_refused=refused,
                                       device=compiled.device)
        except StoreError as error:
            reachable = False
            report.problems.append(str(error))
            log.warning("%s; recomputing %d chunk cache(s)", error, len(wanted))
        report.fetch_seconds = time.perf_counter() - start
    resolved = list(chunks)
    for (index, (ids, key)), cache in zip(wanted.items(), fetched):
        if cache is not None:
            report.hits += 1
            report.fetched_kv_bytes += sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
            resolved[index] = cache
            continue
        if ids is None:
            why = "; ".join(report.problems) or "not in the store"
            raise ChunkUnavailableError(f"chunk {index} ({key}) cannot be fetched ({why}) and, given by its key alone, "
                                        "cannot be recomputed: pass its token ids instead")
        resolved[index] = compiled.precompute_chunk(ids)
        report.recomputed += 1
        if reachable and write_back:
            try:
                put_chunk_cache(store, resolved[index], codec_level, digest)
            except StoreError as error:
                reachable = False
                report.problems.append(str(error))
                log.warning("%s; the chunk cache is not stored", error)
    fusion.last_store_report = report
    return resolved, report
