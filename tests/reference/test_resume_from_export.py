"""A training job resumes from exported bf16 weights (how reference-long continues when its fp32
checkpoint cannot travel to the GPU machine)."""
import json

import pytest
import torch

from kvcompile.reference.checkpoint import EXPORTED_STATE, load_checkpoint


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_resume_from_exported_weights(tmp_path):
    trained = tiny_llama().to(torch.bfloat16)
    trained.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / EXPORTED_STATE).write_text(json.dumps({"step": 4306, "tokens": 123, "seconds": 1.5}))
    fresh = tiny_llama()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    state, had_moments = load_checkpoint(str(tmp_path), fresh)
    assert state["step"] == 4306 and not had_moments  # moments restart: the job re-warms
    for name, tensor in trained.state_dict().items():
        assert fresh.state_dict()[name].dtype == torch.float32
        assert torch.equal(fresh.state_dict()[name], tensor.float()), name


def test_a_folder_that_is_neither_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither a training checkpoint"):
        load_checkpoint(str(tmp_path), tiny_llama())
