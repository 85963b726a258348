"""kvcompile::rerotate_keys and the reposition helpers: cached keys moved to other positions.

The exactness that matters is on real models: a chunk prefilled alone at position 0 and its keys
re-rotated by o must equal the same chunk prefilled at position o, layer by layer, for every
RoPE variant (default, linear, llama3, yarn, half-split written out, interleaved / complex,
partial rotary, NoPE layers).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import kvcompile.ops  # noqa: F401  (registers the op)
from kvcompile.core.records import LayerRecord, Positions, PositionKind
from kvcompile.errors import UnsupportedAttentionError
from kvcompile.ops.rerotate_keys.reposition import reposition_keys, rope_inverse_frequencies

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # family_checks, model_families

op = torch.ops.kvcompile.rerotate_keys


def random_inputs(batch=2, heads=3, tokens=5, dim=16, rotary=16, seed=0, scale=50):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, dim, generator=generator)
    delta = torch.randint(-scale, scale + 1, (batch, tokens), generator=generator)  # per row, per token, negative too
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    return keys, delta, inv_freq


def direct_formula(keys, delta, inv_freq, interleaved):
    """Written independently of the op, all in float64: HF's rotate_half with cos = cat(f, f)
    for half-split; complex multiplication of (x[2i] + i·x[2i+1]) by e^(i·angle) for interleaved."""
    half = inv_freq.shape[0]
    x = keys.double()
    angle = delta.double()[:, None, :, None] * inv_freq.double()  # [B, 1, T, R/2]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    if interleaved:
        pairs = torch.view_as_complex(rot.reshape(*rot.shape[:-1], half, 2).contiguous())
        rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)
    else:
        cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
        rotate_half = torch.cat((-rot[..., half:], rot[..., :half]), -1)
        rotated = rot * cos + rotate_half * sin
    return torch.cat((rotated, rest), -1)


# --- the torch op ---------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim, rotary", [(16, 16), (16, 8), (12, 4), (10, 0)])
def test_op_matches_direct_formula(interleaved, dim, rotary):
    keys, delta, inv_freq = random_inputs(dim=dim, rotary=rotary, seed=dim + rotary)
    got = op(keys, delta, inv_freq, interleaved)
    assert got.shape == keys.shape and got.dtype == keys.dtype and got.is_contiguous()
    torch.testing.assert_close(got.double(), direct_formula(keys, delta, inv_freq, interleaved), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[..., rotary:], keys[..., rotary:])  # dims past R pass through, bit for bit


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotations_compose_and_invert(interleaved):
    keys, delta, inv_freq = random_inputs(seed=3)
    other = torch.randint(-70, 70, delta.shape, generator=torch.Generator().manual_seed(4))
    twice = op(op(keys, delta, inv_freq, interleaved), other, inv_freq, interleaved)
    torch.testing.assert_close(twice, op(keys, delta + other, inv_freq, interleaved), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(op(op(keys, delta, inv_freq, interleaved), -delta, inv_freq, interleaved), keys,
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(op(keys, torch.zeros_like(delta), inv_freq, interleaved), keys)


def test_large_deltas_keep_float64_angles():
    """At delta ~ 1e5 a float32 angle is off by up to 0.004 rad; the op's angle is float64."""
    keys, _, inv_freq = random_inputs(batch=1, heads=2, tokens=4, seed=5)
    delta = torch.tensor([[100000, -100003, 131071, 99991]])
    got = op(keys, delta, inv_freq, False)
    expected = direct_formula(keys, delta, inv_freq, False)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    # the same rotation with the angle formed in float32 is visibly wrong: what the test guards
    angle32 = delta.float()[:, None, :, None] * inv_freq
    cos, sin = torch.cat((angle32, angle32), -1).cos(), torch.cat((angle32, angle32), -1).sin()
    naive = keys * cos + torch.cat((-keys[..., 8:], keys[..., :8]), -1) * sin
    assert (naive.double() - expected).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_round_once(dtype):
    keys, delta, inv_freq = random_inputs(seed=6)
    keys = keys.to(dtype)
    got = op(keys, delta, inv_freq, True)
    assert got.dtype == dtype
    expected = direct_formula(keys, delta, inv_freq, True)
    torch.testing.assert_close(got, expected.to(dtype))  # within the dtype's own rounding


def test_strided_keys():
    keys, delta, inv_freq = random_inputs(batch=2, heads=3, tokens=5, seed=7)
    strided = keys.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    assert not strided.is_contiguous()
    assert torch.equal(op(strided, delta, inv_freq, False), op(keys, delta, inv_freq, False))
    sliced = torch.randn(2, 3, 9, 16)[:, :, 2:7]  # a view of a longer cache buffer
    torch.testing.assert_close(op(sliced, delta, inv_freq, True), op(sliced.contiguous(), delta, inv_freq, True),
                               atol=0, rtol=0)


