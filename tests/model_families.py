"""Tiny, config-only decoder-LM families for testing kvcompile against many HF architectures.

    from model_families import FAMILIES, family_config
    cfg = family_config("gemma2")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")

Everything is built from config classes alone (no hub access).  Common sizes: hidden 64,
4 query heads / 2 KV heads, head_dim 16, intermediate 128, vocab 272, 512 positions, bos 256 /
eos 257 / pad 0.  Every windowed attention uses a window/chunk of 8 so a 24-token prompt plus 32
generated tokens overruns every window.  Families whose layers alternate between attention types
get 4 layers (each type appears at least once, usually twice); the rest get 2.

Deliberate exceptions to the common sizes: gemma4_text full layers (head_dim 32, 1 KV head),
MLA families deepseek_v3 / minicpm3 (qk head 24 = 16 nope + 8 rope, v head 16), mimo_v2_flash
(SWA layers get 2x KV heads), and MHA-only families (no num_key_value_heads field).

A few names are variants of a model_type ("falcon_alibi", "falcon_mqa", "mpt_noalibi"):
`FAMILY_MODEL_TYPE` maps every name to its transformers model_type.
"""

from __future__ import annotations

import dataclasses

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

WINDOW = 8  # sliding window / attention chunk / local window for every family

S, F, C = "sliding_attention", "full_attention", "chunked_attention"
ALT4 = [S, F, S, F]  # alternating sliding/full over 4 layers

# Canonical tiny sizes, written with the modern HF names. Each key is translated to the config's
# own field name (attribute_map or ALIASES) and silently dropped where the config has no such field.
BASE = dict(
    vocab_size=272,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=0,
    # MoE knobs (only applied where the config has them)
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    # dropouts off so repeated forwards are comparable
    attention_dropout=0.0,
)

# Legacy field names for the canonical keys (used when the config has no attribute_map entry).
ALIASES = {
    "intermediate_size": ("n_inner", "ffn_dim", "ffn_hidden_size", "dff"),
    "num_key_value_heads": ("num_kv_heads",),
    "max_position_embeddings": ("n_positions", "max_seq_len"),
    "attention_dropout": ("attn_pdrop",),
}

