"""A small pass manager: runs FX passes in order and keeps what each one matched and changed.

A pass is a callable `(graph_module, context) -> list[dict]`; each dict is one record (usually one
per layer) that `kvcompile inspect` prints as a table row. Passes mutate the graph in place and
leave shared facts (e.g. the attention sites) in `context`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch.fx

PassFn = Callable[[torch.fx.GraphModule, Dict[str, Any]], List[dict]]


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


class PassManager:
    def __init__(self, passes: List[PassFn]):
        self.passes = passes

    def run(self, graph_module: torch.fx.GraphModule, context: Dict[str, Any]) -> PassReport:
        report = PassReport()
        for pass_fn in self.passes:
            rows = pass_fn(graph_module, context)
            graph_module.graph.lint()
            graph_module.recompile()
            doc = (pass_fn.__doc__ or "").strip().splitlines()[0] if pass_fn.__doc__ else ""
            name = getattr(pass_fn, "pass_name", pass_fn.__name__)
            report.passes.append(PassRecord(name, doc, rows))
        return report
