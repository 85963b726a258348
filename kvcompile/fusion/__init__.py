"""KV fusion (CacheBlend, arXiv 2405.16444): reuse precomputed chunk caches, recompute what matters.

    chunks = [compiled.precompute_chunk(ids) for ids in documents]   # each alone, from position 0
    tokens = compiled.generate_fused(chunks, query_ids, recompute_ratio=0.15, max_new_tokens=32)

chunks.py     ChunkCache: one chunk's K/V at positions 0..L-1, with what makes reuse safe
              (model fingerprint, dtype, cache kind, layer records); save/load as safetensors
selectors.py  which chunk tokens to recompute: the question's probe of the reused cache, in spans
              (the default), KV deviation at a check layer (CacheBlend), the first tokens of each
              chunk (EPIC), the question's attention (A³)
blend.py      the fused prefill: place and re-rotate the chunks, check layer, selective
              recompute of the chosen tokens and the query, then ordinary decoding
loading.py    the chunk caches' layer-by-layer loading on a side stream, overlapped with compute
"""
from kvcompile.fusion.chunks import ChunkCache, ChunkMismatchError, model_fingerprint  # noqa: F401
from kvcompile.fusion.selectors import TokenSelector  # noqa: F401
from kvcompile.fusion.api import FusionMethods  # noqa: F401
