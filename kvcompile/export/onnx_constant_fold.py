"""Constant folding of shape arithmetic in saved ONNX graphs, for TensorRT's ONNX parser.

torch.onnx (with optimize=False, which export needs so that kvcompile nodes stay bare) writes
shape arithmetic as small chains: RMSNorm's ReduceMean takes axes = Reshape(Constant, Constant).
ONNX Runtime folds such chains itself, but TensorRT's parser needs some inputs (reduce and
squeeze axes, above all) to *be* an initializer or a Constant when it reads the node; on the H200,
TensorRT-RTX 1.7.1 refused every graph we exported at the first RMSNorm for that reason
(bench/gpu_tensorrt.sh stage 2, issue 16). So before a graph is saved:

  * Constant nodes written with value_int(s) / value_float(s) become `value` tensors (one form
    for every reader);
  * a node of a shape / constant op (FOLDABLE) whose inputs are all constants is evaluated with
    onnx's reference evaluator and replaced by a Constant holding its output — repeatedly, in
    graph order, so whole chains collapse; integer-only for arithmetic, and nothing that involves
    bfloat16 or 8-bit floats, so the folded value is exactly what ONNX Runtime would compute;
  * nodes left without consumers are removed.

The same runs inside local function bodies and Loop/If bodies, except for nodes that depend on
an attribute reference (ref_attr_name: the value is only known per call) or on a function or
subgraph input. Folded values are capped at MAX_FOLDED_ELEMENTS so a large tensor is never
inlined into the graph as a constant.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

MAX_FOLDED_ELEMENTS = 4096  # shape arithmetic is tiny; anything larger stays computed

# Ops whose folding is exact and whose results TensorRT's parser may need as build-time
# constants (shapes, axes, indices). Float math (Sqrt, Pow, ...) is left to the runtime.
FOLDABLE = frozenset({
    "Cast", "Concat", "ConstantOfShape", "Equal", "Expand", "Flatten", "Gather", "Greater", "GreaterOrEqual",
    "Identity", "Less", "LessOrEqual", "Not", "And", "Or", "Range", "Reshape", "Shape", "Size", "Slice",
    "Squeeze", "Tile", "Transpose", "Unsqueeze", "Where",
})
# Folded only over integer inputs: integer arithmetic is exact in every implementation.
INTEGER_ONLY = frozenset({"Abs", "Add", "Div", "Max", "Min", "Mod", "Mul", "Neg", "ReduceProd", "ReduceSum", "Sub"})

# Element types numpy represents natively (bfloat16 and the 8/4-bit floats are emulated by
# onnx's reference evaluator, whose rounding we do not want to depend on).
_PLAIN_TYPES = {TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
                TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}
_INTEGER_TYPES = _PLAIN_TYPES - {TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}
_PLAIN_DTYPES = {np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in _PLAIN_TYPES}

_SCALAR_FORMS = {  # Constant attribute -> (numpy dtype, is a list)
    "value_int": (np.int64, False), "value_ints": (np.int64, True),
    "value_float": (np.float32, False), "value_floats": (np.float32, True),
}


def _is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _uses_attribute_reference(node: onnx.NodeProto) -> bool:
    return any(attr.ref_attr_name for attr in node.attribute)


def _embedded_array(tensor: TensorProto) -> Optional[np.ndarray]:
    """The tensor's value when it is small, stored inline and of a plain numpy type."""
    if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type not in _PLAIN_TYPES:
        return None
    if int(np.prod(tensor.dims, dtype=np.int64)) > MAX_FOLDED_ELEMENTS:
        return None
    return numpy_helper.to_array(tensor)


def constant_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    """The value of a Constant node, or None (attribute reference, strings, sparse, large)."""
    if len(node.attribute) != 1 or node.attribute[0].ref_attr_name:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return _embedded_array(attr.t)
    if attr.name in _SCALAR_FORMS:
        dtype, is_list = _SCALAR_FORMS[attr.name]
        return np.array(helper.get_attribute_value(attr), dtype=dtype).reshape(-1 if is_list else ())
    return None


def constant_node(name: str, output: str, value: np.ndarray) -> onnx.NodeProto:
    """A Constant node holding `value` as a `value` tensor (the form every parser reads)."""
    return helper.make_node("Constant", [], [output], name=name, value=numpy_helper.from_array(value))


def _foldable(node: onnx.NodeProto, values: Dict[str, np.ndarray]) -> bool:
    if not _is_standard(node) or _uses_attribute_reference(node) or not node.input:
        return False
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
        return False
    inputs = [name for name in node.input if name]
    if not all(name in values for name in inputs):
        return False
    if node.op_type in INTEGER_ONLY:
        return all(np.issubdtype(values[name].dtype, np.integer) for name in inputs)
    if node.op_type == "Cast":
        return helper.get_attribute_value(node.attribute[0]) in _PLAIN_TYPES
    return node.op_type in FOLDABLE


