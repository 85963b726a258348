"""The `kvcompile` ONNX domain: what every op's ONNX function shares.

Each op is exported as ONE node `kvcompile::<op name>` whose model-local function body,
written with standard ONNX ops in the op's own `onnx_function.py`, defines what it computes.
Stock ONNX Runtime inlines the body and runs it; TensorRT's parser maps a node of that name
to a registered plugin when one exists and otherwise inlines the same body. So the body is
the contract a plugin must match, and the tests check it against the torch ops numerically.

Shapes used by the attention bodies (D = head dim, G = Hq // Hkv query heads per KV head,
S = P + T): query [B, Hq, T, D]; key, value [B, Hkv, T, D]; key_cache [B, Hkv, P, D];
attn_bias [B, 1, T, S] additive; out [B, Hq, T, D]. Bodies group query heads as
[B, Hkv, G, T, D] so GQA needs no repeat of K/V.
"""
from __future__ import annotations

from typing import Sequence, TypeVar, Union

import onnx
from onnxscript import BFLOAT16, FLOAT, FLOAT16
from onnxscript import opset18 as op
from onnxscript import script
from onnxscript.values import Op, Opset

DOMAIN = "kvcompile"
DOMAIN_VERSION = 1
STANDARD_OPSET = 18  # must equal the ai.onnx opset of the graphs these functions live in
kvcompile_opset = Opset(DOMAIN, DOMAIN_VERSION)

# Type annotations are what torch.onnx reads to know each function's inputs and outputs.
TFloat = TypeVar("TFloat", bound=Union[FLOAT, FLOAT16, BFLOAT16])
TBias = TypeVar("TBias", bound=Union[FLOAT, FLOAT16, BFLOAT16])


# A layer without sinks carries this one "sink" logit: exp(-inf - max) is exactly 0 (also for a
# fully hidden row, whose max is the finite mask value), so the
# extra softmax column changes nothing (and the body needs no branch).
NO_SINK = float("-inf")


@script(kvcompile_opset, default_opset=op)
def attention_probs(query: TFloat, keys: TFloat, attn_bias: TBias, scale: float, softcap: float,
                    sinks: Sequence[float]) -> TFloat:
    """softmax([capped(q·keysᵀ·scale) + bias, sink]) without the sink column, query heads grouped
    per KV head (kvcompile/ops/attention_math.py). softcap 0 = none; sinks: one logit per query
    head, or [NO_SINK].

    query [B, Hq, T, D], keys [B, Hkv, S, D], attn_bias [B, 1, T, S] -> [B, Hkv, G, T, S]
    """
    grouped_shape = op.Concat(op.Shape(keys, start=0, end=2), op.Constant(value_ints=[-1]),
                              op.Shape(query, start=2, end=4), axis=0)
    grouped_query = op.Reshape(query, grouped_shape)  # [B, Hkv, G, T, D]
    keys_t = op.Unsqueeze(op.Transpose(keys, perm=[0, 1, 3, 2]), op.Constant(value_ints=[2]))  # [B, Hkv, 1, D, S]
    scale_value = op.CastLike(op.Constant(value_float=scale), query)
    scores = op.Mul(op.MatMul(grouped_query, keys_t), scale_value)  # [B, Hkv, G, T, S]
    cap = op.CastLike(op.Constant(value_float=softcap), scores)
    zero = op.CastLike(op.Constant(value_float=0.0), scores)
    one = op.CastLike(op.Constant(value_float=1.0), scores)
    capping = op.Greater(cap, zero)
    safe_cap = op.Where(capping, cap, one)  # Where evaluates both branches: no division by 0
    scores = op.Where(capping, op.Mul(op.Tanh(op.Div(scores, safe_cap)), safe_cap), scores)
    bias = op.Unsqueeze(op.CastLike(attn_bias, query), op.Constant(value_ints=[1]))  # [B, 1, 1, T, S]
    logits = op.Add(scores, bias)
    # sink logits [Hq] (or one value for all) -> [B, Hkv, G, T, 1], appended as a last column
    heads = op.Shape(query, start=1, end=2)
    sink = op.Expand(op.CastLike(op.Constant(value_floats=sinks), logits), heads)
    sink = op.Reshape(sink, op.Concat(op.Constant(value_ints=[1]), op.Shape(keys, start=1, end=2),
                                      op.Constant(value_ints=[-1, 1, 1]), axis=0))
    sink = op.Expand(sink, op.Concat(op.Shape(logits, start=0, end=4), op.Constant(value_ints=[1]), axis=0))
    probs = op.Softmax(op.Concat(logits, sink, axis=-1), axis=-1)
    return op.Slice(probs, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]), op.Constant(value_ints=[4]))


# The exporter inlines every function it knows about when it converts opset versions, so
# the graph is built with bare kvcompile nodes (these schemas exist only to let onnxscript
# record such a node, they are never registered with onnx) and `function_protos` attaches
# the bodies afterwards.
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_ATTRIBUTE_KINDS = {"float": onnx.defs.OpSchema.AttrType.FLOAT, "int": onnx.defs.OpSchema.AttrType.INT,
                    "floats": onnx.defs.OpSchema.AttrType.FLOATS}


