"""PassContext: the typed state the passes of one compilation share.

Inputs are set by the compiler before the first pass; each product starts as None and is
set by exactly one pass, which declares it (`produces`). A pass that reads a product declares
it too (`requires`), and the PassManager refuses a pipeline in which a requirement comes
before its producer, so the order is checked before anything runs, in code, not by asserts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Optional

import torch

from kvcompile.core.config import CacheConfig
from kvcompile.core.layout import GraphSpec


@dataclass
class PassContext:
    # inputs
    model_config: Any  # the HF PretrainedConfig
    dtype: torch.dtype
    max_context: int
    cache_config: CacheConfig
    # products
    attention_sites: Optional[List[Any]] = None  # find_attention: one AttentionSite per layer, layer order
    spec: Optional[GraphSpec] = None  # insert_kv_cache: the graph's I/O layout and per-layer records

    @classmethod
    def products(cls) -> set:
        inputs = {"model_config", "dtype", "max_context", "cache_config"}
        return {f.name for f in fields(cls)} - inputs
