"""The op registry: every kvcompile custom op, with everything that defines it, in one entry.

An op lives in one folder, `kvcompile/ops/<name>/`:
  definition.py     the torch custom op (its semantics) and its fake kernel
  onnx_function.py  the ONNX local-function body, the node's inputs and attributes
  kernels.py        (if any) the device dispatch to the kernel library and its C symbols
and its `__init__.py` builds an OpEntry. `kvcompile/ops/__init__.py` registers the entries, one
line per op. The ONNX exporter, the kernel loader, `inspect` and the TensorRT plugin generator
iterate over `registered()` and know no op by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union


@dataclass(frozen=True)
class NodeAttribute:
    """One attribute of the op's ONNX node (plain numbers only: TensorRT has no string tensors)."""

    name: str
    kind: str  # "float" | "int" | "floats"
    doc: str


@dataclass(frozen=True)
class OnnxDefinition:
    """How the op appears in an ONNX graph: one node in domain `kvcompile` with a function body.

    inputs:      the node's tensor inputs, in the torch op's argument order
    attributes:  the node's attributes; `node_attributes(*rest, context=...)` maps the torch
                 op's remaining (non-tensor) arguments to their values
    body:        the onnxscript function that defines the node; `helpers` are the functions it
                 calls, which the graph must carry too
    """

    inputs: Tuple[str, ...]
    attributes: Tuple[NodeAttribute, ...]
    node_attributes: Callable[..., Dict[str, Any]]
    body: Any
    helpers: Tuple[Any, ...] = ()
    output: str = "output"
    bias_inputs: Tuple[str, ...] = ("attn_bias",)  # typed separately: may differ from activations


@dataclass(frozen=True)
class KernelSymbol:
    """A C function of the kernel library (plugins/csrc) and its ctypes signature."""

    name: str
    restype: Any
    argtypes: Tuple[Any, ...]


@dataclass(frozen=True)
class OpEntry:
    name: str  # torch.ops.kvcompile.<name> and ONNX node kvcompile::<name>
    torch_op: Any  # the OpOverload the passes insert
    # Where its OnnxDefinition comes from, loaded on first export (onnxscript is a heavy import):
    # a module path whose DEFINITION it is, or a function returning one.
    # None: a trace-time op that the passes always replace, so no target ever exports it.
    onnx: Union[str, Callable[[], OnnxDefinition], None]
    kernel_symbols: Tuple[KernelSymbol, ...] = ()
    summary: str = ""

    @property
    def exportable(self) -> bool:
        return self.onnx is not None

    @classmethod
    def of_folder(cls, package: str, summary: str, kernels: bool = False, exportable: bool = True) -> "OpEntry":
        """The entry of the op in folder `package` (kvcompile/ops/<name>/), by convention: the op is
        torch.ops.kvcompile.<name>, its ONNX definition `<package>.onnx_function.DEFINITION`, its
        kernel symbols `<package>.kernels.SYMBOLS` (when `kernels`)."""
        import torch

        name = package.rsplit(".", 1)[-1]
        symbols = tuple(import_module(f"{package}.kernels").SYMBOLS) if kernels else ()
        return cls(name=name, torch_op=getattr(torch.ops.kvcompile, name).default,
                   onnx=f"{package}.onnx_function" if exportable else None, kernel_symbols=symbols, summary=summary)

    def onnx_definition(self) -> OnnxDefinition:
        if not self.exportable:
            raise ValueError(f"kvcompile::{self.name} is a trace-time op and has no ONNX definition")
        if self.name not in _onnx_cache:
            load = self.onnx
            _onnx_cache[self.name] = import_module(load).DEFINITION if isinstance(load, str) else load()
        return _onnx_cache[self.name]


_registry: Dict[str, OpEntry] = {}
_onnx_cache: Dict[str, OnnxDefinition] = {}


def register(entry: OpEntry) -> OpEntry:
    """Add an op; registering the same name again replaces it (tests register toy ops)."""
    _registry[entry.name] = entry
    _onnx_cache.pop(entry.name, None)
    return entry


def unregister(name: str) -> None:
    _registry.pop(name, None)
    _onnx_cache.pop(name, None)


def registered() -> List[OpEntry]:
    return list(_registry.values())


def get(name: str) -> Optional[OpEntry]:
    return _registry.get(name)


def by_torch_op(target) -> Optional[OpEntry]:
    """The entry whose torch op a graph node calls, if it is a kvcompile op."""
    for entry in _registry.values():
        if target is entry.torch_op:
            return entry
    return None


def kernel_symbols() -> Iterable[KernelSymbol]:
    for entry in _registry.values():
        yield from entry.kernel_symbols
