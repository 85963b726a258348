"""kvcompile: a compiler for the KV cache of decoder LLMs.

    model = kvcompile.load_model("reference")
    config = kvcompile.CacheConfig(kind="kcache", kcache=kvcompile.KCacheOptions(topn=128))
    compiled = kvcompile.compile(model, config)
    tokens = compiled.generate(input_ids, max_new_tokens=32)
    kvcompile.export(model, target="onnx", out_dir="exported/reference-kcache", cache=config)

Importing the package is light (no torch) so `kvcompile --help` starts fast; the functions
below import what they need when called. Errors: kvcompile.errors (one typed family).
"""
__version__ = "0.1.0"

from kvcompile.core.config import CacheConfig, KCacheOptions  # noqa: F401,E402
from kvcompile.core.modes import CacheKind, SelectMode  # noqa: F401,E402
from kvcompile.errors import ConfigError, KvcompileError, LoadError  # noqa: F401,E402


def load_model(name_or_dir="reference", dtype=None, device=None):
    """A local Hugging Face checkpoint folder or a bundled model ("reference"), in eval mode."""
    from kvcompile.frontend.loading import load_model as load

    return load(name_or_dir, dtype=dtype, device=device)


def compile(model, config=None):  # noqa: A001
    """Trace `model`, rewrite its attention for `config` (a CacheConfig), return a CompiledModel."""
    from kvcompile.core.pipeline import compile as compile_model

    return compile_model(model, config)


def export(model, target="torch", out_dir="exported/model", cache=None):
    """Compile `model` for `cache` and write a `target` ("torch" | "onnx") artifact folder."""
    from kvcompile.export import export as export_artifact

    return export_artifact(model, target=target, out_dir=out_dir, cache=cache)
