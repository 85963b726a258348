"""A small pass manager: runs FX passes in order and keeps what each one matched and changed.

A pass is a function `(graph_module, context: PassContext) -> list[dict]` made a CompilerPass
by the `compiler_pass` decorator, which names what it reads and writes in the context. Each
returned dict is one record (usually one per layer) that `kvcompile inspect` prints as a row.
Passes mutate the graph in place and leave shared facts in the context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Sequence, Tuple

import torch.fx

from kvcompile.passes.context import PassContext


class PipelineError(RuntimeError):
    """Passes in an order where one reads what no earlier pass produced."""


@dataclass(frozen=True)
class CompilerPass:
    name: str
    run: Callable[[torch.fx.GraphModule, PassContext], List[dict]]
    requires: Tuple[str, ...] = ()
    produces: Tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        text = (self.run.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""

    def __call__(self, graph_module, context):
        return self.run(graph_module, context)


def compiler_pass(requires: Sequence[str] = (), produces: Sequence[str] = ()):
    """Make a function a CompilerPass named after it, with its context reads and writes."""
    unknown = (set(requires) | set(produces)) - PassContext.products()
    if unknown:
        raise PipelineError(f"not PassContext products: {sorted(unknown)}")

    def wrap(function) -> CompilerPass:
        return CompilerPass(function.__name__, function, tuple(requires), tuple(produces))
    return wrap


@dataclass
class PassRecord:
    name: str
    doc: str
    rows: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "doc": self.doc, "rows": self.rows}


@dataclass
class PassReport:
    passes: List[PassRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passes": [p.to_dict() for p in self.passes]}

    @classmethod
    def from_dict(cls, data: dict) -> "PassReport":
        return cls([PassRecord(p["name"], p.get("doc", ""), p.get("rows", [])) for p in data.get("passes", [])])


def check_order(passes: Sequence[CompilerPass]) -> None:
    available: set = set()
    for compiler_pass_ in passes:
        missing = set(compiler_pass_.requires) - available
        if missing:
            raise PipelineError(f"pass {compiler_pass_.name} needs {sorted(missing)}, which no earlier pass produces")
        available |= set(compiler_pass_.produces)


class PassManager:
    def __init__(self, passes: Sequence[CompilerPass]):
        check_order(passes)
        self.passes = list(passes)

    def run(self, graph_module: torch.fx.GraphModule, context: PassContext) -> PassReport:
        report = PassReport()
        for compiler_pass_ in self.passes:
            rows = compiler_pass_(graph_module, context)
            graph_module.graph.lint()
            graph_module.recompile()
            report.passes.append(PassRecord(compiler_pass_.name, compiler_pass_.doc, rows))
        return report
