"""The graphs we save are shaped for TensorRT's ONNX parser (issue 16): shape arithmetic folded
into Constants where the parser needs build-time constants, counted Loops without a condition
the parser cannot register, and function bodies that call no other local function — with
ONNX Runtime's results unchanged."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kvcompile.ops  # noqa: F401  (registers the ops)
from kvcompile.export.onnx_constant_fold import MAX_FOLDED_ELEMENTS, fold_constants, fold_function
from kvcompile.export.onnx_loop_condition import constant_loop_conditions_in_model
from kvcompile.ops import onnx_domain, registry

from tensorrt_constant_inputs import build_time_constant_violations


def const(name, **value):
    return helper.make_node("Constant", [], [name], name=f"make_{name}", **value)


def rmsnorm_mean_graph() -> onnx.ModelProto:
    """torch.onnx's RMSNorm mean: ReduceMean axes = Reshape(Constant(value=...), Constant(value_ints=...))."""
    nodes = [const("axis", value=numpy_helper.from_array(np.array(-1, dtype=np.int64))),
             const("flat", value_ints=[-1]),
             helper.make_node("Reshape", ["axis", "flat"], ["axes"], name="reshape_axes"),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="node_mean", keepdims=1),
             const("unused", value_int=7)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["b", 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_reduce_axes_chain_becomes_one_constant_with_same_results():
    model = rmsnorm_mean_graph()
    assert build_time_constant_violations(model) == [
        "graph: ReduceMean node_mean input 1 (axes) is not an initializer or a Constant"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    before = run(model, {"x": x})
    fold_constants(model)
    assert build_time_constant_violations(model) == []
    assert [n.op_type for n in model.graph.node] == ["Constant", "ReduceMean"]  # the chain and the unused Constant gone
    axes = model.graph.node[0]
    assert axes.output[0] == "axes" and axes.attribute[0].name == "value"
    assert numpy_helper.to_array(axes.attribute[0].t).tolist() == [-1]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run(model, {"x": x})[0], before[0])


def test_only_exact_small_values_fold():
    nodes = [const("two_f", value_float=2.0), const("three_f", value_float=3.0),
             helper.make_node("Mul", ["two_f", "three_f"], ["six_f"], name="float_mul"),  # float math: runtime's
             const("two", value_int=2), const("three", value_int=3),
             helper.make_node("Mul", ["two", "three"], ["six"], name="int_mul"),
             const("big_shape", value_ints=[MAX_FOLDED_ELEMENTS + 1]),
             helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="too_big"),
             helper.make_node("Cast", ["six"], ["six_bf16"], name="to_bf16", to=TensorProto.BFLOAT16)]
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in
               (("six_f", TensorProto.FLOAT), ("six", TensorProto.INT64), ("big", TensorProto.FLOAT),
                ("six_bf16", TensorProto.BFLOAT16))]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs), opset_imports=[helper.make_opsetid("", 18)])
    fold_constants(model)
    by_output = {n.output[0]: n for n in model.graph.node}
    assert by_output["six_f"].op_type == "Mul"
    assert by_output["six"].op_type == "Constant" and numpy_helper.to_array(by_output["six"].attribute[0].t) == 6
    assert by_output["big"].op_type == "ConstantOfShape"
    assert by_output["six_bf16"].op_type == "Cast"
    assert all(n.attribute[0].name == "value" for n in model.graph.node if n.op_type == "Constant")


