"""Every decoder family of the installed transformers compiles exactly or is refused by name.

Each family is a tiny random-weight config (tests/model_families.py), fp32 on CPU, with windows
of 8 so that a 24-token prompt plus 32 new tokens overruns every window. EXPECTED lists what
each must do: None = exact (logits within 1e-4 of transformers for prefill and every decode
step, 32 identical greedy tokens, batch 1 and a left-padded batch of 3: tests/family_checks.py),
or a phrase the one-line refusal must contain. Zero silent differences: a family that runs but
differs fails, and so does one refused without naming the feature. docs/MODEL_COVERAGE.md is
generated from the same checks (`python tests/family_table.py`).
"""
from __future__ import annotations

import pytest

import kvcompile
from family_checks import TOLERANCE, build, check_compiled, check_family
from model_families import FAMILIES

PER_LAYER_SHAPES = "per-layer cache shapes"
OWN_CODE = "computed by the model's own code"
EXPECTED = {
    "diffllama": "share a layer index",  # differential attention: two softmaxes per layer
    "mimo_v2_flash": PER_LAYER_SHAPES,
    "gemma4_text": PER_LAYER_SHAPES,
    "llama4_text": "temperature tuning",
    "phimoe": "disagrees with the model config",  # window in the mask only, not in the attention call
    "deepseek_v3": "MLA",
    "minicpm3": "MLA",
    "dbrx": "could not trace",  # data-dependent expert routing
    "openai-gpt": OWN_CODE,
    "xglm": OWN_CODE,
    "bloom": OWN_CODE,
    "mpt": OWN_CODE,
    "mpt_noalibi": OWN_CODE,
    "gpt_neo": OWN_CODE,
    "falcon_alibi": "ALiBi",
}
# Outcomes that depend on the transformers version (both seen): exact, or refused with this phrase.
# gemma3n_text shares K/V across layers in 5.24 but not in 5.17; gptj and codegen use the
# attention interface in 5.24, their own attention code in 5.17.
VERSION_DEPENDENT = {"gemma3n_text": "cross-layer KV sharing", "gptj": OWN_CODE, "codegen": OWN_CODE}
HYBRID_WINDOWS = ("qwen2", "ministral", "gemma2", "gemma3_text", "cohere2", "gpt_oss", "llama4_text_no_tuning")


def skip_unavailable(family: str):
    try:
        return build(family)
    except LookupError as error:
        pytest.skip(str(error))
    except (TypeError, ValueError) as error:  # an older transformers without this config field
        pytest.skip(f"{family} cannot be built by this transformers: {str(error).splitlines()[0]}")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact_or_refused_by_name(family):
    skip_unavailable(family)
    outcome = check_family(family)
    expected = EXPECTED.get(family)
    if family in VERSION_DEPENDENT:
        assert outcome.refused is None or VERSION_DEPENDENT[family] in outcome.refused, outcome.refused
        assert outcome.refused is not None or outcome.max_logit_diff <= TOLERANCE
    elif expected is None:
        assert outcome.refused is None, f"{family} should compile exactly, was refused: {outcome.refused}"
        assert outcome.max_logit_diff <= TOLERANCE
    else:
        assert outcome.refused is not None, f"{family} should be refused ({expected}) but compiled"
        assert expected in outcome.refused
        assert "\n" not in outcome.refused


def test_enough_families_are_covered():
    exact = [f for f in FAMILIES if f not in EXPECTED and f not in VERSION_DEPENDENT]
    assert len(exact) >= 30 and {"gemma2", "gemma3_text", "cohere2", "gpt_oss"} <= set(exact)


@pytest.mark.parametrize("family", HYBRID_WINDOWS)
def test_kcache_with_topn_at_least_context_is_exact_on_hybrid_windows(family):
    model = skip_unavailable(family)
    compiled = kvcompile.compile(model, kvcompile.CacheConfig(kind="kcache", topn=10**6))
    assert {r.kind.value for r in compiled.spec.layers} == {"kcache"}
    assert check_compiled(model, compiled) <= TOLERANCE


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_hybrid_window_records_and_mask_inputs(family):
    model = skip_unavailable(family)
    compiled = kvcompile.compile(model)
    windows = {r.window.describe() for r in compiled.spec.layers}
    assert windows == {"sliding 8", "none"}
    assert {"attn_bias", "attn_bias.sliding_8"} <= set(compiled.spec.input_names)
