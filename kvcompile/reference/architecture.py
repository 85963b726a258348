"""The reference models' shapes: small Llamas (RoPE, GQA, byte vocabulary).

"base" (the bundled `reference`, 2K context): head_dim 32 and 2 KV heads keep every KV tensor
a power of two wide ([B, 2, T, 32]), which the kernels and the codec like; 8 layers leave room
for the two-step lookups the tasks need.

"long" (`reference-long`, 8K context): head_dim 64 (the KV statistics the codec and KCache
see in real models), GQA 6:2, the same 8 layers. Sized by the GPU budget it was first trained
under (one ~8-minute H200 job, ~13M parameters) and by the GPU machine's return path: its fp32
training checkpoint (51 MB) comes back in 4 files of <= 15 MiB. RoPE theta 500 000 (Llama 3's
at 8K) leaves the slowest rotary pair far from wrapping at 16K, so a later job can extend the
context by training at 16K without changing the model.
"""
from __future__ import annotations

from transformers import LlamaConfig

from kvcompile.frontend.tokenizer import ByteTokenizer

CONTEXT = 2048        # the bundled `reference`
LONG_CONTEXT = 8192   # `reference-long`

# size -> (LlamaConfig shape, context, rope theta)
SIZES = {
    # ~7.7M parameters: 15.5 MB in bf16.
    "base": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32), CONTEXT, 10000.0),
    # For CPU smoke runs of the training script only.
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16), CONTEXT, 10000.0),
    # ~12.8M parameters: 25.6 MB in bf16 (two shards), 51 MB as the fp32 checkpoint.
    "long": (dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=64), LONG_CONTEXT, 500000.0),
    # The long model's layout (head_dim 64, GQA 3:1, long context) at a CPU-testable size.
    "long-tiny": (dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=64), LONG_CONTEXT, 500000.0),
}


def context_of(size: str) -> int:
    return SIZES[size][1]


def reference_config(size: str = "base") -> LlamaConfig:
    shape, context, theta = SIZES[size]
    tok = ByteTokenizer()
    return LlamaConfig(
        vocab_size=tok.vocab_size,
        max_position_embeddings=context,
        rope_theta=theta,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        initializer_range=0.02,
        **shape,
    )
