"""Tiny random-weight configurations of real architectures, for exactness tests and demos.

Each is small enough to trace and run in a second on CPU but keeps the features the passes must
handle: GQA, RoPE variants (partial rotary), qk-norm, projection biases, learned positions.
"""
from __future__ import annotations

import torch

VOCAB = 272  # 256 bytes + specials, matching the byte tokenizer's range


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=256, eos_token_id=257)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":  # q/k/v projection biases
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":  # qk-norm
        return tf.Qwen3Config(**llama_like, head_dim=16)
    if arch == "phi3":  # partial rotary, fused qkv projection
        return tf.Phi3Config(**llama_like, partial_rotary_factor=0.5, pad_token_id=0)
    if arch == "gemma":  # attention scaling by query_pre_attn_scalar-free head_dim, GeGLU
        return tf.GemmaConfig(**llama_like, head_dim=16)
    if arch == "llama3":  # llama3 RoPE frequency scaling, MQA (one KV head)
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}
        return tf.LlamaConfig(**{**llama_like, "num_key_value_heads": 1}, rope_parameters=rope)
    if arch == "cohere":  # interleaved rotary computed in fp32, LayerNorm, logit scaling
        return tf.CohereConfig(**llama_like)
    if arch == "granite":  # attention_multiplier instead of 1/sqrt(d), residual/embedding multipliers
        return tf.GraniteConfig(**llama_like, attention_multiplier=0.3)
    if arch == "olmo2":  # qk-norm over the whole projection, post-norms
        return tf.Olmo2Config(**llama_like)
    if arch == "starcoder2":  # biases everywhere, LayerNorm, GELU MLP
        return tf.Starcoder2Config(**llama_like)
    if arch == "gpt_neox":  # partial rotary (25%), fused qkv, parallel residual, MHA
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=512,
                                bos_token_id=256, eos_token_id=257)
    hybrid = dict(llama_like, num_hidden_layers=4, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"] * 2)
    if arch == "gemma2":  # alternating sliding/full layers, attention logit soft-capping
        return tf.Gemma2Config(**hybrid, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0)
    if arch == "gpt_oss":  # alternating sliding/full layers, attention sinks, MoE
        return tf.GptOssConfig(**{**hybrid, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2)
    if arch == "gpt2":  # learned absolute positions, fused c_attn with bias, MHA
        return tf.GPT2Config(vocab_size=VOCAB, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                             bos_token_id=256, eos_token_id=257)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2",
              "llama3", "cohere", "granite", "olmo2", "starcoder2", "gpt_neox", "gemma2", "gpt_oss")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seeded random-weight model of `arch`, eval mode."""
    from transformers import AutoModelForCausalLM

    from kvcompile.frontend.loading import with_attention_implementation

    config = tiny_config(arch)

    def build(implementation):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=dtype)
    model = with_attention_implementation(build)
    model.config._kvcompile_source = f"tiny-{arch}"
    return model.eval()