def _evaluate(node: onnx.NodeProto, values: Dict[str, np.ndarray], opset: int) -> Optional[List[np.ndarray]]:
    """Run one node on its constant inputs with onnx's reference evaluator (None if it cannot)."""
    from onnx.reference import ReferenceEvaluator

    inputs = sorted({name for name in node.input if name})
    graph = helper.make_graph([node], "fold", [], [onnx.ValueInfoProto(name=o) for o in node.output],
                              initializer=[numpy_helper.from_array(values[n], n) for n in inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        outputs = ReferenceEvaluator(model).run(None, {})
    except Exception:  # an op or type the evaluator lacks: the node simply stays
        return None
    outputs = [np.asarray(o) for o in outputs]
    if any(o.dtype not in _PLAIN_DTYPES or o.size > MAX_FOLDED_ELEMENTS for o in outputs):
        return None
    return outputs


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _referenced_names(node: onnx.NodeProto) -> set:
    """Every name a node reads, including those its subgraphs read from the enclosing scope."""
    names = {name for name in node.input if name}
    for graph in _subgraphs(node):
        for inner in graph.node:
            names |= _referenced_names(inner)
        names |= {o.name for o in graph.output}
    return names


def _fold_nodes(nodes, values: Dict[str, np.ndarray], opset: int) -> List[onnx.NodeProto]:
    """Fold `nodes` (in graph order), extending `values` with every constant found; returns
    the new node list."""
    folded = []
    for node in nodes:
        for graph in _subgraphs(node):
            _fold_graph(graph, values, opset)
        if _is_standard(node) and node.op_type == "Constant":
            value = constant_value(node)
            if value is not None:
                values[node.output[0]] = value
                if node.attribute[0].name != "value":
                    node = constant_node(node.name, node.output[0], value)
            folded.append(node)
            continue
        outputs = _evaluate(node, values, opset) if _foldable(node, values) else None
        if outputs is None or len(outputs) != len(node.output):
            folded.append(node)
            continue
        for index, (name, value) in enumerate(zip(node.output, outputs)):
            if not name:
                continue
            values[name] = value
            suffix = f"_{index}" if len(node.output) > 1 else ""
            folded.append(constant_node(f"{node.name or 'folded'}{suffix}", name, value))
    return folded


def _without_unused(nodes: List[onnx.NodeProto], needed: set) -> List[onnx.NodeProto]:
    """Drop standard-domain nodes none of whose outputs is read (nodes are in graph order)."""
    kept = []
    needed = set(needed)
    for node in reversed(nodes):
        if _is_standard(node) and not any(o in needed for o in node.output if o):
            continue
        kept.append(node)
        needed |= _referenced_names(node)
    return kept[::-1]


def _fold_graph(graph: onnx.GraphProto, outer: Dict[str, np.ndarray], opset: int) -> None:
    """Fold a graph in place; `outer` holds the constants of enclosing scopes."""
    values = {name: value for name, value in outer.items()}
    for name in [i.name for i in graph.input]:
        values.pop(name, None)  # a subgraph input shadows an outer constant of the same name
    for tensor in graph.initializer:
        # Only integer initializers count (shapes, indices): float ones are weights, which stay
        # initializers whether or not they are embedded when the graph is folded.
        array = _embedded_array(tensor) if tensor.data_type in _INTEGER_TYPES else None
        if array is not None:
            values[tensor.name] = array
    nodes = _fold_nodes(graph.node, values, opset)
    nodes = _without_unused(nodes, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)


def _standard_opset(opset_imports) -> Optional[int]:
    return next((o.version for o in opset_imports if o.domain in ("", "ai.onnx")), None)


def fold_function(function: onnx.FunctionProto, opset: Optional[int] = None) -> None:
    """Fold a local function's body in place. Its inputs and attribute references are not
    constants, so only what the body builds from literal Constants folds."""
    opset = _standard_opset(function.opset_import) or opset
    if opset is None:
        return
    nodes = _fold_nodes(function.node, {}, opset)
    nodes = _without_unused(nodes, set(function.output))
    del function.node[:]
    function.node.extend(nodes)


def fold_main_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold `model`'s main graph in place (not its local functions); returns `model`.
    Initializers stored externally (the weights) are never read."""
    opset = _standard_opset(model.opset_import)
    if opset is not None:
        _fold_graph(model.graph, {}, opset)
    return model


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the main graph and every local function of `model` in place; returns `model`."""
    fold_main_graph(model)
    opset = _standard_opset(model.opset_import)
    for function in model.functions if opset is not None else ():
        fold_function(function, opset)
    return model
