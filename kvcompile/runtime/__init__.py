"""Runtimes: the cache managers and generation loop shared by the torch and ONNX Runtime backends."""
