"""The shipped reference weights: size limits, architecture, and loading with plain transformers."""
import glob
import json
import os

import pytest
import torch

from kvcompile.reference import WEIGHTS_DIR
from kvcompile.frontend.tokenizer import ByteTokenizer


def test_size_limits():
    files = glob.glob(os.path.join(WEIGHTS_DIR, "*"))
    assert sum(os.path.getsize(f) for f in files) <= 25_000_000
    shards = glob.glob(os.path.join(WEIGHTS_DIR, "*.safetensors"))
    assert shards and all(os.path.getsize(s) <= 16_000_000 for s in shards)


def test_config_is_a_small_gqa_llama_with_2k_context():
    with open(os.path.join(WEIGHTS_DIR, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 2)
    assert config["max_position_embeddings"] >= 2048
    tok = ByteTokenizer.for_model_dir(WEIGHTS_DIR)
    assert config["vocab_size"] == tok.vocab_size
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)


def _load(device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR, attn_implementation="sdpa").to(device)


def test_loads_on_cpu_with_5_to_15m_bf16_parameters():
    model = _load("cpu")
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 15e6
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[256, 100, 101]])).logits
    assert logits.shape == (1, 3, 259) and torch.isfinite(logits).all()


@pytest.mark.gpu
def test_loads_and_retrieves_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kvcompile.eval import HFRunner
    from kvcompile.eval.retrieval import score_retrieval
    result = score_retrieval(HFRunner(_load("cuda")), (2048,), count=16)
    assert result["2048"] >= 0.9
