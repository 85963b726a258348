"""The front end: load a checkpoint (or a tiny random model), trace it with torch.export,
and the tokenizers that turn prompts into ids (docs/ARCHITECTURE.md)."""
