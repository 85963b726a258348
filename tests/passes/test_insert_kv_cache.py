"""insert_kv_cache: SDPA replaced, cache inputs/outputs added, the model's mask code removed."""
from __future__ import annotations

import torch

from tiny_models import compiled_tiny


def call_targets(graph_module):
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]


def test_graph_signature_and_ops():
    _, compiled = compiled_tiny("llama")
    graph_module, spec = compiled.graph_module, compiled.spec
    placeholders = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "position_ids", "attn_bias",
                            "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    targets = call_targets(graph_module)
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(torch.ops.kvcompile.cached_attention.default) == spec.num_layers
    # repeat_kv's expand and the causal-mask construction are gone (the runtime supplies the mask)
    assert torch.ops.aten.expand.default not in targets
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    assert len(output.args[0]) == 1 + 2 * spec.num_layers
    assert spec.input_names[3:5] == ["past_key.0", "past_value.0"]
    assert spec.output_names[1:3] == ["new_key.0", "new_value.0"]


def test_new_kv_outputs_are_per_kv_head():
    _, compiled = compiled_tiny("mistral")
    spec = compiled.spec
    input_ids = torch.randint(0, 256, (2, 5))
    cache = compiled.new_cache(2, 8)
    keys, values = cache.past_all()
    bias = torch.zeros(2, 1, 5, 5)
    logits, new_keys, new_values = compiled.step(input_ids, torch.arange(5).expand(2, 5), bias, keys, values)
    assert logits.shape == (2, 5, spec.vocab_size)
    assert new_keys[0].shape == (2, spec.kv_heads, 5, spec.head_dim)
    assert new_values[1].shape == (2, spec.kv_heads, 5, spec.head_dim)


def test_report_rows_name_each_layer():
    _, compiled = compiled_tiny("gpt2")
    insert = next(p for p in compiled.report.passes if p.name == "insert_kv_cache")
    assert [row["layer"] for row in insert.rows] == [0, 1]
    assert all(row["with"] == "kvcompile::cached_attention" for row in insert.rows)
