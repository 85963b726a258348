"""ONNX target: a compiled graph -> `prefill.onnx`, `decode.onnx` and `manifest.json`.

The compiled graph is traced ONCE by torch.onnx (dynamo) with dynamic batch, new-token and
past-token axes. Because the graph is functional over an explicit cache, that one trace already
is both programs: prefill (T ≥ 1, P ≥ 0, P = 0 for a fresh prompt) and decode (T = 1). So
`decode.onnx` is the same graph with the new-token axis fixed to 1 rather than a second trace:
the two cannot drift apart, export takes half the time, and ONNX Runtime still gets a static
T for decode. Both files share one external weight file when weights are large.

kvcompile ops become single nodes in domain `kvcompile` carrying model-local function bodies:
every op in the registry (kvcompile/ops/registry.py) brings its own (`onnx_function.py` in its
folder); nothing here knows an op by name. torch.onnx inlines every function it knows about
when it converts opsets, so the nodes are recorded bare and the bodies attached after export.
"""
from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import onnx
import torch
from torch.export import Dim

import kvcompile
import kvcompile.ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from kvcompile.core.config import topn_ratio
from kvcompile.core.layout import GraphSpec
from kvcompile.export.example_inputs import example_inputs
from kvcompile.export.manifest import check_writable_parent, compiled_fields, write_artifact
from kvcompile.export.onnx_constant_fold import fold_main_graph
from kvcompile.export.onnx_loop_condition import constant_loop_conditions
from kvcompile.ops import onnx_domain, registry
from kvcompile.frontend.text_tokenizer import copy_tokenizer_files
from kvcompile.errors import OnnxExportError  # noqa: F401  (raised here)

PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE = "prefill.onnx", "decode.onnx", "weights.data"
CHECK_FILE, CHECK_WEIGHTS_FILE = "check.onnx", "check.data"  # fusion's check graph (export --fuse)
RESTORE_FILE = "restore.onnx"  # a compressed context decoded into the cache (export --codec)
# Above this many bytes of weights the graphs reference one shared external file. Protobuf
# cannot hold more than 2 GB, so anything near that must be external; below it a single
# self-contained file is handier.
EXTERNAL_DATA_THRESHOLD = 256 << 20
_PROTOBUF_SAFE_BYTES = 1 << 30  # embedding more than this risks protobuf's 2 GB ceiling




# torch op -> kvcompile node --------------------------------------------------------------------
@dataclass(frozen=True)
class ExportContext:
    """What a registered op's `node_attributes` may need beyond its own arguments."""

    topn_fraction: Optional[Fraction] = None  # a fractional kcache topn, which the graph computes


def export_context(cache_config: Optional[dict]) -> ExportContext:
    kcache = (cache_config or {}).get("kcache", cache_config or {})
    topn = kcache.get("topn")
    return ExportContext(topn_fraction=topn_ratio(topn) if isinstance(topn, float) else None)


def node_translation(entry, context: ExportContext):
    """torch op call -> one bare `kvcompile::<name>` node: the first len(inputs) arguments are
    the node's tensor inputs, the rest become its attributes through the op's node_attributes."""
    definition = entry.onnx_definition()
    node = onnx_domain.node_op(entry.name, definition)
    count = len(definition.inputs)

    def translate(*args):
        attributes = definition.node_attributes(*args[count:], context=context)
        return node(*args[:count], **attributes)
    return translate


def translation_table(cache_config: Optional[dict] = None) -> dict:
    context = export_context(cache_config)
    return {entry.torch_op: node_translation(entry, context) for entry in registry.registered()
            if entry.exportable}


# I/O contract ----------------------------------------------------------------------------------
def io_axes(spec: GraphSpec) -> tuple[dict, dict]:
    """Axis names (str = dynamic, int = fixed) of every graph input and output."""
    return ({slot.name: list(slot.axes) for slot in spec.inputs()},
            {slot.name: list(slot.axes) for slot in spec.outputs()})