def _attention_attribute_docs():
    from kvcompile.ops.registry import NodeAttribute

    return (NodeAttribute("softcap", "float", "0 = none, else scores become softcap * tanh(scores / softcap)"),
            NodeAttribute("sinks", "floats", f"one sink logit per query head, joining the softmax's denominator; "
                                             f"[{NO_SINK:g}] = no sinks"))


ATTENTION_ATTRIBUTES = _attention_attribute_docs()


def attention_attributes(softcap: float = 0.0, sinks=None) -> dict:
    """The softcap / sinks node attributes every attention op carries (see attention_probs)."""
    return {"softcap": float(softcap), "sinks": [float(x) for x in sinks] if sinks is not None else [NO_SINK]}


def node_op(name: str, definition) -> Op:
    """An onnxscript Op that records a bare `kvcompile::<name>` node (an OnnxDefinition's)."""
    def formal(param):
        return onnx.defs.OpSchema.FormalParameter(param, "TBias" if param in definition.bias_inputs else "T")

    schema = onnx.defs.OpSchema(
        name, DOMAIN, DOMAIN_VERSION,
        inputs=[formal(param) for param in definition.inputs],
        outputs=[formal(definition.output)],
        type_constraints=[("T", _FLOAT_TYPES, "activations"), ("TBias", _FLOAT_TYPES, "additive bias")],
        attributes=[onnx.defs.OpSchema.Attribute(a.name, _ATTRIBUTE_KINDS[a.kind], a.doc, required=True)
                    for a in definition.attributes],
    )
    return Op(kvcompile_opset, name, schema)


def function_protos(op_names) -> list:
    """The FunctionProtos that nodes of the given registered ops need, one per op, each
    self-contained and ready for TensorRT's parser.

    An op's body is named after the op (the node `kvcompile::<name>` resolves to it whatever
    the Python function is called). Helper functions the body calls (`OnnxDefinition.helpers`)
    are inlined into it rather than shipped beside it: TensorRT's parser imports a function
    called from inside another function badly, so no body we emit calls another local function.
    Each body then gets the same TensorRT preparation as the graphs (kvcompile/export):
    counted Loops' condition outputs as Constants, and its literal shape arithmetic folded.
    """
    from kvcompile.export.onnx_constant_fold import fold_function
    from kvcompile.export.onnx_loop_condition import constant_loop_conditions
    from kvcompile.ops import registry

    protos = []
    for name in dict.fromkeys(op_names):  # deduplicated, in order
        definition = registry.get(name).onnx_definition()
        body = definition.body.to_function_proto()
        body.name = name
        if definition.helpers:
            body = _with_helpers_inlined(body, [helper.to_function_proto() for helper in definition.helpers])
        constant_loop_conditions(body.node)
        fold_function(body, STANDARD_OPSET)
        protos.append(body)
    return protos


def _with_helpers_inlined(body, helpers) -> "onnx.FunctionProto":
    """`body` with every call of a `helpers` function replaced by that function's nodes
    (onnx.inliner renames the helper's values uniquely and substitutes attribute references)."""
    import onnx.inliner

    holder = onnx.helper.make_model(
        onnx.helper.make_graph([], "holder", [], []), functions=[body, *helpers],
        opset_imports=[onnx.helper.make_opsetid("", STANDARD_OPSET), onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    inlined = onnx.inliner.inline_selected_functions(holder, [(h.domain, h.name) for h in helpers], exclude=False)
    return next(f for f in inlined.functions if f.domain == body.domain and f.name == body.name)


def node_attribute_docs() -> dict:
    """op name -> {attribute: "kind: doc"} for every registered op (recorded in manifests)."""
    from kvcompile.ops import registry

    return {entry.name: {a.name: f"{a.kind}: {a.doc}" for a in entry.onnx_definition().attributes}
            for entry in registry.registered() if entry.exportable}


# TensorRT: the node attributes its ONNX parser reads to map a node to a registered plugin
# (op type = plugin name). Naming the namespace explicitly makes parsers that would otherwise
# inline the node's local function pick the plugin (docs/TENSORRT.md); the local function stays
# attached, so ONNX Runtime and plugin-less TensorRT builds still run the body.
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")


def name_plugins(model, op_names) -> list:
    """Give every node of `op_names` (in the main graph) plugin_namespace = DOMAIN and
    plugin_version = DOMAIN_VERSION; returns the op names that were named."""
    named = set()
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in op_names:
            kept = [a for a in node.attribute if a.name not in PLUGIN_ATTRIBUTES]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("plugin_namespace", DOMAIN),
                                          onnx.helper.make_attribute("plugin_version", str(DOMAIN_VERSION))])
            named.add(node.op_type)
    return sorted(named)
