"""Render a PassReport as tables a newcomer can read: one table per pass, one row per layer."""
from __future__ import annotations

from rich.table import Table

from kvcompile.passes.manager import PassReport


def print_signature(console, spec) -> None:
    """The compiled graph's inputs and outputs, with the cache layout of each layer."""
    console.print("\n[bold cyan]graph signature[/bold cyan] — what a runtime feeds and receives each step")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("name", "shape", "lives on"):
        table.add_column(column)
    table.add_row("input_ids, position_ids", "[B, T]", "device")
    table.add_row("attn_bias", "[B, 1, T, P+T]", "device (causal + padding mask, built by the runtime)")
    for layer, kind in enumerate(spec.layer_kinds):
        table.add_row(f"past_key.{layer}", "[B, Hkv, P, D]", "device")
        table.add_row(f"past_value.{layer}", f"[{spec.value_layout(layer).replace(',', ', ')}]",
                      "host memory (kcache)" if kind == "kcache" else "device")
    table.add_row("→ logits", "[B, T, V]", "")
    table.add_row("→ new_key.i, new_value.i", "[B, Hkv, T, D]", "appended to the cache by the runtime")
    console.print(table)
    console.print(f"B batch, T new tokens, P cached tokens; Hkv={spec.kv_heads}, D={spec.head_dim}, "
                  f"V={spec.vocab_size}, {spec.num_layers} layers, {spec.dtype}")


def print_report(console, report: PassReport, title: str, spec=None) -> None:
    console.print(f"[bold]{title}[/bold]")
    for record in report.passes:
        rows = record.rows
        console.print(f"\n[bold cyan]{record.name}[/bold cyan] — {record.doc}")
        if not rows:
            console.print("  nothing matched")
            continue
        table = Table(show_lines=False, box=None, pad_edge=False, header_style="bold")
        columns = list(dict.fromkeys(key for row in rows for key in row))
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row.get(column, "")) for column in columns))
        console.print(table)
    if spec is not None:
        print_signature(console, spec)