def test_bad_arguments_are_named():
    keys, delta, inv_freq = random_inputs()
    with pytest.raises(ValueError, match="delta must have shape"):
        op(keys, delta[:, :2], inv_freq, False)
    with pytest.raises(ValueError, match="delta must be an integer"):
        op(keys, delta.float(), inv_freq, False)
    with pytest.raises(ValueError, match="more than head dim"):
        op(keys, delta, torch.ones(9), False)
    with pytest.raises(ValueError, match=r"keys must be \[B, Hkv, T, D\]"):
        op(keys[0], delta, inv_freq, False)


def test_opcheck_fake_kernel_and_schema():
    keys, delta, inv_freq = random_inputs(tokens=3)
    torch.library.opcheck(op.default, (keys, delta, inv_freq, True),
                          test_utils=("test_schema", "test_faketensor"))


# --- real models: re-rotated keys equal a prefill at the offset ----------------------------
# (family, offsets to check every layer at, offsets to check only layer 0 at). Layer 0's keys
# depend on nothing but the token and its position, so they are pure re-rotations for any
# offset. Deeper layers are too only where the model itself is shift-invariant: Llama 4's
# chunked attention groups absolute positions (chunk 8 here), so only offsets that are
# multiples of the chunk leave the chunk's hidden states unchanged; Ministral 3 scales queries
# by 1 + β·log(1 + ⌊position / original_max_position_embeddings⌋) (128 here), so from
# position 128 on, layer ≥ 1 hidden states (values included) change with the offset.
FAMILIES = [
    ("llama", (5, 300), ()),
    ("apertus", (5, 300), ()),  # llama3 scaling
    ("ministral3", (5,), (300,)),  # yarn (+ llama 4 query scaling by position)
    ("gpt_oss", (5, 300), ()),  # yarn, half-split written out per half, sinks, sliding
    ("phi3", (5, 300), ()),  # sliding window
    ("phi", (5, 300), ()),  # partial rotary 8/16, half-split
    ("stablelm", (5, 300), ()),  # partial rotary 4/16
    ("glm", (5, 300), ()),  # partial rotary 8/16, interleaved
    ("cohere", (5, 300), ()),  # interleaved
    ("llama4_text_no_tuning", (8, 296), (5, 300)),  # complex interleaved + NoPE layers, chunked
    ("cohere2", (5, 300), ()),  # NoPE full layers
    ("gemma3_text", (5, 300), ()),  # rope parameters keyed by layer type: θ 1e4 sliding, 1e6 full; qk-norm
    ("llama_linear", (5, 300), ()),  # linear scaling, factor 2
]
TOLERANCE = 1e-5


def build_family(name):
    from family_checks import build

    if name != "llama_linear":
        return build(name)
    from transformers import AutoModelForCausalLM

    from kvcompile.frontend.loading import with_attention_implementation
    from model_families import family_config

    config = family_config("llama")
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

    def make(implementation):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    model = with_attention_implementation(make).eval()
    assert model.model.rotary_emb.rope_type == "linear"
    return model


@torch.no_grad()
def chunk_kv(compiled, ids, offset):
    """Keys and values of every layer after prefilling `ids` alone at positions offset.. ."""
    from kvcompile.runtime.eval_runner import prefill_isolated

    cache = compiled.new_cache(1, 64)
    prefill_isolated(compiled, cache, ids, first_position=offset)
    length = cache.length
    return ([k[:, :, :length].clone() for k in cache.keys], [v[:, :, :length].clone() for v in cache.values])