def dynamic_shapes(module: torch.nn.Module, spec: GraphSpec):
    """torch.export dynamic_shapes for the flat signature (nested if forward takes *past).

    Every named axis is Dim.AUTO: the traced model already carries its own bounds (e.g. batch
    ≤ 1024 from kvcompile.frontend.trace) and context = past + tokens is a relation torch.export
    cannot state with Dims. `finish_graph` then checks that no axis was specialised.
    """
    in_axes, _ = io_axes(spec)
    shapes = [{i: Dim.AUTO for i, a in enumerate(axes) if isinstance(a, str)} for axes in in_axes.values()]
    params = list(inspect.signature(module.forward).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        fixed = sum(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)
        return tuple(shapes[:fixed]) + (tuple(shapes[fixed:]),)
    return tuple(shapes)


# post-processing of the traced graph -----------------------------------------------------------
def _set_axes(value_info: onnx.ValueInfoProto, axes: list) -> None:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) != len(axes):
        raise OnnxExportError(f"{value_info.name}: graph has rank {len(dims)}, contract says {axes}")
    for dim, axis in zip(dims, axes):
        if isinstance(axis, str) and dim.HasField("dim_value"):
            raise OnnxExportError(f"{value_info.name}: axis {axis!r} was specialised to {dim.dim_value} by tracing; "
                                  "the graph would only run at that size")
        dim.Clear()
        if isinstance(axis, str):
            dim.dim_param = axis
        else:
            dim.dim_value = axis


def check_outputs(spec: GraphSpec, layer: int) -> dict:
    """Output axes of the check graph: K/V of layers 0..layer and that layer's queries."""
    _, out_axes = io_axes(spec)
    outputs = {name: axes for name, axes in out_axes.items()
               if name.startswith("new_") and int(name.rsplit(".", 1)[1]) <= layer}
    outputs["check_query"] = ["batch", spec.query_heads, "tokens", spec.head_dim]
    return outputs


def finish_graph(model: onnx.ModelProto, spec: GraphSpec, fixed_tokens: Optional[int],
                 out_axes: Optional[dict] = None) -> onnx.ModelProto:
    """Name the I/O axes, attach kvcompile function bodies, re-run strict shape inference."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy: called once per graph
    in_axes, spec_out_axes = io_axes(spec)
    out_axes = out_axes or spec_out_axes
    fix = (lambda axes: [fixed_tokens if a == "tokens" else a for a in axes]) if fixed_tokens else (lambda a: a)
    for value_info in model.graph.input:
        _set_axes(value_info, fix(in_axes[value_info.name]))
    for value_info in model.graph.output:
        _set_axes(value_info, fix(out_axes[value_info.name]))
    # Intermediate shapes carry torch's symbol names (s0, s1 ...): recompute them from the I/O.
    del model.graph.value_info[:]
    # torch.onnx records a Python stack trace per node: most of the graph's bytes, and paths of
    # the exporting machine. Not part of the artifact.
    for node in model.graph.node:
        del node.metadata_props[:]
    used = sorted({node.op_type for node in model.graph.node if node.domain == onnx_domain.DOMAIN})
    unknown = [name for name in used if registry.get(name) is None or not registry.get(name).exportable]
    if unknown:
        raise OnnxExportError(f"graph has kvcompile nodes without an ONNX function: {unknown}")
    del model.functions[:]
    model.functions.extend(onnx_domain.function_protos(used))
    if not any(o.domain == onnx_domain.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(onnx_domain.DOMAIN, onnx_domain.DOMAIN_VERSION))
    prepare_for_parsers(model)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def prepare_for_parsers(model: onnx.ModelProto) -> onnx.ModelProto:
    """What every saved graph gets (ONNX-target graphs are fed to TensorRT too): shape arithmetic
    folded into Constants and counted Loops' conditions made Constants, the two things
    TensorRT's ONNX parser refused in our graphs (onnx_constant_fold.py, onnx_loop_condition.py).
    The main graph only: the local functions come from onnx_domain.function_protos, which
    prepares each body the same way."""
    constant_loop_conditions(model.graph.node)
    return fold_main_graph(model)


def _externalise(model: onnx.ModelProto, weights_file: str = WEIGHTS_FILE) -> None:
    """Point every initializer at the shared weights file (its data was written beside it)."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = weights_file


