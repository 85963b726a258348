"""Render a PassReport as tables a newcomer can read: one table per pass, one row per layer."""
from __future__ import annotations

from rich.table import Table

from kvcompile.passes.manager import PassReport


def print_report(console, report: PassReport, title: str) -> None:
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
