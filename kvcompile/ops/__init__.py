"""kvcompile's custom ops, one folder each, and the registry that lists them.

Importing this package registers every op under the `kvcompile` torch namespace
(`torch.ops.kvcompile.<name>`) and in `kvcompile.ops.registry`. To add an op, add a folder
like `cached_attention/` and one line below (docs/ARCHITECTURE.md, "Adding an op").
"""
from kvcompile.ops import registry
from kvcompile.ops import cached_attention, captured_attention, kcache_attention

registry.register(captured_attention.ENTRY)
registry.register(cached_attention.ENTRY)
registry.register(kcache_attention.ENTRY)
from kvcompile.ops import rerotate_keys; registry.register(rerotate_keys.ENTRY)  # noqa: E402,E702
from kvcompile.ops import kv_decode; registry.register(kv_decode.ENTRY)  # noqa: E402,E702