# Per-family overrides, in the config's own field names. `None` = no overrides (just BASE).
OVERRIDES: dict[str, dict] = {
    # --- llama-like, full attention -----------------------------------------------------------
    "llama": {},
    "qwen3": {},
    "gemma": {},
    "cohere": {},
    "olmo2": {},
    "granite": dict(attention_multiplier=0.125),  # non-default attention scaling
    "helium": {},
    "arcee": {},
    "apertus": dict(rope_parameters=dict(rope_type="llama3", rope_theta=12e6, factor=8.0,
                                         original_max_position_embeddings=128,
                                         low_freq_factor=1.0, high_freq_factor=4.0)),
    "seed_oss": {},
    "glm": {},  # partial rotary 0.5
    "glm4": {},  # partial rotary 0.5
    "stablelm": {},  # partial rotary 0.25
    "persimmon": {},  # partial rotary 0.5, qk layernorm, no GQA field
    "phi": {},  # partial rotary 0.5
    "gpt_neox": {},  # partial rotary 0.25
    "nemotron": {},  # partial rotary 0.5
    "internlm3": {},
    "ernie4_5": {},
    "hunyuan_v1_dense": {},
    "jais2": {},
    "hyperclovax": {},
    "olmo": {},
    "bitnet": {},
    "nanochat": {},  # final-logit softcap
    "diffllama": {},  # differential attention (two softmaxes)
    # --- sliding window on every layer (mistral style) ----------------------------------------
    "mistral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW),
    "starcoder2": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW),
    "ministral3": dict(sliding_window=WINDOW, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=128, beta_fast=32.0,
        beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.1)),
    # --- per-layer sliding / full ---------------------------------------------------------------
    "ministral": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4),
    "qwen2": dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
                  max_window_layers=2, layer_types=ALT4),
    "gemma2": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4,
                   query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=[S, S, F, F],
                        query_pre_attn_scalar=16),
    "vaultgemma": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4,
                       query_pre_attn_scalar=16, attn_logit_softcapping=50.0),
    "cohere2": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4),  # NoPE on full layers
    "exaone4": dict(num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=2,
                    layer_types=ALT4),  # NoPE on full layers when sliding is on
    "olmo3": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4),
    "cwm": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=[F, S, F, S],
                rope_parameters=dict(rope_type="llama3", rope_theta=1e6, factor=4.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=128)),
    "gpt_oss": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4,
                    rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                         truncate=False, original_max_position_embeddings=128,
                                         rope_theta=150000.0)),  # + attention sinks
    "granite_swa": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=[F, S, F, S],
                        layer_rope_theta=[10000.0] * 4),  # + sigmoid sinks
    "afmoe": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4, num_dense_layers=1,
                  global_attn_every_n_layers=2),
    "mimo_v2_flash": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=[F, S, F, S],
                          mlp_layer_types=["dense", "sparse", "dense", "sparse"], v_head_dim=16),
    "flint": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4),
    "kolibri1": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4),
    "gemma3n_text": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4,
                         num_kv_shared_layers=2, hidden_size_per_layer_input=16,
                         vocab_size_per_layer_input=272, laurel_rank=8,
                         activation_sparsity_pattern=[0.0] * 4),
    "gemma4_text": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4,
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=272,
                        final_logit_softcapping=30.0, attention_k_eq_v=True,  # full layers: no v_proj
                        global_head_dim=32, num_global_key_value_heads=1),  # full layers: other head_dim/kv heads
    "cohere2_moe": dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=ALT4,
                        mlp_layer_types=["sparse"] * 4),
    "modernbert-decoder": dict(num_hidden_layers=4, layer_types=[F, S, F, S], local_attention=2 * WINDOW,
                               cls_token_id=1, sep_token_id=2),  # sliding_window = local_attention // 2
    # --- chunked attention / NoPE -----------------------------------------------------------------
    "llama4_text": dict(num_hidden_layers=4, attention_chunk_size=WINDOW, no_rope_layer_interval=2,
                        layer_types=[C, F, C, F], interleave_moe_layer_step=2,
                        intermediate_size_mlp=128),  # full layers are NoPE (+ temperature tuning)
    "llama4_text_no_tuning": dict(num_hidden_layers=4, attention_chunk_size=WINDOW, no_rope_layer_interval=2,
                                  layer_types=[C, F, C, F], interleave_moe_layer_step=2, intermediate_size_mlp=128,
                                  attn_temperature_tuning=False),  # chunked + NoPE, without the tuning
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2),  # NoPE every 2nd layer
    # --- MoE variants of the above (attention identical to the dense parent) ------------------
    "qwen2_moe": dict(shared_expert_intermediate_size=32),
    "qwen3_moe": {},
    "olmoe": {},
    "granitemoe": {},
    "phimoe": dict(sliding_window=WINDOW),
    "glm4_moe": dict(first_k_dense_replace=1),
    "deepseek_v3": dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
                        num_key_value_heads=4),  # MLA
    "minicpm3": dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                     v_head_dim=16, num_key_value_heads=4),  # MLA
    "dbrx": dict(attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),  # rope_theta: 5.24 config bug
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
    "jetmoe": dict(kv_channels=16, num_key_value_heads=2),
    # --- classic GPT-style: learned / rotary-in-module / alibi / local ------------------------
    "gpt2": {},
    "gpt_bigcode": {},  # multi-query by default
    "openai-gpt": {},
    "ctrl": {},  # sinusoidal absolute positions
    "biogpt": {},
    "opt": dict(word_embed_proj_dim=64),
    "xglm": {},
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8, n_ctx=512),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "falcon_mqa": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "falcon_alibi": dict(alibi=True, new_decoder_architecture=False, multi_query=True),
    "bloom": {},  # alibi
    "mpt": dict(expansion_ratio=2, attn_config=dict(alibi=True)),
    "mpt_noalibi": dict(expansion_ratio=2, learned_pos_emb=True, attn_config=dict(alibi=False)),
    "gpt_neo": dict(num_layers=4, attention_types=[[["global", "local"], 2]], window_size=WINDOW),
}

FAMILY_MODEL_TYPE = {name: name for name in OVERRIDES}
FAMILY_MODEL_TYPE.update(falcon_mqa="falcon", falcon_alibi="falcon", mpt_noalibi="mpt",
                         llama4_text_no_tuning="llama4_text")

FAMILIES: tuple[str, ...] = tuple(OVERRIDES)


def family_config(name: str):
    """A tiny config object for family `name` (see FAMILIES)."""
    if name not in OVERRIDES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    if FAMILY_MODEL_TYPE[name] not in CONFIG_MAPPING:
        raise LookupError(f"transformers here has no model type {FAMILY_MODEL_TYPE[name]!r}")
    cls = CONFIG_MAPPING[FAMILY_MODEL_TYPE[name]]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    amap = getattr(cls, "attribute_map", {}) or {}
    kwargs = {}
    for key, value in BASE.items():
        for cand in (key, amap.get(key), *ALIASES.get(key, ())):
            if cand and cand in fields:
                kwargs.setdefault(cand, value)
                break
    kwargs.update(OVERRIDES[name])
    return cls(**kwargs)
