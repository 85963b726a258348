"""The reference model's shape: a small Llama (RoPE, GQA 8:2, byte vocabulary, 2K context).

head_dim 32 and 2 KV heads keep every KV tensor a power-of-two wide ([B, 2, T, 32]), which
the kernels and the codec like; 8 layers leave room for the two-step lookups the tasks need.
"""
from __future__ import annotations

from transformers import LlamaConfig

from kvcompile.frontend.tokenizer import ByteTokenizer

CONTEXT = 2048

SIZES = {
    # ~7.7M parameters: 15.5 MB in bf16.
    "base": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32),
    # For CPU smoke runs of the training script only.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def reference_config(size: str = "base") -> LlamaConfig:
    tok = ByteTokenizer()
    return LlamaConfig(
        vocab_size=tok.vocab_size,
        max_position_embeddings=CONTEXT,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        initializer_range=0.02,
        **SIZES[size],
    )
