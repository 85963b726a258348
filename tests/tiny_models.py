"""Tiny compiled models and padded batches shared by the tests (imported as `tiny_models`)."""
from __future__ import annotations

import functools

import torch

import kvcompile
from kvcompile.frontend.tiny_models import tiny_model

# The four architectures the foundation issue names, plus features the passes must generalise
# over: qk-norm (qwen3, olmo2), partial rotary + fused qkv (phi3, gpt_neox), GeGLU / embedding
# scaling (gemma), llama3 RoPE scaling + MQA (llama3), interleaved rotary in fp32 (cohere),
# attention_multiplier scale (granite), biases + LayerNorm (starcoder2).
CORE_ARCHS = ("llama", "mistral", "qwen2", "gpt2")
EXTRA_ARCHS = ("qwen3", "phi3", "gemma", "llama3", "cohere", "granite", "olmo2", "starcoder2", "gpt_neox")


@functools.lru_cache(maxsize=None)
def compiled_tiny(arch: str, kind: str = "full", topn=10**6, select: str = "head"):
    """(hf_model, compiled_model) for a tiny config, traced once per test session."""
    model = tiny_model(arch)
    config = kvcompile.CacheConfig(kind=kind, topn=topn, select=select) if kind == "kcache" else kvcompile.CacheConfig()
    return model, kvcompile.compile(model, config)


def padded_batch(seed: int = 1, batch: int = 3, length: int = 10, pads=(0, 3, 6)):
    """Left-padded prompts of different lengths: (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(pads[:batch]):
        attention_mask[row, :pad] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask
