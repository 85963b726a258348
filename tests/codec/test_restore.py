"""A compiled model started from a compressed context (kvcompile/codec/restore.py): decoding into
the cache is exact, a restored context continues like a full prefill, and a context from another
model, shape or dtype is refused before anything is decoded."""
from __future__ import annotations

import io

import pytest
import torch

import kvcompile
import kvcompile.codec as codec
from kvcompile.codec.restore import RestoreMismatchError
from kvcompile.codec.saved_kv import prompt_kv

CONTEXT = 160


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    compiled = kvcompile.compile(kvcompile.load_model("reference"))
    text = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
            "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, item):\n"
            "        self.items.append(item)\n")
    ids = torch.tensor(list(text.encode()))[:CONTEXT]  # the reference model's byte tokenizer
    query = torch.tensor(list(b"\n\nprint(fibonacci("))
    return compiled, ids, query, prompt_kv(compiled, ids)


def eight_bit(x):
    """Per-(layer, token) abs-max int8, as the codec's lossless level expects."""
    scale = x.abs().amax(dim=(1, 3), keepdim=True)
    return torch.round(x / scale * 127) / 127 * scale


def query_logits(compiled, source, query):
    cache = compiled.restore_cache(source, extra_capacity=query.shape[0])
    logits, _ = compiled.prefill(query[None], cache=cache)
    return logits


def test_a_restored_context_continues_like_a_full_prefill(setup):
    compiled, ids, query, kv = setup
    full_logits, _ = compiled.prefill(torch.cat([ids, query])[None])
    restored = query_logits(compiled, (kv.keys, kv.values), query)
    torch.testing.assert_close(restored, full_logits[:, CONTEXT:], rtol=1e-4, atol=1e-4)
    full = compiled.generate(torch.cat([ids, query])[None], max_new_tokens=8)[:, CONTEXT:]
    assert torch.equal(compiled.generate_from_kv((kv.keys, kv.values), query[None], max_new_tokens=8), full)


def test_the_lossless_level_restores_8_bit_kv_exactly(setup):
    compiled, ids, query, kv = setup
    keys, values = eight_bit(kv.keys), eight_bit(kv.values)
    blob = codec.encode((keys, values), level=codec.LOSSLESS_LEVEL, chunk_tokens=64, fingerprint=kv.fingerprint)
    expected = query_logits(compiled, (keys, values), query)
    assert torch.equal(query_logits(compiled, blob, query), expected)  # bit-equal logits
    tokens = compiled.generate_from_kv((keys, values), query[None], max_new_tokens=8)
    assert torch.equal(compiled.generate_from_kv(io.BytesIO(blob), query[None], max_new_tokens=8), tokens)


def test_a_bitstream_file_restores(setup, tmp_path):
    compiled, ids, query, kv = setup
    path = tmp_path / "ctx.kvcb"
    path.write_bytes(codec.encode((kv.keys, kv.values), level=1, fingerprint=kv.fingerprint))
    out = compiled.generate_from_kv(str(path), query, max_new_tokens=4)
    assert out.shape == (1, query.shape[0] + 4) and torch.equal(out[0, :query.shape[0]], query)


@pytest.mark.parametrize("change, fragment", [
    ("fingerprint", "computed by another model"),
    ("layers", "this model has"),
    ("dtype", "this model runs in float32"),
])
def test_a_foreign_context_is_refused(setup, change, fragment):
    compiled, ids, query, kv = setup
    keys, values, fingerprint = kv.keys, kv.values, kv.fingerprint
    if change == "fingerprint":
        fingerprint = "0" * 16
    elif change == "layers":
        keys, values = keys[:-1], values[:-1]
    else:
        keys, values = keys.half(), values.half()
    blob = codec.encode((keys, values), level=2, fingerprint=fingerprint)
    with pytest.raises(RestoreMismatchError, match=fragment):
        compiled.generate_from_kv(blob, query, max_new_tokens=2)


def test_a_context_that_leaves_no_room_is_refused_up_front(setup):
    compiled, ids, query, kv = setup
    from kvcompile.errors import ContextLengthError

    with pytest.raises(ContextLengthError, match=f"after {CONTEXT} cached"):
        compiled.generate_from_kv((kv.keys, kv.values), query, max_new_tokens=compiled.spec.max_context)


def test_the_restore_graph_writes_the_cache_layout_of_kcache_layers():
    from kvcompile.frontend.tiny_models import tiny_model
    from kvcompile.codec import chunk as chunk_codec
    from kvcompile.passes.restore_from_codec import restore_graph

    compiled = kvcompile.compile(tiny_model("llama"), kvcompile.CacheConfig(kind="kcache", topn=8, full_layers=1))
    kv = prompt_kv(compiled, torch.randint(3, 200, (64,)))
    blob = codec.encode((kv.keys, kv.values), level=2, chunk_tokens=32)
    header, stream = codec.read_header(io.BytesIO(blob)), io.BytesIO(blob)
    codec.read_header(stream)
    # the graph reads format-2 chunks: restore_cache lays a format-3 chunk out as one (to_format2)
    chunks = [chunk_codec.to_format2(header, i, data) for i, data in codec.iter_chunks(stream, header)]
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    outputs = restore_graph(compiled.spec, 2, 32)(data, torch.tensor([0, len(chunks[0])]))
    keys, values = codec.decode(blob)
    for layer, record in enumerate(compiled.spec.layers):
        assert torch.equal(outputs[2 * layer][0], keys[layer])
        value = outputs[2 * layer + 1][0]
        assert torch.equal(value.transpose(0, 1) if record.host_values else value, values[layer])
    assert any(r.host_values for r in compiled.spec.layers) and not compiled.spec.layers[0].host_values
    restored = compiled.restore_cache(blob)
    past_keys, past_values = restored.past_all()
    assert torch.equal(past_keys[1][0], keys[1]) and torch.equal(past_values[1][0].transpose(0, 1), values[1])


@pytest.mark.slow
def test_an_onnx_artifact_restores_through_its_restore_graph(tmp_path):
    from kvcompile.frontend.tiny_models import tiny_model
    from kvcompile.runtime.onnxruntime import load_onnx_artifact

    from kvcompile.export import export

    export(tiny_model("llama"), target="onnx", out_dir=tmp_path / "art", codec_level=1)
    backend = load_onnx_artifact(tmp_path / "art")
    assert backend.manifest["graphs"]["restore"]["level"] == 1
    kv = prompt_kv(backend, torch.randint(3, 200, (300,)))
    blob = codec.encode((kv.keys, kv.values), level=1, fingerprint=kv.fingerprint)  # 1 whole chunk + 44 tokens
    keys, values = codec.decode(blob)
    past_keys, past_values = backend.restore_cache(blob).past_all()
    for layer in range(backend.spec.num_layers):
        assert torch.equal(past_keys[layer][0], keys[layer]) and torch.equal(past_values[layer][0], values[layer])
    assert backend.generate_from_kv(blob, torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)
