"""Tables on the terminal for the CLI commands: rich tables while they are small, plain columns past
RICH_TABLE_MAX_ROWS rows.

rich spends about a millisecond a row laying a table out: `plan` at 100 models (1,000 routing rows)
would double what the user waits for past the solve, and `flow` on a 10k-edge graph took 13 s to
print an analysis that takes 10 ms. Plain columns hold the same cells, without colours or markup.
"""

from __future__ import annotations

import re

from rich import box
from rich.console import Console
from rich.table import Table

RICH_TABLE_MAX_ROWS = 60
_MARKUP = re.compile(r"\[/?(?:bold|red)\]")  # the only markup the commands put in cells


def print_table(console: Console, title: str, columns: list[tuple[str, str]], rows: list[list[str]],
                styles: list[str | None] | None = None, table_box: box.Box = box.SIMPLE_HEAVY) -> None:
    """``columns``: (header, justify: left / right / center); ``styles``: a rich style per row and
    ``table_box`` the border (rich tables only)."""
    if len(rows) <= RICH_TABLE_MAX_ROWS:
        table = Table(title=title, box=table_box)
        for col, justify in columns:
            table.add_column(col, justify=justify)
        for i, row in enumerate(rows):
            table.add_row(*row, style=None if styles is None else styles[i])
        console.print(table)
        return
    plain = [[_MARKUP.sub("", c) if "[" in c else c for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in plain]) for i, (h, _) in enumerate(columns)]
    align = {"left": str.ljust, "right": str.rjust, "center": str.center}

    def line(cells) -> str:
        return "  ".join(align[j](c, w) for c, w, (_, j) in zip(cells, widths, columns, strict=True)).rstrip()

    text = [title, line([h for h, _ in columns]), "  ".join("-" * w for w in widths), *map(line, plain)]
    console.print("\n".join(text), markup=False, highlight=False, soft_wrap=True)
