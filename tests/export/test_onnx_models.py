"""Model-level ONNX parity: compile() a model, export it, run it on ONNX Runtime (CPU) and
compare with the torch runtime — prefill and decode logits within 1e-4, 32 greedy tokens equal."""
import time

import pytest
import torch

import kvcompile
from kvcompile.core.pipeline import compile as compile_model
from kvcompile.export.onnx_target import export_onnx
from kvcompile.runtime import generate as gen
from kvcompile.runtime.onnxruntime import load_onnx_artifact
from tiny_models import compiled_tiny

TOPN = 8  # below the contexts used (prompt 9 + up to 32 new): KCache selection is exercised


def prompt(vocab=256, batch=2, length=9, padding=3):
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :padding] = 0  # left padding in the second sequence
    return input_ids, attention_mask


def check_parity(compiled, backend, decode_steps=4):
    input_ids, attention_mask = prompt()
    torch_cache, ort_cache = compiled.new_cache(2, 64), backend.new_cache(2, 64)
    expected = gen.prefill(compiled, torch_cache, input_ids, attention_mask)
    torch.testing.assert_close(gen.prefill(backend, ort_cache, input_ids, attention_mask), expected, atol=1e-4, rtol=0)
    next_ids = expected[:, -1].argmax(-1)
    for _ in range(decode_steps):
        expected = gen.decode_step(compiled, torch_cache, next_ids)
        torch.testing.assert_close(gen.decode_step(backend, ort_cache, next_ids), expected, atol=1e-4, rtol=0)
        next_ids = expected[:, -1].argmax(-1)
    want = compiled.generate(input_ids, attention_mask, max_new_tokens=32)
    got = backend.generate(input_ids, attention_mask, max_new_tokens=32)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "kcache"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_tiny_model_onnx_parity(arch, kind, tmp_path):
    _, compiled = compiled_tiny(arch, kind, topn=TOPN)  # traced once per session, shared with other tests
    out = export_onnx(compiled, tmp_path / f"{arch}-{kind}")
    backend = load_onnx_artifact(out)
    assert backend.manifest["kvcompile_nodes"] == (["cached_attention"] if kind == "full" else ["kcache_attention"])
    check_parity(compiled, backend)


@pytest.mark.slow
def test_fractional_topn_onnx_parity(tmp_path):
    """topn=0.3 is graph arithmetic on the context length; the node carries the fraction."""
    _, compiled = compiled_tiny("llama", "kcache", topn=0.3)
    backend = load_onnx_artifact(export_onnx(compiled, tmp_path / "fraction"))
    attributes = backend.manifest["kvcompile_domain"]["node_attributes"]["kcache_attention"]
    assert "topn_numerator" in attributes
    check_parity(compiled, backend)


def reference_model():
    """The bundled reference model when its weights exist, else random weights of its shape."""
    from kvcompile.frontend.loading import LoadError, load_model

    try:
        return load_model("reference"), "reference"
    except (LoadError, FileNotFoundError, OSError):
        from transformers import AutoModelForCausalLM

        from kvcompile.reference.architecture import reference_config

        torch.manual_seed(0)
        config = reference_config("base")
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval(), "reference-shape"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "kcache"])
def test_reference_model_onnx_parity_and_export_time(kind, tmp_path):
    model, _ = reference_model()
    compiled = compile_model(model, kvcompile.CacheConfig(kind=kind, topn=TOPN))
    started = time.perf_counter()
    out = export_onnx(compiled, tmp_path / kind)
    assert time.perf_counter() - started <= 60, "export of the reference model must take ≤ 60 s"
    check_parity(compiled, load_onnx_artifact(out), decode_steps=2)
