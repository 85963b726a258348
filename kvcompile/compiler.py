"""kvcompile.compile: trace a HF causal LM and run the FX passes for a CacheConfig."""
from __future__ import annotations

from typing import Optional

import torch

from kvcompile.config import CacheConfig
from kvcompile.runtime.compiled import CompiledModel
from kvcompile.trace import max_context, trace_model
from kvcompile.passes.find_attention import find_attention
from kvcompile.passes.insert_kv_cache import insert_kv_cache
from kvcompile.passes.manager import PassManager
from kvcompile.passes.strip_asserts import strip_asserts


def pipeline(config: CacheConfig) -> list:
    """The passes a CacheConfig asks for, in order."""
    passes = [strip_asserts, find_attention, insert_kv_cache]
    if config.kind == "kcache":
        from kvcompile.passes.kcache import kcache

        passes.append(kcache)
    return passes


def compile(model: torch.nn.Module, config: Optional[CacheConfig] = None) -> CompiledModel:  # noqa: A001
    """Trace `model` with torch.export, rewrite its attention for `config`, return a CompiledModel."""
    config = config or CacheConfig()
    model = model.eval()
    dtype = next(model.parameters()).dtype
    exported = trace_model(model)
    graph_module = exported.module()
    context = {"model_config": model.config, "dtype": dtype, "max_context": max_context(model), "cache_config": config}
    report = PassManager(pipeline(config)).run(graph_module, context)
    return CompiledModel(graph_module, context["spec"], config, report, model.config)