@pytest.fixture
def one_thread():
    """These tiny models run ~100x faster on one thread than on a busy machine's several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family, exact_offsets, layer0_offsets", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_rerotated_keys_equal_prefill_at_offset(family, exact_offsets, layer0_offsets, one_thread):
    import kvcompile

    model = build_family(family)
    compiled = kvcompile.compile(model)
    records = compiled.spec.layers
    ids = torch.randint(1, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    keys0, values0 = chunk_kv(compiled, ids, 0)
    inv_freqs = [rope_inverse_frequencies(record, model.config) for record in records]
    assert any(f is not None for f in inv_freqs)
    for offset in (*exact_offsets, *layer0_offsets):
        keys, values = chunk_kv(compiled, ids, offset)
        layers = range(len(records)) if offset in exact_offsets else (0,)
        for i in layers:
            record = records[i]
            moved = reposition_keys(keys0[i], record, model.config, offset)
            diff = (moved - keys[i]).abs().max().item()
            assert diff < TOLERANCE, f"{family} layer {i} ({record.positions.describe()}), offset {offset}: {diff:.2e}"
            torch.testing.assert_close(values0[i], values[i], atol=TOLERANCE, rtol=0)  # values carry no position
            if inv_freqs[i] is None:
                assert moved is keys0[i]  # NoPE: unchanged
            else:
                assert (keys0[i] - keys[i]).abs().max() > 1e-3  # the offset really moved the keys
                # the same frequencies, passed in, give the same keys
                assert torch.equal(reposition_keys(keys0[i], record, None, offset, inv_freq=inv_freqs[i]), moved)
    if layer0_offsets:  # the model itself is not shift-invariant there (see FAMILIES)
        keys, values = chunk_kv(compiled, ids, layer0_offsets[-1])
        assert (values[1] - values0[1]).abs().max() > TOLERANCE


def test_frequencies_are_the_models_own():
    """linear scaling divides transformers' frequencies by the factor; the model's buffer agrees."""
    model = build_family("llama_linear")
    record = LayerRecord(0, "model.layers.0.self_attn", 4, 2, 16, 0.25, positions=Positions(
        PositionKind.ROPE, layout="half-split", rotary_dims=16, head_dim=16, theta=10000.0,
        scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    inv_freq = rope_inverse_frequencies(record, model.config)
    assert torch.equal(inv_freq, model.model.rotary_emb.inv_freq.float())
    default = rope_inverse_frequencies(replace(record, positions=replace(
        record.positions, scaling={"rope_type": "default", "rope_theta": 10000.0})), model.config)
    torch.testing.assert_close(inv_freq * 2, default, atol=0, rtol=1e-7)
    # a manifest's model_config (a plain dict) works too
    assert torch.equal(rope_inverse_frequencies(record, model.config.to_dict()), inv_freq)


def rope_record(rope_type="default", layout="half-split", **params):
    return LayerRecord(3, "model.layers.3.self_attn", 4, 2, 16, 0.25, positions=Positions(
        PositionKind.ROPE, layout=layout, rotary_dims=16, head_dim=16, theta=10000.0,
        scaling={"rope_type": rope_type, "rope_theta": 10000.0, **params}))


@pytest.mark.parametrize("record, feature", [
    (rope_record("dynamic", factor=2.0), "'dynamic'"),
    (rope_record("longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                 original_max_position_embeddings=64), "'longrope'"),
    (rope_record("made_up"), "'made_up'"),
    (rope_record(layout="unrecognised rotation"), "'unrecognised rotation'"),
])
def test_refusals_name_layer_and_feature(record, feature):
    from model_families import family_config

    with pytest.raises(UnsupportedAttentionError) as error:
        reposition_keys(torch.zeros(1, 2, 3, 16), record, family_config("llama"), 5)
    message = str(error.value)
    assert "\n" not in message and "layer 3" in message and feature in message


def test_dynamic_scaling_model_is_refused(one_thread):
    """A real model with dynamic NTK scaling: torch.export refuses its data-dependent frequency
    update today (TraceError); should tracing ever succeed, re-rotating its keys is refused."""
    import kvcompile
    from transformers import AutoModelForCausalLM

    from kvcompile.errors import TraceError
    from kvcompile.frontend.loading import with_attention_implementation
    from model_families import family_config

    config = family_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = with_attention_implementation(
        lambda implementation: AutoModelForCausalLM.from_config(config, attn_implementation=implementation)).eval()
    try:
        compiled = kvcompile.compile(model)
    except (TraceError, UnsupportedAttentionError):
        return  # refused before any cache exists
    record = compiled.spec.layers[0]
    assert record.positions.scaling["rope_type"] == "dynamic"
    with pytest.raises(UnsupportedAttentionError, match=r"^layer 0 .*'dynamic'"):
        rope_inverse_frequencies(record, model.config)


def test_nope_layer_needs_no_config():
    record = LayerRecord(1, "model.layers.1.self_attn", 4, 2, 16, 0.25, positions=Positions(PositionKind.NONE))
    keys = torch.randn(1, 2, 3, 16)
    assert rope_inverse_frequencies(record, None) is None
    assert reposition_keys(keys, record, None, 7) is keys


def test_delta_forms():
    record = rope_record()
    keys = torch.randn(2, 2, 3, 16)
    inv_freq = rope_inverse_frequencies(record, None)
    per_token = torch.tensor([[4, 4, 4], [-2, -2, -2]])
    expected = op(keys, per_token, inv_freq, False)
    assert torch.equal(reposition_keys(keys, record, None, torch.tensor([4, -2])), expected)
    assert torch.equal(reposition_keys(keys, record, None, per_token), expected)
    assert torch.equal(reposition_keys(keys, record, None, 4)[0], expected[0])
    with pytest.raises(ValueError, match="delta must be"):
        reposition_keys(keys, record, None, 2.5)


# --- the ONNX body -----------------------------------------------------------------------------
def single_node_model(elem_type, interleaved: int):
    import onnx
    from onnx import TensorProto, helper

    from kvcompile.ops import onnx_domain

    node = helper.make_node("rerotate_keys", ["keys", "delta", "inv_freq"], ["out"], domain=onnx_domain.DOMAIN,
                            interleaved=interleaved)
    graph = helper.make_graph(
        [node], "rerotate_keys",
        [helper.make_tensor_value_info("keys", elem_type, [f"keys_{i}" for i in range(4)]),
         helper.make_tensor_value_info("delta", TensorProto.INT64, ["keys_0", "keys_2"]),
         helper.make_tensor_value_info("inv_freq", TensorProto.FLOAT, ["half"])],
        [helper.make_tensor_value_info("out", elem_type, [f"out_{i}" for i in range(4)])])
    model = helper.make_model(
        graph, functions=onnx_domain.function_protos(["rerotate_keys"]),
        opset_imports=[helper.make_opsetid("", onnx_domain.STANDARD_OPSET),
                       helper.make_opsetid(onnx_domain.DOMAIN, onnx_domain.DOMAIN_VERSION)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model, **tensors):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in tensors.items()})[0])


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("dim, rotary, scale", [(16, 16, 50), (16, 8, 50), (12, 4, 3), (16, 16, 131072)])
def test_onnx_body_matches_torch_op(interleaved, dim, rotary, scale):
    from onnx import TensorProto

    keys, delta, inv_freq = random_inputs(dim=dim, rotary=rotary, scale=scale, seed=rotary + scale)
    expected = op(keys, delta, inv_freq, bool(interleaved))
    got = run_onnx(single_node_model(TensorProto.FLOAT, interleaved), keys=keys, delta=delta, inv_freq=inv_freq)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_onnx_body_float16_and_shape_inference():
    import onnx
    from onnx import TensorProto

    keys, delta, inv_freq = random_inputs(seed=9)
    model = single_node_model(TensorProto.FLOAT16, 1)
    got = run_onnx(model, keys=keys.half(), delta=delta, inv_freq=inv_freq)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, op(keys.half(), delta, inv_freq, True), atol=1e-3, rtol=1e-3)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    out = inferred.graph.output[0].type.tensor_type
    assert out.elem_type == TensorProto.FLOAT16
    assert [d.dim_param for d in out.shape.dim][:3] == ["keys_0", "keys_1", "keys_2"]


def test_registry_entry():
    from kvcompile.ops import registry

    entry = registry.get("rerotate_keys")
    assert entry.torch_op is op.default and entry.exportable
    definition = entry.onnx_definition()
    assert definition.inputs == ("keys", "delta", "inv_freq")
    assert definition.node_attributes(True) == {"interleaved": 1}
    assert [s.name for s in entry.kernel_symbols] == ["kvc_rerotate_keys"]


# --- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim, rotary", [(128, 128), (128, 64), (80, 40)])
def test_cuda_kernel_matches_torch_op(dtype, interleaved, dim, rotary):
    from kvcompile.ops.rerotate_keys import kernels

    generator = torch.Generator().manual_seed(dim + rotary)
    buffer = torch.randn(3, 40, 4, dim, generator=generator).to(dtype)  # [B, P_max, H, D]
    keys = buffer.transpose(1, 2)[:, :, 5:29]  # strided [B, H, T=24, D] view of a longer buffer
    delta = torch.randint(-100000, 100001, (3, 24), generator=generator)
    delta[0] = 100000
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    expected = op(keys, delta, inv_freq, interleaved)
    gpu = (keys.cuda(), delta.cuda(), inv_freq.cuda())
    assert kernels.can_use_kernels(*gpu), "the CUDA kernel should run"
    got = op(*gpu, interleaved)
    torch.cuda.synchronize()
    assert got.dtype == dtype and got.is_contiguous()
    # same float64 angle and float32 pair arithmetic: equal up to one rounding of the output
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.cpu(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got.cpu().double(), direct_formula(keys, delta, inv_freq, interleaved).to(dtype).double(),
                               atol=4 * tolerance, rtol=4 * tolerance)
    assert torch.equal(got.cpu()[..., rotary:], keys[..., rotary:])
