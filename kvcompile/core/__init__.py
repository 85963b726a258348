"""The compiler core: cache configuration, per-layer records, the graph I/O layout, and the
pass pipeline that turns a traced model into a CompiledModel (docs/ARCHITECTURE.md)."""
