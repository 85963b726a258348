"""Loops without a condition input: the body's condition output made a Constant, for TensorRT.

A counted loop (onnxscript's `for k in range(n)`, kv_decode's rANS steps) is a Loop node with a
trip count and no condition input, whose body passes its condition input straight through:
cond_out = Identity(cond_in). ONNX Runtime is fine with that, but TensorRT's parser registers
the body's condition input only when the Loop node has a condition input (onnx-tensorrt's Loop
importer), so the Identity reads an unregistered name: "Node input was not registered" (the
one-node kv_decode graph on TensorRT-RTX 1.7.1, issue 16). Since the loop has no condition, the
body's condition output is simply `true`: a Constant, which reads nothing the parser lacks.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper


def _subgraphs(nodes: Iterable[onnx.NodeProto]):
    for node in nodes:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield node, attr.g
            elif attr.type == AttributeProto.GRAPHS:
                for graph in attr.graphs:
                    yield node, graph


def _has_condition_input(loop: onnx.NodeProto) -> bool:
    return len(loop.input) > 1 and bool(loop.input[1])


def _constant_condition(body: onnx.GraphProto) -> bool:
    """Make the body's condition output a Constant `true` when it merely forwards the condition
    input; returns whether the body changed."""
    if len(body.input) < 2 or not body.output:
        return False
    cond_in, cond_out = body.input[1].name, body.output[0].name
    true = numpy_helper.from_array(np.array(True))
    for index, node in enumerate(body.node):
        if node.op_type == "Identity" and list(node.output) == [cond_out] and list(node.input) == [cond_in]:
            body.node[index].CopyFrom(helper.make_node("Constant", [], [cond_out], name=node.name, value=true))
            return True
    if cond_out == cond_in:  # forwarded without a node: give the output its own Constant
        name = f"{cond_in}_always"
        body.node.insert(0, helper.make_node("Constant", [], [name], name=name, value=true))
        body.output[0].name = name
        return True
    return False


def constant_loop_conditions(nodes) -> int:
    """Rewrite every condition-less Loop among `nodes` (and in their subgraphs, recursively);
    returns how many bodies changed."""
    changed = 0
    for node, graph in _subgraphs(nodes):
        if node.op_type == "Loop" and node.domain in ("", "ai.onnx") and not _has_condition_input(node):
            changed += _constant_condition(graph)
        changed += constant_loop_conditions(graph.node)
    return changed


def constant_loop_conditions_in_model(model: onnx.ModelProto) -> int:
    """The same over the main graph and every local function of `model` (in place)."""
    return constant_loop_conditions(model.graph.node) + sum(
        constant_loop_conditions(function.node) for function in model.functions)
