"""kvcompile: a compiler for the KV cache of decoder LLMs."""
__version__ = "0.1.0"

from kvcompile.config import CacheConfig, ConfigError  # noqa: F401
