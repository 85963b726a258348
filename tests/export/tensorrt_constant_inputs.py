"""Where TensorRT's ONNX parser needs a build-time constant, and a check that a graph gives one.

onnx-tensorrt reads some node inputs as weights when it imports the node: the axes of every
Reduce* and of Squeeze/Unsqueeze ("Axis input must resolve to a build-time constant", the error
TensorRT-RTX 1.7.1 gave on every graph before onnx_constant_fold). Other inputs may be computed
at run time (shape tensors: Reshape's shape, Slice's bounds, TopK's k, Expand's shape ...), but
when such an input does not depend on anything known only at run time, the parser still wants
to see it as a constant, so nothing foldable may be left there either.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Set

import onnx
from onnx import AttributeProto

REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
# op -> input positions that must be an initializer or a Constant's output, always
# (onnx-tensorrt docs/operators.md, TensorRT 10: "`axes` must be an initializer" for these)
ALWAYS_CONSTANT: Dict[str, tuple] = {**{op: (1,) for op in REDUCE_OPS}, "Squeeze": (1,), "Unsqueeze": (1,),
                                     "Slice": (3,)}
# op -> input positions that must be a constant whenever their value does not depend on run time
CONSTANT_WHEN_STATIC: Dict[str, tuple] = {
    "Reshape": (1,), "Slice": (1, 2, 3, 4), "TopK": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Resize": (1, 2, 3), "Pad": (1, 2, 3), "Split": (1,), "OneHot": (1,),
}


def _subgraphs(node):
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _violations(where: str, nodes: Iterable[onnx.NodeProto], constants: Set[str], static: Set[str]) -> List[str]:
    """constants: names that are initializers or Constant outputs (in scope); static: names whose
    value is known at build time (constants and what standard ops compute from them only)."""
    found = []
    constants, static = set(constants), set(static)
    for node in nodes:
        for graph in _subgraphs(node):
            inner = {i.name for i in graph.input}
            found += _violations(f"{where}/{node.op_type} {node.name}", graph.node,
                                 (constants - inner) | {t.name for t in graph.initializer},
                                 (static - inner) | {t.name for t in graph.initializer})
        standard = node.domain in ("", "ai.onnx")
        for position in ALWAYS_CONSTANT.get(node.op_type, ()) if standard else ():
            if position < len(node.input) and node.input[position] and node.input[position] not in constants:
                found.append(f"{where}: {node.op_type} {node.name} input {position} ({node.input[position]}) is not "
                             "an initializer or a Constant")
        for position in CONSTANT_WHEN_STATIC.get(node.op_type, ()) if standard else ():
            name = node.input[position] if position < len(node.input) else ""
            if name and name in static and name not in constants:
                found.append(f"{where}: {node.op_type} {node.name} input {position} ({name}) is computed from "
                             "constants only but was not folded")
        if standard and node.op_type == "Constant":
            constants.update(node.output)
            if not any(a.ref_attr_name for a in node.attribute):
                static.update(node.output)
        elif standard and not list(_subgraphs(node)) and node.input and all(
                not name or name in static for name in node.input):
            static.update(o for o in node.output if o)
    return found


def build_time_constant_violations(model: onnx.ModelProto) -> List[str]:
    """Every node input of `model` (main graph, local functions, subgraphs) in a position where
    TensorRT's parser needs a build-time constant and does not get one."""
    initializers = {t.name for t in model.graph.initializer}
    found = _violations("graph", model.graph.node, initializers, initializers)
    for function in model.functions:
        found += _violations(f"function {function.name}", function.node, set(), set())
    return found
