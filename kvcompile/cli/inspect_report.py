"""Render a PassReport as tables a newcomer can read: one table per pass, one row per layer."""
from __future__ import annotations

from rich.table import Table

from kvcompile.passes.manager import PassReport


def print_signature(console, spec) -> None:
    """The compiled graph's inputs and outputs (the I/O layout), and each layer's record."""
    console.print("\n[bold cyan]layers[/bold cyan] — each layer's attention record")
    print_rows(console, [record.describe() for record in spec.layers])
    console.print("\n[bold cyan]graph signature[/bold cyan] — what a runtime feeds and receives each step")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("name", "shape", "lives on", "role"):
        table.add_column(column)
    for slot in spec.inputs():
        table.add_row(slot.name, slot.shape_text(), slot.memory, slot.role)
    for slot in spec.outputs():
        table.add_row(f"→ {slot.name}", slot.shape_text(), slot.memory, slot.role)
    console.print(table)
    console.print(f"B batch, T new tokens, P cached tokens; Hkv={spec.kv_heads}, D={spec.head_dim}, "
                  f"V={spec.vocab_size}, {spec.num_layers} layers, {spec.dtype}")
    print_ops(console)


def print_ops(console) -> None:
    """The registered kvcompile ops (what an ONNX graph's custom nodes and TensorRT plugins are)."""
    from kvcompile.ops import registry

    console.print("\n[bold cyan]kvcompile ops[/bold cyan] — registered custom ops")
    print_rows(console, [{"op": f"kvcompile::{e.name}", "what": e.summary,
                          "kernel symbols": ", ".join(s.name for s in e.kernel_symbols) or "-"}
                         for e in registry.registered()])


def print_rows(console, rows) -> None:
    table = Table(show_lines=False, box=None, pad_edge=False, header_style="bold")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(column, "")) for column in columns))
    console.print(table)


def print_report(console, report: PassReport, title: str, spec=None) -> None:
    console.print(f"[bold]{title}[/bold]")
    for record in report.passes:
        rows = record.rows
        console.print(f"\n[bold cyan]{record.name}[/bold cyan] — {record.doc}")
        if not rows:
            console.print("  nothing matched")
            continue
        print_rows(console, rows)
    if spec is not None:
        print_signature(console, spec)