def test_function_inputs_and_attribute_references_stay_computed():
    n_attr = helper.make_node("Constant", [], ["n"], name="from_attr")
    n_attr.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name="count", type=onnx.AttributeProto.INT))
    nodes = [n_attr, const("one", value_int=1),
             helper.make_node("Add", ["n", "one"], ["n1"], name="uses_attribute"),
             helper.make_node("Shape", ["x"], ["shape"], name="uses_input"),
             const("four", value_ints=[4]), const("minus", value_ints=[-1]),
             helper.make_node("Concat", ["four", "minus"], ["target"], name="literal_shape", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y0"], name="reshape"),
             helper.make_node("Expand", ["y0", "shape"], ["y1"], name="expand"),
             const("zero_axes", value_ints=[0]),
             helper.make_node("Unsqueeze", ["n1", "zero_axes"], ["n1_1d"], name="unsq")]
    function = helper.make_function("test", "f", ["x"], ["y1", "n1_1d"], nodes,
                                    opset_imports=[helper.make_opsetid("", 18)], attributes=["count"])
    fold_function(function)
    ops = {n.name: n.op_type for n in function.node}
    assert ops["uses_attribute"] == "Add" and ops["uses_input"] == "Shape"
    assert ops["literal_shape"] == "Constant"  # Concat of two literals folded
    assert ops["from_attr"] == "Constant" and function.node[0].attribute[0].ref_attr_name == "count"


def test_counted_loop_gets_a_constant_condition_and_runs_the_same():
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="forward_cond"),
                  helper.make_node("Add", ["acc_in", "i"], ["acc_out"], name="add")]
    body = helper.make_graph(body_nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_in", TensorProto.INT64, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_out", TensorProto.INT64, [])])
    loop = helper.make_node("Loop", ["n", "", "start"], ["total"], name="counted", body=body)
    graph = helper.make_graph([loop], "g", [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                                            helper.make_tensor_value_info("start", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("total", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"n": np.array(5, dtype=np.int64), "start": np.array(2, dtype=np.int64)}
    before = run(model, feeds)
    assert constant_loop_conditions_in_model(model) == 1
    body = model.graph.node[0].attribute[0].g
    assert not any("cond_in" in n.input for n in body.node)
    assert [n.op_type for n in body.node if "cond_out" in n.output] == ["Constant"]
    onnx.checker.check_model(model, full_check=True)
    assert run(model, feeds)[0] == before[0] == 12


def exportable_ops():
    return [entry.name for entry in registry.registered() if entry.exportable]


@pytest.mark.parametrize("op_name", exportable_ops())
def test_function_protos_are_self_contained_and_parser_ready(op_name):
    protos = onnx_domain.function_protos([op_name])
    assert [p.name for p in protos] == [op_name]
    (proto,) = protos
    helper_names = {h.to_function_proto().name for h in registry.get(op_name).onnx_definition().helpers}
    called = {(n.domain, n.op_type) for n in proto.node if n.domain not in ("", "ai.onnx")}
    assert not called, f"{op_name} calls {called}"  # no local function inside a local function
    assert helper_names.isdisjoint(n.op_type for n in proto.node)
    model = helper.make_model(helper.make_graph([], "g", [], []), functions=protos,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("kvcompile", 1)])
    assert build_time_constant_violations(model) == []
    # no placeholder tensor names: TensorRT-RTX's builder (Myelin) refused the decode graph whose 8
    # inlined kcache bodies each had a tensor named "_" (duplicate tensor name, H200, 2026-11-29)
    assert "_" not in {name for node in proto.node for name in node.output}, op_name
    for node in proto.node:  # counted loops carry a Constant condition, not the body's condition input
        for graph in (a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            if node.op_type == "Loop":
                cond_in = graph.input[1].name
                assert not any(cond_in in inner.input for inner in graph.node), op_name


def test_fold_is_idempotent_on_an_exported_graph(tmp_path):
    """Folding twice changes nothing: what the export saved is already a fixed point."""
    from types import SimpleNamespace

    from kvcompile.core.config import CacheConfig
    from kvcompile.export.onnx_target import PREFILL_FILE, export_onnx
    from onnx_toy_model import ToyDecoder

    torch.set_num_threads(1)
    module = ToyDecoder(["full", "kcache"], topn=4, select="head", renormalize=False).eval()
    out = export_onnx(SimpleNamespace(graph_module=module, spec=module.spec), tmp_path / "toy",
                      model_config={"eos_token_id": None}, cache_config=CacheConfig(kind="kcache", topn=4).to_dict())
    saved = onnx.load(str(out / PREFILL_FILE))
    assert build_time_constant_violations(saved) == []
    again = onnx.ModelProto.FromString(saved.SerializeToString())
    fold_constants(again)
    assert again.SerializeToString() == saved.SerializeToString()


# The reference model's graphs, as `kvcompile export` writes them ------------------------------
@pytest.fixture(scope="module")
def reference_graphs(tmp_path_factory):
    import kvcompile
    from kvcompile.core.config import CacheConfig
    from kvcompile.export.onnx_target import export_onnx
    from kvcompile.export.tensorrt_target import EngineProfile, export_tensorrt

    torch.set_num_threads(1)
    model = kvcompile.load_model("reference")
    root = tmp_path_factory.mktemp("ref")
    full = kvcompile.compile(model)
    # the ONNX target (with fusion's check graph and the codec's restore graph) for the full
    # cache, the TensorRT target for kcache: both write through the same finish_graph
    onnx_dir = export_onnx(full, root / "full", fuse_check_layer=1)
    kcache = kvcompile.compile(model, CacheConfig(kind="kcache", topn=16))
    trt_dir = export_tensorrt(kcache, root / "kcache", profile=EngineProfile(max_batch=1, max_context=64,
                                                                               opt_context=16), build_engines=False)
    return {"full": onnx_dir, "kcache": trt_dir}


@pytest.mark.slow
def test_reference_graphs_give_tensorrt_constants_where_it_needs_them(reference_graphs):
    for kind, graph_file in (("full", "prefill.onnx"), ("full", "decode.onnx"), ("full", "check.onnx"),
                             ("kcache", "prefill.onnx"), ("kcache", "decode.onnx")):
        model = onnx.load(str(reference_graphs[kind] / graph_file), load_external_data=False)
        assert build_time_constant_violations(model) == [], (kind, graph_file)
        assert not [n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name != "value"]
        assert {(f.domain, f.name) for f in model.functions} == {
            (n.domain, n.op_type) for n in model.graph.node if n.domain == onnx_domain.DOMAIN}
        assert function_names_shadowing_graph_tensors(model) == [], (kind, graph_file)


def function_names_shadowing_graph_tensors(model: onnx.ModelProto) -> list:
    """TensorRT's parser binds a function's inputs by name in the graph's tensor table and keeps
    an existing tensor of the same name ("Behavior may be incorrect", onnx-tensorrt
    LocalFunctionImporter): a function input named like another graph tensor would read that one."""
    tensors = ({i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
               | {o for n in model.graph.node for o in n.output})
    functions = {(f.domain, f.name): f for f in model.functions}
    return [(node.name, inner) for node in model.graph.node if (node.domain, node.op_type) in functions
            for outer, inner in zip(node.input, functions[(node.domain, node.op_type)].input)
            if outer != inner and inner in tensors]


@pytest.mark.slow
def test_reference_restore_graph_is_parser_ready(tmp_path):
    import kvcompile
    from kvcompile.export.onnx_target import RESTORE_FILE, export_restore_graph

    spec = kvcompile.compile(kvcompile.load_model("reference")).spec
    export_restore_graph(spec, tmp_path, {"level": 2, "chunk_tokens": 32}, check=True)
    model = onnx.load(str(tmp_path / RESTORE_FILE))
    assert build_time_constant_violations(model) == []
    assert [f.name for f in model.functions] == ["kv_decode"]
    assert function_names_shadowing_graph_tensors(model) == []