def _summary(err: Exception) -> str:
    """torch.onnx's errors open with generic advice; the cause is under 'Exception summary'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        return " ".join(after[:2]) if after else type(err).__name__
    return lines[0] if lines else type(err).__name__


def trace_to_onnx(module: torch.nn.Module, spec: GraphSpec, work_dir: Path,
                  cache_config: Optional[dict] = None, output_names=None,
                  weights_file: str = WEIGHTS_FILE) -> tuple[onnx.ModelProto, int]:
    """torch.onnx (dynamo) export of the flat graph; returns (model without weight data, weight bytes)."""
    try:
        # ExportedProgram.module() comes back in training mode and refuses .eval(); its graph
        # is already the inference graph, so torch.onnx's warning about it is noise.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(
                module, example_inputs(spec), dynamo=True, optimize=False,
                opset_version=onnx_domain.STANDARD_OPSET,
                dynamic_shapes=dynamic_shapes(module, spec),
                input_names=spec.input_names, output_names=output_names or spec.output_names,
                custom_translation_table=translation_table(cache_config), verbose=False)
    except Exception as err:  # torch.onnx raises many types; one line for the user, cause chained
        raise OnnxExportError(f"torch.onnx could not export the compiled graph: {_summary(err)}") from err
    weight_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                       if v.const_value is not None)
    # Saving through torch.onnx streams weights to disk; the proto we keep stays small.
    traced = work_dir / "traced.onnx"
    program.save(str(traced), external_data=True)
    model = onnx.load(str(traced), load_external_data=False)
    data_file = work_dir / "traced.onnx.data"
    if data_file.exists():
        data_file.rename(work_dir / weights_file)
        _externalise(model, weights_file)
    traced.unlink()
    return model, weight_bytes


def check_graph(path: Path) -> None:
    """onnx.checker (full check, which includes strict shape inference) on a saved graph."""
    onnx.checker.check_model(str(path), full_check=True)


def _save(model: onnx.ModelProto, path: Path, embed_weights: bool) -> None:
    if embed_weights:
        onnx.load_external_data_for_model(model, str(path.parent))
    onnx.save_model(model, str(path))


def export_onnx(
    compiled,
    out_dir,
    *,
    model_config=None,
    cache_config=None,
    source_dir: Optional[Path] = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    check: bool = True,
    fuse_check_layer: Optional[int] = None,
) -> Path:
    """Export a CompiledModel (anything with `.graph_module` and `.spec`) as an ONNX artifact.

    Writes DIR/prefill.onnx, DIR/decode.onnx, [DIR/weights.data], [DIR/tokenizer/] and
    DIR/manifest.json atomically; returns DIR. With `fuse_check_layer` L also DIR/check.onnx
    [+ check.data]: the graph cut after layer L that KV fusion's check pass runs. model_config / cache_config default to the
    compiled model's own; tokenizer files are copied from `source_dir` when it has them.
    """
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)  # before minutes of tracing, not after
    spec: GraphSpec = compiled.spec
    module = compiled.graph_module
    shared = compiled_fields(compiled, "onnx", model_config, cache_config)
    cache_config = shared["cache_config"]

    def fill(folder: Path) -> dict:
        started = time.perf_counter()
        traced, weight_bytes = trace_to_onnx(module, spec, folder, cache_config)
        embed = weight_bytes <= min(external_data_threshold, _PROTOBUF_SAFE_BYTES)
        graphs = {PREFILL_FILE: finish_graph(traced, spec, fixed_tokens=None),
                  DECODE_FILE: finish_graph(traced, spec, fixed_tokens=1)}
        for name, model in graphs.items():
            _save(model, folder / name, embed)
        if embed and (folder / WEIGHTS_FILE).exists():
            (folder / WEIGHTS_FILE).unlink()
        if check:
            for name in graphs:
                check_graph(folder / name)
        fields = onnx_fields(graphs[PREFILL_FILE], weights=None if embed else WEIGHTS_FILE,
                             export_seconds=round(time.perf_counter() - started, 2))
        if fuse_check_layer is not None:
            fields["graphs"]["check"] = export_check_graph(module, spec, folder, cache_config, fuse_check_layer,
                                                           external_data_threshold, check)
        if shared.get("codec"):
            fields["graphs"]["restore"] = export_restore_graph(spec, folder, shared["codec"], check)
        has_tokenizer = copy_tokenizer_files(source_dir, folder / "tokenizer")
        return {**shared, **fields, "tokenizer": "tokenizer" if has_tokenizer else None}

    return write_artifact(out_dir, fill)


def export_check_graph(module, spec: GraphSpec, folder: Path, cache_config, layer: int,
                       external_data_threshold: int, check: bool) -> dict:
    """check.onnx: the compiled graph cut after `layer` (passes/check_layer_graph.py)."""
    from kvcompile.fusion.blend import uses_learned_positions
    from kvcompile.passes.check_layer_graph import check_layer_graph

    outputs = check_outputs(spec, layer)
    cut = check_layer_graph(module, layer)
    traced, weight_bytes = trace_to_onnx(cut, spec, folder, cache_config, output_names=list(outputs),
                                         weights_file=CHECK_WEIGHTS_FILE)
    embed = weight_bytes <= min(external_data_threshold, _PROTOBUF_SAFE_BYTES)
    _save(finish_graph(traced, spec, fixed_tokens=None, out_axes=outputs), folder / CHECK_FILE, embed)
    if embed and (folder / CHECK_WEIGHTS_FILE).exists():
        (folder / CHECK_WEIGHTS_FILE).unlink()
    if check:
        check_graph(folder / CHECK_FILE)
    return {"file": CHECK_FILE, "layer": layer, "outputs": list(outputs),
            "learned_positions": uses_learned_positions(module)}


def export_restore_graph(spec: GraphSpec, folder: Path, codec: dict, check: bool) -> dict:
    """restore.onnx: whole chunks of a codec bitstream decoded into the cache tensors
    (passes/restore_from_codec.py), the kv_decode node carrying its function body."""
    from kvcompile.passes.restore_from_codec import output_names, restore_graph

    level, chunk_tokens = int(codec["level"]), int(codec["chunk_tokens"])
    graph = restore_graph(spec, level, chunk_tokens)
    example = (torch.zeros(64, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, example, dynamo=True, optimize=False,
                                        opset_version=onnx_domain.STANDARD_OPSET,
                                        dynamic_shapes=({0: Dim.AUTO}, {0: Dim.AUTO}),
                                        input_names=["data", "chunk_offsets"], output_names=output_names(spec),
                                        custom_translation_table=translation_table(None), verbose=False)
    except Exception as err:
        raise OnnxExportError(f"torch.onnx could not export the restore graph: {_summary(err)}") from err
    model = program.model_proto
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.functions[:]
    model.functions.extend(onnx_domain.function_protos(["kv_decode"]))
    if not any(o.domain == onnx_domain.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(onnx_domain.DOMAIN, onnx_domain.DOMAIN_VERSION))
    prepare_for_parsers(model)
    onnx.save_model(model, str(folder / RESTORE_FILE))
    if check:
        check_graph(folder / RESTORE_FILE)
    return {"file": RESTORE_FILE, "level": level, "chunk_tokens": chunk_tokens,
            "inputs": ["data", "chunk_offsets"], "outputs": output_names(spec)}


def onnx_fields(model: onnx.ModelProto, weights: Optional[str], export_seconds: float) -> dict:
    """The manifest fields only an ONNX artifact has (the shared ones: manifest.compiled_fields)."""
    return {
        "graphs": {
            "prefill": {"file": PREFILL_FILE, "tokens": "dynamic ≥ 1", "past": "dynamic ≥ 0"},
            "decode": {"file": DECODE_FILE, "tokens": 1, "past": "dynamic ≥ 0"},
        },
        "weights_file": weights,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "kvcompile_nodes": sorted({n.op_type for n in model.graph.node if n.domain == onnx_domain.DOMAIN}),
        "kvcompile_domain": {"domain": onnx_domain.DOMAIN, "version": onnx_domain.DOMAIN_VERSION,
                             "node_attributes": onnx_domain.node_attribute_docs()},
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "kvcompile": kvcompile.__version__,
                     "export_seconds": export_seconds},
    }
