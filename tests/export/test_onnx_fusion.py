"""KV fusion on ONNX Runtime: `export --fuse` writes check.onnx, and the fused prefill on ORT
matches the torch runtime's for every selector and ratio."""
from __future__ import annotations

import pytest
import torch

from kvcompile.errors import UsageError
from kvcompile.export.onnx_target import CHECK_FILE, export_onnx
from kvcompile.runtime.onnxruntime import load_onnx_artifact
from tiny_models import compiled_tiny


@pytest.mark.slow
def test_fused_prefill_on_onnx_runtime_matches_torch(tmp_path):
    _, compiled = compiled_tiny("qwen2")  # GQA, q/k/v biases
    backend = load_onnx_artifact(export_onnx(compiled, tmp_path / "fuse", fuse_check_layer=1))
    assert (tmp_path / "fuse" / CHECK_FILE).is_file() and backend.manifest["graphs"]["check"]["layer"] == 1
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 250, (n,), generator=generator) for n in (11, 7, 13)]
    query = torch.randint(3, 250, (5,), generator=generator)
    torch_chunks = [compiled.precompute_chunk(d) for d in docs]
    ort_chunks = [backend.precompute_chunk(d) for d in docs]
    for ratio, selector in ((0.0, "deviation"), (0.3, "deviation"), (0.3, "query_attention"), (0.3, "chunk_head"),
                            (0.3, "query_spans"), (1.0, "deviation")):
        expected = compiled.fusion.prefill(compiled.new_cache(1, 64), torch_chunks, query, ratio, selector)
        got = backend.fusion.prefill(backend.new_cache(1, 64), ort_chunks, query, ratio, selector)
        assert (got - expected).abs().max().item() <= 1e-4, (ratio, selector)
    assert torch.equal(backend.generate_fused(ort_chunks, query, 0.3, 12),
                       compiled.generate_fused(torch_chunks, query, 0.3, 12))
    # a chunk cache computed by one runtime serves the other
    assert torch.equal(backend.generate_fused(torch_chunks, query, 0.3, 12),
                       compiled.generate_fused(ort_chunks, query, 0.3, 12))
    with pytest.raises(UsageError, match="check layer 2"):
        backend.generate_fused(ort_chunks, query, 0.3, 4, check_layer=2)
