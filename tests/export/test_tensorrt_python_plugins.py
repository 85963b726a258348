"""The Python plugins (tensorrt.plugin) through TensorRT's life cycle on a GPU: registered, added
to a network, built into an engine (shapes and types from their register functions), run on real
buffers, equal to the torch ops. Needs full TensorRT ≥ 10.6 with `tensorrt.plugin` and CUDA;
skipped otherwise (TensorRT-RTX has no plugin layers)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="needs TensorRT's Python bindings (pip install tensorrt)")
trtp = pytest.importorskip("tensorrt.plugin", reason="needs TensorRT ≥ 10.6 (tensorrt.plugin)")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import numpy as np  # noqa: E402

import kvcompile.ops  # noqa: E402,F401  (registers the torch ops)
from kvcompile.plugins.tensorrt.python_plugins import register_python_plugins  # noqa: E402

TRT_TYPES = {torch.float32: trt.float32, torch.float16: trt.float16, torch.int64: trt.int64}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register_python_plugins()


def run_plugin(make_layer, inputs: dict, output_shape, output_dtype):
    """Build a one-plugin network over `inputs` (name -> tensor), run it, return the output."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    tensors = [network.add_input(name, TRT_TYPES[t.dtype], tuple(t.shape)) for name, t in inputs.items()]
    layer = network.add_plugin(make_layer(*tensors))
    layer.get_output(0).name = "out"
    network.mark_output(layer.get_output(0))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None, "the engine did not build"
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    for name, tensor in inputs.items():
        context.set_tensor_address(name, tensor.data_ptr())
    out = torch.empty(output_shape, dtype=output_dtype, device="cuda")
    context.set_tensor_address("out", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rerotate_keys_plugin_equals_the_torch_op(interleaved):
    from kvcompile.ops.rerotate_keys.definition import rerotate_reference

    generator = torch.Generator().manual_seed(interleaved)
    keys = torch.randn(2, 4, 37, 64, generator=generator)
    delta = torch.randint(-2000, 130000, (2, 37), generator=generator)
    inv_freq = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    inputs = {"keys": keys.cuda(), "delta": delta.cuda(), "inv_freq": inv_freq.cuda()}
    got = run_plugin(lambda k, d, f: trtp.op.kvcompile.rerotate_keys(k, d, f, interleaved=interleaved), inputs,
                     keys.shape, torch.float32)
    torch.testing.assert_close(got.cpu(), rerotate_reference(keys, delta, inv_freq, bool(interleaved)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("select_layer", [0, 1])
def test_kcache_attention_plugin_equals_the_torch_op(select_layer):
    from kvcompile.ops.kcache_attention.definition import kcache_attention_reference

    B, Hq, Hkv, P, D, topn = 2, 8, 2, 300, 64, 32
    generator = torch.Generator().manual_seed(select_layer)
    query, key, value = (torch.randn(B, h, 1, D, generator=generator) for h in (Hq, Hkv, Hkv))
    key_cache = torch.randn(B, Hkv, P, D, generator=generator)
    value_host = torch.randn(B, P, Hkv, D, generator=generator).pin_memory()  # bound by its host address
    bias = torch.zeros(B, 1, 1, P + 1)
    bias[1, ..., :40] = -65504.0
    inputs = {"query": query.cuda(), "key": key.cuda(), "value": value.cuda(), "key_cache": key_cache.cuda(),
              "value_host": value_host, "attn_bias": bias.cuda()}
    attributes = dict(scale=0.125, topn=topn, topn_numerator=0, topn_denominator=0, select_layer=select_layer,
                      renormalize=1, softcap=0.0, sinks=np.array([-np.inf], dtype=np.float32))
    got = run_plugin(lambda *t: trtp.op.kvcompile.kcache_attention(*t, **attributes), inputs, query.shape,
                     torch.float32)
    want = kcache_attention_reference(query, key, value, key_cache, value_host, bias, 0.125, topn,
                                      ("head", "layer")[select_layer], True)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
