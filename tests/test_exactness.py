"""The compiled full-cache model must reproduce Hugging Face exactly (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from kvcompile.runtime.generate import positions_from_mask
from tiny_models import CORE_ARCHS, EXTRA_ARCHS, compiled_tiny, padded_batch

ARCHS = CORE_ARCHS + EXTRA_ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_match_hf(arch):
    model, compiled = compiled_tiny(arch)
    input_ids, attention_mask = padded_batch(seed=2)
    # HF's forward numbers positions 0..L-1 even under left padding; its generate (and we)
    # number real tokens from 0. Learned absolute positions (GPT-2) tell the difference.
    with torch.no_grad():
        reference = model(input_ids, attention_mask=attention_mask,
                          position_ids=positions_from_mask(attention_mask)).logits
    logits, cache = compiled.prefill(input_ids, attention_mask)
    real = attention_mask.bool()
    assert (logits[real] - reference[real]).abs().max().item() <= 1e-4

    # Three decode steps, each checked against HF over the whole sequence so far.
    sequence, mask = input_ids, attention_mask
    for step in range(3):
        next_ids = torch.tensor([[7 + step], [42], [200 - step]])
        sequence = torch.cat([sequence, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        with torch.no_grad():
            expected = model(sequence, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
        got = compiled.decode_step(next_ids, cache)[:, -1]
        assert (got - expected).abs().max().item() <= 1e-4, f"decode step {step}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches_hf_greedy(arch, batch):
    model, compiled = compiled_tiny(arch)
    input_ids, attention_mask = padded_batch(seed=3, batch=batch)
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                              pad_token_id=0)
    got = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, pad_token_id=0)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_generate_stops_at_eos_and_pads():
    model, compiled = compiled_tiny("llama")
    input_ids, attention_mask = padded_batch(seed=4)
    free_run = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, eos_token_id=-1)
    eos = int(free_run[0, input_ids.shape[1] + 1])  # the 2nd token row 0 produces
    got = compiled.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, eos_token_id=eos,
                            pad_token_id=0)
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    row = got[0, input_ids.shape[1]:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1:])


def test_decode_past_initial_capacity_grows_cache():
    model, compiled = compiled_tiny("qwen2")
    input_ids = torch.randint(0, 256, (2, 5))
    logits, cache = compiled.prefill(input_ids)
    assert cache.capacity == 5
    sequence = input_ids
    for _ in range(4):  # forces two doublings
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_ids], dim=1)
        logits = compiled.decode_step(next_ids, cache)
    with torch.no_grad():
        expected = model(sequence).logits[:, -1]
    assert cache.capacity >= 9
    assert (logits[:, -1] - expected).abs().max().item() <= 1e-4


def test_sliding_window_model_matches_hf():
    import transformers

    import kvcompile
    from kvcompile.frontend.tiny_models import tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 4
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    compiled = kvcompile.compile(model)
    assert compiled.spec.sliding_window == 4
    input_ids = torch.randint(0, 256, (1, 12))
    expected = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(compiled.generate(input_ids, max_new_tokens=20), expected)
