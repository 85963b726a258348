"""kvcompile.compile: trace a HF causal LM and run the pass pipeline of its cache kind."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from kvcompile.core.config import CacheConfig
from kvcompile.core.modes import CacheKind
from kvcompile.errors import InputError
from kvcompile.frontend.trace import max_context, trace_model
from kvcompile.passes.context import PassContext
from kvcompile.passes.find_attention import find_attention
from kvcompile.passes.insert_kv_cache import insert_kv_cache
from kvcompile.passes.kcache import kcache
from kvcompile.passes.manager import CompilerPass, PassManager
from kvcompile.passes.strip_asserts import strip_asserts
from kvcompile.runtime.compiled import CompiledModel

# The passes each cache kind runs, in order. Fusion and the codec add their rows here.
PIPELINES: Dict[CacheKind, Tuple[CompilerPass, ...]] = {
    CacheKind.FULL: (strip_asserts, find_attention, insert_kv_cache),
    CacheKind.KCACHE: (strip_asserts, find_attention, insert_kv_cache, kcache),
}


def pipeline(config: CacheConfig) -> Tuple[CompilerPass, ...]:
    """The passes a CacheConfig asks for, in order."""
    return PIPELINES[config.kind]


def pass_context(model: torch.nn.Module, config: CacheConfig) -> PassContext:
    return PassContext(model_config=model.config, dtype=next(model.parameters()).dtype,
                       max_context=max_context(model), cache_config=config)


def check_model(model) -> None:
    """A Hugging Face causal LM, or one clear line saying what was given instead."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(config, "vocab_size"):
        raise InputError(f"compile() needs a Hugging Face causal LM (a PreTrainedModel with a config), got "
                         f"{type(model).__name__}; load one with kvcompile.load_model or transformers")
    if not any(True for _ in model.parameters()):
        raise InputError(f"{type(model).__name__} has no parameters to compile")


def compile(model: torch.nn.Module, config: Optional[CacheConfig] = None) -> CompiledModel:  # noqa: A001
    """Trace `model` with torch.export, rewrite its attention for `config`, return a CompiledModel."""
    config = config or CacheConfig()
    check_model(model)
    model = model.eval()
    graph_module = trace_model(model).module()
    context = pass_context(model, config)
    report = PassManager(pipeline(config)).run(graph_module, context)
    return CompiledModel(graph_module, context.spec, config, report, model.config)
