"""Rich tables that show every figure whole: on a terminal, in a log file and through a pipe.

Rich sizes a console that is not a terminal from COLUMNS, else 80 columns, and cuts a cell that
does not fit to "…". Study output mostly goes to files (sbatch's output, `| tee`, CI logs, a
notebook's captured cell), where there is no screen to fit, so there a console takes the width
its table measures. A terminal keeps its own width, and a cell too wide for it folds onto a second
line (print_table sets every column's overflow to "fold"), so no figure is cut short anywhere.
"""
from __future__ import annotations

import shutil
import sys
from typing import Any, Optional, TextIO


def console_for(file: Optional[TextIO] = None, min_width: int = 0):
    """Return a rich Console writing to `file` (stdout by default), at least `min_width` wide."""
    from rich.console import Console

    out = file or sys.stdout
    width = shutil.get_terminal_size((160, 24)).columns
    return Console(file=out, width=max(width, min_width))


def print_table(console: Any, table: Any) -> None:
    """Print `table`, folding any cell too wide for a terminal; a console that writes to a file or a
    pipe is first widened to the table's full width."""
    from rich.measure import Measurement

    for column in table.columns:
        column.overflow = "fold"
    if not getattr(console.file, "isatty", lambda: False)():
        wide = console.options.update_width(10_000)
        console.width = max(console.width, Measurement.get(console, wide, table).maximum)
    console.print(table)
