"""kvcompile::captured_attention — a layer's attention captured at trace time (never exported:
insert_kv_cache replaces every such node before any target sees the graph)."""
from kvcompile.ops.captured_attention import definition  # noqa: F401  (registers the torch op)
from kvcompile.ops.registry import OpEntry

ENTRY = OpEntry.of_folder(__name__, "trace-time capture of one layer's attention with its facts (replaced by the passes)", exportable=False)
